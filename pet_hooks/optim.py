"""``pet_hooks.optim``: the optimizers pet_hooks provides (``AdamW``: torch's AdamW in one fused kernel per tensor).

    from pet_hooks.optim import AdamW      # the arguments and state of mindspore.experimental.optim.AdamW
"""
from .training.fused_adamw import AdamW

__all__ = ["AdamW"]
