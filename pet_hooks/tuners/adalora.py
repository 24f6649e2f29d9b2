"""AdaLoRA (PEFT's ``AdaLoraConfig`` / ``adalora.SVDLinear``) on ``nn.Dense`` and MindFormers' ``Linear``.

``y = base(x) + (dropout(x) @ (A * E)^T @ B^T) * scaling / (ranknum + 1e-5)``, as PEFT's forward, with
``lora_A`` [init_r, in], ``lora_E`` [init_r, 1] (the singular values), ``lora_B`` [out, init_r] (PEFT's names
and shapes), ``scaling = lora_alpha`` (``init_r`` when ``lora_alpha`` is 0) and ``ranknum = init_r`` (PEFT's
non-trained ``ranknum``, which never changes: a Python float here). At init, as PEFT: ``E = 0`` (the output is
the base's), ``A`` and ``B`` normal(0, 0.02); ``init_weights: false`` draws all three standard normal.

What the training adds (the rank allocator, the orthogonality regulariser's gradient) lives in the optimizer
step: ``pet_hooks.training.adalora``. This module holds the layer, the tuner, the regulariser's value and
PEFT's file layout: PEFT's keys are bare (``<module>.lora_A`` / ``.lora_E`` / ``.lora_B``, no ``.weight``),
``ranknum`` is not saved, and a config with ``rank_pattern`` (``<module>.lora_E`` -> one bool per rank) makes
PEFT save only the kept ranks' rows. Reading such a file, the kept rows go back to their ranks and the others
are zero (E zero: they add nothing); pet_hooks' cells keep ``init_r`` rows, where PEFT's loaded modules are
resized to the kept ranks (the same outputs; see docs/methods.md for what differs when training goes on).

On/off is a data switch (``pet_adalora_on``, one float32 Parameter, 1 or 0). Merging adds PEFT's
``get_delta_weight`` ``B @ (A * E) * scaling / (ranknum + 1e-5)`` to the weight (in its layout).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

from ..config.pet_config import AdaLoraConfig, config_from_dict
from ..errors import AdapterFileError, PetConfigError
from .base import Injection
from .common import LinearTargets, SwitchedTuner, init_rng, inject_all, shared_switch, weight_is_out_in
from .file_layouts import PeftLayout

__all__ = ["AdaLoraTuner", "AdaLoraLayer", "AdaLoraPeftLayout", "FACTORS", "delta_weight", "orth_regularizer"]

#: the trained factors, PEFT's names (parameter leaves and cell attributes alike)
FACTORS = ("lora_A", "lora_E", "lora_B")
_ADDED_ATTRS = FACTORS + ("adalora_scale", "adalora_dropout", "pet_adalora_on")


class AdaLoraLayer:
    """Mixin for the generated classes: the base output plus the SVD-form branch (in float32)."""

    pet_hooks_adalora = True  # marker: "this instance was patched by pet_hooks' AdaLoRA"

    def construct(self, x):
        out = self.pet_base_construct(x)
        h = ops.cast(x, mstype.float32)
        if self.training and self.adalora_dropout > 0.0:    # a Python float: one branch compiled
            h = ops.dropout(h, p=self.adalora_dropout, training=True)
        mid = ops.matmul(h, ops.transpose(self.lora_A * self.lora_E, (1, 0)))      # [..., r]
        delta = ops.matmul(mid, ops.transpose(self.lora_B, (1, 0))) * self.adalora_scale
        on = ops.cast(self.pet_adalora_on, mstype.float32)
        return out + ops.cast(delta * on, ops.dtype(out))


def _factor(cell: nn.Cell, name: str) -> np.ndarray:
    return getattr(cell, name).astype(mstype.float32).asnumpy()


def scale_of(cfg: AdaLoraConfig) -> float:
    """PEFT's ``scaling / (ranknum + 1e-5)``: ``lora_alpha`` (or ``init_r`` when it is 0) over ``init_r``, the
    denominator rounded to float32 as PEFT's ``ranknum`` tensor is."""
    scaling = float(cfg.lora_alpha) if cfg.lora_alpha > 0 else float(cfg.init_r)
    return scaling / float(np.float32(cfg.init_r) + np.float32(1e-5))


def delta_weight(cell: nn.Cell) -> np.ndarray:
    """``B @ (A * E) * scaling / (ranknum + 1e-5)`` [out, in], float32 (PEFT's ``get_delta_weight``)."""
    a, e, b = (_factor(cell, name) for name in FACTORS)
    return (b @ (a * e) * cell.adalora_scale).astype(np.float32)


def orth_regularizer(cells: List[nn.Cell], weight: float) -> float:
    """PEFT's term added to the loss: ``weight`` x the mean over every ``lora_A`` and ``lora_B`` of
    ``||A A^T - I||_F`` / ``||B^T B - I||_F`` (float64 here, a value to log or compare)."""
    norms = []
    for cell in cells:
        a, b = _factor(cell, "lora_A").astype(np.float64), _factor(cell, "lora_B").astype(np.float64)
        norms.append(np.linalg.norm(a @ a.T - np.eye(a.shape[0])))
        norms.append(np.linalg.norm(b.T @ b - np.eye(b.shape[1])))
    return float(weight * np.mean(norms)) if norms else 0.0


class AdaLoraPeftLayout(PeftLayout):
    """PEFT's AdaLoRA files: ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B`` bare; with ``rank_pattern`` only the
    kept ranks' rows (PEFT's ``resize_state_dict_by_rank_pattern``)."""

    peft_type = "ADALORA"
    weights = {name: name for name in FACTORS}
    key_tail = ""
    _FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
               "total_step", "lora_alpha", "lora_dropout")

    def fields(self, cfg: AdaLoraConfig) -> dict:
        doc = {name: getattr(cfg, name) for name in self._FIELDS}
        doc.update({"init_lora_weights": cfg.init_weights, "fan_in_fan_out": False, "bias": "none",
                    "use_dora": False, "use_rslora": False, "layers_to_transform": None, "layers_pattern": None,
                    "rank_pattern": None})
        return doc

    def module_fields(self, injections, mapped, target_modules, cfg=None) -> dict:
        """``rank_pattern`` in PEFT's keys (``<their module>.lora_E``)."""
        if cfg is None or not cfg.rank_pattern:
            return {}
        return {"rank_pattern": {f"{mapped[path]}.lora_E": list(mask) for path, mask in cfg.rank_pattern.items()
                                 if path in mapped}}

    def saved_module(self, cfg: AdaLoraConfig, path: str, tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The kept ranks only (PEFT saves a rank-pattern'd adapter so)."""
        mask = (cfg.rank_pattern or {}).get(path)
        if mask is None or all(mask):
            return tensors
        keep = np.asarray(mask, bool)
        return {"lora_A": tensors["lora_A"][keep], "lora_E": tensors["lora_E"][keep],
                "lora_B": tensors["lora_B"][:, keep]}

    def loaded_module(self, doc: Mapping, module: str, tensors: Dict[str, np.ndarray],
                      weights_path: str) -> Dict[str, np.ndarray]:
        """The file's rows back at their ranks of ``init_r`` (the dropped ranks zero)."""
        mask = ((doc.get("rank_pattern") or {}).get(f"{module}.lora_E"))
        init_r = int(doc.get("init_r", 12))
        if mask is None:
            return tensors
        keep = np.asarray(mask, bool)
        rows = int(keep.sum())
        if keep.size != init_r or any(tensors[name].shape[0] != rows for name in ("lora_A", "lora_E")) \
                or tensors["lora_B"].shape[1] != rows:
            raise AdapterFileError(f"{weights_path}: module '{module}' holds {tensors['lora_A'].shape[0]} rank(s), "
                                   f"but its rank_pattern keeps {rows} of {keep.size} (init_r={init_r})")
        out = {"lora_A": np.zeros((init_r,) + tensors["lora_A"].shape[1:], tensors["lora_A"].dtype),
               "lora_E": np.zeros((init_r, 1), tensors["lora_E"].dtype),
               "lora_B": np.zeros((tensors["lora_B"].shape[0], init_r), tensors["lora_B"].dtype)}
        out["lora_A"][keep], out["lora_E"][keep], out["lora_B"][:, keep] = (tensors["lora_A"], tensors["lora_E"],
                                                                            tensors["lora_B"])
        return out

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        if doc.get("fan_in_fan_out"):
            raise AdapterFileError(f"{config_path}: fan_in_fan_out=true (GPT-2's Conv1D) is not supported")
        if (doc.get("bias") or "none") != "none":
            raise AdapterFileError(f"{config_path}: bias={doc.get('bias')!r} is not supported for AdaLoRA "
                                   f"(only 'none')")

    def config_from(self, doc: Mapping, target_modules: List[str]) -> AdaLoraConfig:
        return self.config_from_modules(doc, {path: path for path in target_modules})

    def config_from_modules(self, doc: Mapping, module_map: Mapping[str, str]) -> AdaLoraConfig:
        fields = {name: doc[name] for name in self._FIELDS if name in doc}
        if "init_lora_weights" in doc and isinstance(doc["init_lora_weights"], bool):
            fields["init_weights"] = doc["init_lora_weights"]
        pattern = doc.get("rank_pattern")
        if pattern:
            fields["rank_pattern"] = {module_map[key[:-len(".lora_E")]]: list(value) for key, value in pattern.items()
                                      if key.endswith(".lora_E") and key[:-len(".lora_E")] in module_map}
        try:
            return config_from_dict({"pet_type": "adalora", "target_modules": sorted(set(module_map.values())),
                                     **fields})
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"ADALORA adapter_config.json: {err}") from None

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type != "adalora":
            return f"{config_path}: an ADALORA adapter cannot load into {net_name}, which has {applied.pet_type}"
        if "init_r" in doc and doc["init_r"] != applied.init_r:
            return f"{config_path}: init_r={doc['init_r']!r}, but {net_name} has AdaLoRA with init_r={applied.init_r!r}"
        return None


class AdaLoraTuner(LinearTargets, SwitchedTuner):
    """AdaLoRA as a :class:`~pet_hooks.tuners.base.Tuner`: an SVD-form delta per cell, one shared switch."""

    label = "AdaLoRA"
    pet_types = ("adalora",)
    switch_attr = "pet_adalora_on"
    can_merge = True
    peft = AdaLoraPeftLayout()

    def select_targets(self, net: nn.Cell, cfg: AdaLoraConfig):
        targets = super().select_targets(net, cfg)
        unknown = sorted(set(cfg.rank_pattern or {}) - {path for path, _ in targets})
        if unknown:
            raise PetConfigError(f"rank_pattern names {unknown[:3]}, which the config does not adapt (its cells: "
                                 f"{[path for path, _ in targets][:5]})")
        return targets

    def inject(self, targets, cfg: AdaLoraConfig) -> List[Injection]:
        r = int(cfg.init_r)
        rng = init_rng(cfg)
        switch = shared_switch("pet_adalora_on")
        scale = scale_of(cfg)

        def add(index, path, cell):
            out, inp = int(cell.out_channels), int(cell.in_channels)
            if cfg.init_weights:          # PEFT's reset_lora_parameters
                values = {"lora_A": rng.normal(0.0, 0.02, (r, inp)), "lora_E": np.zeros((r, 1)),
                          "lora_B": rng.normal(0.0, 0.02, (out, r))}
            else:                         # PEFT's torch.randn before the reset
                values = {"lora_A": rng.standard_normal((r, inp)), "lora_E": rng.standard_normal((r, 1)),
                          "lora_B": rng.standard_normal((out, r))}
            params = []
            for name in FACTORS:          # explicit names: parameters added after construction get no prefix
                param = Parameter(values[name].astype(np.float32), name=f"{path}.{name}", requires_grad=True)
                setattr(cell, name, param)
                params.append(param)
            cell.adalora_scale = scale
            cell.adalora_dropout = float(cfg.lora_dropout)
            cell.pet_adalora_on = switch
            return params

        return inject_all(targets, _ADDED_ATTRS, add, mixin_of=lambda cell: AdaLoraLayer)

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """``lora_E``: zero at init, it gets a gradient from the first step whenever the cell is reached."""
        return [injection.cell.lora_E]

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        delta = delta_weight(injection.cell)
        return [(injection.cell.weight, delta if weight_is_out_in(injection.cell) else delta.T)]
