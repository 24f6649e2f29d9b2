"""Bottleneck adapters after ``nn.Dense`` / MindFormers ``Linear`` cells (Houlsby et al., 2019): ``adapter``
and ``low_rank_adapter``, with MindPet's config names and sizes.

The matched cell computes as before (its own ``construct``, called as ``pet_base_construct``:
nothing is copied), and a small module is added to its output ``h``, as MindPet's
``AdapterDense`` / ``LowRankAdapterDense`` do after the layer's activation::

    y = h + up(act(down(h)))        down: width -> bottleneck, up: bottleneck -> width

``adapter``: ``down`` and ``up`` are dense projections (``adapter_down_weight`` [bottleneck,
width] + ``adapter_down_bias``, ``adapter_up_weight`` [width, bottleneck] + ``adapter_up_bias``),
the bottleneck ``bottleneck_size`` wide. ``low_rank_adapter``: the bottleneck is
``width // reduction_factor`` and each projection's matrix is MindPet's ``LowRankLinear`` product
``left @ right`` of rank ``low_rank_size`` (``x @ (left @ right) + bias``), parameters
``low_rank_adapter_{down,up}_{left,right,bias}``.

Init: ``down`` as MindPet (``normal`` with sigma 0.01 for ``adapter``; ``low_rank_w_init`` for
the factors), biases zero, and ``up`` starting at zero (for ``low_rank_adapter`` its right
factor), so the output equals the base output until training moves it. MindPet initialises the
up projection randomly; pet_hooks keeps its own rule that apply() does not change the output.

On/off is a data switch: the up projection (weight and bias) is multiplied by one shared
float32 Parameter (``pet_adapter_on``, 1 or 0); with 0 the branch adds exactly zero.
Adapters cannot be merged (the non-linearity sits between the projections).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

from ..config.pet_config import AdapterConfig, LowRankAdapterConfig
from ..errors import UnsupportedCellError
from ..matching.cells import select_cells
from .base import Injection, Targets
from .common import SwitchedTuner, init_rng, inject_all, projection_reason, shared_switch

__all__ = ["AdapterTuner", "LowRankAdapterTuner", "is_adapter_cell", "SWITCH_NAME"]

SWITCH_NAME = "pet_adapter_on"   # the switch: a parameter, not a weight (not counted, never saved)
_MATMUL_TB = ops.MatMul(transpose_b=True)
_MATMUL = ops.MatMul()
_COMMON_ATTRS = ("adapter_non_linear", "adapter_compute_dtype", "pet_adapter_on")
_ADAPTER_WEIGHTS = ("adapter_down_weight", "adapter_down_bias", "adapter_up_weight", "adapter_up_bias")
_LOW_RANK_WEIGHTS = ("low_rank_adapter_down_left", "low_rank_adapter_down_right", "low_rank_adapter_down_bias",
                     "low_rank_adapter_up_left", "low_rank_adapter_up_right", "low_rank_adapter_up_bias")


class _BottleneckLayer:
    """What both generated classes share: the base output plus the branch, in the branch's dtype."""

    pet_hooks_adapter = True  # marker: "this instance was patched by pet_hooks' bottleneck adapter"

    def construct(self, x):
        h = self.pet_base_construct(x)
        shape = ops.shape(h)
        h2 = ops.reshape(ops.cast(h, self.adapter_compute_dtype), (-1, shape[-1]))
        on = ops.cast(self.pet_adapter_on, self.adapter_compute_dtype)
        branch = self._adapter_branch(h2, on)
        return h + ops.reshape(ops.cast(branch, ops.dtype(h)), shape)


class AdapterLayer(_BottleneckLayer):
    """``up(act(down(h)))`` with dense projections (Houlsby)."""

    def _adapter_branch(self, h2, on):
        dtype = self.adapter_compute_dtype
        down = _MATMUL_TB(h2, ops.cast(self.adapter_down_weight, dtype)) + ops.cast(self.adapter_down_bias, dtype)
        act = self.adapter_non_linear(down)
        up_weight = ops.cast(self.adapter_up_weight, dtype) * on
        return _MATMUL_TB(act, up_weight) + ops.cast(self.adapter_up_bias, dtype) * on


class LowRankAdapterLayer(_BottleneckLayer):
    """``up(act(down(h)))`` with each projection ``x @ (left @ right) + bias`` (MindPet's LowRankLinear)."""

    def _adapter_branch(self, h2, on):
        dtype = self.adapter_compute_dtype
        down_w = _MATMUL(ops.cast(self.low_rank_adapter_down_left, dtype),
                         ops.cast(self.low_rank_adapter_down_right, dtype))
        down = _MATMUL(h2, down_w) + ops.cast(self.low_rank_adapter_down_bias, dtype)
        act = self.adapter_non_linear(down)
        up_w = _MATMUL(ops.cast(self.low_rank_adapter_up_left, dtype),
                       ops.cast(self.low_rank_adapter_up_right, dtype) * on)
        return _MATMUL(act, up_w) + ops.cast(self.low_rank_adapter_up_bias, dtype) * on


def is_adapter_cell(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_hooks_adapter", False) is True


def _width(cell: nn.Cell) -> int:
    return int(cell.out_channels)


def _xavier(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """MindSpore's ``xavier_uniform`` for a matrix: U(-b, b), b = sqrt(6 / (fan_in + fan_out))."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _normal(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """MindSpore's ``normal`` initializer (sigma 0.01), MindPet's default for the adapter's Linear."""
    return rng.normal(0.0, 0.01, size=shape).astype(np.float32)


def _attach(path: str, cell: nn.Cell, cfg, arrays: dict, switch: Parameter) -> List[Parameter]:
    """Set the weights (named ``<path>.<attr>``: parameters added after construction get no path
    prefix), the activation, the compute dtype and the switch on ``cell``; returns the weights."""
    dtype = getattr(mstype, cfg.param_init_type)
    params = []
    for attr, values in arrays.items():
        param = Parameter(values, name=f"{path}.{attr}", requires_grad=True)
        if param.dtype != dtype:
            param.set_dtype(dtype)
        setattr(cell, attr, param)
        params.append(param)
    cell.adapter_non_linear = nn.get_activation(cfg.non_linearity)
    cell.adapter_compute_dtype = getattr(mstype, cfg.compute_dtype or cfg.param_init_type)
    cell.pet_adapter_on = switch
    return params


def _adapter_arrays(cell: nn.Cell, cfg: AdapterConfig, rng: np.random.Generator) -> dict:
    width, bottleneck = _width(cell), cfg.bottleneck_size
    return {"adapter_down_weight": _normal(rng, (bottleneck, width)),
            "adapter_down_bias": np.zeros(bottleneck, np.float32),
            "adapter_up_weight": np.zeros((width, bottleneck), np.float32),
            "adapter_up_bias": np.zeros(width, np.float32)}


def _low_rank_arrays(cell: nn.Cell, cfg: LowRankAdapterConfig, rng: np.random.Generator) -> dict:
    width, rank = _width(cell), cfg.low_rank_size
    bottleneck = width // cfg.reduction_factor
    init = _xavier if cfg.low_rank_w_init == "xavier_uniform" else _normal
    return {"low_rank_adapter_down_left": init(rng, (width, rank)),
            "low_rank_adapter_down_right": init(rng, (rank, bottleneck)),
            "low_rank_adapter_down_bias": np.zeros(bottleneck, np.float32),
            "low_rank_adapter_up_left": init(rng, (bottleneck, rank)),
            "low_rank_adapter_up_right": np.zeros((rank, width), np.float32),
            "low_rank_adapter_up_bias": np.zeros(width, np.float32)}


class _BottleneckTuner(SwitchedTuner):
    """The two bottleneck adapters: the same selection, injection, switch; their own weights."""

    switch_attr = SWITCH_NAME
    mixin: type = _BottleneckLayer
    weights: Tuple[str, ...] = ()

    def _arrays(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def _check_cell(self, path: str, cell: nn.Cell, cfg) -> None:
        """Raise naming the cell when ``cfg``'s sizes do not fit it."""

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return projection_reason(cell, self.label)

    def select_targets(self, net: nn.Cell, cfg) -> Targets:
        targets = select_cells(net, cfg.target_modules, cfg.exclude_layers, can_adapt=self.can_adapt,
                               skip=lambda path, cell: is_adapter_cell(cell))
        for path, cell in targets:
            self._check_cell(path, cell, cfg)
        return targets

    def inject(self, targets, cfg) -> List[Injection]:
        rng = init_rng(cfg)
        switch = shared_switch(SWITCH_NAME)   # one for the whole adapter: switching is one write
        return inject_all(targets, self.weights + _COMMON_ATTRS,
                          lambda index, path, cell: _attach(path, cell, cfg, self._arrays(cell, cfg, rng), switch),
                          mixin_of=lambda cell: self.mixin)

    def io_channels(self, injection: Injection) -> Tuple[int, int]:
        """The adapter maps the layer's output width to itself."""
        return _width(injection.cell), _width(injection.cell)


class AdapterTuner(_BottleneckTuner):
    """``pet_type: adapter``: MindPet's AdapterDense, after any Dense / Linear."""

    label = "Adapter"
    pet_types = ("adapter",)
    mixin = AdapterLayer
    weights = _ADAPTER_WEIGHTS

    def _arrays(self, cell, cfg, rng):
        return _adapter_arrays(cell, cfg, rng)

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """The up projection: it starts at zero and gets a gradient from the first step whenever the
        branch is reached (down's gradient goes through up, zero until up moves)."""
        return [injection.cell.adapter_up_weight]


class LowRankAdapterTuner(_BottleneckTuner):
    """``pet_type: low_rank_adapter``: MindPet's LowRankAdapterDense, after any Dense / Linear."""

    label = "LowRankAdapter"
    pet_types = ("low_rank_adapter",)
    mixin = LowRankAdapterLayer
    weights = _LOW_RANK_WEIGHTS

    def _arrays(self, cell, cfg, rng):
        return _low_rank_arrays(cell, cfg, rng)

    def _check_cell(self, path: str, cell: nn.Cell, cfg: LowRankAdapterConfig) -> None:
        if cfg.reduction_factor > _width(cell):
            raise UnsupportedCellError(
                f"reduction_factor {cfg.reduction_factor} is larger than the output width {_width(cell)} of cell "
                f"'{path}' ({type(cell).__name__}): the bottleneck width // reduction_factor would be 0")

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """The up projection's right factor: zero at first, the one factor with a gradient at step one."""
        return [injection.cell.low_rank_adapter_up_right]
