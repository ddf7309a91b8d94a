"""Losses of the medssl methods (context restoration uses torch's MSELoss, its L2 loss)."""
