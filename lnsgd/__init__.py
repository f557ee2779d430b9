"""lnsgd: an experiment runner for label-noise SGD and the flat minima it prefers."""

__version__ = "0.1.0"
