"""mt: a command-line trainer for Transformer neural machine translation."""

__version__ = "0.1.0"
