"""Shared helpers below everything else: MindSpore shims, the drift guard, patching, file primitives.

Owns ``ms_compat`` (the MindSpore internals pet_hooks relies on, in one place), ``internals`` (the
registry of copied or relied-on MindSpore/MindFormers sources and their hashes: the drift guard),
``patching`` (a self-undoing patch set), ``files`` (atomic writes, tensor readers, adapter file names) and
``distributed`` (which rank writes).
May import: ``pet_hooks.errors`` only. Nothing here imports another pet_hooks layer.
"""
