"""LoRA in other tools' files: Hugging Face PEFT's adapter layout and MindFormers' delta names.

PEFT saves a linear layer's branch as ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, DoRA's
magnitude bare as ``<module>.lora_magnitude_vector``, ``lora_bias``'s vector as ``<module>.lora_B.bias``,
and an embedding's branch bare as
``<module>.lora_embedding_A`` / ``_B``; its ``adapter_config.json`` holds ``r``, ``lora_alpha`` and the
flags below. MindFormers names the same two matrices ``mindpet_delta_lora_a`` / ``_b`` (legacy
``LoRADense``) or ``lora_A.weight`` / ``lora_B.weight`` (mcore). ``pet_hooks.io`` reads both through
these objects (``tuners/file_layouts.py``).
"""
from __future__ import annotations

import math
from typing import List, Optional

from ...config.pet_config import LoraConfig, PetConfigError
from ...errors import AdapterFileError
from ..file_layouts import MindFormersLayout, PeftLayout
from . import dora as lora_dora, embedding as lora_embedding, inits as lora_init
from .kind import BIAS_LEAF

__all__ = ["LoraPeftLayout", "MINDFORMERS_LAYOUT"]

#: legacy (mindpet LoRADense) and mcore (lora_layers.py: lora_A / lora_B are LinearNoTP / ColumnParallelLinear cells)
MINDFORMERS_LAYOUT = MindFormersLayout({"mindpet_delta_lora_a": "lora_A", "mindpet_delta_lora_b": "lora_B",
                                        "lora_A.weight": "lora_A", "lora_B.weight": "lora_B"})


class LoraPeftLayout(PeftLayout):
    """PEFT's ``LORA``: linear layers, embeddings, DoRA's magnitude."""

    peft_type = "LORA"
    weights = {"lora_A": "lora_A", "lora_B": "lora_B"}
    # DoRA's, saved without ".weight"; lora_bias's (issue 29 item 6): lora_B's bias, a key of its own
    bare_weights = {lora_dora.MAGNITUDE: lora_dora.MAGNITUDE, "lora_B.bias": BIAS_LEAF}
    # an embedding's A and B, PEFT's names, saved bare too: the second set a module's tensors may form
    embedding_weights = {leaf: leaf for leaf in lora_embedding.PEFT_LEAVES}

    def tensor_sets(self):
        """``lora_A.weight`` / ``lora_B.weight`` (linear layers), or an embedding's bare ``lora_embedding_A`` / ``_B``."""
        return [(self.weights, self.key_tail), (self.embedding_weights, "")]

    def fields(self, cfg: LoraConfig) -> dict:
        return {"lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "r": cfg.lora_rank,
                "use_dora": cfg.use_dora, "use_rslora": cfg.use_rslora, "init_lora_weights": cfg.init_lora_weights,
                "lora_bias": cfg.lora_bias, "bias": cfg.bias}

    def check_fields(self, doc, config_path: str) -> None:
        for key in ("r", "lora_alpha"):
            if not isinstance(doc.get(key), (int, float)) or isinstance(doc.get(key), bool):
                raise AdapterFileError(f"{config_path}: field {key!r} is missing or not a number")
        try:
            LoraConfig(target_modules=".*", init_lora_weights=doc.get("init_lora_weights", True),
                       use_dora=bool(doc.get("use_dora")), lora_bias=bool(doc.get("lora_bias")),
                       bias=doc.get("bias") or "none")
        except PetConfigError as err:
            raise AdapterFileError(f"{config_path}: {err}") from None

    def config_from(self, doc, target_modules: List[str]) -> LoraConfig:
        return LoraConfig(pet_type="lora", lora_rank=int(doc["r"]), lora_alpha=doc["lora_alpha"],
                          lora_dropout=float(doc.get("lora_dropout") or 0.0),
                          target_modules=target_modules, use_rslora=bool(doc.get("use_rslora")),
                          use_dora=bool(doc.get("use_dora")), init_lora_weights=doc.get("init_lora_weights", True),
                          lora_bias=bool(doc.get("lora_bias")), bias=doc.get("bias") or "none")

    def mismatch(self, doc, config_path: str, net_name: str, applied) -> Optional[str]:
        scaling = doc["lora_alpha"] / (math.sqrt(doc["r"]) if doc.get("use_rslora") else doc["r"])
        if applied.pet_type == LoraConfig.PET_TYPE and math.isclose(applied.scaling, scaling, rel_tol=1e-6):
            theirs = self.config_from(doc, [".*"])
            for key in ("use_dora", "lora_bias", "bias"):
                if getattr(theirs, key) != getattr(applied, key):
                    return (f"{config_path}: {key}={getattr(theirs, key)!r} differs from the LoRA applied to "
                            f"{net_name} ({getattr(applied, key)!r})")
            if (lora_init.mutates_base(theirs) or lora_init.mutates_base(applied)) and \
                    theirs.init_lora_weights != applied.init_lora_weights:
                return (f"{config_path}: init_lora_weights={theirs.init_lora_weights!r} differs from the LoRA applied "
                        f"to {net_name} ({applied.init_lora_weights!r}): its base weight is another residual")
            return None
        return (f"{config_path}: LoRA scaling {scaling:g} (r={doc['r']}, lora_alpha={doc['lora_alpha']}) "
                f"differs from the PET applied to {net_name} "
                f"({applied.pet_type}, scaling {getattr(applied, 'scaling', 'n/a')})")
