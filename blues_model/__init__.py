"""Blues-01: a pure-PyTorch Mixture-of-Experts decoder language model."""
