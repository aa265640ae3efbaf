"""Token stores to training windows: the mixture format, merge, verify, the loader."""
