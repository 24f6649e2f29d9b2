"""The front doors: a Callback (callback.py) and a context manager (context.py); they patch through ``pet_hooks.patching``."""
