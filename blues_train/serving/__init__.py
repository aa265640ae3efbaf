"""Checkpoints to answers: generate, export, report, lineage of a trained run."""
