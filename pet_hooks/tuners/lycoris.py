"""What LoHa and LoKr share (PEFT's ``LycorisLayer``): a delta weight built from factors, added as ``x @ dW^T``.

Both methods adapt ``nn.Dense`` and MindFormers' ``Linear`` as PEFT's ``loha.Linear`` / ``lokr.Linear``
adapt ``torch.nn.Linear``: ``y = base(x) + x @ dW^T`` with ``dW`` [out, in] rebuilt from the factors on
every call (``tuners/loha.py``: a Hadamard product; ``tuners/lokr.py``: a Kronecker product), in
float32, whatever the layout of the base weight. A method module gives the mixin its ``construct``
(``delta_weight``) and its tuner the shapes and the initial values of the factors; the rest is here.

Training-time randomness, as PEFT's forward, only while the cell trains (``set_train(True)``):

* ``rank_dropout``: each row of ``dW`` is kept with probability ``1 - p`` (a fresh mask per call), and
  the kept rows are divided by the mean of the mask (LoHa always; LoKr with ``rank_dropout_scale``);
* ``module_dropout``: the whole delta is skipped for a call with probability ``p``.

Both are Python floats on the cell, so graph mode compiles the draws only where they are non-zero.
On/off is a data switch (``pet_<method>_on``, one float32 Parameter per adapter, 1 or 0): the delta is
multiplied by it, and ``out + 0 * delta`` is the base output exactly. Merging adds ``dW`` (in the
weight's layout) to the weight, unmerging subtracts it (PEFT's ``LycorisLayer.merge`` / ``unmerge``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common import dtype as mstype

from ..config.pet_config import config_from_dict
from ..errors import AdapterFileError
from .base import Injection
from .common import LinearTargets, SwitchedTuner, init_rng, inject_all, shared_switch, weight_is_out_in
from .file_layouts import PeftLayout

__all__ = ["LycorisTuner", "LycorisPeftLayout", "add_delta", "kaiming_uniform", "SETTINGS"]

#: the cell attributes every LoHa / LoKr cell gains besides its factors (``lyco_*`` settings, the switch)
SETTINGS = ("lyco_scale", "lyco_rank_dropout", "lyco_rank_dropout_scale", "lyco_module_dropout")


def add_delta(cell, x, out, weight):
    """``out + on * x @ weight^T`` with PEFT's rank and module dropout while training; ``weight`` is
    ``dW`` [out, in] in float32 (already scaled). Called from the generated classes' ``construct``."""
    if cell.training and cell.lyco_rank_dropout > 0.0:       # Python values: one branch compiled
        keep = ops.cast(ops.rand((weight.shape[0], 1)) > cell.lyco_rank_dropout, mstype.float32)
        if cell.lyco_rank_dropout_scale:
            keep = keep / ops.mean(keep)
        weight = weight * keep
    on = ops.cast(cell.pet_lyco_on, mstype.float32)
    if cell.training and cell.lyco_module_dropout > 0.0:
        on = on * ops.cast(ops.rand((1,)) > cell.lyco_module_dropout, mstype.float32)
    delta = ops.matmul(ops.cast(x, mstype.float32), ops.transpose(weight, (1, 0)))
    return out + ops.cast(delta * on, ops.dtype(out))


def kaiming_uniform(rng: np.random.Generator, shape: Tuple[int, ...]) -> np.ndarray:
    """torch's ``kaiming_uniform_(t, a=sqrt(5))``: uniform in +-1/sqrt(fan_in), fan_in = the product of
    ``shape[1:]`` (what PEFT draws; the values differ, the distribution is the same)."""
    fan_in = int(np.prod(shape[1:]))
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def out_in(cell: nn.Cell) -> Tuple[int, int]:
    return int(cell.out_channels), int(cell.in_channels)


class LycorisTuner(LinearTargets, SwitchedTuner):
    """A LoHa / LoKr tuner: the method module gives ``mixin`` (the generated classes' ``construct``),
    ``factors(cell, cfg, rng)`` (name -> initial float32 array) and ``delta_numpy(cell)`` (``dW`` [out, in])."""

    switch_attr = "pet_lyco_on"
    can_merge = True
    mixin: type = object
    factor_names: Tuple[str, ...] = ()
    rank_dropout_scale: Callable = staticmethod(lambda cfg: True)

    def factors(self, cell: nn.Cell, cfg, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def delta_numpy(self, cell: nn.Cell) -> np.ndarray:
        raise NotImplementedError

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        reason = super().can_adapt(cell)
        if reason is None and getattr(cell, "activation_flag", False):
            # x @ dW^T belongs before the layer's own activation, inside its call: not reachable from outside
            reason = (f"{self.label} adds x @ dW^T to the layer's output before its activation; a "
                      f"{type(cell).__name__} with its own activation ({type(cell.activation).__name__}) is not "
                      f"supported: target a layer without one")
        return reason

    def inject(self, targets, cfg) -> List[Injection]:
        rng = init_rng(cfg)
        switch = shared_switch(f"pet_{self.pet_types[0]}_on")

        def add(index, path, cell):
            params = []
            for name, value in self.factors(cell, cfg, rng).items():
                # explicit names: parameters added after construction get no path prefix
                setattr(cell, name, Parameter(value, name=f"{path}.{name}", requires_grad=True))
                params.append(getattr(cell, name))
            cell.lyco_scale = float(cfg.alpha) / int(cfg.r)
            cell.lyco_rank_dropout = float(cfg.rank_dropout)
            cell.lyco_rank_dropout_scale = bool(self.rank_dropout_scale(cfg))
            cell.lyco_module_dropout = float(cfg.module_dropout)
            cell.pet_lyco_on = switch
            return params

        return inject_all(targets, self.factor_names + SETTINGS + ("pet_lyco_on",), add,
                          mixin_of=lambda cell: self.mixin)

    def zero_factor(self, cell: nn.Cell) -> str:
        """The factor PEFT's default init sets to zero (the gradient guard's witness)."""
        raise NotImplementedError

    def grad_sentinels(self, injection: Injection) -> List[Parameter]:
        """The factor zero at init: it gets a gradient from the first step whenever the delta is reached (the
        others from the second), and with no gradient it stays exactly zero even under weight decay."""
        return [getattr(injection.cell, self.zero_factor(injection.cell))]

    def weight_deltas(self, injection: Injection) -> List[Tuple[Parameter, np.ndarray]]:
        """``dW`` in the weight's layout ([out, in], or [in, out] for a Linear without transpose_b)."""
        delta = self.delta_numpy(injection.cell)
        return [(injection.cell.weight, delta if weight_is_out_in(injection.cell) else delta.T)]


def factor(cell: nn.Cell, name: str) -> np.ndarray:
    return getattr(cell, name).astype(mstype.float32).asnumpy()


class LycorisPeftLayout(PeftLayout):
    """PEFT's LoHa / LoKr files: bare tensors ``<module>.<factor>`` named as ours, and the config's fields."""

    key_tail = ""
    #: PEFT's own fields of the method beyond the shared ones
    extra_fields: Tuple[str, ...] = ()

    def fields(self, cfg) -> dict:
        doc = {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
               "use_effective_conv2d": cfg.use_effective_conv2d, "init_weights": cfg.init_weights,
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
               "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
        doc.update({name: getattr(cfg, name) for name in self.extra_fields})
        return doc

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            if doc.get(name):
                raise AdapterFileError(f"{config_path}: {name}={doc[name]!r} is not supported for {self.peft_type} "
                                       f"by pet_hooks (one r and alpha for every module)")

    def config_from(self, doc: Mapping, target_modules: List[str]):
        fields = {name: doc[name] for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                                               "init_weights") + self.extra_fields if name in doc}
        try:
            return config_from_dict({"pet_type": self.peft_type.lower(), "target_modules": target_modules, **fields})
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"{self.peft_type} adapter_config.json: {err}") from None

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type != self.peft_type.lower():
            return f"{config_path}: a {self.peft_type} adapter cannot load into {net_name}, which has {applied.pet_type}"
        for name in ("r", "alpha") + self.extra_fields:
            if name in doc and doc[name] != getattr(applied, name):
                return (f"{config_path}: {name}={doc[name]!r}, but {net_name} has {self.peft_type} with "
                        f"{name}={getattr(applied, name)!r}")
        return None
