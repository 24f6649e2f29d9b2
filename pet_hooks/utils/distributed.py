"""Which process of a distributed job this is: rank 0 alone writes files (adapters, run checkpoints)."""
from __future__ import annotations

import os

__all__ = ["is_rank_zero"]


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed job (``RANK_ID`` / ``RANK``, as msrun sets)."""
    for var in ("RANK_ID", "RANK"):
        if os.environ.get(var, "0").strip() not in ("", "0"):
            return False
    return True
