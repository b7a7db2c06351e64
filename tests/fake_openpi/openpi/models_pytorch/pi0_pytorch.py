"""Fails like openpi's PyTorch port does next to a transformers it was not written for."""

raise ImportError("stand-in: openpi's PyTorch model needs a specific transformers version")
