"""The ``pet-hooks`` command and its tools: ``main`` (run, inspect, check-config, version), ``inspection``
(the report behind inspect) and ``progress`` (the progress line and the loss curve of run).

May import every layer (``doors`` included). ``main`` imports MindSpore only for the commands that run it.
"""
from .main import main  # noqa: F401  (the console script: pet_hooks.cli:main)

__all__ = ["main"]
