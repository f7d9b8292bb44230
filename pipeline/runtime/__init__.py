"""Cross-cutting machinery shared by every training and inference command."""
