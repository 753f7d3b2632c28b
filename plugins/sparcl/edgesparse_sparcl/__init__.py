"""edgesparse-sparcl: SparCL sparse continual learning."""
__version__ = "0.1.0"
