"""What a method's deltas look like in other tools' files: one layout object per file format.

A :class:`~pet_hooks.tuners.base.Tuner` says what its method does to a net; how the method's tensors and
fields are spelled in Hugging Face PEFT's ``adapter_config.json`` / ``adapter_model.safetensors``, or in a
MindFormers checkpoint, is a layout object the tuner carries (``tuner.peft``, ``tuner.mindformers``;
None when the format has no such method). ``pet_hooks.io`` reads and writes the files and asks the
layout for every name and field, so a new format is a new layout class here, and a method joins a
format by giving its tuner one such object::

    class IA3Tuner(Tuner):
        peft = IA3PeftLayout()          # PeftLayout with the method's peft_type, tensor names and fields

The defaults below are those of a method whose PEFT modules hold ``<module>.<suffix>.weight`` tensors
and whose config needs nothing beyond ``target_modules``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config.pet_config import PetConfig
from ..errors import AdapterFileError

__all__ = ["PeftLayout", "MindFormersLayout"]


class PeftLayout:
    """One method in Hugging Face PEFT's adapter format (``peft_type``, tensor names, config fields)."""

    #: PEFT's ``peft_type`` ("LORA")
    peft_type: ClassVar[str] = ""
    #: PEFT's tensor key suffix (``<module>.<suffix>.weight``) -> the leaf of our delta's name
    weights: ClassVar[Mapping[str, str]] = {}
    #: what follows the suffix in PEFT's keys: ".weight" for LoRA's sub-modules, "" for IA3's bare vectors
    key_tail: ClassVar[str] = ".weight"
    #: PEFT's optional key suffixes saved bare, with no tail (DoRA's ``lora_magnitude_vector``) -> our leaf;
    #: written when the cell has that delta, read when the file has it
    bare_weights: ClassVar[Mapping[str, str]] = {}
    #: tensors of the whole adapter, not of one module (VeRA's shared projections): PEFT's full key
    #: (``base_model.vera_A``) -> the name of our (shared) delta; written on saving, required on loading
    shared_weights: ClassVar[Mapping[str, str]] = {}
    #: a method whose adapter is tensors of the whole model and none per module (prompt tuning's
    #: ``prompt_embeddings``): PEFT's full key -> the name of our delta; the files hold these alone
    #: (``pet_hooks.io.whole_adapter``)
    whole_weights: ClassVar[Mapping[str, str]] = {}

    def tensor_sets(self) -> List[Tuple[Mapping[str, str], str]]:
        """The sets of tensors one PEFT module of this method may hold, ``[(PEFT suffix -> our leaf, key tail)]``;
        each module's tensors form exactly one of them. By default ``weights`` with ``key_tail``."""
        return [(self.weights, self.key_tail)]

    def derive_shared(self, doc: Mapping, absent: Mapping[str, str], cells: Sequence, weights_path: str) -> dict:
        """Our name -> array for the ``shared_weights`` a PEFT file lacks (``absent``: PEFT key -> our name), given
        the cells the adapter maps onto; by default an AdapterFileError naming the first absent key."""
        key = next(iter(absent))
        raise AdapterFileError(f"{weights_path} has no '{key}' (the adapter's shared tensor)")

    # AdaLoRA (issue 30 item 1): PEFT saves a rank-pattern'd adapter's kept ranks only
    def saved_module(self, cfg: PetConfig, path: str, tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One cell's tensors as PEFT's file holds them (PEFT suffix -> array); by default as they are."""
        return tensors

    def loaded_module(self, doc: Mapping, module: str, tensors: Dict[str, np.ndarray],
                      weights_path: str) -> Dict[str, np.ndarray]:
        """One PEFT module's tensors (suffix -> array) in our deltas' shapes; by default as they are."""
        return tensors

    def fields(self, cfg: PetConfig) -> dict:
        """The method's own fields of an ``adapter_config.json`` written for ``cfg``."""
        return {}

    def module_fields(self, injections: Sequence, mapped: Mapping[str, str], target_modules, cfg=None) -> dict:
        """Fields that name modules (IA3's ``feedforward_modules``, LoRA's ``rank_pattern``), in PEFT's names:
        ``mapped`` is our cell path -> their module path (``injections`` are the net's), ``target_modules``
        what the config says, ``cfg`` the adapter's config."""
        return {}

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        """Raise AdapterFileError naming ``config_path`` when the method's fields of a PEFT config are unusable."""

    def config_from(self, doc: Mapping, target_modules: List[str]) -> PetConfig:
        """The config equivalent to an ``adapter_config.json``, adapting ``target_modules``."""
        raise NotImplementedError(f"{type(self).__name__} reads no PEFT config")

    def config_from_modules(self, doc: Mapping, module_map: Mapping[str, str]) -> PetConfig:
        """The config for a PEFT adapter whose modules map onto our cells (their path -> our path); by default
        :meth:`config_from` over our paths. Methods whose config names modules beyond ``target_modules``
        (IA3's ``feedforward_modules``) translate them here."""
        return self.config_from(doc, sorted(set(module_map.values())))

    def mismatch(self, doc: Mapping, config_path: str, net_name: str, applied: PetConfig,
                 module_map: Optional[Mapping[str, str]] = None) -> Optional[str]:
        """Why a PEFT adapter cannot load into a net that already has ``applied``; None when it can.
        ``module_map``: the file's module paths -> our cell paths (per-module fields such as LoRA's patterns)."""
        return None


@dataclass(frozen=True)
class MindFormersLayout:
    """One method in MindFormers' checkpoints: its delta names there, as ``<cell>.<theirs>``."""

    #: MindFormers' delta name suffix -> the leaf of our delta's name
    weights: Mapping[str, str] = field(default_factory=dict)
