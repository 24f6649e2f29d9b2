"""LoRA's initialisations (PEFT's ``init_lora_weights``) and the residual base weight of PiSSA / OLoRA.

=================  ==========================================================================
``True``           A by ``lora_a_init`` (kaiming_uniform(a=sqrt(5)), PEFT's; or MindFormers' normal
                   σ = 0.01), B zeros: the output is unchanged at init
``False``          A and B both as ``nn.Linear``'s default (kaiming_uniform(a=sqrt(5)) over their
                   own fan-in): the output changes at init (PEFT's, for tests)
``"gaussian"``     A ~ normal(0, 1/r), B zeros (PEFT's)
``"pissa"``        SVD ``W = V S U^T``: ``A = sqrt(S_r / s) U_r^T``, ``B = V_r sqrt(S_r / s)``
``"pissa_niter_N"``  the same from a randomized SVD with N power iterations (``torch.svd_lowrank``'s
                   algorithm, drawn from the config's seeded generator)
``"olora"``        QR ``W = Q R``: ``A = R[:r]``, ``B = Q[:, :r]``
=================  ==========================================================================

PiSSA and OLoRA (``s`` = scaling) replace the base weight by the residual ``W - s B A``, so the
output is unchanged at init and the residual is what stays frozen. A cell kind computes the
arrays (``LoraKind.add_deltas``; nothing is written to the base weight yet); once every cell is
patched, :func:`write_residual` writes each residual and returns the original array, which the
injection record keeps and :func:`restore_base` writes back bit for bit on remove. The record also
keeps ``A0`` / ``B0`` for :func:`pet_hooks.io.lora_conversion.save_as_lora` (PEFT's
``path_initial_model_for_weight_conversion``). The weight is read and written through the cell's
kind (``weight_out_in`` / ``in_weight_layout``), which knows how it is stored.

The random A of ``True`` (:func:`default_a`) and the kaiming bound (:func:`kaiming_uniform`) are
written here once, for every kind (the grouped experts draw one A per expert with them)::

    a = default_a(rng, cfg, (cfg.lora_rank, in_channels))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn
from mindspore.common import dtype as mstype

from ...utils.ms_compat import write_values

__all__ = ["initial_bias",  # lora_bias (issue 29 item 6)
           "BaseInit", "mutates_base", "reason", "kaiming_uniform", "default_a", "initial_arrays", "write_residual",
           "restore_base", "RESIDUAL_ATTR"]

RESIDUAL_ATTR = "pet_lora_residual"   # the pending residual on a cell between add_deltas and write_residual


@dataclass
class BaseInit:
    """What a PiSSA / OLoRA init did to one cell's base weight: enough to undo it and to convert to LoRA."""

    weight: Parameter
    original: Tensor            # a copy of the weight's value before, its own dtype and layout (written back on remove)
    a0: np.ndarray              # the initial A and B (float32)
    b0: np.ndarray


def mutates_base(cfg) -> bool:
    """True when ``cfg``'s init replaces the base weight by a residual (PiSSA, OLoRA)."""
    init = cfg.init_lora_weights
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def reason(cfg, residual_ok: bool, default_only: bool = False) -> Optional[str]:
    """None when ``cfg``'s init can be used on a cell of a kind that allows a residual (``residual_ok``) or
    only the default init (``default_only``), else why not.

    PiSSA and OLoRA read and rewrite the weight: nn.Dense and MindFormers' Linear (their kinds'
    ``residual_inits``). Grouped experts have their own init (``True`` only).
    """
    if mutates_base(cfg) and not residual_ok:
        return (f"init_lora_weights={cfg.init_lora_weights!r} (it rewrites the base weight) is supported on "
                f"mindspore.nn.Dense and mindformers.modules.layers.Linear only")
    if cfg.init_lora_weights is not True and default_only:
        return f"init_lora_weights={cfg.init_lora_weights!r} is not supported on grouped experts (only true)"
    return None


def kaiming_uniform(rng: np.random.Generator, shape) -> np.ndarray:
    """kaiming_uniform(a=sqrt(5)) over the last axis as fan-in, as PEFT, mindpet and ``nn.Linear``:
    U(-b, b), b = sqrt(6 / ((1 + a^2) * fan_in))."""
    bound = math.sqrt(6.0 / ((1.0 + 5.0) * shape[-1]))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def default_a(rng: np.random.Generator, cfg, shape) -> np.ndarray:
    """The random A of ``init_lora_weights: true`` (``shape`` ends with the fan-in): by ``lora_a_init``."""
    if cfg.lora_a_init == "normal":  # MindSpore's 'normal' initializer, as MindFormers uses
        return rng.normal(0.0, 0.01, size=shape).astype(np.float32)
    return kaiming_uniform(rng, shape)


def _svd_lowrank(rng: np.random.Generator, w: np.ndarray, r: int, niter: int):
    """``torch.svd_lowrank(w, q=r, niter)``'s algorithm (Halko et al. 2009, alg. 5.1) in float64:
    (U_r, S_r, V_r^T)."""
    w64 = w.astype(np.float64)
    q, _ = np.linalg.qr(w64 @ rng.standard_normal((w.shape[1], r)))
    for _ in range(niter):
        q, _ = np.linalg.qr(w64.T @ q)
        q, _ = np.linalg.qr(w64 @ q)
    u, s, vh = np.linalg.svd(q.T @ w64, full_matrices=False)
    return (q @ u)[:, :r], s[:r], vh[:r]


def initial_arrays(cfg, rng: np.random.Generator, in_ch: int, out_ch: int,
                   weight_out_in: Callable[[], np.ndarray]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(A [r, in], B [out, r], residual [out, in] or None), float32; ``weight_out_in()`` reads the base weight
    (float32 [out, in]) for PiSSA / OLoRA."""
    init, r, scaling = cfg.init_lora_weights, cfg.lora_rank, cfg.scaling
    if init is True:
        return default_a(rng, cfg, (r, in_ch)), np.zeros((out_ch, r), np.float32), None
    if init is False:
        return kaiming_uniform(rng, (r, in_ch)), kaiming_uniform(rng, (out_ch, r)), None
    if init == "gaussian":
        return rng.normal(0.0, 1.0 / r, size=(r, in_ch)).astype(np.float32), np.zeros((out_ch, r), np.float32), None
    w = weight_out_in()
    if init == "olora":
        q, rr = np.linalg.qr(w)
        a, b = rr[:r], q[:, :r]
    else:
        if init == "pissa":
            v, s, uh = np.linalg.svd(w, full_matrices=False)
            v, s, uh = v[:, :r], s[:r], uh[:r]
        else:
            v, s, uh = _svd_lowrank(rng, w, r, int(init.rsplit("_", 1)[1]))
        root = np.sqrt(s / scaling)
        a, b = root[:, None] * uh, v * root[None, :]
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a, b, (w - scaling * (b @ a)).astype(np.float32)


def initial_bias(cfg, rng: np.random.Generator, out_ch: int) -> np.ndarray:
    """``lora_bias``'s start (float32 [out]), as PEFT's ``lora_B`` (an ``nn.Linear(r, out, bias=True)``): zeros
    with ``init_lora_weights`` true (the output is unchanged at init), ``nn.Linear``'s default
    uniform(-1/sqrt(r), 1/sqrt(r)) with false (PEFT then leaves the layer's own init)."""
    if cfg.init_lora_weights is False:
        bound = 1.0 / math.sqrt(cfg.lora_rank)
        return rng.uniform(-bound, bound, size=(out_ch,)).astype(np.float32)
    return np.zeros((out_ch,), np.float32)


def write_residual(cell: nn.Cell, weight: Parameter,
                   in_weight_layout: Callable[[np.ndarray], np.ndarray]) -> Optional[BaseInit]:
    """Write the cell's pending residual into ``weight`` (``in_weight_layout`` turns [out, in] into the way it is
    stored); the record of what was there (None: no residual)."""
    residual = cell.__dict__.pop(RESIDUAL_ATTR, None)
    if residual is None:
        return None
    record = BaseInit(weight, weight.data.copy(), cell.lora_A.astype(mstype.float32).asnumpy().copy(),
                      cell.lora_B.astype(mstype.float32).asnumpy().copy())
    write_values(weight, Tensor(in_weight_layout(residual), mstype.float32))
    return record


def restore_base(base_init: Optional[BaseInit]) -> None:
    """Write the original weight back, bit for bit (its own dtype)."""
    if base_init is not None:
        write_values(base_init.weight, base_init.original)
