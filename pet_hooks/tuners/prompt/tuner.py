"""Prompt tuning (PEFT's ``PromptTuningConfig`` / ``PromptEmbedding``): the tuner, the prompt's init, PEFT's layout.

``prompt_embeddings`` [num_virtual_tokens, hidden] (PEFT's saved key) are put in front of the input embeddings;
the model then runs on ``n + S`` positions, its attention mask prefixed with "visible" and its labels with the
ignore index, as ``PeftModelForCausalLM.forward`` does, and the logits of the virtual positions are dropped.

How, without touching the model's source: the *model* cell moves onto its prompt adapter and its input
embedding onto ``PromptEmbeddingLayer`` (``models.py``: placeholder ids in front of the input, the prompt over
their embedding rows, the virtual positions cut off the output). The real tokens take positions
``n .. n + S - 1`` as in PEFT (Hugging Face numbers positions over the whole ``inputs_embeds``), so a model
with a fixed-size causal mask (MindFormers' in graph mode) must be built with ``seq_length`` covering ``n``.

Refused with an error: a model with no adapter (mcore models among them), an adapter naming no embedding
cell, MindFormers' incremental decoding (``use_past``) and ``input_sliced_sig``, and arguments whose positions
the adapter cannot extend (``attention_mask``, ``input_embeds``, ``position_ids``, ``loss_mask``...). One
adapter per net (as every method but LoRA).

Init (``prompt_tuning_init``, PEFT's): ``RANDOM`` standard normal rows (``nn.Embedding``'s default), ``TEXT`` the
embedding rows of the tokenized ``prompt_tuning_init_text`` repeated or cut to ``n`` (the tokenizer read from a
local ``tokenizer.json`` with the ``tokenizers`` library, special tokens added as ``tokenizer(text)`` adds them),
``SAMPLE_VOCAB`` the rows of random vocabulary ids (drawn with NumPy: PEFT's torch draw differs in value only).
Switching off is structural (the sequence length changes): graph mode recompiles, as for the prefix methods.
"""
from __future__ import annotations

import math
import os
from typing import List, Mapping, Optional, Tuple

import numpy as np
from mindspore import Parameter, nn
from mindspore.common import dtype as mstype

from ...config.pet_config import PetConfig, PromptTuningConfig, config_from_dict
from ...errors import AdapterFileError, PetConfigError, UnsupportedCellError
from ...matching.cells import select_cells
from ..base import Injection, Tuner
from ..common import init_rng, inject_all, restore
from ..file_layouts import PeftLayout
from .models import PROMPT, PromptEmbeddingLayer, known_prompt_models, prompt_adapter_for

__all__ = ["PromptTuner", "PromptTuningPeftLayout", "init_token_ids"]

_MODEL_ATTRS = ("pet_prompt_len", "pet_prompt_active", "pet_prompt_placeholder")
_EMBEDDING_ATTRS = (PROMPT, "pet_prompt_len", "pet_prompt_active")


def _can_adapt(cell: nn.Cell) -> Optional[str]:
    if prompt_adapter_for(cell) is not None:
        return None
    return f"no prompt adapter knows this model class (known: {known_prompt_models()}; see pet_hooks.register_prompt_model)"


def _table(path: str, cell: nn.Cell) -> Parameter:
    """The embedding cell's own 2-D table (``embedding_table``, ``embedding_weight``...)."""
    tables = [p for p in cell.get_parameters(expand=False) if len(p.shape) == 2]
    if len(tables) != 1:
        raise UnsupportedCellError(f"the input embedding '{path}' ({type(cell).__name__}) holds "
                                   f"{len(tables)} 2-D parameters, not one embedding table")
    return tables[0]


def _select(net: nn.Cell, cfg: PromptTuningConfig) -> List[Tuple[str, nn.Cell]]:
    """``[(model path, model), (embedding path, embedding)]``; raises before anything changes."""
    skip = lambda path, cell: getattr(type(cell), "pet_hooks_prompt_embedding", False)
    if cfg.target_modules is not None:
        found = select_cells(net, cfg.target_modules, None, can_adapt=_can_adapt, skip=skip)
    else:
        found = [(p, c) for p, c in net.cells_and_names() if prompt_adapter_for(c) is not None]
        if not found:
            raise PetConfigError(f"{type(net).__name__} has no model cell prompt tuning knows (known: {known_prompt_models()}); "
                                 f"teach pet_hooks yours with pet_hooks.register_prompt_model")
    path, model = found[0]                       # the outermost: named_cells lists a cell before its children
    if len(found) > 1 and cfg.target_modules is not None:
        raise PetConfigError(f"target_modules {cfg.target_modules!r} selects {len(found)} model cells "
                             f"{[p for p, _ in found]}; prompt tuning adapts one")
    adapter = prompt_adapter_for(model)
    try:
        adapter.check_model(model)
    except (AttributeError, ValueError) as err:
        raise UnsupportedCellError(f"cannot adapt '{path or type(model).__name__}' ({type(model).__name__}): "
                                   f"{err}") from None
    relative = adapter.embedding_path(model)
    cells = dict(model.cells_and_names())
    embedding = cells.get(relative)
    if embedding is None or not relative:
        raise UnsupportedCellError(f"{type(model).__name__} has no input embedding cell '{relative}' (its "
                                   f"prompt adapter {adapter.__name__} names it)")
    emb_path = f"{path}.{relative}" if path else relative
    _table(emb_path, embedding)
    return [(path, model), (emb_path, embedding)]


def _tokenizer_file(cfg: PromptTuningConfig) -> str:
    where = os.path.expanduser(cfg.tokenizer_name_or_path)
    path = os.path.join(where, "tokenizer.json") if os.path.isdir(where) else where
    if not os.path.isfile(path):
        raise PetConfigError(f"tokenizer_name_or_path {cfg.tokenizer_name_or_path!r}: no tokenizer.json there "
                             f"(pet_hooks reads a local tokenizer.json, or a directory holding one; it downloads "
                             f"nothing)")
    return path


def init_token_ids(ids: List[int], n: int) -> List[int]:
    """PEFT's TEXT init ids: ``ids`` cut to ``n``, or repeated until ``n`` and cut."""
    if not ids:
        raise PetConfigError("prompt_tuning_init_text gives no token")
    return (ids * math.ceil(n / len(ids)))[:n]


def _initial(cfg: PromptTuningConfig, table: Parameter) -> np.ndarray:
    """The prompt's first value, float32 [n, hidden] (PEFT's PromptEmbedding init)."""
    n, (vocab, hidden) = cfg.num_virtual_tokens, table.shape
    if cfg.prompt_tuning_init == "RANDOM":
        return init_rng(cfg).standard_normal((n, hidden)).astype(np.float32)
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = init_rng(cfg).integers(0, vocab, n)
    else:
        path = _tokenizer_file(cfg)            # a path that is not there says so first, library or not
        try:
            from tokenizers import Tokenizer   # only TEXT needs it
        except ImportError:
            raise PetConfigError("prompt_tuning_init TEXT needs the tokenizers library (pip install tokenizers)") \
                from None
        ids = init_token_ids(Tokenizer.from_file(path).encode(cfg.prompt_tuning_init_text).ids, n)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise PetConfigError(f"tokenizer_name_or_path {cfg.tokenizer_name_or_path!r} gives id {bad[0]}, outside "
                                 f"the model's vocabulary of {vocab}: another model's tokenizer?")
    return table.astype(mstype.float32).asnumpy()[np.asarray(ids)].astype(np.float32)


def _inject(targets: List[Tuple[str, nn.Cell]], cfg: PromptTuningConfig) -> List[Injection]:
    (model_path, model), (emb_path, embedding) = targets
    prompt = Parameter(_initial(cfg, _table(emb_path, embedding)), name=PROMPT, requires_grad=True)
    n = int(cfg.num_virtual_tokens)
    adapter = prompt_adapter_for(model)

    def add(index: int, path: str, cell: nn.Cell) -> List[Parameter]:
        cell.pet_prompt_len, cell.pet_prompt_active = n, True
        if index == 0:
            cell.pet_prompt_placeholder = int(adapter.placeholder_id(cell))
            return []
        setattr(cell, PROMPT, prompt)
        return [prompt]

    return inject_all(targets, lambda cell: _MODEL_ATTRS if cell is model else _EMBEDDING_ATTRS, add,
                      mixin_of=lambda cell: adapter if cell is model else PromptEmbeddingLayer)


class PromptTuningPeftLayout(PeftLayout):
    """PEFT's prompt tuning files: one tensor, ``prompt_embeddings`` [n, hidden], no module keys."""

    peft_type = "PROMPT_TUNING"
    whole_weights = {PROMPT: PROMPT}

    def fields(self, cfg: PromptTuningConfig) -> dict:
        # token_dim, num_layers, num_attention_heads: None, which PEFT fills from the base model's config
        return {"num_virtual_tokens": cfg.num_virtual_tokens, "num_transformer_submodules": 1, "token_dim": None,
                "num_layers": None, "num_attention_heads": None, "prompt_tuning_init": cfg.prompt_tuning_init,
                "prompt_tuning_init_text": cfg.prompt_tuning_init_text,
                "tokenizer_name_or_path": cfg.tokenizer_name_or_path, "tokenizer_kwargs": None,
                "modules_to_save": None}

    def check_fields(self, doc: Mapping, config_path: str) -> None:
        if doc.get("num_transformer_submodules") not in (None, 1):
            raise AdapterFileError(f"{config_path}: num_transformer_submodules="
                                   f"{doc.get('num_transformer_submodules')!r} (an encoder-decoder's prompt) is not "
                                   f"supported; pet_hooks' prompt tuning is for causal language models")
        if doc.get("task_type") not in (None, "CAUSAL_LM"):
            raise AdapterFileError(f"{config_path}: task_type={doc.get('task_type')!r} is not supported (CAUSAL_LM only)")

    def config_from(self, doc: Mapping, target_modules: List[str]) -> PromptTuningConfig:
        # the values come from the file: the init (and its tokenizer, maybe absent here) is not needed
        try:
            return config_from_dict({"pet_type": "prompt_tuning", "num_virtual_tokens": doc.get("num_virtual_tokens")})
        except (TypeError, ValueError) as err:
            raise AdapterFileError(f"PROMPT_TUNING adapter_config.json: {err}") from None

    def mismatch(self, doc, config_path: str, net_name: str, applied, module_map=None) -> Optional[str]:
        if applied.pet_type != "prompt_tuning":
            return f"{config_path}: a PROMPT_TUNING adapter cannot load into {net_name}, which has {applied.pet_type}"
        if doc.get("num_virtual_tokens") != applied.num_virtual_tokens:
            return (f"{config_path}: num_virtual_tokens={doc.get('num_virtual_tokens')!r}, but {net_name} has "
                    f"prompt tuning with num_virtual_tokens={applied.num_virtual_tokens!r}")
        return None


class PromptTuner(Tuner):
    """Prompt tuning as a :class:`~pet_hooks.tuners.base.Tuner`: two injections, the model and its embedding."""

    label = "prompt tuning"
    pet_types = ("prompt_tuning",)
    peft = PromptTuningPeftLayout()

    def can_adapt(self, cell: nn.Cell) -> Optional[str]:
        return _can_adapt(cell)

    def select_targets(self, net: nn.Cell, cfg: PetConfig):
        return _select(net, cfg)

    def inject(self, targets, cfg: PetConfig) -> List[Injection]:
        return _inject(targets, cfg)

    def eject(self, injection: Injection) -> None:
        restore(injection)

    def deltas_of(self, injection: Injection) -> List[Parameter]:
        return list(injection.params)

    def set_active(self, injections, active: bool) -> None:
        """Flags on both cells: the sequence length changes, so graph mode recompiles (switch_is_data False)."""
        for injection in injections:
            injection.cell.pet_prompt_active = bool(active)

    def io_channels(self, injection: Injection):
        prompt = getattr(injection.cell, PROMPT, None)
        return (None, int(prompt.shape[1])) if prompt is not None else (None, None)

    def group_anchor(self, injection: Injection) -> Optional[Parameter]:
        return _table(injection.path, injection.cell) if injection.params else None

    def base_weight(self, cell: nn.Cell) -> Optional[Parameter]:
        return None
