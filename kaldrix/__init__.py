"""kaldrix: the real-time event gateway of the KALDRIX chain."""

__version__ = "0.1.0"

__all__ = ["__version__"]
