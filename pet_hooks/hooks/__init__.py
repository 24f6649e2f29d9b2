"""The front doors: a Callback (callback.py), a context manager (context.py), and the patch set they share."""
