"""Supervised training loops: the classifier of any task (effusion, sex, ...) on originals (and on any tensors)."""
