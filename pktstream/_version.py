"""The package version: one place, read by setuptools at build time (pyproject.toml) and by
``pktstream.__version__`` at run time without importlib.metadata."""
__version__ = "0.1.0"
