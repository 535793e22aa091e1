"""Mult-VAE / Mult-DAE shared core: model, item index, ranking, fold-in, model versions."""

__version__ = "0.1.0"
