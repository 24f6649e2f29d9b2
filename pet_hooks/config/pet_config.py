"""PET configuration: the dataclasses, their validation, and ``load_config``.

Field names follow the ``pet_config`` block of MindFormers model YAMLs, so a block can be
moved over unchanged::

    cfg = load_config("run_llama_lora.yaml")      # model.model_config.pet_config
    cfg = load_config({"pet_type": "lora", "lora_rank": 8, "target_modules": ".*wq|.*wv"})

Every value is checked when the dataclass is built; a bad one raises :class:`PetConfigError`
(a ``ValueError``) naming the field and the value, or :class:`PetConfigTypeError` (both a
``TypeError`` and a ``ValueError``) when the value has the wrong type.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Union

import yaml

from ..errors import PetConfigError, PetConfigTypeError
from .methods import config_types, method, register_method
from .lora_patterns import PATTERN_FIELDS, check_pattern, pattern_key
from .strategy_ckpt import check_run_yaml

__all__ = [
    "PetConfig", "LoraConfig", "PTuning2Config", "PrefixTuningConfig", "IA3Config", "BitFitConfig",
    "AdapterConfig", "LowRankAdapterConfig",
    "LoHaConfig", "LoKrConfig",   # issue 30 item 3
    "OFTConfig",   # issue 30 item 5
    "VeraConfig",   # issue 30 item 4
    "AdaLoraConfig",   # issue 30 item 1
    "PromptTuningConfig",   # issue 30 item 2
    "PetConfigError", "PetConfigTypeError", "load_config", "config_from_dict", "explain", "model_hints",
    "config_types", "config_differences",
]

logger = logging.getLogger("pet_hooks")
# Where a MindFormers run YAML keeps the block, outermost first.
_MINDFORMERS_PATH = ("model", "model_config", "pet_config")
# model_config entries the prefix methods may need when they cannot read them off the model.
_MODEL_HINT_KEYS = ("num_layers", "num_heads", "num_attention_heads", "n_kv_heads",
                    "kv_channels", "hidden_size",
                    # the same in Qwen3Config's (Hugging Face's) names
                    "num_hidden_layers", "num_key_value_heads", "head_dim")
_DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- checks
def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PetConfigTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise PetConfigError(f"{name} must be >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PetConfigTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    # nan passes every comparison check below (nan <= 0 is False) and would poison the weights.
    if not math.isfinite(value):
        raise PetConfigError(f"{name} must be a finite number, got {value!r}")


def _check_rate(name: str, value: Any) -> None:
    _check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise PetConfigError(f"{name} must be in [0, 1), got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise PetConfigTypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value.lower() not in choices:
        raise PetConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_regex(name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise PetConfigTypeError(f"{name} entries must be strings, got {pattern!r} ({type(pattern).__name__})")
    if not pattern.strip():
        raise PetConfigError(f"{name} contains an empty pattern")
    try:
        re.compile(pattern)
    except re.error as err:
        raise PetConfigError(f"{name}: invalid regular expression {pattern!r}: {err}") from None


def _as_pattern_list(name: str, value: Any) -> Optional[list]:
    """None, a string or a list of strings -> None or a list of strings (each checked)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise PetConfigTypeError(f"{name} must be a string or a list of strings, got {value!r}")
    if not items:
        raise PetConfigError(f"{name} is an empty list")
    for item in items:
        _check_regex(name, item)
    return list(items)


def _check_targets(cfg) -> None:
    """A regex string, a list of names, or (prefix methods only) None."""
    if isinstance(cfg.target_modules, str):
        _check_regex("target_modules", cfg.target_modules)
    elif cfg.target_modules is not None:
        cfg.target_modules = _as_pattern_list("target_modules", cfg.target_modules)


def _warn_long_prefix(name: str, length: int) -> None:
    if length > 60:
        logger.warning("pet_hooks: %s=%d: prefixes longer than 60 positions were seen to converge poorly "
                       "(about 5000 training samples) and produce garbled output", name, length)


# issue 29 items 2/3: PEFT's layer selection fields (LoRA; exclude_modules and "all-linear" for IA3 too)
def _check_exclude_modules(cfg) -> None:
    """PEFT's ``exclude_modules``: a regex string (kept a string: fullmatched) or a non-empty list of names."""
    value = cfg.exclude_modules
    if value is None or isinstance(value, str):
        if value is not None:
            _check_regex("exclude_modules", value)
        return
    if not isinstance(value, (list, tuple, set)):
        raise PetConfigTypeError(f"exclude_modules must be a regex string or a list of names, got {value!r}")
    if not value:
        raise PetConfigError("exclude_modules is an empty list")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PetConfigTypeError(f"exclude_modules entries must be non-empty strings, got {item!r}")
    cfg.exclude_modules = sorted(value) if isinstance(value, set) else list(value)


def _check_all_linear(cfg) -> None:
    """``target_modules: "all-linear"`` in any case (PEFT lowers it) is stored as PEFT spells it."""
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        cfg.target_modules = "all-linear"


def _check_linear_selection(cfg) -> None:
    """What LoHa, LoKr, VeRA and OFT check alike of their cell selection: ``target_modules`` given (a regex, a
    list or 'all-linear'), ``exclude_layers``, and PEFT's layer selection."""
    if cfg.target_modules is None:
        raise PetConfigError(f"target_modules is required for {cfg.PET_TYPE} (a regex such as '.*wq|.*wv', "
                             f"a list of cell names, or 'all-linear')")
    _check_targets(cfg)
    cfg.exclude_layers = _as_pattern_list("exclude_layers", cfg.exclude_layers)
    _check_layer_selection(cfg)


def _check_layer_selection(cfg) -> None:
    """``exclude_modules``, ``layers_to_transform`` (an int >= 0 or a non-empty list of them, kept sorted and
    unique) and ``layers_pattern`` (a name or a list of names, each a regex piece; needs layers_to_transform)."""
    _check_all_linear(cfg)
    _check_exclude_modules(cfg)
    value = cfg.layers_to_transform
    if value is not None:
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise PetConfigTypeError(f"layers_to_transform must be a layer index or a list of them, got {value!r}")
        if not items:
            raise PetConfigError("layers_to_transform is an empty list")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise PetConfigTypeError(f"layers_to_transform entries must be integers, got {item!r} "
                                         f"({type(item).__name__})")
            if item < 0:
                raise PetConfigError(f"layers_to_transform entries must be >= 0, got {item!r}")
        cfg.layers_to_transform = sorted(set(items))
    if cfg.layers_pattern is not None:
        cfg.layers_pattern = _as_pattern_list("layers_pattern", cfg.layers_pattern)
        if cfg.layers_to_transform is None:
            raise PetConfigError(f"layers_pattern {cfg.layers_pattern!r} needs layers_to_transform (PEFT's rule: "
                                 f"the pattern only says where the layer index is)")


# ----------------------------------------------------------------------------- dataclasses
@dataclass
class PetConfig:
    """Fields shared by every PET method.

    ``freeze_include`` / ``freeze_exclude`` are MindFormers' (mindpet's) lists of
    ``fnmatch`` wildcards over parameter names: base parameters matching ``freeze_exclude``
    stay trainable (and are saved with the adapter); parameters matching ``freeze_include``
    and not ``freeze_exclude`` are frozen even if they are deltas.
    """

    pet_type: str = field(default="", metadata={
        "help": "the method: lora, ptuning2, prefixtuning, ia3, bitfit, adapter, low_rank_adapter, loha, lokr, oft, vera, adalora or prompt_tuning"})
    freeze_include: Optional[list] = field(default=None, metadata={"help": "fnmatch patterns of params to freeze"})
    freeze_exclude: Optional[list] = field(default=None, metadata={"help": "fnmatch patterns of params kept trainable"})
    # modules_to_save (PEFT's, on every PEFT config): a trainable copy of each named cell, saved with the adapter;
    # the original stays frozen and untouched (pet_hooks.surgery.modules_to_save). Part of the adapter (compared).
    modules_to_save: Optional[list] = field(default=None, metadata={
        "help": "cell names (PEFT's: a cell whose path ends with an entry); each gets a trainable copy, saved "
                "with the adapter, the original kept frozen (freeze_exclude trains the original in place)"})
    # model_config values (num_layers, kv_channels, ...) found beside a pet_config block.
    model_hints: dict = field(default_factory=dict, repr=False, compare=False,
                              metadata={"help": "model_config values found next to the pet_config block"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    seed: Optional[int] = field(default=None, compare=False,
                                metadata={"help": "seed for the deltas' init (the same deltas on every rank)"})
    # A compile setting, not part of the adapter (compare=False): see pet_hooks.surgery.graph_reuse.
    reuse_block_graphs: bool = field(default=True, compare=False, metadata={
        "help": "graph mode: compile identically adapted repeated blocks once (MindSpore lazy inline)"})
    # A memory setting, not part of the adapter (compare=False): see pet_hooks.surgery.chunked_loss.
    chunked_loss: Optional[int] = field(default=None, compare=False, metadata={
        "help": "MindFormers' Llama: compute the head and loss N rows at a time, never the whole logits (None: off)"})
    # A training setting, not part of the adapter (compare=False): see pet_hooks.training.fused_adamw.
    fused_optimizer: bool = field(default=False, compare=False, metadata={
        "help": "the doors build pet_hooks.optim.AdamW (one fused kernel per tensor, the same update) for "
                "MindSpore's experimental AdamW and MindFormers' AdamW"})

    PET_TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.pet_type:
            self.pet_type = self.PET_TYPE
        if not isinstance(self.pet_type, str) or self.pet_type.lower() != self.PET_TYPE:
            raise PetConfigError(f"pet_type must be {self.PET_TYPE!r} for {type(self).__name__}, "
                                 f"got {self.pet_type!r}")
        self.pet_type = self.pet_type.lower()
        for name in ("freeze_include", "freeze_exclude"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                    raise PetConfigTypeError(f"{name} must be a list of non-empty strings, got {value!r}")
                setattr(self, name, list(value))
        if self.modules_to_save is not None:         # modules_to_save: a list of non-empty names (PEFT's)
            names = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
            if not isinstance(names, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in names):
                raise PetConfigTypeError(f"modules_to_save must be a list of non-empty cell names, "
                                         f"got {self.modules_to_save!r}")
            self.modules_to_save = list(dict.fromkeys(names)) or None
        if not isinstance(self.model_hints, dict):
            raise PetConfigTypeError(f"model_hints must be a mapping, got {self.model_hints!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_bool("reuse_block_graphs", self.reuse_block_graphs)
        _check_bool("fused_optimizer", self.fused_optimizer)
        if self.chunked_loss is not None:
            _check_int("chunked_loss", self.chunked_loss)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; subclasses extend this."""

    def for_loading(self) -> "PetConfig":
        """The config to apply when a saved adapter's values follow at once (prompt tuning: an init that reads
        nothing, as PEFT's ``inference_mode``); by default the config itself. (issue 30 item 2)"""
        return self

    def to_dict(self) -> dict:
        """The fields a user sets (what ``adapter_config.json`` stores), without ``model_hints``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model_hints"}


def explain(cfg: PetConfig) -> str:
    """One line per field of ``cfg``: its value and its ``help`` (``pet-hooks check-config --explain``)."""
    rows = [(f.name, json.dumps(getattr(cfg, f.name)), f.metadata.get("help", ""))
            for f in dataclasses.fields(cfg) if f.name != "model_hints"]
    if cfg.model_hints:
        rows.append(("model_hints", json.dumps(cfg.model_hints, sort_keys=True),
                     next(f.metadata["help"] for f in dataclasses.fields(cfg) if f.name == "model_hints")))
    name_width = max(len(name) for name, _, _ in rows)
    value_width = min(24, max(len(value) for _, value, _ in rows))
    return "\n".join(f"{name.ljust(name_width)}  {value.ljust(value_width)}  {text}".rstrip()
                     for name, value, text in rows)


@dataclass
class LoraConfig(PetConfig):
    """LoRA: ``y = base(x) + scaling * dropout(x) @ A^T @ B^T`` on the matched layers."""

    PET_TYPE: ClassVar[str] = "lora"

    lora_rank: int = field(default=8, metadata={"help": "rank r of A [r, in] and B [out, r]"})
    lora_alpha: float = field(default=16, metadata={"help": "scaling = alpha / r (alpha / sqrt(r) with use_rslora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input, in [0, 1)"})
    target_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "a regex fullmatched against dotted cell paths, or a list of names, or "
                                        "'all-linear' (every linear cell but the output head, PEFT's)"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})
    # issue 29 item 2/3, PEFT's layer selection: exclude_modules, layers_to_transform, layers_pattern
    # (target_modules also takes PEFT's "all-linear"; pet_hooks.matching.layers / all_linear)
    exclude_modules: Union[str, list, None] = field(default=None, metadata={
        "help": "PEFT's: a regex fullmatched on a cell's own path, or a list of names (a path or its last parts); "
                "a cell it or exclude_layers excludes is skipped"})
    layers_to_transform: Union[int, list, None] = field(default=None, metadata={
        "help": "PEFT's: adapt only the cells in these layer indices (an int or a list; the number after "
                "layers_pattern, or after the first numbered container: model.layers.N, blocks.N, decoder.layers.N)"})
    layers_pattern: Union[str, list, None] = field(default=None, metadata={
        "help": "PEFT's: the name(s) of the layer container whose index layers_to_transform reads "
                "(layers, h, decoder.layers); None = the first numbered container in the path"})
    # Init-only fields (compare=False): two configs that differ only here describe the same adapter.
    lora_a_init: str = field(default="kaiming_uniform", compare=False,
                             metadata={"help": "kaiming_uniform | normal"})
    lora_b_init: str = field(default="zeros", metadata={"help": "zeros (the output is unchanged at init)"})
    # PEFT's name and values. Part of the adapter (compared): PiSSA / OLoRA change the base weight.
    init_lora_weights: Union[bool, str] = field(default=True, metadata={
        "help": "true (A by lora_a_init, B zeros) | false (A and B random) | gaussian | pissa | pissa_niter_N | "
                "olora (PEFT's values; pissa/olora replace the base weight by its residual)"})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA: a trainable magnitude per output row (lora_magnitude_vector), direction W + scaling*B@A"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    # rank_pattern / alpha_pattern (issue 29): PEFT's per-module rank and alpha, see config/lora_patterns.py.
    rank_pattern: dict = field(default_factory=dict, metadata={
        "help": "regex -> rank for the cells it selects (PEFT's rule: the key matches the end of the dotted "
                "path, after a dot; the first matching key wins); a key selecting no adapted cell is an error"})
    alpha_pattern: dict = field(default_factory=dict, metadata={
        "help": "regex -> lora_alpha for the cells it selects (matched as rank_pattern)"})
    param_init_type: str = field(default="float32", metadata={"help": "dtype of the delta parameters"})
    compute_dtype: Optional[str] = field(default=None, metadata={"help": "branch dtype; None = the layer's own"})
    # A training setting, not part of the adapter (compare=False): see pet_hooks.training.loraplus.
    loraplus_lr_ratio: Optional[float] = field(default=None, compare=False, metadata={
        "help": "LoRA+: the rebuilt optimizer gives the B matrices lr x this ratio (PEFT's name)"})
    # lora_bias / bias (issue 29 item 6): PEFT's names and values. Part of the adapter (compared).
    lora_bias: bool = field(default=False, metadata={
        "help": "a trainable bias on B (<cell>.lora_B_bias, [out], zeros; PEFT's lora_B.bias): the branch adds "
                "scaling * bias; linear layers only, not with DoRA; merging adds it to the base bias"})
    bias: str = field(default="none", metadata={
        "help": "none | all (every base parameter named bias or *.bias trains) | lora_only (the base biases of "
                "the adapted layers train); the trained biases are saved with the adapter (PEFT's bias)"})
    # trainable_token_indices (PEFT's): pet_hooks.surgery.trainable_tokens. Part of the adapter (compared).
    trainable_token_indices: Union[list, dict, None] = field(default=None, metadata={
        "help": "train only these rows of an embedding (and of a head tied to it): a list of token ids (the "
                "first embedding cell) or {cell name: ids} (a cell whose path ends with the name)"})

    _A_INITS: ClassVar[dict] = {"kaiming_uniform": "kaiming_uniform", "he_uniform": "kaiming_uniform",
                                "heuniform": "kaiming_uniform", "normal": "normal"}

    def validate(self) -> None:
        _check_int("lora_rank", self.lora_rank)
        _check_number("lora_alpha", self.lora_alpha)
        if self.lora_alpha <= 0:
            raise PetConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        _check_rate("lora_dropout", self.lora_dropout)
        if self.target_modules is None:
            raise PetConfigError("target_modules is required for LoRA (a regex such as '.*wq|.*wv', "
                                 "or a list of cell names)")
        _check_targets(self)
        self.exclude_layers = _as_pattern_list("exclude_layers", self.exclude_layers)
        _check_layer_selection(self)        # issue 29: exclude_modules, layers_to_transform, layers_pattern
        _check_choice("lora_a_init", self.lora_a_init, tuple(self._A_INITS))
        self.lora_a_init = self._A_INITS[self.lora_a_init.lower()]
        _check_choice("lora_b_init", self.lora_b_init, ("zero", "zeros"))
        self.lora_b_init = "zeros"
        self.init_lora_weights = _init_lora_weights(self.init_lora_weights)
        if self.init_lora_weights is not True and self.lora_a_init != "kaiming_uniform":
            raise PetConfigError(f"lora_a_init {self.lora_a_init!r} applies only when init_lora_weights is true "
                                 f"(the default init), got init_lora_weights={self.init_lora_weights!r}")
        _check_bool("use_dora", self.use_dora)
        _check_bool("use_rslora", self.use_rslora)
        for name in PATTERN_FIELDS:      # rank_pattern / alpha_pattern
            setattr(self, name, check_pattern(name, getattr(self, name)))
        self.param_init_type = _dtype_name("param_init_type", self.param_init_type)
        if self.compute_dtype is not None:
            self.compute_dtype = _dtype_name("compute_dtype", self.compute_dtype)
        if self.trainable_token_indices is not None:       # trainable_token_indices
            self.trainable_token_indices = _token_indices(self.trainable_token_indices)
        if self.loraplus_lr_ratio is not None:
            _check_number("loraplus_lr_ratio", self.loraplus_lr_ratio)
            if self.loraplus_lr_ratio <= 0:
                raise PetConfigError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio!r}")
        # lora_bias / bias (issue 29 item 6), PEFT's checks
        _check_bool("lora_bias", self.lora_bias)
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise PetConfigError(f"lora_bias=True is only supported with init_lora_weights true or false, got "
                                 f"init_lora_weights={self.init_lora_weights!r}")
        if self.lora_bias and self.use_dora:
            raise PetConfigError("lora_bias=True is not supported with DoRA (use_dora=True), as in PEFT")
        _check_choice("bias", self.bias, ("none", "all", "lora_only"))
        self.bias = self.bias.lower()

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return float(self.lora_alpha) / (self.lora_rank ** 0.5 if self.use_rslora else self.lora_rank)

    # rank_pattern / alpha_pattern: the one place a cell's own rank and alpha are read.
    def for_module(self, path: str) -> "LoraConfig":
        """The config of the cell at ``path``: ``lora_rank`` / ``lora_alpha`` from the first ``rank_pattern`` /
        ``alpha_pattern`` key selecting it (PEFT's rule, ``config/lora_patterns.py``), the patterns emptied;
        this config itself when no key selects it."""
        rank_key, alpha_key = pattern_key(self.rank_pattern, path), pattern_key(self.alpha_pattern, path)
        if rank_key is None and alpha_key is None:
            return self
        return dataclasses.replace(
            self, rank_pattern={}, alpha_pattern={},
            lora_rank=self.rank_pattern[rank_key] if rank_key is not None else self.lora_rank,
            lora_alpha=self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha)

    def __eq__(self, other: Any) -> bool:
        """The dataclass equality, except that rank_pattern / alpha_pattern compare in order too (the first key
        selecting a cell wins, so two mappings of the same items in another order may be other adapters)."""
        if other.__class__ is not self.__class__:
            return NotImplemented
        return _compared(self) == _compared(other)

    __hash__ = None     # as the dataclass's own equality leaves it: configs are mutable

    @property
    def has_patterns(self) -> bool:
        """True when ``rank_pattern`` or ``alpha_pattern`` holds a key (ranks or scalings may differ per cell)."""
        return bool(self.rank_pattern or self.alpha_pattern)


def _compared(cfg: PetConfig) -> tuple:
    """The fields an equality compares (``compare=True``), each mapping as its items in order."""
    return tuple(_compared_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.compare)


@dataclass
class PTuning2Config(PetConfig):
    """P-Tuning v2: learned key/value prefixes for every attention layer (MindFormers ``ptuning2``)."""

    PET_TYPE: ClassVar[str] = "ptuning2"

    pre_seq_len: int = field(default=16, metadata={"help": "prefix length"})
    prefix_projection: bool = field(default=False, metadata={"help": "reparametrise through an MLP"})
    projection_dim: Optional[int] = field(default=None, metadata={"help": "MLP width when prefix_projection"})
    dropout_rate: float = field(default=0.0, metadata={"help": "dropout on the prefix key/values"})
    target_modules: Union[str, list, None] = field(default=None, metadata={"help": "attention cells; None = known"})

    def validate(self) -> None:
        _check_int("pre_seq_len", self.pre_seq_len)
        _warn_long_prefix("pre_seq_len", self.pre_seq_len)
        _check_bool("prefix_projection", self.prefix_projection)
        if self.prefix_projection:
            if self.projection_dim is None:
                raise PetConfigError("projection_dim is required when prefix_projection is true")
            _check_int("projection_dim", self.projection_dim)
        elif self.projection_dim is not None:
            _check_int("projection_dim", self.projection_dim)
        _check_rate("dropout_rate", self.dropout_rate)
        _check_targets(self)


@dataclass
class PrefixTuningConfig(PetConfig):
    """Prefix-Tuning: prefixes produced by embedding -> Dense -> tanh -> Dense (MindFormers ``prefixtuning``)."""

    PET_TYPE: ClassVar[str] = "prefixtuning"

    prefix_token_num: int = field(default=16, metadata={"help": "prefix length"})
    mid_dim: int = field(default=512, metadata={"help": "width of the reparametrisation MLP"})
    dropout_rate: float = field(default=0.0, metadata={"help": "dropout on the prefix key/values"})
    target_modules: Union[str, list, None] = field(default=None, metadata={"help": "attention cells; None = known"})

    def validate(self) -> None:
        _check_int("prefix_token_num", self.prefix_token_num)
        _warn_long_prefix("prefix_token_num", self.prefix_token_num)
        _check_int("mid_dim", self.mid_dim)
        _check_rate("dropout_rate", self.dropout_rate)
        _check_targets(self)


@dataclass
class IA3Config(PetConfig):
    """(IA)^3 (PEFT's ``IA3Config``): a learned vector scales each matched layer's output, or, for
    the layers ``feedforward_modules`` matches, its input."""

    PET_TYPE: ClassVar[str] = "ia3"

    target_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "a regex fullmatched against dotted cell paths, or a list of names, or "
                                        "'all-linear' (every linear cell but the output head, PEFT's)"})
    feedforward_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "targets whose input (not output) is scaled; each must select a target"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})
    # issue 29 item 3: PEFT's IA3Config has exclude_modules (and target_modules "all-linear") too
    exclude_modules: Union[str, list, None] = field(default=None, metadata={
        "help": "PEFT's: a regex fullmatched on a cell's own path, or a list of names (a path or its last parts); "
                "a cell it or exclude_layers excludes is skipped"})
    # Init-only (compare=False), as lora_a_init: two configs differing only here describe one adapter.
    init_ia3_weights: bool = field(default=True, compare=False, metadata={
        "help": "true: vectors start at 1 (output unchanged); false: standard normal, as PEFT"})

    def validate(self) -> None:
        if self.target_modules is None:
            raise PetConfigError("target_modules is required for IA3 (a regex such as '.*wk|.*wv|.*w2', "
                                 "or a list of cell names)")
        _check_targets(self)
        if isinstance(self.feedforward_modules, str):
            _check_regex("feedforward_modules", self.feedforward_modules)
        else:
            self.feedforward_modules = _as_pattern_list("feedforward_modules", self.feedforward_modules)
        self.exclude_layers = _as_pattern_list("exclude_layers", self.exclude_layers)
        _check_all_linear(self)             # issue 29: "all-linear" and exclude_modules, as LoRA's
        _check_exclude_modules(self)
        _check_bool("init_ia3_weights", self.init_ia3_weights)


@dataclass
class BitFitConfig(PetConfig):
    """BitFit: only the ``bias`` parameters of the matched cells train; no parameter is added."""

    PET_TYPE: ClassVar[str] = "bitfit"

    target_modules: Union[str, list, None] = field(default=None, metadata={
        "help": "cells whose bias trains: a regex fullmatched against dotted cell paths, or a list of names; "
                "None = every cell with a bias"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})

    def validate(self) -> None:
        _check_targets(self)
        self.exclude_layers = _as_pattern_list("exclude_layers", self.exclude_layers)


# The activations a bottleneck adapter may use: mindspore.nn.get_activation's names that
# tests/tuners/test_adapter.py has a NumPy reference for.
NON_LINEARITIES = ("gelu", "relu", "tanh", "sigmoid", "silu", "fast_gelu")


@dataclass
class AdapterConfig(PetConfig):
    """Houlsby bottleneck adapter after each matched layer (MindPet ``AdapterDense``, MindFormers ``adapter``):
    ``y = h + up(act(down(h)))`` with ``h`` the layer's output."""

    PET_TYPE: ClassVar[str] = "adapter"

    bottleneck_size: int = field(default=64, metadata={"help": "width of the bottleneck (MindPet's name)"})
    non_linearity: str = field(default="gelu", metadata={"help": "activation between down and up: "
                                                         + ", ".join(NON_LINEARITIES)})
    target_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "a regex fullmatched against dotted cell paths, or a list of names"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})
    param_init_type: str = field(default="float32", metadata={"help": "dtype of the adapter parameters"})
    compute_dtype: Optional[str] = field(default=None, metadata={"help": "dtype the adapter computes in; None = param_init_type"})

    def validate(self) -> None:
        _check_int("bottleneck_size", self.bottleneck_size)
        _check_adapter_common(self)


@dataclass
class LowRankAdapterConfig(PetConfig):
    """Low-rank bottleneck adapter (MindPet ``LowRankAdapterDense``, MindFormers ``low_rank_adapter``): the
    adapter's down and up projections are each a product ``left @ right`` of rank ``low_rank_size``."""

    PET_TYPE: ClassVar[str] = "low_rank_adapter"

    reduction_factor: int = field(default=1, metadata={
        "help": "bottleneck width = layer width // reduction_factor (MindPet's name)"})
    low_rank_size: int = field(default=1, metadata={"help": "rank of each factorised projection"})
    low_rank_w_init: str = field(default="xavier_uniform", compare=False, metadata={
        "help": "init of the factors: xavier_uniform | normal (the up projection's right factor starts at 0)"})
    non_linearity: str = field(default="gelu", metadata={"help": "activation between down and up: "
                                                         + ", ".join(NON_LINEARITIES)})
    target_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "a regex fullmatched against dotted cell paths, or a list of names"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})
    param_init_type: str = field(default="float32", metadata={"help": "dtype of the adapter parameters"})
    compute_dtype: Optional[str] = field(default=None, metadata={"help": "dtype the adapter computes in; None = param_init_type"})

    def validate(self) -> None:
        _check_int("reduction_factor", self.reduction_factor)
        _check_int("low_rank_size", self.low_rank_size)
        _check_choice("low_rank_w_init", self.low_rank_w_init, ("xavier_uniform", "normal"))
        self.low_rank_w_init = self.low_rank_w_init.lower()
        _check_adapter_common(self)


# The cell selection of the methods that adapt Dense / Linear cells besides LoRA (PEFT's fields; LoRA declares
# its own, with the same rules: pet_hooks.matching.layers / all_linear), checked by _check_linear_selection.
@dataclass
class _LinearSelection:
    """``target_modules`` and PEFT's layer selection, a mixin placed before :class:`PetConfig` (not a PetConfig
    itself: every PetConfig here is a registered method)."""

    target_modules: Union[str, list, None] = field(
        default=None, metadata={"help": "a regex fullmatched against dotted cell paths, or a list of names, or "
                                        "'all-linear' (every linear cell but the output head, PEFT's)"})
    exclude_layers: Union[str, list, None] = field(
        default=None, metadata={"help": "regexes; a cell whose path (or an ancestor's) fullmatches one is skipped"})
    exclude_modules: Union[str, list, None] = field(default=None, metadata={
        "help": "PEFT's: a regex fullmatched on a cell's own path, or a list of names (a path or its last parts)"})
    layers_to_transform: Union[int, list, None] = field(default=None, metadata={
        "help": "PEFT's: adapt only the cells in these layer indices (an int or a list)"})
    layers_pattern: Union[str, list, None] = field(default=None, metadata={
        "help": "PEFT's: the name(s) of the layer container whose index layers_to_transform reads"})


# issue 30 item 3: LoHa / LoKr (PEFT's LoHaConfig / LoKrConfig; tuners/loha.py, tuners/lokr.py)
@dataclass
class _LycorisFields(_LinearSelection):
    """The fields PEFT's LoHaConfig and LoKrConfig share (PEFT's ``LycorisConfig``), in PEFT's names: a mixin
    placed before :class:`PetConfig` (not a PetConfig itself: every PetConfig here is a registered method)."""

    r: int = field(default=8, metadata={"help": "rank of the low-rank factors (PEFT's)"})
    alpha: float = field(default=8, metadata={"help": "scaling = alpha / r (PEFT's)"})
    rank_dropout: float = field(default=0.0, metadata={
        "help": "training only: each output row of the delta weight is dropped with this probability, in [0, 1)"})
    module_dropout: float = field(default=0.0, metadata={
        "help": "training only: the whole delta of a cell is skipped for a step with this probability, in [0, 1)"})
    use_effective_conv2d: bool = field(default=False, metadata={
        "help": "PEFT's, for convolutions only: no effect on Dense / Linear (the only cells adapted), kept "
                "for PEFT's files"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    init_weights: Union[bool, str] = field(default=True, compare=False, metadata={
        "help": "true: one factor starts at zero (the output is unchanged at init); false: every factor random "
                "(PEFT's kaiming uniform)"})

    _INITS: ClassVar[tuple] = ()

    def validate(self) -> None:
        _check_linear_selection(self)
        _check_int("r", self.r)
        _check_number("alpha", self.alpha)
        _check_rate("rank_dropout", self.rank_dropout)
        _check_rate("module_dropout", self.module_dropout)
        _check_bool("use_effective_conv2d", self.use_effective_conv2d)
        if isinstance(self.init_weights, str) and self.init_weights.lower() in self._INITS:
            self.init_weights = self.init_weights.lower()
        elif not isinstance(self.init_weights, bool):
            raise PetConfigError(f"init_weights must be true or false{''.join(f' or {v!r}' for v in self._INITS)}, "
                                 f"got {self.init_weights!r}")


@dataclass
class LoHaConfig(_LycorisFields, PetConfig):
    """LoHa (PEFT's ``LoHaConfig``): ``y = base(x) + x @ dW^T``, ``dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r``,
    a Hadamard product of two rank-r products."""

    PET_TYPE: ClassVar[str] = "loha"


@dataclass
class LoKrConfig(_LycorisFields, PetConfig):
    """LoKr (PEFT's ``LoKrConfig``): ``y = base(x) + x @ dW^T``, ``dW = kron(w1, w2) * alpha / r`` with each factor
    full or a rank-r product, as PEFT decides from the layer's factorised sizes."""

    PET_TYPE: ClassVar[str] = "lokr"

    decompose_both: bool = field(default=False, metadata={
        "help": "also write the left Kronecker factor w1 as a rank-r product (when r < its larger side / 2)"})
    decompose_factor: int = field(default=-1, metadata={
        "help": "the factor sizes: -1 splits each dimension near its square root, else into (f, dim / f) "
                "when f divides it (PEFT's factorization)"})
    rank_dropout_scale: bool = field(default=False, metadata={
        "help": "rank_dropout divides the kept rows by their mean (PEFT's LoKr option; LoHa always does)"})
    init_weights: Union[bool, str] = field(default=True, compare=False, metadata={
        "help": "true: w1 starts at zero (the output is unchanged at init); 'lycoris': w2 starts at zero; "
                "false: every factor random (PEFT's kaiming uniform)"})

    _INITS: ClassVar[tuple] = ("lycoris",)

    def validate(self) -> None:
        super().validate()
        _check_bool("decompose_both", self.decompose_both)
        _check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) \
                or (self.decompose_factor < 1 and self.decompose_factor != -1):
            raise PetConfigError(f"decompose_factor must be -1 or an integer >= 1, got {self.decompose_factor!r}")


# issue 30 item 4: VeRA (PEFT's VeraConfig)
@dataclass
class VeraConfig(_LinearSelection, PetConfig):
    """VeRA (PEFT's ``VeraConfig``): ``y = base(x) + lambda_b * ((lambda_d * (x @ A^T)) @ B^T)`` with one frozen
    random pair ``vera_A`` [r, max in] / ``vera_B`` [max out, r] shared by every layer (sliced to its size) and
    trained vectors ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] per layer."""

    PET_TYPE: ClassVar[str] = "vera"

    r: int = field(default=256, metadata={
        "help": "the rank of the shared random projections (PEFT's default 256: VeRA trains r + out values per layer)"})
    projection_prng_key: int = field(default=0, metadata={
        "help": "seed of the shared projections vera_A / vera_B (pet_hooks draws them with NumPy, kaiming uniform "
                "as PEFT; they are saved with the adapter, so loading uses them exactly)"})
    save_projection: bool = field(default=True, metadata={
        "help": "PEFT's; must be true: vera_A / vera_B (drawn with NumPy) travel in the adapter file. A PEFT file "
                "saved with false is read by re-deriving PEFT's projections with torch, when torch is installed"})
    vera_dropout: float = field(default=0.0, metadata={
        "help": "training only: dropout on the input of the VeRA branch, in [0, 1)"})
    d_initial: float = field(default=0.1, metadata={
        "help": "the initial value of every vera_lambda_d entry (vera_lambda_b starts at 0: output unchanged)"})
    fan_in_fan_out: bool = field(default=False, metadata={
        "help": "PEFT's, for GPT-2's Conv1D only: must be false (Dense / Linear give their own layout)"})
    bias: str = field(default="none", metadata={
        "help": "PEFT's; only 'none' (no base bias trains) is supported for VeRA"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    init_weights: bool = field(default=True, compare=False, metadata={
        "help": "true: vera_lambda_b = 0, vera_lambda_d = d_initial (output unchanged); false: PEFT's raw init, "
                "vera_lambda_b = 1, vera_lambda_d standard normal"})

    def validate(self) -> None:
        _check_linear_selection(self)
        _check_int("r", self.r)
        _check_int("projection_prng_key", self.projection_prng_key, minimum=0)
        _check_bool("save_projection", self.save_projection)
        if not self.save_projection:
            raise PetConfigError("save_projection=false is not supported: pet_hooks draws vera_A / vera_B from "
                                 "projection_prng_key with NumPy, not with torch's generator as PEFT, so the "
                                 "projections must travel in the adapter file; keep save_projection: true")
        _check_rate("vera_dropout", self.vera_dropout)
        _check_number("d_initial", self.d_initial)
        _check_bool("fan_in_fan_out", self.fan_in_fan_out)
        if self.fan_in_fan_out:
            raise PetConfigError("fan_in_fan_out=true is for GPT-2's Conv1D, which pet_hooks does not adapt; "
                                 "Dense / Linear say their own weight layout")
        if self.bias != "none":
            raise PetConfigError(f"bias must be 'none' for vera (training base biases is not supported), "
                                 f"got {self.bias!r}")
        _check_bool("init_weights", self.init_weights)


# issue 30 item 2: prompt tuning (PEFT's PromptTuningConfig)
_PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PetConfig):
    """Prompt tuning (PEFT's ``PromptTuningConfig``): ``num_virtual_tokens`` learned embedding rows
    (``prompt_embeddings`` [n, hidden]) in front of the input embeddings; the attention mask and the
    labels are extended as PEFT extends them (ones, and -100: no loss on the virtual positions)."""

    PET_TYPE: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = field(default=20, metadata={
        "help": "the number of virtual tokens: rows of prompt_embeddings, put in front of every input"})
    target_modules: Union[str, list, None] = field(default=None, metadata={
        "help": "the model cell to adapt (a regex fullmatched on its path); None = the outermost cell whose "
                "class has a prompt adapter (pet_hooks.register_prompt_model)"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    prompt_tuning_init: str = field(default="RANDOM", compare=False, metadata={
        "help": "RANDOM (normal rows), TEXT (the embedding rows of prompt_tuning_init_text's tokens, repeated or "
                "cut to num_virtual_tokens, as PEFT) or SAMPLE_VOCAB (the rows of random vocabulary ids)"})
    prompt_tuning_init_text: Optional[str] = field(default=None, compare=False, metadata={
        "help": "TEXT init: the text whose tokens' embedding rows start the prompt"})
    tokenizer_name_or_path: Optional[str] = field(default=None, compare=False, metadata={
        "help": "TEXT init: a local tokenizer.json, or a directory holding one (read with the tokenizers "
                "library; nothing is downloaded)"})
    tokenizer_kwargs: Optional[dict] = field(default=None, compare=False, metadata={
        "help": "PEFT's (AutoTokenizer's arguments); must be empty: pet_hooks reads tokenizer.json itself"})

    def validate(self) -> None:
        _check_int("num_virtual_tokens", self.num_virtual_tokens)
        _check_targets(self)
        init = self.prompt_tuning_init
        if not isinstance(init, str) or init.upper() not in _PROMPT_INITS:
            raise PetConfigError(f"prompt_tuning_init must be one of {list(_PROMPT_INITS)}, got {init!r}")
        self.prompt_tuning_init = init.upper()
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PetConfigTypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
        if self.prompt_tuning_init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise PetConfigError(f"prompt_tuning_init TEXT needs prompt_tuning_init_text, got "
                                     f"{self.prompt_tuning_init_text!r}")
            if not self.tokenizer_name_or_path:
                raise PetConfigError(f"prompt_tuning_init TEXT needs tokenizer_name_or_path, got "
                                     f"{self.tokenizer_name_or_path!r}")
        if self.tokenizer_kwargs:
            raise PetConfigError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is not supported: pet_hooks reads "
                                 f"the tokenizer.json named by tokenizer_name_or_path itself")
        if self.chunked_loss is not None:
            raise PetConfigError(f"chunked_loss={self.chunked_loss!r} is not supported with prompt_tuning (both "
                                 f"change the model's forward)")
        if self.modules_to_save:
            raise PetConfigError(f"modules_to_save={self.modules_to_save!r} is not supported with prompt_tuning")

    def for_loading(self) -> "PromptTuningConfig":
        """RANDOM init: the loaded values replace it, and a TEXT init's tokenizer may not be on this machine."""
        return dataclasses.replace(self, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                                   tokenizer_name_or_path=None)


def _check_adapter_common(cfg) -> None:
    """What both bottleneck adapters check alike."""
    _check_choice("non_linearity", cfg.non_linearity, NON_LINEARITIES)
    cfg.non_linearity = cfg.non_linearity.lower()
    if cfg.target_modules is None:
        raise PetConfigError(f"target_modules is required for {cfg.PET_TYPE} (a regex such as '.*dense2|.*w2', "
                             f"or a list of cell names)")
    _check_targets(cfg)
    cfg.exclude_layers = _as_pattern_list("exclude_layers", cfg.exclude_layers)
    cfg.param_init_type = _dtype_name("param_init_type", cfg.param_init_type)
    if cfg.compute_dtype is not None:
        cfg.compute_dtype = _dtype_name("compute_dtype", cfg.compute_dtype)


# issue 30 item 5: OFT (PEFT 0.21's OFTConfig; tuners/oft.py)
@dataclass
class OFTConfig(_LinearSelection, PetConfig):
    """OFT (PEFT's ``OFTConfig``): the input of each matched Dense / Linear is rotated by a learned
    block-diagonal orthogonal matrix (Cayley transform of skew-symmetric blocks): ``y = base(x @ R)``."""

    PET_TYPE: ClassVar[str] = "oft"

    r: int = field(default=0, metadata={
        "help": "number of blocks per layer (in_features / r each); PEFT's: exactly one of r and oft_block_size "
                "is non-zero, so r: N needs oft_block_size: 0"})
    oft_block_size: int = field(default=32, metadata={
        "help": "size of each rotation block; must divide every target's in_features (PEFT's default 32; 0 when r "
                "is given)"})
    use_cayley_neumann: bool = field(default=True, metadata={
        "help": "true: the Cayley transform by a Neumann series (num_cayley_neumann_terms terms, approximately "
                "orthogonal); false: the exact (I - Q)(I + Q)^-1 with a matrix inverse"})
    num_cayley_neumann_terms: int = field(default=5, metadata={
        "help": "terms of the Neumann series (PEFT's count: 5 gives I + 2Q + 2Q^2 + 2Q^3 + Q^4)"})
    coft: bool = field(default=False, metadata={
        "help": "constrained OFT: before each use, every block's skew matrix is projected to Frobenius norm "
                "<= eps / sqrt(blocks) and the projection written back to the parameter (PEFT's)"})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (only with coft: true), > 0"})
    block_share: bool = field(default=False, metadata={
        "help": "one rotation block shared by all the blocks of a layer (one row of oft_R)"})
    module_dropout: float = field(default=0.0, metadata={
        "help": "PEFT's field, in [0, 1), kept for PEFT's files; PEFT 0.21.2's Linear never applies it, so it has "
                "no effect here either"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    init_weights: bool = field(default=True, compare=False, metadata={
        "help": "true: oft_R starts at zero (the identity rotation: the output is unchanged); false: normal, "
                "std 0.1 (PEFT's)"})

    def validate(self) -> None:
        _check_linear_selection(self)
        _check_int("r", self.r, minimum=0)
        _check_int("oft_block_size", self.oft_block_size, minimum=0)
        if (self.r != 0) == (self.oft_block_size != 0):     # PEFT's check: exactly one of them
            raise PetConfigError(f"exactly one of r and oft_block_size must be non-zero (PEFT's rule, "
                                 f"r x oft_block_size = in_features), got r={self.r!r}, "
                                 f"oft_block_size={self.oft_block_size!r}")
        _check_bool("use_cayley_neumann", self.use_cayley_neumann)
        _check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        _check_bool("coft", self.coft)
        _check_number("eps", self.eps)
        if self.eps <= 0:
            raise PetConfigError(f"eps must be > 0, got {self.eps!r}")
        _check_bool("block_share", self.block_share)
        _check_rate("module_dropout", self.module_dropout)
        _check_bool("init_weights", self.init_weights)


# issue 30 item 1: AdaLoRA (PEFT's AdaLoraConfig; tuners/adalora.py, training/adalora.py)
@dataclass
class AdaLoraConfig(_LinearSelection, PetConfig):
    """AdaLoRA (PEFT's ``AdaLoraConfig``): ``y = base(x) + dropout(x) @ (A * E)^T @ B^T * lora_alpha / init_r`` with
    ``lora_A`` [init_r, in], ``lora_E`` [init_r, 1] (the singular values, zero at init) and ``lora_B`` [out, init_r];
    during training the rank allocator zeroes the least important entries of ``lora_E`` down to a budget of
    ``target_r`` per layer on average (``pet_hooks.update_and_allocate``), and the optimizer step adds the gradient
    of ``orth_reg_weight`` x the orthogonality regulariser of A and B."""

    PET_TYPE: ClassVar[str] = "adalora"

    init_r: int = field(default=12, metadata={"help": "the initial rank of every adapted layer (rows of lora_A)"})
    target_r: int = field(default=8, metadata={
        "help": "the average rank per layer once the budget has shrunk (the allocator's final budget)"})
    tinit: int = field(default=0, metadata={"help": "steps of warm-up before the budget starts shrinking"})
    tfinal: int = field(default=0, metadata={
        "help": "the last steps, with the rank pattern fixed (from step total_step - tfinal on)"})
    deltaT: int = field(default=1, metadata={"help": "steps between two budget allocations while it shrinks"})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity |p * grad|, in (0, 1)"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty, in (0, 1)"})
    orth_reg_weight: float = field(default=0.5, metadata={
        "help": "weight of the orthogonality regulariser of lora_A / lora_B added to the loss (>= 0)"})
    total_step: Optional[int] = field(default=None, metadata={
        "help": "required: the number of training steps (the budget schedule's length), > tinit + tfinal"})
    # set by the allocator during training (PEFT's): not part of what makes two adapters the same
    rank_pattern: Optional[dict] = field(default=None, compare=False, metadata={
        "help": "set by training (update_and_allocate): cell path -> one bool per rank (kept or not); saved with the "
                "adapter; from step total_step - tfinal on the dropped ranks' lora_E are kept at zero"})
    lora_alpha: float = field(default=8, metadata={
        "help": "scaling = lora_alpha / init_r (PEFT's lora_alpha; 0 scales by init_r / init_r = 1)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the AdaLoRA branch input, in [0, 1)"})
    # Init-only (compare=False): two configs that differ only here describe the same adapter.
    init_weights: bool = field(default=True, compare=False, metadata={
        "help": "true: lora_E = 0 and lora_A / lora_B normal(0, 0.02) (PEFT's; the output is unchanged); false: "
                "all three standard normal"})

    def validate(self) -> None:
        _check_linear_selection(self)
        _check_int("init_r", self.init_r)
        _check_int("target_r", self.target_r)
        if self.target_r > self.init_r:
            raise PetConfigError(f"target_r={self.target_r!r} must not exceed init_r={self.init_r!r} (the "
                                 f"budget only shrinks)")
        _check_int("tinit", self.tinit, minimum=0)
        _check_int("tfinal", self.tfinal, minimum=0)
        _check_int("deltaT", self.deltaT)
        if self.total_step is None:
            raise PetConfigError("total_step is required for adalora (the budget schedule's length), as PEFT's "
                                 "AdaLoraConfig requires it")
        _check_int("total_step", self.total_step)
        if self.tinit >= self.total_step - self.tfinal:   # PEFT's check
            raise PetConfigError(f"tinit={self.tinit!r} >= total_step - tfinal = {self.total_step!r} - "
                                 f"{self.tfinal!r}: no budgeting phase is left; decrease tinit / tfinal or "
                                 f"increase total_step")
        for name in ("beta1", "beta2"):
            _check_number(name, getattr(self, name))
            if not 0.0 < getattr(self, name) < 1.0:
                raise PetConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        _check_number("orth_reg_weight", self.orth_reg_weight)
        if self.orth_reg_weight < 0:
            raise PetConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        _check_number("lora_alpha", self.lora_alpha)
        _check_rate("lora_dropout", self.lora_dropout)
        _check_bool("init_weights", self.init_weights)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict) or not all(
                    isinstance(k, str) and isinstance(v, list) and len(v) == self.init_r
                    and all(isinstance(b, bool) for b in v) for k, v in self.rank_pattern.items()):
                raise PetConfigError(f"rank_pattern must map cell paths to lists of init_r={self.init_r} "
                                     f"booleans, got {self.rank_pattern!r}"[:300])


# Keys MindFormers writes under other names; mapped before the unknown-key check.
_KEY_ALIASES: dict = {"dropout_prob": "dropout_rate", "lora_a_init_method": "lora_a_init"}


_LORA_INITS = ("gaussian", "pissa", "olora")


def _token_indices(value: Any) -> Union[list, dict]:
    """trainable_token_indices: a non-empty list of distinct ints >= 0, or {non-empty name: such a list}."""
    def ids(where: str, items: Any) -> list:
        if not isinstance(items, (list, tuple)) or not items:
            raise PetConfigTypeError(f"trainable_token_indices{where} must be a non-empty list of token ids, "
                                     f"got {items!r}")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise PetConfigTypeError(f"trainable_token_indices{where}: token ids are ints, got {item!r}")
            if item < 0:
                raise PetConfigError(f"trainable_token_indices{where}: token id {item} is negative")
        twice = sorted({i for i in items if list(items).count(i) > 1})
        if twice:
            raise PetConfigError(f"trainable_token_indices{where}: token id {twice[0]} is listed twice")
        return list(items)

    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k.strip() for k in value):
            raise PetConfigTypeError(f"trainable_token_indices must map cell names to token ids, got {value!r}")
        return {key: ids(f"[{key!r}]", items) for key, items in value.items()}
    return ids("", value)


def _init_lora_weights(value: Any) -> Union[bool, str]:
    """PEFT's ``init_lora_weights``: true, false, 'gaussian', 'pissa', 'pissa_niter_N' (N >= 1) or 'olora'."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LORA_INITS:
            return text
        found = re.fullmatch(r"pissa_niter_(\d+)", text)
        if found and int(found.group(1)) >= 1:
            return f"pissa_niter_{int(found.group(1))}"
    raise PetConfigError(f"init_lora_weights must be true, false, 'gaussian', 'pissa', 'pissa_niter_N' (N >= 1) "
                         f"or 'olora', got {value!r}")


def _dtype_name(name: str, value: Any) -> str:
    """'float16', 'fp16', mindspore.float16 -> 'float16'."""
    text = str(value).lower().replace("mindspore.", "")
    text = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(text, text)
    if text not in _DTYPES:
        raise PetConfigError(f"{name} must be one of {list(_DTYPES)}, got {value!r}")
    return text


# ----------------------------------------------------------------------------- loading
def config_from_dict(data: Mapping, model_hints: Optional[Mapping] = None) -> PetConfig:
    """Build the dataclass for a mapping that holds ``pet_type``; unknown keys are an error."""
    if not isinstance(data, Mapping):
        raise PetConfigTypeError(f"pet_config must be a mapping, got {type(data).__name__}")
    pet_type = data.get("pet_type")
    cls = method(pet_type).config_class
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise PetConfigTypeError(f"pet_config keys must be strings, got {key!r}")
        kwargs[_KEY_ALIASES.get(key, key)] = value
    known = {f.name for f in dataclasses.fields(cls)} - {"model_hints"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PetConfigError(f"unknown key(s) {unknown} for pet_type {pet_type!r}; known keys: {sorted(known)}")
    kwargs["model_hints"] = dict(model_hints or {})
    return cls(**kwargs)


def config_differences(first: PetConfig, second: PetConfig) -> str:
    """``"lora_rank: 4 vs 8, ..."``: the fields that make two configs describe different adapters."""
    if type(first) is not type(second):
        return f"pet_type: {first.pet_type!r} vs {second.pet_type!r}"
    return ", ".join(f"{f.name}: {getattr(first, f.name)!r} vs {getattr(second, f.name)!r}"
                     for f in dataclasses.fields(first)
                     if f.compare and _compared_value(getattr(first, f.name)) != _compared_value(getattr(second, f.name)))


def _compared_value(value: Any) -> Any:
    """A mapping as its items in order (rank_pattern / alpha_pattern: the order decides), else the value."""
    return tuple(value.items()) if isinstance(value, dict) else value


def model_hints(model_config: Any) -> dict:
    """The model_config values the prefix methods may need (``num_layers``, ``kv_channels``, ...), from a
    mapping (a run YAML's ``model_config``) or a config object (a built model's ``config``)."""
    if isinstance(model_config, Mapping):
        return {k: model_config[k] for k in _MODEL_HINT_KEYS if k in model_config}
    return {k: getattr(model_config, k) for k in _MODEL_HINT_KEYS
            if isinstance(getattr(model_config, k, None), int) and not isinstance(getattr(model_config, k), bool)}


def _find_block(doc: Mapping, where: str) -> tuple:
    """Locate the pet_config block and the model_config beside it in a parsed document."""
    if "pet_type" in doc:
        return doc, {}
    if "pet_config" in doc:
        return doc["pet_config"], model_hints(doc)
    node: Any = doc
    for key in _MINDFORMERS_PATH[:-1]:
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and node.get("pet_config") is not None:
        return node["pet_config"], model_hints(node)
    raise PetConfigError(f"{where}: no PET configuration found; expected 'pet_type' at the top level, "
                         f"a 'pet_config' block, or model.model_config.pet_config")


def _read_document(path: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"PET config file not found: {path}")
    if os.path.isdir(path):
        raise PetConfigError(f"PET config path is a directory, not a file: {path}")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PetConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        if path.lower().endswith(".json"):
            return json.loads(text)
        # safe_load never builds Python objects: a !!python/object tag is refused.
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PetConfigError(f"{path}: cannot parse: {err}") from None


RESERVED_NAMES = ("all", "__base__")   # save_adapter(..., "all"); the base model in adapter_per_row


def check_adapter_name(name) -> None:
    """An adapter name is a non-empty string without '/' (it names a folder) and not a reserved word."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in RESERVED_NAMES:
        raise PetConfigError(f"adapter_name {name!r} is not usable: give a non-empty string without '/', "
                             f"other than {', '.join(map(repr, RESERVED_NAMES))}")


def load_config(src: Union[str, os.PathLike, Mapping, PetConfig]) -> PetConfig:
    """Read a PET configuration from a file path, a mapping or an existing config.

    Accepts a MindFormers run YAML (``model.model_config.pet_config``), a YAML or JSON
    whose top level holds ``pet_config``, or a bare block with ``pet_type``.

    Raises:
        FileNotFoundError: the path does not exist.
        PetConfigError: (a ValueError) unknown ``pet_type`` or keys, bad values, unreadable file.
    """
    if isinstance(src, PetConfig):
        return src
    if isinstance(src, (str, os.PathLike)):
        where = os.fspath(src)
        doc = _read_document(where)
    elif isinstance(src, Mapping):
        where, doc = "config mapping", src
    else:
        raise PetConfigTypeError(f"load_config takes a path, a mapping or a PetConfig, got {type(src).__name__}")
    if not isinstance(doc, Mapping):
        raise PetConfigError(f"{where}: the top level must be a mapping, got {type(doc).__name__}")
    block, hints = _find_block(doc, where)
    config = config_from_dict(block, hints)
    check_run_yaml(doc, where)      # after validation: a config that fails says only what is wrong
    return config


# ----------------------------------------------------------------------------- the methods pet_hooks ships
# One line per method: its config class and its tuner, imported at first use (config/methods.py).
register_method(LoraConfig, "pet_hooks.tuners.lora.tuner:LoraTuner")
register_method(PTuning2Config, "pet_hooks.tuners.prefix.tuner:PrefixTuner")
register_method(PrefixTuningConfig, "pet_hooks.tuners.prefix.tuner:PrefixTuner")
register_method(IA3Config, "pet_hooks.tuners.ia3:IA3Tuner")
register_method(BitFitConfig, "pet_hooks.tuners.bitfit:BitFitTuner")
register_method(AdapterConfig, "pet_hooks.tuners.bottleneck:AdapterTuner")
register_method(LowRankAdapterConfig, "pet_hooks.tuners.bottleneck:LowRankAdapterTuner")
register_method(LoHaConfig, "pet_hooks.tuners.loha:LoHaTuner")      # issue 30 item 3
register_method(LoKrConfig, "pet_hooks.tuners.lokr:LoKrTuner")      # issue 30 item 3
register_method(OFTConfig, "pet_hooks.tuners.oft:OFTTuner")      # issue 30 item 5
register_method(VeraConfig, "pet_hooks.tuners.vera:VeraTuner")      # issue 30 item 4
register_method(AdaLoraConfig, "pet_hooks.tuners.adalora:AdaLoraTuner")      # issue 30 item 1
register_method(PromptTuningConfig, "pet_hooks.tuners.prompt.tuner:PromptTuner")      # issue 30 item 2
