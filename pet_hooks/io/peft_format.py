"""LoRA and IA3 adapters in Hugging Face PEFT's format, and the names that move them between frameworks.

    pet_hooks.save_adapter(llama, "hf_adapter/", format="peft", name_map="llama")
    pet_hooks.load_adapter(fresh_llama, "hf_adapter/")          # a PEFT directory is detected

A PEFT LoRA directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight``
([out, r]); an embedding's are ``<module path>.lora_embedding_A`` ([r, num_embeddings]) and
``.lora_embedding_B`` ([dim, r]), bare (the layout's ``tensor_sets``). pet_hooks' deltas have the
same shapes and the same scaling (``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``),
whatever the layout of the base weight, so only the names change. PEFT's ``save_pretrained`` also
writes a copy of an adapted embedding's base table (``<module>.base_layer.weight``, its
``save_embedding_layers``); reading, pet_hooks checks its shape and never writes it into the net
(a copy that differs from the net's table is reported in a warning). An IA3 directory (``peft_type: "IA3"``) holds ``<module path>.ia3_l`` vectors
in PEFT's shapes ([out, 1], or [1, in] for ``feedforward_modules``). Which tensors a module has,
and what the config says, is the method's PEFT layout (``tuner.peft``, a
:class:`pet_hooks.tuners.PeftLayout`: ``peft_type``, ``weights``, ``key_tail``, ``fields``, ``module_fields`` ...).

A *name map* (:mod:`pet_hooks.matching.name_maps`) turns a pet_hooks cell path into the other
framework's module path. Saving with a map that leaves a delta unmapped is an error naming
it. Loading without ``name_map`` tries the same names, then each built-in map, and takes the
one that maps every module of the adapter onto the net.

MindFormers' own converter (``mindformers/models/llama/convert_weight.py``) turns Hugging
Face Llama weights into MindFormers ones by renaming alone (the rotary permutation there
applies to Meta's original checkpoints only), so no row of ``wq`` / ``wk`` needs
reordering; ``tests/io/test_peft_format.py`` checks the logits against PyTorch.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from mindspore import Parameter, nn

from ..config.pet_config import load_config
from ..errors import AdapterFileError, PetConfigError, PetStateError
from ..utils.files import CONFIG_NAME, WEIGHTS_NAME, read_safetensors, to_numpy, write_bytes
from .loading import load_tensors
from . import fused, saved_copies, token_rows
from . import whole_adapter   # issue 30 item 2
from ..matching.name_maps import (NAME_MAPS, MapFn, NameMapSpec, fused_parts, inverse_name_map, register_name_map,
                                  resolve_name_map)
from ..surgery.core import DEFAULT_ADAPTER, get_state, state_owner

logger = logging.getLogger("pet_hooks")
from ..tuners import Tuner, all_tuners, peft_tuner

# NAME_MAPS and register_name_map stay importable from here, where docs/peft_format.md names them.
__all__ = ["save_peft", "load_peft", "is_peft_config", "PEFT_PREFIX", "NAME_MAPS", "register_name_map"]

PEFT_PREFIX = "base_model.model."
# The fields PEFT writes for a method beyond the common ones and the layout's own (PeftLayout.fields), by
# peft_type: what PEFT's LoraConfig saves by default. (PEFT ignores keys its config class lacks,
# with a warning, so a method without an entry here gets only the common fields.)
_PEFT_DEFAULTS = {
    "LORA": {"alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
             "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
             "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
             "rank_pattern": {}},
}


def is_peft_config(doc: Mapping) -> bool:
    """True for an ``adapter_config.json`` written by PEFT (or by ``save_peft``)."""
    return isinstance(doc, Mapping) and "peft_type" in doc


def _adaptable_paths(net: nn.Cell, tuner: Tuner) -> List[str]:
    return [path for path, cell in net.cells_and_names() if path and tuner.can_adapt(cell) is None]


# ----------------------------------------------------------------------------- saving
def _map_all(paths: List[str], fn: MapFn, label: str, net: nn.Cell, deltas: Mapping[str, List[str]]) -> Dict[str, str]:
    """Our cell path -> theirs for every path; ``deltas`` (path -> its delta names) names what an unmapped cell holds."""
    out = {}
    for path in paths:
        new = fn(path)
        if not isinstance(new, str) or not new:
            tensors = " and ".join(f"'{name}'" for name in deltas[path])
            raise PetConfigError(f"name_map {label} leaves cell '{path}' of {type(net).__name__} unmapped "
                                 f"(tensors {tensors}); extend the map or pass another")
        out[path] = new
    clash = {}
    for ours, theirs in out.items():
        if theirs in clash:
            raise PetConfigError(f"name_map {label} maps both '{clash[theirs]}' and '{ours}' to '{theirs}'")
        clash[theirs] = ours
    return out


def _peft_targets(mapped: Dict[str, str], net: nn.Cell, fn: MapFn, tuner: Tuner) -> Union[List[str], str]:
    """PEFT's ``target_modules``: the last names when they select exactly these cells, else a regex."""
    leaves = sorted({theirs.rsplit(".", 1)[-1] for theirs in mapped.values()})
    # The adapted cells are not "adaptable" any more (can_adapt refuses the generated classes):
    # these are the cells PEFT would also pick up if the last names were all it had.
    would_match = set()
    for path in _adaptable_paths(net, tuner):
        theirs = fn(path)
        if isinstance(theirs, str) and theirs.rsplit(".", 1)[-1] in leaves:
            would_match.add(path)
    if would_match <= set(mapped):
        return leaves
    return "|".join(re.escape(theirs) for theirs in sorted(mapped.values()))


def save_peft(net: nn.Cell, directory: str, name_map: NameMapSpec = None, *, task_type: Optional[str] = "CAUSAL_LM",
              base_model_name_or_path: Optional[str] = None) -> str:
    """Write the adapter of ``net`` as PEFT writes one (see the module docstring)."""
    from safetensors.numpy import save

    state = get_state(net)
    if state is None or state.tuner.peft is None:
        methods = ", ".join(t.label for t in all_tuners() if t.peft)
        raise PetStateError(f"the PEFT format holds the methods PEFT has ({methods}); {type(net).__name__} has "
                            f"{'no PET' if state is None else state.config.pet_type}")
    if state.kept and state.config.freeze_exclude:
        raise PetStateError(f"the PEFT format holds LoRA deltas only, but freeze_exclude keeps base parameter(s) "
                            f"{[p.name for p in state.kept][:3]} trainable; save with format='pet_hooks'")
    tuner = state.tuner
    if tuner.peft.whole_weights:        # prompt tuning (issue 30 item 2): no module keys, no name map
        return whole_adapter.save(state, directory, task_type, base_model_name_or_path)
    label, fn = resolve_name_map(name_map)
    paths = [injection.path for injection in state.injections]
    fused_cells = {path: parts for path in paths for parts in [fused_parts(name_map, path)] if parts}
    delta_names = {injection.path: [p.name for p in tuner.deltas_of(injection)] for injection in state.injections}
    mapped = _map_all([p for p in paths if p not in fused_cells], fn, label, net, delta_names)
    tensors = {}
    for injection in state.injections:
        params = {param.name: param for param in tuner.deltas_of(injection)}
        bare = {suffix: params[f"{injection.path}.{leaf}"] for suffix, leaf in tuner.peft.bare_weights.items()
                if f"{injection.path}.{leaf}" in params}
        if injection.path in fused_cells and bare:
            raise PetStateError(f"cell '{injection.path}' is fused in name map {label} and has {sorted(bare)}: "
                                f"splitting those is not supported; save with format='pet_hooks'")
        for suffix, param in bare.items():
            tensors[f"{PEFT_PREFIX}{fn(injection.path)}.{suffix}"] = np.ascontiguousarray(to_numpy(param))
        if injection.path in fused_cells:      # one cell, several PEFT modules sharing its A (pet_hooks.io.fused)
            layout, theirs = fused_cells[injection.path]
            rows = fused.part_rows(layout, injection.cell, injection.path)
            parts = fused.split(to_numpy(params[f"{injection.path}.lora_A"]), to_numpy(params[f"{injection.path}.lora_B"]),
                                rows)
            for index, (their_path, (a, b)) in enumerate(zip(theirs, parts)):
                tensors[f"{PEFT_PREFIX}{their_path}.lora_A.weight"] = np.ascontiguousarray(a)
                tensors[f"{PEFT_PREFIX}{their_path}.lora_B.weight"] = b
                mapped[f"{injection.path}#{index}"] = their_path
            continue
        layout = next(((weights, tail) for weights, tail in tuner.peft.tensor_sets()
                       if all(f"{injection.path}.{leaf}" in params for leaf in weights.values())), None)
        if layout is None:
            pairs = " or ".join(" / ".join(weights.values()) for weights, _ in tuner.peft.tensor_sets())
            raise PetStateError(f"cell '{injection.path}' ({injection.original_class.__name__}) has deltas "
                                f"{sorted(params)[:4]}, not one {pairs} pair: "
                                f"PEFT's LoRA layout does not hold them (grouped experts); save with format='pet_hooks'")
        weights, tail = layout
        module_tensors = tuner.peft.saved_module(state.config, injection.path, {   # AdaLoRA: the kept ranks
            suffix: to_numpy(params[f"{injection.path}.{leaf}"]) for suffix, leaf in weights.items()})
        for suffix, value in module_tensors.items():
            tensors[f"{PEFT_PREFIX}{mapped[injection.path]}.{suffix}{tail}"] = np.ascontiguousarray(value)
    tensors.update(_bias_tensors(net, state, fn, label, fused_cells))
    shared = {p.name: p for injection in state.injections for p in tuner.deltas_of(injection)}
    for key, name in tuner.peft.shared_weights.items():     # the adapter's own tensors (VeRA's vera_A / vera_B)
        tensors[key] = np.ascontiguousarray(to_numpy(shared[name]))
    doc = {
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "peft_type": tuner.peft.peft_type, "revision": None, "target_modules": _peft_targets(mapped, net, fn, tuner),
        "task_type": task_type, **_PEFT_DEFAULTS.get(tuner.peft.peft_type, {}), **tuner.peft.fields(state.config),
    }
    doc.update(tuner.peft.module_fields(state.injections, mapped, doc["target_modules"], cfg=state.config))
    copy_tensors, doc["modules_to_save"] = saved_copies.peft_tensors(state, fn, label, PEFT_PREFIX, net)
    tensors.update(copy_tensors)                        # config modules_to_save: the copies, PEFT's keys
    if state.tokens:                                    # config trainable_token_indices: the rows, PEFT's keys
        token_tensors, doc["trainable_token_indices"] = token_rows.peft_tensors(state, fn, label, PEFT_PREFIX, net)
        tensors.update(token_tensors)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_bytes(os.path.join(directory, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
    return directory


# LoRA's bias "all" / "lora_only" (issue 29 item 6): the base biases it trains travel with the adapter, under
# PEFT's keys: <module>.base_layer.bias for an adapted module (PEFT's layer wraps the base), <module>.bias else
_BASE_BIAS, _PLAIN_BIAS = "base_layer.bias", "bias"


def _bias_tensors(net: nn.Cell, state, fn: MapFn, label: str, fused_cells: Mapping) -> Dict[str, np.ndarray]:
    """The base biases LoRA's ``bias`` keeps trainable (``state.kept``), under PEFT's keys."""
    if not state.kept:
        return {}
    adapted = {injection.path for injection in state.injections}
    owner = {id(cell.bias): path for path, cell in state_owner(net).cells_and_names()
             if isinstance(getattr(cell, "bias", None), Parameter)}
    out = {}
    for param in state.kept:
        path = owner.get(id(param))
        if path is None or path in fused_cells:
            raise PetStateError(f"bias={state.config.bias!r} trains '{param.name}', which is not the bias of a cell "
                                f"PEFT's format can name{' (a fused cell)' if path else ''}; save with "
                                f"format='pet_hooks'")
        theirs = fn(path)
        if not isinstance(theirs, str) or not theirs:
            raise PetConfigError(f"name_map {label} leaves cell '{path}' of {type(net).__name__} unmapped "
                                 f"(its bias '{param.name}', trained by bias={state.config.bias!r})")
        tail = _BASE_BIAS if path in adapted else _PLAIN_BIAS
        out[f"{PEFT_PREFIX}{theirs}.{tail}"] = np.ascontiguousarray(to_numpy(param))
    return out


def _split_biases(tensors: Mapping[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, tuple]]:
    """(the other tensors, their module path -> (base bias, of an adapted module?)) of a PEFT file."""
    rest, biases = {}, {}
    for key, value in tensors.items():
        if key.startswith(PEFT_PREFIX) and key.endswith("." + _BASE_BIAS):
            biases[key[len(PEFT_PREFIX):-len(_BASE_BIAS) - 1]] = (value, True)
        elif key.startswith(PEFT_PREFIX) and key.endswith("." + _PLAIN_BIAS) and not key.endswith(".lora_B.bias"):
            biases[key[len(PEFT_PREFIX):-len(_PLAIN_BIAS) - 1]] = (value, False)
        else:
            rest[key] = value
    return rest, biases


def _bias_names(net: nn.Cell, biases: Mapping[str, tuple], ours: Mapping[str, str], spec: NameMapSpec,
                doc: Mapping, weights_path: str) -> Dict[str, np.ndarray]:
    """The file's base biases under the names of the net's bias Parameters (their cells found by the name map)."""
    if not biases:
        return {}
    if (doc.get("bias") or "none") == "none":
        raise AdapterFileError(f"{weights_path} holds base biases ({sorted(biases)[:3]}) but its config says "
                               f"bias='none'")
    _, fn = resolve_name_map(spec)
    model = state_owner(net) or net
    inverse = inverse_name_map((path for path, _ in model.cells_and_names()), fn)
    cells = dict(model.cells_and_names())
    out = {}
    for module, (value, adapted) in sorted(biases.items()):
        key = f"{PEFT_PREFIX}{module}.{_BASE_BIAS if adapted else _PLAIN_BIAS}"
        path = ours.get(module) if adapted else inverse.get(module)
        bias = getattr(cells[path], "bias", None) if path is not None else None
        if bias is None or not hasattr(bias, "name"):
            raise AdapterFileError(f"{weights_path}: key '{key}' (a base bias trained with bias="
                                   f"{doc.get('bias')!r}) names no cell with a bias in {type(net).__name__}")
        out[bias.name] = value
    return out


# ----------------------------------------------------------------------------- loading
# layers_to_transform / layers_pattern / exclude_modules / "all-linear" (issue 29) are read: the file's modules
# are exactly the ones PEFT adapted, and the config built from them selects those (config_from_modules).
_UNSUPPORTED = (("layer_replication", (None,)),
                ("target_parameters", (None, [])))


def _check_doc(doc: Mapping, config_path: str) -> Tuner:
    """The tuner for the document's ``peft_type``, once the document is one pet_hooks can read."""
    tuner = peft_tuner(doc.get("peft_type"))
    if tuner is None:
        readable = ", ".join(t.peft.peft_type for t in all_tuners() if t.peft)
        raise AdapterFileError(f"{config_path}: peft_type {doc.get('peft_type')!r} is not supported "
                               f"(pet_hooks reads {readable})")
    for key, allowed in _UNSUPPORTED:
        if key in doc and doc[key] not in allowed:
            raise AdapterFileError(f"{config_path}: {key}={doc[key]!r} is not supported by pet_hooks")
    tuner.peft.check_fields(doc, config_path)
    return tuner


#: PEFT's copy of an adapted module's base weight (``save_embedding_layers``), ``<module>.base_layer.weight``
_BASE_COPY = "base_layer.weight"


def _modules_of(tensors: Mapping[str, np.ndarray], weights_path: str,
                tuner: Tuner) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]:
    """(module path -> {suffix: array}, module path -> PEFT's copy of its base weight) from PEFT keys.

    Each module's tensors must form one of the tuner's layouts (plus its optional bare tensors); any
    other key is an error naming it.
    """
    layouts = tuner.peft.tensor_sets()
    ending = {f"{suffix}{tail}": suffix for weights, tail in layouts for suffix in weights}
    ending.update({suffix: suffix for suffix in tuner.peft.bare_weights})
    ending[_BASE_COPY] = _BASE_COPY
    key_re = re.compile(r"base_model\.model\.(.+)\.(" + "|".join(re.escape(e) for e in ending) + ")")
    modules: Dict[str, Dict[str, np.ndarray]] = {}
    copies: Dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        found = key_re.fullmatch(key)
        if found is None:
            expected = " / .".join(f"{s}{t}" for weights, t in layouts for s in weights)
            raise AdapterFileError(f"{weights_path}: key '{key}' is not a PEFT {tuner.label} weight "
                                   f"(expected {PEFT_PREFIX}<module>.{expected})")
        module, suffix = found.group(1), ending[found.group(2)]
        if suffix == _BASE_COPY:
            copies[module] = value
        else:
            modules.setdefault(module, {})[suffix] = value
    for module in copies:
        if module not in modules:
            raise AdapterFileError(f"{weights_path}: key '{PEFT_PREFIX}{module}.{_BASE_COPY}' is a base weight of a "
                                   f"module without {tuner.label} tensors; pet_hooks does not load base weights")
    for module, found in modules.items():
        own = {suffix for suffix in found if suffix not in tuner.peft.bare_weights}
        hit = [(w, t) for w, t in layouts if own & set(w)] or layouts[:1]
        if len(hit) > 1:
            raise AdapterFileError(f"{weights_path}: module '{module}' has both "
                                   + " and ".join(str(sorted(own & set(w))) for w, _ in hit)
                                   + ": a module holds one layout (a linear layer's or an embedding's)")
        weights, tail = hit[0]
        missing = [s for s in weights if s not in found]
        if missing:
            raise AdapterFileError(f"{weights_path}: module '{module}' has no {missing[0]}{tail}")
    return modules, copies


def _check_base_copies(net: nn.Cell, tuner: Tuner, copies: Mapping[str, np.ndarray], ours: Mapping[str, str],
                       weights_path: str) -> None:
    """PEFT's copies of base weights must fit the net's; they are never written (the base is the net's own)."""
    cells = dict(net.cells_and_names())
    for module, value in copies.items():
        weight = tuner.base_weight(cells[ours[module]])
        key = f"{PEFT_PREFIX}{module}.{_BASE_COPY}"
        if weight is None:
            continue
        if tuple(value.shape) != tuple(weight.shape):
            raise AdapterFileError(f"{weights_path}: '{key}' (PEFT's copy of the base weight) has shape "
                                   f"{tuple(value.shape)}, the net's '{weight.name}' {tuple(weight.shape)}: the adapter "
                                   f"was made for another vocabulary")
        differ = float(np.abs(to_numpy(weight).astype(np.float32) - value.astype(np.float32)).max())
        if differ > 0:
            logger.warning("pet_hooks: %s holds PEFT's copy of the base weight '%s', which differs from the net's "
                           "'%s' by up to %.3g; pet_hooks keeps the net's own base weights and loads the deltas",
                           weights_path, key, weight.name, differ)


def _net_paths(net: nn.Cell, tuner: Tuner, fresh: bool = False) -> List[str]:
    """The cells an adapter file may name: the adapted ones, and with ``fresh`` (a new adapter of a net
    that has PET) every cell the method could adapt too."""
    state = get_state(net)
    if state is None:
        return _adaptable_paths(net, tuner)
    adapted = [injection.path for injection in (state.cells if fresh else state.injections)]
    return adapted + [path for path in _adaptable_paths(net, tuner) if path not in adapted] if fresh else adapted


def _choose_map(net: nn.Cell, modules: Mapping[str, Mapping[str, np.ndarray]], name_map: NameMapSpec,
                weights_path: str, tuner: Tuner, fresh: bool = False) -> tuple:
    """(their module path -> our cell path, the map that gave it), with the given map or the first one
    that maps them all. The parts of a fused cell (``FUSED_MAPS``) all map to that cell."""
    specs = [name_map] if name_map is not None else [None] + sorted(NAME_MAPS)
    paths = _net_paths(net, tuner, fresh)
    best = None
    for spec in specs:
        label, fn = resolve_name_map(spec)
        inverse = {}
        for path in paths:
            parts = fused_parts(spec, path)
            for theirs in (parts[1] if parts else (fn(path),)):
                if isinstance(theirs, str):
                    inverse.setdefault(theirs, path)
        hits = sum(module in inverse for module in sorted(modules))
        if hits == len(modules):
            return {module: inverse[module] for module in sorted(modules)}, spec
        if best is None or hits > best[0]:
            best = (hits, label, inverse)
    _, label, inverse = best
    missing = next(module for module in sorted(modules) if module not in inverse)
    tried = f"name map {label}" if name_map is not None else f"any name map (none, {', '.join(sorted(NAME_MAPS))})"
    example = next(iter(sorted(inverse)), None)
    ending = {s: f"{s}{t}" for weights, t in tuner.peft.tensor_sets() for s in weights}
    first = ending.get(min(modules[missing]), min(modules[missing]))
    raise AdapterFileError(
        f"{weights_path}: module '{missing}' (key '{PEFT_PREFIX}{missing}.{first}') matches no "
        f"{tuner.label if get_state(net) else 'adaptable'} cell of {type(net).__name__} under {tried}; "
        f"is the adapter for another architecture?"
        + (f" (the net's cells map to names such as '{example}')" if example else ""))


def _joined_fused_cells(net: nn.Cell, tuner: Tuner, spec: NameMapSpec, ours: Mapping[str, str],
                        modules: Mapping[str, Mapping[str, np.ndarray]], weights_path: str) -> Dict[str, np.ndarray]:
    """The tensors of every fused cell, joined from its parts (the parts' own entries are overwritten)."""
    cells = dict(net.cells_and_names())
    joined: Dict[str, np.ndarray] = {}
    for path in sorted(set(ours.values())):
        parts = fused_parts(spec, path)
        if not parts:
            continue
        layout, theirs = parts
        found = {theirs.index(m): {_leaves(tuner)[k]: v for k, v in modules[m].items()}
                 for m, p in ours.items() if p == path}
        rows = fused.part_rows(layout, cells[path], path)
        for leaf, value in fused.join(found, rows, theirs, path, weights_path).items():
            joined[f"{path}.{leaf}"] = value
    return joined


def _leaves(tuner: Tuner) -> Dict[str, str]:
    """PEFT's key suffix -> the leaf of our delta's name, of every layout and the bare ones."""
    leaves = {suffix: leaf for weights, _ in tuner.peft.tensor_sets() for suffix, leaf in weights.items()}
    return {**leaves, **tuner.peft.bare_weights}


def _config_of(tuner: Tuner, doc: Mapping, ours: Mapping[str, str], config_path: str):
    """The file's config over our cells; a per-module field that does not fit them (LoRA's rank_pattern on the
    parts of a fused cell) is an AdapterFileError naming the file."""
    try:
        return tuner.peft.config_from_modules(doc, ours)
    except AdapterFileError as err:
        raise AdapterFileError(f"{config_path}: {err}") from None


def load_peft(net: nn.Cell, directory: str, doc: Mapping, name_map: NameMapSpec = None, cfg=None,
              adapter_name: Optional[str] = None, hotswap: bool = False) -> nn.Cell:
    """Load a PEFT directory into ``net`` (applying its method first when it has no PET); returns ``net``.

    ``adapter_name`` / ``hotswap`` as for :func:`pet_hooks.load_adapter`: a new name takes the
    adapter's own config (its modules mapped onto the net's cells)."""
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    tuner = _check_doc(doc, config_path)
    if tuner.peft.whole_weights:        # prompt tuning (issue 30 item 2): the adapter's tensors alone
        return whole_adapter.load(net, directory, doc, tuner, cfg, adapter_name, hotswap)
    # config modules_to_save: the copies' keys apart first (pet_hooks.io.saved_copies), then the rows, then (LoRA's
    # bias "all" / "lora_only") the base biases: a copied cell's own bias is the copy's, not a base bias
    copy_modules, rest = saved_copies.split_keys(read_safetensors(weights_path), doc.get("modules_to_save"),
                                                 PEFT_PREFIX, weights_path)
    token_deltas, rest = token_rows.split_keys(rest, PEFT_PREFIX)   # config trainable_token_indices
    rest, biases = _split_biases(rest) if tuner.peft.peft_type == "LORA" else (rest, {})
    # the adapter's own tensors (VeRA's vera_A / vera_B); the layout re-derives absent ones or refuses (below)
    shared = {name: rest.pop(key) for key, name in tuner.peft.shared_weights.items() if key in rest}
    modules, copies = _modules_of(rest, weights_path, tuner)
    if not modules:
        raise AdapterFileError(f"{weights_path} holds no {tuner.label} tensors")
    fresh = adapter_name is not None and (get_state(net) is None or adapter_name not in get_state(net).adapters)
    ours, spec = _choose_map(net, modules, name_map, weights_path, tuner, fresh)
    _check_base_copies(net, tuner, copies, ours, weights_path)
    tensors = {f"{ours[module]}.{_leaves(tuner)[suffix]}": value       # AdaLoRA: rows back at their ranks
               for module, pair in modules.items()
               for suffix, value in tuner.peft.loaded_module(doc, module, pair, weights_path).items()}
    tensors.update(_joined_fused_cells(net, tuner, spec, ours, modules, weights_path))
    tensors.update(_bias_names(net, biases, ours, spec, doc, weights_path))
    absent = {key: name for key, name in tuner.peft.shared_weights.items() if name not in shared}
    if absent:
        cells = dict(net.cells_and_names())
        shared.update(tuner.peft.derive_shared(doc, absent, [cells[path] for path in sorted(set(ours.values()))],
                                               weights_path))
    tensors.update(shared)
    state = get_state(net)
    copy_adapter = adapter_name or (state.active[0] if state is not None else DEFAULT_ADAPTER)
    copy_tensors, copy_paths = saved_copies.our_tensors(net, copy_modules, spec, copy_adapter, weights_path)
    tensors.update(copy_tensors)
    token_tensors, token_indices = token_rows.our_tensors(net, token_deltas, doc, spec, weights_path, config_path)
    tensors.update(token_tensors)
    if cfg is not None and (state is None or fresh):
        target = load_config(cfg)
    elif state is None or fresh:
        target = token_rows.with_tokens(saved_copies.with_copies(_config_of(tuner, doc, ours, config_path), copy_paths),
                                        token_indices)
    elif hotswap:         # the file's own config: load_tensors checks that it fits the adapter
        target = token_rows.with_tokens(saved_copies.with_copies(_config_of(tuner, doc, ours, config_path), copy_paths),
                                        token_indices)
    else:
        reason = tuner.peft.mismatch(doc, config_path, type(net).__name__, state.config, module_map=ours)
        if reason is not None:
            raise PetStateError(reason)
        target = None
    # with LoRA's bias "all" / "lora_only" the base biases it trains are part of the adapter (saved_parameters)
    return load_tensors(net, target, tensors, weights_path, deltas_only=(doc.get("bias") or "none") == "none",
                        cast_floats=True, adapter_name=adapter_name, hotswap=hotswap)
