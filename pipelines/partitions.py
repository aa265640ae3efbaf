"""Dynamic partitions: datasets, the partitions of `raw_corpus` (added by the raw-corpus
sensor and by each tokenization), and checkpoints (added by `trained_model` for every
checkpoint the training run saved)."""

import dagster as dg

dataset_partitions = dg.DynamicPartitionsDefinition(name="datasets")
checkpoint_partitions = dg.DynamicPartitionsDefinition(name="checkpoints")
