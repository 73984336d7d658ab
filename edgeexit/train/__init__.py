"""Losses (ce, sd, byot, mlcsd), recipes, trainer, checkpoints and evaluation."""
