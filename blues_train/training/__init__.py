"""Mixture to checkpoints: the training configuration, train, checkpoints, metrics, run folders."""
