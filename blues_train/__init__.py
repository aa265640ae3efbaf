"""The Blues platform library: token store, mixtures, loader, training, generation."""
