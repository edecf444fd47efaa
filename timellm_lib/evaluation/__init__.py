"""Scoring: metrics over windows (used by training's validation), evaluating a checkpoint and
predicting to files (which read checkpoints through ``training.checkpoint``)."""
