"""The package version, kept apart so that setup.py and adapter files can read it cheaply."""
__version__ = "0.1.0"
