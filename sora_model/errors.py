"""Errors of the model layer (importing this module does not import torch)."""


class ModelLoadError(RuntimeError):
    """A VAE, text encoder or checkpoint that cannot be loaded; says which and what to try."""
