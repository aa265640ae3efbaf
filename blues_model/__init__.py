"""Blues-01: a pure-PyTorch Mixture-of-Experts decoder language model."""

from .attention import KVCache
from .config import BluesConfig, count_parameters, flops_per_token
from .model import BluesLM, BluesOutput

__all__ = ["BluesConfig", "BluesLM", "BluesOutput", "KVCache", "count_parameters", "flops_per_token"]
