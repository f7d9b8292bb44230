"""Supervised training loops: the effusion/sex classifier on originals (and on any tensors)."""
