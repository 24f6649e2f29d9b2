"""VeRA (PEFT's ``VeraConfig`` / ``vera.Linear``) on ``nn.Dense`` and MindFormers' ``Linear``.

``y = base(x) + lambda_b * ((lambda_d * (dropout(x) @ A^T)) @ B^T)``, as PEFT's forward, with ``A`` =
``vera_A[:, :in]`` and ``B`` = ``vera_B[:out, :]``: ONE frozen pair of random projections for the whole
adapter (``vera_A`` [r, largest in], ``vera_B`` [largest out, r], sized over the targets as PEFT's
``_find_dim``), the same two Parameter objects on every adapted cell, sliced to the cell's size; per cell
the trained vectors ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] (PEFT's names and shapes). At init,
as PEFT: ``vera_lambda_b = 0`` (the output is the base's), ``vera_lambda_d = d_initial``; with
``init_weights: false`` PEFT's raw values, ``lambda_b = 1`` and ``lambda_d`` standard normal.

The projections: PEFT draws them kaiming uniform (bound ``sqrt(6 / fan_in)``) from torch's generator seeded
with ``projection_prng_key``; pet_hooks draws the same distribution from NumPy's generator seeded with the
same key (torch's stream cannot be replayed without torch). So the values differ from PEFT's for one key,
and they travel with the adapter: ``save_projection`` must be true (PEFT's default), both formats hold
``vera_A`` / ``vera_B`` (PEFT's keys ``base_model.vera_A`` / ``base_model.vera_B``, ``PeftLayout.shared_weights``),
and loading uses the file's exactly. A PEFT file saved with ``save_projection: false`` holds no projections:
when torch is installed they are re-derived as PEFT does, by torch itself in a child process (``peft_projections``:
PEFT's values exactly; the loaded config then says ``save_projection: true``, so pet_hooks' files carry them);
without torch the file is refused with an error saying why. The projections are never trained
(``Tuner.frozen_parameters``: frozen by ``apply`` like a switch, and not counted, as PEFT's buffers), yet saved
like deltas; merging, training and switching never write them.

On/off is a data switch (``pet_vera_on``, one float32 Parameter, 1 or 0) multiplying the branch. Merging
adds ``(lambda_b * B) @ (lambda_d * A)`` to the weight (in its layout), unmerging subtracts it (PEFT's).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

from ..config.pet_config import VeraConfig, config_from_dict
from ..errors import AdapterFileError
from ..utils.files import read_safetensors
from .base import Injection
from .common import LinearTargets, SwitchedTuner, init_rng, inject_all, shared_switch, weight_is_out_in
from .file_layouts import PeftLayout

__all__ = ["VeraTuner", "VeraLayer", "VeraPeftLayout", "PROJECTIONS", "kaiming_uniform"]

#: the names of the shared projections (parameter names and cell attributes alike)
PROJECTIONS = ("vera_A", "vera_B")
_ADDED_ATTRS = ("vera_lambda_b", "vera_lambda_d") + PROJECTIONS + ("vera_in", "vera_out", "vera_dropout",
                                                                   "pet_vera_on")


class VeraLayer:
    """Mixin for the generated classes: the base output plus the VeRA branch (in float32)."""

    pet_hooks_vera = True  # marker: "this instance was patched by pet_hooks' VeRA"

    def construct(self, x):
        out = self.pet_base_construct(x)
        h = ops.cast(x, mstype.float32)
        if self.training and self.vera_dropout > 0.0:       # a Python float: one branch compiled
            h = ops.dropout(h, p=self.vera_dropout, training=True)
        a = self.vera_A[:, :self.vera_in]                    # [r, in]: this cell's slice of the shared pair
        b = self.vera_B[:self.vera_out, :]                   # [out, r]
        mid = ops.matmul(h, ops.transpose(a, (1, 0))) * self.vera_lambda_d
        delta = ops.matmul(mid, ops.transpose(b, (1, 0))) * self.vera_lambda_b
        on = ops.cast(self.pet_vera_on, mstype.float32)
        return out + ops.cast(delta * on, ops.dtype(out))


def kaiming_uniform(rng: np.random.Generator, shape: Tuple[int, int]) -> np.ndarray:
    """PEFT's ``_kaiming_init``: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = ``shape[1]``."""
    bound = np.sqrt(3.0) * np.sqrt(2.0) / np.sqrt(shape[1])
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# PEFT's _init_vera_A_vera_B: one CPU generator seeded with the key, vera_A then vera_B, kaiming uniform
_TORCH_DRAW = """
import math, sys
import torch
from safetensors.numpy import save_file
key, r, n_in, n_out, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
generator = torch.Generator(device="cpu").manual_seed(key)
def draw(shape):
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator).numpy()
a = draw((r, n_in))
save_file({"vera_A": a, "vera_B": draw((n_out, r))}, path)
"""


def peft_projections(key: int, r: int, n_in: int, n_out: int) -> Dict[str, np.ndarray]:
    """PEFT's ``vera_A`` [r, n_in] / ``vera_B`` [n_out, r] for ``projection_prng_key`` ``key``, drawn by torch in a
    child process (torch and MindSpore are not loaded in one process)."""
    if not torch_available():
        raise AdapterFileError("re-deriving PEFT's vera_A / vera_B from projection_prng_key needs torch, which is "
                               "not installed")
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "projections.safetensors")
        out = subprocess.run([sys.executable, "-c", _TORCH_DRAW, str(key), str(r), str(n_in), str(n_out), path],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise AdapterFileError(f"re-deriving PEFT's vera_A / vera_B with torch failed: {out.stderr[-500:]}")
        found = read_safetensors(path)          # a tensor file, never a pickle
        return {name: found[name].astype(np.float32) for name in PROJECTIONS}


def _out_in(cell: nn.Cell) -> Tuple[int, int]:
    return int(cell.out_channels), int(cell.in_channels)


def _vector(cell: nn.Cell, name: str) -> np.ndarray:
    return getattr(cell, name).astype(mstype.float32).asnumpy()


def delta_weight(cell: nn.Cell) -> np.ndarray:
    """``(lambda_b * B) @ (lambda_d * A)`` [out, in], float32 (PEFT's ``get_delta_weight``)."""
    a = _vector(cell, "vera_A")[:, :cell.vera_in]
    b = _vector(cell, "vera_B")[:cell.vera_out, :]
    return ((_vector(cell, "vera_lambda_b")[:, None] * b) @ (_vector(cell, "vera_lambda_d")[:, None] * a)
            ).astype(np.float32)


class VeraPeftLayout(PeftLayout):
    """PEFT's VeRA files: ``<module>.vera_lambda_b`` / ``.vera_lambda_d`` bare, the shared pair at
    ``base_model.vera_A`` / ``base_model.vera_B``."""

    peft_type = "VERA"
    weights = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
    key_tail = ""
    shared_weights = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}
    _FIELDS = ("r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights")

    def fields(self, cfg: VeraConfig) -> dict:
        doc = {name: getattr(cfg, name) for name in self._FIELDS}
        doc.update({"fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                    "layers_pattern": None})
        return doc

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        if doc.get("save_projection", True) is not True and not torch_available():
            raise AdapterFileError(
                f"{config_path}: save_projection={doc.get('save_projection')!r}: the adapter holds no vera_A / vera_B, "
                f"and without torch pet_hooks cannot re-derive PEFT's projections from projection_prng_key (torch's "
                f"generator); install torch, or save it from PEFT with save_projection=True")
        if doc.get("fan_in_fan_out"):
            raise AdapterFileError(f"{config_path}: fan_in_fan_out=true (GPT-2's Conv1D) is not supported")
        if (doc.get("bias") or "none") != "none":
            raise AdapterFileError(f"{config_path}: bias={doc.get('bias')!r} is not supported for VeRA (only 'none')")

    def derive_shared(self, doc: Mapping, absent: Mapping[str, str], cells: Sequence, weights_path: str) -> dict:
        """A file saved with ``save_projection: false``: PEFT's projections re-derived from ``projection_prng_key``
        by torch itself (in a child process), sized over the cells the file adapts (PEFT's ``_find_dim``)."""
        if doc.get("save_projection", True) is True:
            raise AdapterFileError(f"{weights_path} has no '{next(iter(absent))}' but its config says "
                                   f"save_projection=true (the projections must be in the file)")
        sizes = [_out_in(cell) for cell in cells]
        return peft_projections(int(doc.get("projection_prng_key", 0)), int(doc["r"]),
                                max(s[1] for s in sizes), max(s[0] for s in sizes))

    def config_from(self, doc: Mapping, target_modules: List[str]) -> VeraConfig:
        # save_projection false in the file: the projections were re-derived with torch (derive_shared); from
        # now on they travel in pet_hooks' files, so the config says true
        fields = {name: doc[name] for name in self._FIELDS if name in doc and name != "save_projection"}
        try:
            return config_from_dict({"pet_type": "vera", "target_modules": target_modules, **fields})
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"VERA adapter_config.json: {err}") from None

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type != "vera":
            return f"{config_path}: a VERA adapter cannot load into {net_name}, which has {applied.pet_type}"
        if "r" in doc and doc["r"] != applied.r:
            return f"{config_path}: r={doc['r']!r}, but {net_name} has VeRA with r={applied.r!r}"
        return None


class VeraTuner(LinearTargets, SwitchedTuner):
    """VeRA as a :class:`~pet_hooks.tuners.base.Tuner`: shared frozen projections, trained vectors per cell."""

    label = "VeRA"
    pet_types = ("vera",)
    switch_attr = "pet_vera_on"
    can_merge = True
    peft = VeraPeftLayout()

    def inject(self, targets, cfg: VeraConfig) -> List[Injection]:
        r = int(cfg.r)
        sizes = [_out_in(cell) for _, cell in targets]
        largest_out, largest_in = max(s[0] for s in sizes), max(s[1] for s in sizes)
        # PEFT's order: vera_A first, then vera_B, from one generator seeded with the key
        keyed = np.random.default_rng(cfg.projection_prng_key)
        vera_a = Parameter(kaiming_uniform(keyed, (r, largest_in)), name="vera_A", requires_grad=False)
        vera_b = Parameter(kaiming_uniform(keyed, (largest_out, r)), name="vera_B", requires_grad=False)
        rng = init_rng(cfg)
        switch = shared_switch("pet_vera_on")

        def add(index, path, cell):
            out, inp = _out_in(cell)
            if cfg.init_weights:
                lambda_b, lambda_d = np.zeros(out, np.float32), np.full(r, cfg.d_initial, np.float32)
            else:                                           # PEFT's values before reset_vera_parameters
                lambda_b, lambda_d = np.ones(out, np.float32), rng.standard_normal(r).astype(np.float32)
            # explicit names: parameters added after construction get no path prefix
            cell.vera_lambda_b = Parameter(lambda_b, name=f"{path}.vera_lambda_b", requires_grad=True)
            cell.vera_lambda_d = Parameter(lambda_d, name=f"{path}.vera_lambda_d", requires_grad=True)
            cell.vera_A, cell.vera_B = vera_a, vera_b         # the same two objects on every cell
            cell.vera_in, cell.vera_out = inp, out
            cell.vera_dropout = float(cfg.vera_dropout)
            cell.pet_vera_on = switch
            return [cell.vera_lambda_b, cell.vera_lambda_d, vera_a, vera_b]

        return inject_all(targets, _ADDED_ATTRS, add, mixin_of=lambda cell: VeraLayer)

    def frozen_parameters(self, injections) -> List[Parameter]:
        """The shared projections: saved with the adapter, never trained."""
        return list({id(p): p for i in injections for p in (i.cell.vera_A, i.cell.vera_B)}.values())

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """``vera_lambda_b``: zero at init, it gets a gradient from the first step whenever the cell is reached
        (``lambda_d`` only once ``lambda_b`` moved), and without one it stays zero even under weight decay."""
        return [injection.cell.vera_lambda_b]

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        delta = delta_weight(injection.cell)
        return [(injection.cell.weight, delta if weight_is_out_in(injection.cell) else delta.T)]
