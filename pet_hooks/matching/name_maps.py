"""Name maps: a pet_hooks cell path -> the other framework's module path (Hugging Face's).

    label, to_theirs = resolve_name_map("llama")
    to_theirs("model.layers.0.attention.wq")        # 'model.layers.0.self_attn.q_proj'

A map is one-way on purpose: loading inverts it over the net's own cells, so a map written
once serves both directions. It can be ``None`` (the same names), the name of a built-in map
(``"llama"``: MindFormers Llama -> Hugging Face Llama; ``"qwen3"``: MindFormers' mcore Qwen3 ->
Hugging Face Qwen3, whose fused ``linear_qkv`` / ``linear_fc1`` are several modules there, see
``FUSED_MAPS``), a mapping of dotted name pieces
(``{"attention.wq": "self_attn.q_proj"}``, each replaced where it stands as whole segments;
a path no piece applies to is unmapped), or a callable returning the new path or ``None`` for
unmapped. Used by the PEFT format (``peft_format``) and by the hints of ``matching``. Imports
nothing but the standard library.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

from ..errors import PetConfigError, PetConfigTypeError

__all__ = ["NAME_MAPS", "FUSED_MAPS", "NameMapSpec", "MapFn", "register_name_map", "resolve_name_map",
           "fused_parts", "inverse_name_map"]

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

NAME_MAPS["qwen3"] = {  # MindFormers mcore TrainingQwen3ForCausalLM -> Hugging Face Qwen3ForCausalLM
    "decoder.layers": "layers",
    "self_attention.linear_proj": "self_attn.o_proj",
    "self_attention.q_layernorm": "self_attn.q_norm",
    "self_attention.k_layernorm": "self_attn.k_norm",
    "mlp.linear_fc2": "mlp.down_proj",
    "pre_mlp_layernorm": "post_attention_layernorm",
    "decoder.final_layernorm": "norm",
    "embedding.word_embeddings": "embed_tokens",
    "model.output_layer": "lm_head",
}

#: Fused cells: one pet_hooks cell that is several modules of the other framework, its output rows
#: split between them. piece -> (row layout, the other framework's pieces in order); the layouts are
#: ``pet_hooks.io.fused``'s. Paths of the parts are mapped with the map of the same name.
FUSED_MAPS: Dict[str, Dict[str, Tuple[str, Tuple[str, ...]]]] = {
    "qwen3": {
        "self_attention.linear_qkv": ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        "mlp.linear_fc1": ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    },
}

NameMapSpec = Union[None, str, Mapping[str, str], Callable[[str], Optional[str]]]
MapFn = Callable[[str], Optional[str]]


def register_name_map(name: str, pieces: Mapping[str, str]) -> None:
    """Add a built-in map usable as ``name_map=name`` (dotted pieces -> pieces)."""
    NAME_MAPS[name] = dict(pieces)


def _piece_map(pieces: Mapping[str, str]) -> MapFn:
    # One regex over all pieces, longest first, so a replaced piece is never replaced again.
    keys = sorted(pieces, key=len, reverse=True)
    pattern = re.compile(r"(?<![^.])(" + "|".join(re.escape(k) for k in keys) + r")(?![^.])")

    def mapped(path: str) -> Optional[str]:
        new, count = pattern.subn(lambda m: pieces[m.group(1)], path)
        return new if count else None
    return mapped


def resolve_name_map(spec: NameMapSpec) -> Tuple[str, MapFn]:
    """``(label for messages, path -> mapped path or None)`` for any accepted ``name_map``."""
    if spec is None:
        return "none (the same names)", lambda path: path
    if isinstance(spec, str):
        if spec not in NAME_MAPS:
            raise PetConfigError(f"unknown name_map {spec!r}; built-in maps: {sorted(NAME_MAPS)}")
        return repr(spec), _piece_map(NAME_MAPS[spec])
    if isinstance(spec, Mapping):
        if not spec or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
            raise PetConfigTypeError("a name_map mapping must be a non-empty {str: str} of dotted name pieces")
        return "the given mapping", _piece_map(spec)
    if callable(spec):
        return getattr(spec, "__name__", "the given callable"), spec
    raise PetConfigTypeError(f"name_map must be None, a built-in name {sorted(NAME_MAPS)}, a mapping or a callable; "
                    f"got {type(spec).__name__}")


def inverse_name_map(paths: Iterable[str], fn: MapFn) -> Dict[str, str]:
    """The other framework's module path -> our cell path, over ``paths`` through a resolved map ``fn`` (the first
    of our paths wins where two map to one name; paths the map leaves out are not in it)."""
    inverse: Dict[str, str] = {}
    for path in paths:
        theirs = fn(path) if path else None
        if isinstance(theirs, str):
            inverse.setdefault(theirs, path)
    return inverse


def fused_parts(spec: NameMapSpec, path: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """``(row layout, the other framework's module paths)`` when ``path`` is a fused cell under the
    built-in map ``spec``; None otherwise (an ordinary one-to-one cell, or a map without fused cells)."""
    if not isinstance(spec, str) or spec not in FUSED_MAPS:
        return None
    _, to_theirs = resolve_name_map(spec)
    for piece, (layout, parts) in FUSED_MAPS[spec].items():
        if path == piece or path.endswith("." + piece):
            head = path[: len(path) - len(piece)]
            return layout, tuple(to_theirs(head + part) or head + part for part in parts)
    return None
