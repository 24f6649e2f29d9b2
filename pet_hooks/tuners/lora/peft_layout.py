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

import dataclasses
import logging
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

from ...config.lora_patterns import PATTERN_FIELDS, check_pattern, pattern_key
from ...config.pet_config import LoraConfig, PetConfigError
from ...errors import AdapterFileError
from ..file_layouts import MindFormersLayout, PeftLayout
from . import dora as lora_dora, embedding as lora_embedding, inits as lora_init
from .kind import BIAS_LEAF

__all__ = ["LoraPeftLayout", "MINDFORMERS_LAYOUT"]

logger = logging.getLogger("pet_hooks")

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
            for name in PATTERN_FIELDS:         # rank_pattern / alpha_pattern
                check_pattern(name, doc.get(name))
        except PetConfigError as err:
            raise AdapterFileError(f"{config_path}: {err}") from None

    def config_from(self, doc, target_modules: List[str]) -> LoraConfig:
        return LoraConfig(pet_type="lora", lora_rank=int(doc["r"]), lora_alpha=doc["lora_alpha"],
                          lora_dropout=float(doc.get("lora_dropout") or 0.0),
                          target_modules=target_modules, use_rslora=bool(doc.get("use_rslora")),
                          use_dora=bool(doc.get("use_dora")), init_lora_weights=doc.get("init_lora_weights", True),
                          lora_bias=bool(doc.get("lora_bias")), bias=doc.get("bias") or "none")

    # -- rank_pattern / alpha_pattern ---------------------------------------------------------------------
    # Written: PEFT matches its keys against PEFT's module names, so a cell whose rank or alpha is not the
    # default gets an entry under its own PEFT module name (each part of a fused cell under the part's):
    # every pattern is translated, whatever name map moved the cells. Read: each module of the file takes
    # PEFT's rank / alpha by PEFT's rule on its PEFT name, and our config holds them under our escaped paths.
    def module_fields(self, injections: Sequence, mapped: Mapping[str, str], target_modules, cfg=None) -> dict:
        if cfg is None or not cfg.has_patterns:
            return {}
        out: Dict[str, dict] = {"rank_pattern": {}, "alpha_pattern": {}}
        for ours, theirs in sorted(mapped.items(), key=lambda item: item[1]):
            own = cfg.for_module(ours.split("#", 1)[0])            # "<path>#<part>": a fused cell's part
            if own.lora_rank != cfg.lora_rank:
                out["rank_pattern"][theirs] = own.lora_rank
            if own.lora_alpha != cfg.lora_alpha:
                out["alpha_pattern"][theirs] = own.lora_alpha
        return out

    def _per_module(self, doc, module_map: Mapping[str, str]) -> Dict[str, dict]:
        """rank_pattern / alpha_pattern of our config for the file's modules (their path -> our path)."""
        out: Dict[str, dict] = {}
        for name, default_key in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            patterns = doc.get(name) or {}
            used, own = set(), {}
            for theirs, ours in sorted(module_map.items()):
                key = pattern_key(patterns, theirs)
                used.add(key)
                value = patterns[key] if key is not None else doc[default_key]
                if own.setdefault(ours, (value, theirs))[0] != value:
                    raise AdapterFileError(f"{name}: modules '{own[ours][1]}' and '{theirs}' are parts of one cell "
                                           f"'{ours}' but have {own[ours][0]} and {value}")
            unused = [key for key in patterns if key not in used]
            if unused:          # PEFT warns and ignores them; the tensors' shapes are what counts
                logger.warning("pet_hooks: PEFT adapter's %s key(s) %s match no module of the adapter and are "
                               "ignored (as PEFT ignores them)", name, unused)
            out[name] = {re.escape(ours): value for ours, (value, _) in sorted(own.items())
                         if value != doc[default_key]}
        return out

    def config_from_modules(self, doc, module_map: Mapping[str, str]) -> LoraConfig:
        cfg = self.config_from(doc, sorted(set(module_map.values())))
        return dataclasses.replace(cfg, **self._per_module(doc, module_map))

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        patterned = doc.get("rank_pattern") or doc.get("alpha_pattern") or getattr(applied, "has_patterns", False)
        if patterned and applied.pet_type == LoraConfig.PET_TYPE and module_map:
            try:
                theirs = self.config_from_modules(doc, module_map)
            except AdapterFileError as err:
                return f"{config_path}: {err}"
            for module, ours in sorted(module_map.items()):
                want, have = theirs.for_module(ours), applied.for_module(ours)
                if not math.isclose(want.scaling, have.scaling, rel_tol=1e-6):
                    return (f"{config_path}: module '{module}' has LoRA scaling {want.scaling:g} (r={want.lora_rank}, "
                            f"lora_alpha={want.lora_alpha}, rank_pattern / alpha_pattern applied), the LoRA applied "
                            f"to {net_name} {have.scaling:g} in its cell '{ours}'")
            doc = {**doc, "r": applied.lora_rank, "lora_alpha": applied.lora_alpha, "rank_pattern": {},
                   "alpha_pattern": {}, "use_rslora": applied.use_rslora}      # the scalings agree cell by cell
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
