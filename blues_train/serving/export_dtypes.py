"""The dtypes of an export's weights, by name: importable without PyTorch (the Dagster
asset's run config offers them in processes that never load a model)."""

DTYPES = ("bfloat16", "float32")
DEFAULT_DTYPE = "bfloat16"
