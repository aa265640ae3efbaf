"""Raw sources to token stores: tokenizer and encoding engines, spot check, prepare, the store format."""
