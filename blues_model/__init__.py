"""Blues-01: a pure-PyTorch Mixture-of-Experts decoder language model."""

from .attention import KVCache
from .config import BluesConfig, RunOptions, count_parameters, flops_per_token
from .model import BluesLM, BluesOutput

__all__ = ["BluesConfig", "BluesLM", "BluesOutput", "KVCache", "RunOptions", "count_parameters", "flops_per_token"]
