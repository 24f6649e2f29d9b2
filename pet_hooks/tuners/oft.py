"""OFT (PEFT 0.21's ``OFTConfig`` / ``oft.Linear``) on ``nn.Dense`` and MindFormers' ``Linear``.

As PEFT 0.21 (``peft/tuners/oft/layer.py``), the input is rotated before the base layer:
``y = base(x @ R)``, ``R`` block diagonal with ``k = in / b`` blocks of size ``b`` (``r`` or
``oft_block_size``, the other one derived). Each block comes from one row of ``oft_R`` ([k, b(b-1)/2],
[1, ...] with ``block_share``: PEFT's name and shape, so PEFT's tensors load as they are), the
upper triangle of a skew-symmetric ``Q = U - U^T``, by the Cayley transform:

* exact (``use_cayley_neumann: false``): ``R = (I - Q)(I + Q)^-1``;
* Neumann (PEFT's default): ``I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1)``, ``n`` the number of terms,
  exactly PEFT's loop (which, for n = 3 or 4, ends with ``2Q^2 + Q^3``).

COFT (``coft: true``): before each use the rows are projected, PEFT's ``_project_batch``: a block whose
skew matrix has a Frobenius norm above ``eps / sqrt(rows)`` is scaled down to that norm, and the
projection is written back into ``oft_R`` (PEFT copies it under ``no_grad``); the gradient flows as
if the parameter held the projected values. ``oft_R`` starts at zero (the identity rotation: the
output is the base's) unless ``init_weights: false`` (normal, std 0.1, as PEFT).

``module_dropout`` is accepted and kept in the files but, as in PEFT 0.21.2 (whose ``Linear.forward``
never calls its ``oft_dropout``), has no effect. PEFT adjusts a block size that does not divide
``in_features`` with a warning; pet_hooks refuses such a target, naming the cell and the sizes.

On/off is a data switch (``pet_oft_on``, one float32 Parameter per adapter, 1 or 0): the layer gets
``x_rot * s + x * (1 - s)``, exactly ``x`` when off. Merging is multiplicative, PEFT's:
``W' = W R^T`` ([out, in] layout); unmerging multiplies by the inverse of ``R^T`` (PEFT inverts too:
the Neumann ``R`` is only nearly orthogonal).
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import dtype as mstype

from ..config.pet_config import OFTConfig, config_from_dict
from ..errors import AdapterFileError, PetConfigError
from ..matching.cells import select_cells
from ..utils.ms_compat import write_values
from .base import Injection
from .common import SwitchedTuner, init_rng, inject_all, projection_reason, shared_switch, weight_is_out_in
from .file_layouts import PeftLayout

__all__ = ["OFTTuner", "OFTLayer", "is_oft_cell", "rotation_numpy"]

SWITCH_NAME = "pet_oft_on"
# the rotation's settings (Python values: graph mode compiles the chosen branch) and its gather table
_ADDED_ATTRS = ("oft_R", "oft_block", "oft_blocks", "oft_neumann", "oft_terms", "oft_coft", "oft_eps",
                "oft_index", SWITCH_NAME)


def _skew(cell, vec):
    """``U - U^T`` [rows, b, b] from the upper-triangle rows ``vec`` [rows, b(b-1)/2] (a gather: exact)."""
    padded = ops.concat((ops.zeros((vec.shape[0], 1), mstype.float32), vec), 1)   # column 0: the zeros
    upper = ops.reshape(ops.gather(padded, cell.oft_index, 1), (vec.shape[0], cell.oft_block, cell.oft_block))
    return upper - ops.transpose(upper, (0, 2, 1))


def _projected(cell, vec):
    """PEFT's ``_project_batch`` (COFT): rows whose skew matrix is larger than ``eps / sqrt(rows)`` in
    Frobenius norm (``oft_eps``, already divided) are scaled to it; the norm of ``U - U^T`` is ``sqrt(2 sum(vec^2))``."""
    eps = cell.oft_eps
    norm = ops.sqrt(ops.reduce_sum(ops.square(_skew(cell, vec)), (1, 2)))
    norm = ops.reshape(norm, (-1, 1))
    return ops.select(ops.broadcast_to(norm <= eps, vec.shape), vec, eps * (vec / norm))


def _rotation(cell):
    """The rotation blocks [rows, b, b] (float32) from ``oft_R``, projected first under COFT."""
    vec = ops.cast(cell.oft_R, mstype.float32)
    if cell.oft_coft:
        projected = ops.stop_gradient(_projected(cell, vec))
        on = ops.cast(cell.pet_oft_on, mstype.float32) > 0.5       # switched off, PEFT does not project
        ops.assign(cell.oft_R, ops.cast(ops.select(ops.broadcast_to(on, vec.shape), projected, vec),
                                        ops.dtype(cell.oft_R)))
        vec = vec - ops.stop_gradient(vec) + projected          # the projected values, the gradient of oft_R
    q = _skew(cell, vec)
    eye = ops.broadcast_to(ops.eye(cell.oft_block, cell.oft_block, mstype.float32), q.shape)
    if not cell.oft_neumann:
        return ops.matmul(eye - q, ops.inverse(eye + q))
    terms = cell.oft_terms
    rot = eye
    if terms > 1:
        rot = rot + 2.0 * q
        if terms > 2:                    # PEFT's loop, term for term
            power = ops.matmul(q, q)
            rot = rot + 2.0 * power
            for _ in range(3, terms - 1):
                power = ops.matmul(power, q)
                rot = rot + 2.0 * power
            power = ops.matmul(power, q)
            rot = rot + power
    return rot


class OFTLayer:
    """Mixin for the generated classes: the base layer called with the rotated input."""

    pet_hooks_oft = True  # marker: "this instance was patched by pet_hooks' OFT"

    def construct(self, x):
        rot = _rotation(self)
        h = ops.cast(x, mstype.float32)
        blocks = ops.transpose(ops.reshape(h, (-1, self.oft_blocks, self.oft_block)), (1, 0, 2))  # [k, N, b]
        turned = ops.reshape(ops.transpose(ops.matmul(blocks, rot), (1, 0, 2)), h.shape)  # rot [1,b,b] broadcasts
        on = ops.cast(self.pet_oft_on, mstype.float32)
        return self.pet_base_construct(ops.cast(turned * on + h * (1.0 - on), ops.dtype(x)))


def is_oft_cell(cell: nn.Cell) -> bool:
    return getattr(type(cell), "pet_hooks_oft", False) is True


def _sizes(path: str, cell: nn.Cell, cfg: OFTConfig) -> Tuple[int, int]:
    """(blocks, block size) for a cell, as PEFT's ``update_layer`` derives them; refuses what PEFT would adjust."""
    features = int(cell.in_channels)
    field, value = ("r", cfg.r) if cfg.r else ("oft_block_size", cfg.oft_block_size)
    if value > features or features % value:
        raise PetConfigError(f"{field}={value} does not divide the in_features {features} of cell '{path}' "
                             f"({type(cell).__name__}); OFT needs r x oft_block_size = in_features (PEFT would "
                             f"adjust it with a warning, pet_hooks refuses)")
    return (value, features // value) if cfg.r else (features // value, value)


def _gather_table(block: int) -> np.ndarray:
    """Index of each [b, b] entry into ``[0, vec...]``: 1 + the position of (i, j), i < j, in PEFT's
    ``triu_indices(b, b, 1)`` order (row-major), 0 (the zero column) elsewhere."""
    table = np.zeros((block, block), np.int32)
    rows, cols = np.triu_indices(block, 1)
    table[rows, cols] = np.arange(1, len(rows) + 1)
    return table.reshape(-1)


def _select_targets(net: nn.Cell, cfg: OFTConfig):
    targets = select_cells(net, cfg.target_modules, cfg.exclude_layers,
                           can_adapt=lambda cell: projection_reason(cell, "OFT"),
                           skip=lambda path, cell: is_oft_cell(cell), exclude_modules=cfg.exclude_modules,
                           layers_to_transform=cfg.layers_to_transform, layers_pattern=cfg.layers_pattern,
                           is_linear=lambda cell: projection_reason(cell, "OFT") is None)
    for path, cell in targets:
        _sizes(path, cell, cfg)                  # every size checked before anything changes
    return targets


def _inject(targets, cfg: OFTConfig) -> List[Injection]:
    rng = init_rng(cfg)
    switch = shared_switch(SWITCH_NAME)

    def add(index, path, cell):
        blocks, block = _sizes(path, cell, cfg)
        shape = (1 if cfg.block_share else blocks, block * (block - 1) // 2)
        values = (np.zeros(shape, np.float32) if cfg.init_weights
                  else (rng.standard_normal(shape) * 0.1).astype(np.float32))
        # explicit name: parameters added after construction get no path prefix
        cell.oft_R = Parameter(values, name=f"{path}.oft_R", requires_grad=True)
        cell.oft_block, cell.oft_blocks = block, blocks
        cell.oft_neumann, cell.oft_terms = bool(cfg.use_cayley_neumann), int(cfg.num_cayley_neumann_terms)
        # COFT's radius per row, PEFT's eps / sqrt(rows of oft_R)
        cell.oft_coft, cell.oft_eps = bool(cfg.coft), float(cfg.eps) / float(np.sqrt(shape[0]))
        cell.oft_index = Tensor(_gather_table(block), mstype.int32)
        cell.pet_oft_on = switch
        return [cell.oft_R]

    return inject_all(targets, _ADDED_ATTRS, add, mixin_of=lambda cell: OFTLayer)


# ----------------------------------------------------------------------------- merging (NumPy, float64)
def _numpy_projected(vec: np.ndarray, eps: float, block: int) -> np.ndarray:
    norm = np.sqrt(2.0 * np.sum(vec * vec, axis=1, keepdims=True))
    return np.where(norm <= eps, vec, eps * (vec / np.where(norm > 0, norm, 1.0)))


def rotation_numpy(cell: nn.Cell) -> np.ndarray:
    """The full block-diagonal ``R`` [in, in] (float64) of an OFT cell, as its ``construct`` computes it."""
    vec = cell.oft_R.astype(mstype.float32).asnumpy().astype(np.float64)
    block = cell.oft_block
    if cell.oft_coft:
        vec = _numpy_projected(vec, cell.oft_eps, block)
    upper = np.zeros((vec.shape[0], block, block))
    rows, cols = np.triu_indices(block, 1)
    upper[:, rows, cols] = vec
    q = upper - upper.transpose(0, 2, 1)
    eye = np.broadcast_to(np.eye(block), q.shape)
    if not cell.oft_neumann:
        rot = (eye - q) @ np.linalg.inv(eye + q)
    else:
        rot, terms = eye.copy(), cell.oft_terms
        if terms > 1:
            rot = rot + 2.0 * q
            if terms > 2:
                power = q @ q
                rot = rot + 2.0 * power
                for _ in range(3, terms - 1):
                    power = power @ q
                    rot = rot + 2.0 * power
                rot = rot + power @ q
    full = np.zeros((cell.oft_blocks * block,) * 2)
    for i in range(cell.oft_blocks):
        full[i * block:(i + 1) * block, i * block:(i + 1) * block] = rot[0 if rot.shape[0] == 1 else i]
    return full


def _weight_out_in(cell: nn.Cell) -> np.ndarray:
    weight = cell.weight.astype(mstype.float32).asnumpy().astype(np.float64)
    return weight if weight_is_out_in(cell) else weight.T


def _stored(cell: nn.Cell, weight_out_in: np.ndarray) -> np.ndarray:
    return (weight_out_in if weight_is_out_in(cell) else weight_out_in.T).astype(np.float32)


class OFTPeftLayout(PeftLayout):
    """PEFT's ``OFT``: ``<module>.oft_R.weight`` per module, and OFTConfig's fields."""

    peft_type = "OFT"
    weights = {"oft_R": "oft_R"}
    _FIELDS = ("r", "oft_block_size", "module_dropout", "use_cayley_neumann", "num_cayley_neumann_terms", "coft",
               "eps", "block_share", "init_weights")

    def fields(self, cfg: OFTConfig) -> dict:
        doc = {name: getattr(cfg, name) for name in self._FIELDS}
        # PEFT's check_kwargs warns about a Neumann adapter from before 0.18 (no peft_version): the
        # formula here is 0.21.2's
        doc.update({"fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "peft_version": "0.21.2",
                    "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None})
        return doc

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        if doc.get("bias", "none") != "none":
            raise AdapterFileError(f"{config_path}: bias={doc['bias']!r} is not supported for OFT by pet_hooks "
                                   f"(only 'none')")
        if doc.get("fan_in_fan_out"):
            raise AdapterFileError(f"{config_path}: fan_in_fan_out=true (GPT-2's Conv1D) is not supported")

    def config_from(self, doc: Mapping, target_modules: List[str]) -> OFTConfig:
        fields = {name: doc[name] for name in self._FIELDS if name in doc}
        try:
            return config_from_dict({"pet_type": "oft", "target_modules": target_modules, **fields})
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"OFT adapter_config.json: {err}") from None

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type != "oft":
            return f"{config_path}: an OFT adapter cannot load into {net_name}, which has {applied.pet_type}"
        for name in self._FIELDS[:-1]:
            if name in doc and doc[name] != getattr(applied, name):
                return f"{config_path}: {name}={doc[name]!r}, but {net_name} has OFT with {name}={getattr(applied, name)!r}"
        return None


class OFTTuner(SwitchedTuner):
    """OFT as a :class:`~pet_hooks.tuners.base.Tuner`: block-diagonal rotations of the input of Dense / Linear."""

    label = "OFT"
    pet_types = ("oft",)
    switch_attr = SWITCH_NAME
    can_merge = True
    peft = OFTPeftLayout()

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return projection_reason(cell, "OFT")

    def is_linear(self, cell: nn.Cell) -> bool:
        return self.can_adapt(cell) is None

    def select_targets(self, net: nn.Cell, cfg: OFTConfig):
        return _select_targets(net, cfg)

    def inject(self, targets, cfg: OFTConfig) -> List[Injection]:
        return _inject(targets, cfg)

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        """``W R^T - W`` in the weight's layout: what merging changes (the merged checkpoint reads it)."""
        cell = injection.cell
        weight = _weight_out_in(cell)
        return [(cell.weight, _stored(cell, weight @ rotation_numpy(cell).T) - _stored(cell, weight))]

    def merge(self, injection: Injection, sign: int) -> None:
        """PEFT's: ``W' = W R^T`` (COFT's projection written back first); unmerge ``W = W' (R^T)^-1``."""
        cell = injection.cell
        rot = rotation_numpy(cell)
        if cell.oft_coft:                # PEFT's get_weight writes the projection back, as the forward does
            vec = cell.oft_R.astype(mstype.float32).asnumpy().astype(np.float64)
            write_values(cell.oft_R, Tensor(_numpy_projected(vec, cell.oft_eps, cell.oft_block).astype(np.float32),
                                            cell.oft_R.dtype))
        weight = _weight_out_in(cell)
        merged = weight @ rot.T if sign > 0 else weight @ np.linalg.inv(rot.T)
        write_values(cell.weight, Tensor(_stored(cell, merged), mstype.float32))
