"""LoRA adapters in Hugging Face PEFT's format, and the names that move them between frameworks.

    pet_hooks.save_adapter(llama, "hf_adapter/", format="peft", name_map="llama")
    pet_hooks.load_adapter(fresh_llama, "hf_adapter/")          # a PEFT directory is detected

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]). pet_hooks' deltas have the same shapes and the same scaling (``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``), whatever the layout of the base weight, so only
the names change.

A *name map* turns a pet_hooks cell path into the other framework's module path. It is
one-way on purpose: loading inverts it over the net's own cells, so a map written once
serves both directions. It can be ``None`` (the same names), the name of a built-in map
(``"llama"``: MindFormers Llama -> Hugging Face Llama), a mapping of dotted name pieces
(``{"attention.wq": "self_attn.q_proj"}``, each replaced where it stands as whole
segments; a path no piece applies to is unmapped), or a callable returning the new path
or ``None`` for unmapped. Saving with a map that leaves a delta unmapped is an error naming
it. Loading without ``name_map`` tries the same names, then each built-in map, and takes the
one that maps every module of the adapter onto the net.

MindFormers' own converter (``mindformers/models/llama/convert_weight.py``) turns Hugging
Face Llama weights into MindFormers ones by renaming alone (the rotary permutation there
applies to Meta's original checkpoints only), so no row of ``wq`` / ``wk`` needs
reordering; ``tests/test_peft_format.py`` checks the logits against PyTorch.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from mindspore import nn

from .config import LoraConfig, load_config
from .surgery import get_state
from .tuners import lora

__all__ = ["NAME_MAPS", "NameMapSpec", "register_name_map", "resolve_name_map", "save_peft", "load_peft",
           "is_peft_config", "read_safetensors", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

#: Built-in maps: pet_hooks path pieces -> the other framework's, replaced as whole segments.
NAME_MAPS: Dict[str, Dict[str, str]] = {
    "llama": {  # MindFormers LlamaForCausalLM -> Hugging Face LlamaForCausalLM (convert_reversed.py's names)
        "attention.wq": "self_attn.q_proj",
        "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj",
        "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj",
        "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "norm_out": "norm",
        "tok_embeddings": "embed_tokens",
        "lm_head": "lm_head",
    },
}

NameMapSpec = Union[None, str, Mapping[str, str], Callable[[str], Optional[str]]]
_MapFn = Callable[[str], Optional[str]]


def register_name_map(name: str, pieces: Mapping[str, str]) -> None:
    """Add a built-in map usable as ``name_map=name`` (dotted pieces -> pieces)."""
    NAME_MAPS[name] = dict(pieces)


def _piece_map(pieces: Mapping[str, str]) -> _MapFn:
    # One regex over all pieces, longest first, so a replaced piece is never replaced again.
    keys = sorted(pieces, key=len, reverse=True)
    pattern = re.compile(r"(?<![^.])(" + "|".join(re.escape(k) for k in keys) + r")(?![^.])")

    def mapped(path: str) -> Optional[str]:
        new, count = pattern.subn(lambda m: pieces[m.group(1)], path)
        return new if count else None
    return mapped


def resolve_name_map(spec: NameMapSpec) -> Tuple[str, _MapFn]:
    """``(label for messages, path -> mapped path or None)`` for any accepted ``name_map``."""
    if spec is None:
        return "none (the same names)", lambda path: path
    if isinstance(spec, str):
        if spec not in NAME_MAPS:
            raise ValueError(f"unknown name_map {spec!r}; built-in maps: {sorted(NAME_MAPS)}")
        return repr(spec), _piece_map(NAME_MAPS[spec])
    if isinstance(spec, Mapping):
        if not spec or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
            raise TypeError("a name_map mapping must be a non-empty {str: str} of dotted name pieces")
        return "the given mapping", _piece_map(spec)
    if callable(spec):
        return getattr(spec, "__name__", "the given callable"), spec
    raise TypeError(f"name_map must be None, a built-in name {sorted(NAME_MAPS)}, a mapping or a callable; "
                    f"got {type(spec).__name__}")


def is_peft_config(doc: Mapping) -> bool:
    """True for an ``adapter_config.json`` written by PEFT (or by ``save_peft``)."""
    return isinstance(doc, Mapping) and "peft_type" in doc


# ----------------------------------------------------------------------------- saving
def _map_all(paths: List[str], fn: _MapFn, label: str, net: nn.Cell) -> Dict[str, str]:
    out = {}
    for path in paths:
        new = fn(path)
        if not isinstance(new, str) or not new:
            raise ValueError(f"name_map {label} leaves cell '{path}' of {type(net).__name__} unmapped "
                             f"(tensors '{path}.lora_A' and '{path}.lora_B'); extend the map or pass another")
        out[path] = new
    clash = {}
    for ours, theirs in out.items():
        if theirs in clash:
            raise ValueError(f"name_map {label} maps both '{clash[theirs]}' and '{ours}' to '{theirs}'")
        clash[theirs] = ours
    return out


def _peft_targets(mapped: Dict[str, str], net: nn.Cell, fn: _MapFn) -> Union[List[str], str]:
    """PEFT's ``target_modules``: the last names when they select exactly these cells, else a regex."""
    leaves = sorted({theirs.rsplit(".", 1)[-1] for theirs in mapped.values()})
    # The adapted cells are not "adaptable" any more (can_adapt refuses the generated classes):
    # these are the cells PEFT would also pick up if the last names were all it had.
    adaptable = [path for path, cell in net.cells_and_names() if path and lora.can_adapt(cell) is None]
    would_match = set()
    for path in adaptable:
        theirs = fn(path)
        if isinstance(theirs, str) and theirs.rsplit(".", 1)[-1] in leaves:
            would_match.add(path)
    if would_match <= set(mapped):
        return leaves
    return "|".join(re.escape(theirs) for theirs in sorted(mapped.values()))


def save_peft(net: nn.Cell, directory: str, name_map: NameMapSpec = None, *, task_type: Optional[str] = "CAUSAL_LM",
              base_model_name_or_path: Optional[str] = None) -> str:
    """Write the LoRA adapter of ``net`` as PEFT writes one (see the module docstring)."""
    from safetensors.numpy import save

    from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, _atomic_write, _to_numpy

    state = get_state(net)
    if state is None or state.config.pet_type != "lora":
        raise ValueError(f"the PEFT format holds LoRA adapters; {type(net).__name__} has "
                         f"{'no PET' if state is None else state.config.pet_type}")
    if state.kept:
        raise ValueError(f"the PEFT format holds LoRA deltas only, but freeze_exclude keeps base parameter(s) "
                         f"{[p.name for p in state.kept][:3]} trainable; save with format='pet_hooks'")
    cfg: LoraConfig = state.config
    label, fn = resolve_name_map(name_map)
    paths = [record.path for record in state.injections]
    mapped = _map_all(paths, fn, label, net)
    tensors = {}
    for record in state.injections:
        for suffix, param in (("A", record.cell.lora_A), ("B", record.cell.lora_B)):
            tensors[f"{PEFT_PREFIX}{mapped[record.path]}.lora_{suffix}.weight"] = np.ascontiguousarray(
                _to_numpy(param))
    doc = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": cfg.lora_rank,
        "rank_pattern": {}, "revision": None, "target_modules": _peft_targets(mapped, net, fn),
        "task_type": task_type, "use_dora": False, "use_rslora": cfg.use_rslora,
    }
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    blob = save(tensors, metadata={"format": "pt"})
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda h: h.write(blob))
    text = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda h: h.write(text))
    return directory


# ----------------------------------------------------------------------------- loading
_UNSUPPORTED = (("use_dora", (False, None)), ("bias", ("none", None)), ("rank_pattern", ({}, None)),
                ("alpha_pattern", ({}, None)), ("layers_to_transform", (None,)), ("modules_to_save", (None, [])),
                ("layer_replication", (None,)), ("trainable_token_indices", (None,)),
                ("target_parameters", (None, [])))


def _check_doc(doc: Mapping, config_path: str) -> None:
    if doc.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {doc.get('peft_type')!r} is not supported (pet_hooks reads LORA)")
    for key, allowed in _UNSUPPORTED:
        if key in doc and doc[key] not in allowed:
            raise ValueError(f"{config_path}: {key}={doc[key]!r} is not supported by pet_hooks")
    for key in ("r", "lora_alpha"):
        if not isinstance(doc.get(key), (int, float)) or isinstance(doc.get(key), bool):
            raise ValueError(f"{config_path}: field {key!r} is missing or not a number")


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays; bfloat16 (PEFT's usual dtype, which NumPy
    lacks) is widened to float32 exactly, by reading the file's own layout."""
    from .adapter_io import _read_tensors
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
                raise LookupError
            data = handle.read()
    except (OSError, ValueError, LookupError):
        return _read_tensors(path)  # the ordinary reader (and its error for a broken file)
    tensors = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if entry["dtype"] == "BF16":
                bits = np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16
                tensors[name] = bits.view(np.float32).reshape(entry["shape"])
            else:
                dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[entry["dtype"]]
                tensors[name] = np.frombuffer(data[start:end], dtype).reshape(entry["shape"]).copy()
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors


def _modules_of(tensors: Mapping[str, np.ndarray], weights_path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """module path -> {"A": array, "B": array} from PEFT keys; any other key is an error naming it."""
    modules: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        found = _KEY.fullmatch(key)
        if found is None:
            raise ValueError(f"{weights_path}: key '{key}' is not a PEFT LoRA weight "
                             f"(expected {PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        modules.setdefault(found.group(1), {})[found.group(2)] = value
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"{weights_path}: module '{module}' has no lora_{missing}.weight")
    return modules


def _net_paths(net: nn.Cell) -> List[str]:
    state = get_state(net)
    if state is not None:
        return [record.path for record in state.injections]
    return [path for path, cell in net.cells_and_names() if path and lora.can_adapt(cell) is None]


def _choose_map(net: nn.Cell, modules: List[str], name_map: NameMapSpec,
                weights_path: str) -> Dict[str, str]:
    """their module path -> our cell path, with the given map or the first one that maps them all."""
    specs = [name_map] if name_map is not None else [None] + sorted(NAME_MAPS)
    paths = _net_paths(net)
    best: Optional[Tuple[int, str, Dict[str, str]]] = None
    for spec in specs:
        label, fn = resolve_name_map(spec)
        inverse = {}
        for path in paths:
            theirs = fn(path)
            if isinstance(theirs, str):
                inverse.setdefault(theirs, path)
        hits = sum(module in inverse for module in modules)
        if hits == len(modules):
            return {module: inverse[module] for module in modules}
        if best is None or hits > best[0]:
            best = (hits, label, inverse)
    _, label, inverse = best
    missing = next(module for module in modules if module not in inverse)
    tried = f"name map {label}" if name_map is not None else f"any name map (none, {', '.join(sorted(NAME_MAPS))})"
    example = next(iter(sorted(inverse)), None)
    raise ValueError(f"{weights_path}: module '{missing}' (key '{PEFT_PREFIX}{missing}.lora_A.weight') matches no "
                     f"{'LoRA' if get_state(net) else 'adaptable'} cell of {type(net).__name__} under {tried}; "
                     f"is the adapter for another architecture?"
                     + (f" (the net's cells map to names such as '{example}')" if example else ""))


def load_peft(net: nn.Cell, directory: str, doc: Mapping, name_map: NameMapSpec = None, cfg=None) -> nn.Cell:
    """Load a PEFT LoRA directory into ``net`` (applying LoRA first when it has no PET); returns ``net``."""
    from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, load_tensors

    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    _check_doc(doc, config_path)
    modules = _modules_of(read_safetensors(weights_path), weights_path)
    if not modules:
        raise ValueError(f"{weights_path} holds no LoRA tensors")
    ours = _choose_map(net, sorted(modules), name_map, weights_path)
    tensors = {f"{ours[module]}.lora_{ab}": value for module, pair in modules.items() for ab, value in pair.items()}
    scaling = doc["lora_alpha"] / (math.sqrt(doc["r"]) if doc.get("use_rslora") else doc["r"])
    state = get_state(net)
    if state is not None:
        if state.config.pet_type != "lora" or not math.isclose(state.config.scaling, scaling, rel_tol=1e-6):
            raise ValueError(f"{config_path}: LoRA scaling {scaling:g} (r={doc['r']}, lora_alpha={doc['lora_alpha']}) "
                             f"differs from the PET applied to {type(net).__name__} "
                             f"({state.config.pet_type}, scaling {getattr(state.config, 'scaling', 'n/a')})")
        target = None
    elif cfg is not None:
        target = load_config(cfg)
    else:
        target = LoraConfig(pet_type="lora", lora_rank=int(doc["r"]), lora_alpha=doc["lora_alpha"],
                            lora_dropout=float(doc.get("lora_dropout") or 0.0),
                            target_modules=sorted(set(ours.values())), use_rslora=bool(doc.get("use_rslora")))
    return load_tensors(net, target, tensors, weights_path, deltas_only=True, cast_floats=True)

