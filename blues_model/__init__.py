"""Blues-01: a pure-PyTorch Mixture-of-Experts decoder language model.

Its configuration imports without PyTorch (all a Dagster code server or a reader of a
checkpoint's config needs); the model's classes import it when first asked for.
"""

from importlib import import_module

from .config import BluesConfig, RunOptions, count_parameters, flops_per_token

_MODEL_NAMES = {"KVCache": ".attention", "BluesLM": ".model", "BluesOutput": ".model"}

__all__ = ["BluesConfig", "BluesLM", "BluesOutput", "KVCache", "RunOptions", "count_parameters", "flops_per_token"]


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        return getattr(import_module(_MODEL_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
