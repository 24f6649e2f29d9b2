"""The front doors: when the core flow runs, never what it does.

Owns ``flow`` (the flow every door shares: find the model, adapt once, the optimizer over the deltas,
the adapter on disk), ``callback`` (PetCallback), ``context`` (enable), ``mindformers`` (MindFormers'
own flow inside the doors), ``launcher`` (pet-hooks run) and ``_bootstrap`` (the sitecustomize of child
processes). Each door patches through ``pet_hooks.utils.patching``.
May import every layer below: ``training``, ``io``, ``multi``, ``surgery``, ``tuners``, ``matching``,
``config``, ``utils``.
"""
