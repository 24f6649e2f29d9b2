"""Bad input everywhere a user can give it: one table, one clear error each, nothing touched.

Rows are config mappings (through ``apply``), config files (through ``apply``), adapter
directories and checkpoint files (through ``load_adapter``) and command lines (through the
``pet-hooks`` entry point, in process). Every row must raise one error of exactly the class it names
(``pet_hooks.errors``' ``PetConfigTypeError``, not only the built-in ``TypeError`` it also is) whose
message names the culprit (the field, pattern, file or tensor) and the offending value, with no frame from inside
MindSpore in its traceback, and must leave the model (classes, parameter names, values and
flags), the global patches and the environment exactly as they were. A property test throws
random mappings at ``load_config`` / ``apply`` with the same promise.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import traceback
from dataclasses import dataclass
from typing import Any, Callable, List

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

import pet_hooks
from pet_hooks import cli
from pet_hooks.errors import (AdapterFileError, AdapterNotFoundError, NoMatchError, PetConfigError, PetConfigTypeError,
                              PetStateError, UnsupportedCellError)
from pet_hooks.config.methods import config_types
from pet_hooks.doors import context
from samples.tiny_gpt import build
from tests.conftest import GPT_LORA, ROOT, SEED_CONFIG, SMALL

CONFIG = os.path.join(ROOT, "samples", "configs", "lora.yaml")
MS_DIR = os.path.dirname(os.path.abspath(ms.__file__))
PET_DIR = os.path.dirname(os.path.abspath(pet_hooks.__file__))
SEED = SEED_CONFIG
CFG = {**GPT_LORA, "lora_alpha": 8}
NAME = "blocks.0.attention.dense1.lora_A"
IA3 = {"pet_type": "ia3", "target_modules": ".*dense2|.*dense3|.*mlp.projection", "feedforward_modules": ".*mlp.projection"}
ADAPTER = {"pet_type": "adapter", "bottleneck_size": 4, "target_modules": ".*projection"}
LOW_RANK = {"pet_type": "low_rank_adapter", "reduction_factor": 4, "target_modules": ".*projection"}
LOHA = {"pet_type": "loha", "r": 2, "target_modules": ".*dense1|.*dense3"}          # issue 30 item 3
LOKR = {"pet_type": "lokr", "r": 2, "target_modules": ".*dense1|.*dense3"}
OFT = {"pet_type": "oft", "oft_block_size": 4, "target_modules": ".*dense1|.*dense3"}     # issue 30 item 5
VERA = {"pet_type": "vera", "r": 4, "target_modules": ".*dense1|.*dense3"}          # issue 30 item 4
ADALORA = {"pet_type": "adalora", "init_r": 4, "target_r": 2, "total_step": 10,          # issue 30 item 1
           "target_modules": ".*dense1|.*dense3"}
PROMPT = {"pet_type": "prompt_tuning", "num_virtual_tokens": 3}                     # issue 30 item 2


@dataclass
class Row:
    """One bad input: where it goes in, the error it must raise, the words its message must hold."""

    id: str
    kind: str                     # mapping | file | adapter | cli
    given: Any                    # the mapping; the file bytes; damage(dir) -> load_adapter args; argv
    exc: type                     # exactly the class raised (a subclass of it fails the row)
    words: List[str]
    name: str = "pet.yaml"        # file rows: the file name


def M(id, mapping, exc, *words):
    return Row(id, "mapping", mapping, exc, list(words))


def F(name, content, exc, *words, names_file=True):
    """A config file row; a file that cannot be read is named, a bad value in it names its field."""
    return Row(name, "file", content, exc, list(words) + ([name] if names_file else []), name=name)


def A(id, damage, exc, *words):
    return Row(id, "adapter", damage, exc, list(words))


def N(id, call, exc, *words, setup=None):
    """A row of several adapters: the net has adapters "default" (CFG, active) and "b" (rank 2), then
    ``setup(net)`` if given; ``call(net, adapter_dir)`` is what must fail."""
    return Row(id, "adapters", (setup, call), exc, list(words))


def _rows_of(net, names):
    with pet_hooks.adapter_per_row(net, names):
        pass


def _checkpoint_of(directory, cfg, adapter_name="default", **shape):
    """A run checkpoint in ``directory`` written by another net (of the sample GPT with ``shape``) with ``cfg``."""
    other = build(seed=2, **{**SMALL, **shape})
    pet_hooks.apply(other, cfg, adapter_name=adapter_name)
    pet_hooks.save_checkpoint(other, None, 4, str(directory))
    return str(directory)


def C(id, argv, *words):
    return Row(id, "cli", argv, SystemExit, list(words))


def MF(id, make, exc, *words):
    """A row of MindFormers' own flow under a door: ``make(tmp_path)`` returns (the model that must stay as it
    was, or None when MindFormers builds it inside the failing call; the call)."""
    return Row(id, "mindformers", make, exc, list(words))


# ----------------------------------------------------------------------------- MindFormers' flow under a door
def _run_yaml(tmp_path, **pet_changes):
    from tests.models.test_mindformers_flow import LORA_YAML, _doc, write_run_yaml
    return write_run_yaml(tmp_path, {**_doc(LORA_YAML)["model"]["model_config"]["pet_config"], **pet_changes})


def _build_in_door(path, cfg=None):
    from tests.models.test_mindformers_flow import build_from_yaml
    with pet_hooks.enable(cfg):
        build_from_yaml(path)


def _trainer_in_door(net, tmp_path, pet_method, cfg=None):
    from tests.models.test_mindformers_flow import _trainer
    with pet_hooks.enable(cfg):
        _trainer(net, tmp_path, pet_method=pet_method)


def _llama_with_pet_config(block):
    from tests.nets import tiny_llama
    net = tiny_llama()
    net.config.pet_config = block
    return net


def _mindformers_pet_model():
    from mindformers.pet import get_pet_model
    from tests.nets import tiny_llama
    return get_pet_model(tiny_llama(), {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*wq"})


# ----------------------------------------------------------------------------- damage to an adapter
def _rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _weights(d):
    return d / "adapter_model.safetensors"


def _config(d):
    return d / "adapter_config.json"


def _set(d, key, value):
    _rewrite(_weights(d), lambda t: t.__setitem__(key, value))


def _write_config(d, doc):
    _config(d).write_text(json.dumps(doc))


_BOMB_MARK = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pet_hooks_unpickled_{os.getpid()}")


class _Bomb:
    """A pickle that would leave a mark if anything unpickled it."""

    def __reduce__(self):
        return (open, (_BOMB_MARK, "w"))


def _file_arg(d, name, content):
    (d / name).write_bytes(content)
    return {"path": d / name}


EMB = "base_model.model.embedding."          # the sample GPT's token embedding (256 x 16 here) in PEFT's keys


def _peft_dir(d, tensors):
    """The adapter directory rewritten as a PEFT LoRA of the token embedding holding ``tensors``."""
    _write_config(d, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["embedding"], "bias": "none"})
    save_file({k: np.zeros(v, np.float32) for k, v in tensors.items()}, str(_weights(d)))


def _peft_bias_dir(d, bias, tensors, lora_bias=False):
    """lora_bias / bias (issue 29 item 6): a PEFT LoRA of one query projection with ``bias`` and ``tensors`` added."""
    q = "base_model.model.blocks.0.attention.dense1."
    _write_config(d, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["dense1"], "bias": bias,
                      "lora_bias": lora_bias})
    save_file({k: np.zeros(v, np.float32) for k, v in {q + "lora_A.weight": (4, 16), q + "lora_B.weight": (16, 4),
                                                       **tensors}.items()}, str(_weights(d)))


def _lycoris_peft_dir(d, peft_type, tensors, **fields):
    """LoHa / LoKr (issue 30 item 3): a PEFT adapter of one query projection (16 -> 16) holding ``tensors``."""
    q = "base_model.model.blocks.0.attention.dense1."
    _write_config(d, {"peft_type": peft_type, "r": 2, "alpha": 2, "target_modules": ["dense1"], **fields})
    save_file({q + k: np.zeros(v, np.float32) for k, v in tensors.items()}, str(_weights(d)))


_HADA = {"hada_w1_a": (16, 2), "hada_w1_b": (2, 16), "hada_w2_a": (16, 2), "hada_w2_b": (2, 16)}


def _oft_peft_dir(d, shape, **fields):
    """OFT (issue 30 item 5): a PEFT adapter of one query projection (16 -> 16, blocks of 4) with ``oft_R`` of ``shape``."""
    _write_config(d, {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "target_modules": ["dense1"], **fields})
    save_file({"base_model.model.blocks.0.attention.dense1.oft_R.weight": np.zeros(shape, np.float32)},
              str(_weights(d)))


def _vera_peft_dir(d, tensors, **fields):
    """VeRA (issue 30 item 4): a PEFT adapter of one query projection (16 -> 16) holding ``tensors``."""
    _write_config(d, {"peft_type": "VERA", "r": 2, "target_modules": ["dense1"], "save_projection": True, **fields})
    save_file({k: np.zeros(v, np.float32) for k, v in tensors.items()}, str(_weights(d)))


_VERA_Q = "base_model.model.blocks.0.attention.dense1."
_VERA = {"base_model.vera_A": (2, 16), "base_model.vera_B": (16, 2), _VERA_Q + "vera_lambda_b": (16,),
         _VERA_Q + "vera_lambda_d": (2,)}


def _adalora_peft_dir(d, rows, mask, **fields):
    """AdaLoRA (issue 30 item 1): a PEFT adapter of one query projection (16 -> 16), ``rows`` ranks, init_r 4."""
    q = "base_model.model.blocks.0.attention.dense1."
    _write_config(d, {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10,
                      "target_modules": ["dense1"], "rank_pattern": mask and {"blocks.0.attention.dense1.lora_E": mask},
                      **fields})
    save_file({q + "lora_A": np.zeros((rows, 16), np.float32), q + "lora_E": np.zeros((rows, 1), np.float32),
               q + "lora_B": np.zeros((16, rows), np.float32)}, str(_weights(d)))
def _prompt_peft_dir(d, tensors, **fields):
    """Prompt tuning (issue 30 item 2): a PEFT PROMPT_TUNING adapter of 3 virtual tokens holding ``tensors``."""
    _write_config(d, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "task_type": "CAUSAL_LM", **fields})
    save_file({k: np.zeros(v, np.float32) for k, v in tensors.items()}, str(_weights(d)))


def _ckpt_without_lora(d):
    ms.save_checkpoint(nn.Dense(2, 2), str(d / "base.ckpt"))
    return {"path": d / "base.ckpt", "cfg": CFG}


ROWS: List[Row] = [
    # ---- config values, as mappings (MindFormers field names) ----
    M("rank-0", {**SEED, "lora_rank": 0}, PetConfigError, "lora_rank", "got 0"),
    M("rank-negative", {**SEED, "lora_rank": -2}, PetConfigError, "lora_rank", "-2"),
    M("rank-str", {**SEED, "lora_rank": "8"}, PetConfigTypeError, "lora_rank", "'8'"),
    M("rank-float", {**SEED, "lora_rank": 2.5}, PetConfigTypeError, "lora_rank", "2.5"),
    M("rank-bool", {**SEED, "lora_rank": True}, PetConfigTypeError, "lora_rank", "True"),
    M("rank-none", {**SEED, "lora_rank": None}, PetConfigTypeError, "lora_rank", "None"),
    M("alpha-0", {**SEED, "lora_alpha": 0}, PetConfigError, "lora_alpha", "got 0"),
    M("alpha-str", {**SEED, "lora_alpha": "big"}, PetConfigTypeError, "lora_alpha", "'big'"),
    M("alpha-nan", {**SEED, "lora_alpha": float("nan")}, PetConfigError, "lora_alpha", "nan"),
    M("alpha-inf", {**SEED, "lora_alpha": float("inf")}, PetConfigError, "lora_alpha", "inf"),
    M("dropout-1", {**SEED, "lora_dropout": 1.0}, PetConfigError, "lora_dropout", "1.0"),
    M("dropout-negative", {**SEED, "lora_dropout": -0.1}, PetConfigError, "lora_dropout", "-0.1"),
    M("dropout-str", {**SEED, "lora_dropout": "0.1"}, PetConfigTypeError, "lora_dropout", "'0.1'"),
    M("target-empty", {**SEED, "target_modules": ""}, PetConfigError, "target_modules", "empty"),
    M("target-blank", {**SEED, "target_modules": "   "}, PetConfigError, "target_modules", "empty"),
    M("target-unclosed", {**SEED, "target_modules": "(unclosed"}, PetConfigError, "target_modules", "(unclosed"),
    M("target-nothing-to-repeat", {**SEED, "target_modules": "*dense"}, PetConfigError, "target_modules", "*dense"),
    M("target-empty-list", {**SEED, "target_modules": []}, PetConfigError, "target_modules", "empty"),
    M("target-list-int", {**SEED, "target_modules": ["ok", 3]}, PetConfigTypeError, "target_modules", "got 3"),
    M("target-int", {**SEED, "target_modules": 42}, PetConfigTypeError, "target_modules", "42"),
    M("target-mapping", {**SEED, "target_modules": {"a": 1}}, PetConfigTypeError, "target_modules", "{'a': 1}"),
    M("target-missing", {**SEED, "target_modules": None}, PetConfigError, "target_modules", "required"),
    M("exclude-bad-regex", {**SEED, "exclude_layers": ["[bad"]}, PetConfigError, "exclude_layers", "[bad"),
    M("a-init", {**SEED, "lora_a_init": "xavier"}, PetConfigError, "lora_a_init", "xavier"),
    M("b-init", {**SEED, "lora_b_init": "normal"}, PetConfigError, "lora_b_init", "normal"),
    M("init-lora-weights-unknown", {**SEED, "init_lora_weights": "loftq"}, PetConfigError, "init_lora_weights",
      "loftq"),
    M("init-lora-weights-niter-0", {**SEED, "init_lora_weights": "pissa_niter_0"}, PetConfigError, "init_lora_weights",
      "pissa_niter_0"),
    M("init-lora-weights-int", {**SEED, "init_lora_weights": 3}, PetConfigError, "init_lora_weights", "got 3"),
    M("init-lora-weights-with-a-init", {**SEED, "init_lora_weights": "pissa", "lora_a_init": "normal"}, PetConfigError,
      "lora_a_init", "init_lora_weights", "pissa"),
    M("dora-str", {**SEED, "use_dora": "yes"}, PetConfigTypeError, "use_dora", "'yes'"),
    M("rslora-str", {**SEED, "use_rslora": "yes"}, PetConfigTypeError, "use_rslora", "'yes'"),
    M("param-dtype", {**SEED, "param_init_type": "int8"}, PetConfigError, "param_init_type", "int8"),
    M("compute-dtype", {**SEED, "compute_dtype": "float64"}, PetConfigError, "compute_dtype", "float64"),
    M("seed-negative", {**SEED, "seed": -1}, PetConfigError, "seed", "-1"),
    M("reuse-str", {**SEED, "reuse_block_graphs": "no"}, PetConfigTypeError, "reuse_block_graphs", "'no'"),
    M("chunked-loss-zero", {**SEED, "chunked_loss": 0}, PetConfigError, "chunked_loss", "got 0"),
    M("chunked-loss-str", {**SEED, "chunked_loss": "8"}, PetConfigTypeError, "chunked_loss", "'8'"),
    M("chunked-loss-not-llama", {**SEED, "chunked_loss": 8}, UnsupportedCellError, "chunked_loss",
      "LlamaForCausalLM"),
    M("fused-optimizer-str", {**SEED, "fused_optimizer": "yes"}, PetConfigTypeError, "fused_optimizer", "'yes'"),
    # rank_pattern / alpha_pattern (issue 29)
    M("rank-pattern-list", {**SEED, "rank_pattern": [".*dense1"]}, PetConfigTypeError, "rank_pattern", "['.*dense1']"),
    M("rank-pattern-zero", {**SEED, "rank_pattern": {".*dense1": 0}}, PetConfigError, "rank_pattern", "'.*dense1'",
      "got 0"),
    M("rank-pattern-float", {**SEED, "rank_pattern": {"dense1": 2.5}}, PetConfigTypeError, "rank_pattern", "2.5"),
    M("rank-pattern-bool", {**SEED, "rank_pattern": {"dense1": True}}, PetConfigTypeError, "rank_pattern", "True"),
    M("rank-pattern-bad-regex", {**SEED, "rank_pattern": {"[bad": 2}}, PetConfigError, "rank_pattern", "[bad"),
    M("rank-pattern-empty-key", {**SEED, "rank_pattern": {" ": 2}}, PetConfigError, "rank_pattern", "empty key"),
    M("rank-pattern-int-key", {**SEED, "rank_pattern": {3: 2}}, PetConfigTypeError, "rank_pattern", "got 3"),
    M("rank-pattern-no-match", {**SEED, "rank_pattern": {"dense9": 2}}, NoMatchError, "rank_pattern", "'dense9'",
      "nearest", "blocks.0.attention.dense"),
    M("rank-pattern-untargeted", {**SEED, "rank_pattern": {"mapping": 2}}, NoMatchError, "rank_pattern",
      "'mapping'", "selects none"),
    M("alpha-pattern-nan", {**SEED, "alpha_pattern": {"dense1": float("nan")}}, PetConfigError, "alpha_pattern",
      "nan"),
    M("alpha-pattern-negative", {**SEED, "alpha_pattern": {"dense1": -4}}, PetConfigError, "alpha_pattern", "-4"),
    M("alpha-pattern-str", {**SEED, "alpha_pattern": {"dense1": "8"}}, PetConfigTypeError, "alpha_pattern", "'8'"),
    M("alpha-pattern-no-match", {**SEED, "alpha_pattern": {"attention": 2}}, NoMatchError, "alpha_pattern",
      "'attention'", "nearest"),
    M("loraplus-zero", {**SEED, "loraplus_lr_ratio": 0}, PetConfigError, "loraplus_lr_ratio", "got 0"),
    M("loraplus-str", {**SEED, "loraplus_lr_ratio": "16"}, PetConfigTypeError, "loraplus_lr_ratio", "'16'"),
    M("freeze-exclude-int", {**SEED, "freeze_exclude": [1]}, PetConfigTypeError, "freeze_exclude", "[1]"),
    M("freeze-exclude-empty", {**SEED, "freeze_exclude": [""]}, PetConfigTypeError, "freeze_exclude", "['']"),
    M("unknown-key", {**SEED, "lora_rnak": 4}, PetConfigError, "lora_rnak", "lora_rank"),
    M("unknown-pet-type", {**SEED, "pet_type": "adapterx"}, PetConfigError, "pet_type", "adapterx", "lora"),
    M("pet-type-int", {**SEED, "pet_type": 5}, PetConfigError, "pet_type 5"),
    M("pet-type-missing", {"lora_rank": 8}, PetConfigError, "pet_type"),
    M("key-not-str", {**SEED, 1: 2}, PetConfigTypeError, "keys must be strings", "1"),
    M("ptuning2-len-0", {"pet_type": "ptuning2", "pre_seq_len": 0}, PetConfigError, "pre_seq_len", "got 0"),
    M("ptuning2-dropout", {"pet_type": "ptuning2", "dropout_rate": 1.5}, PetConfigError, "dropout_rate", "1.5"),
    M("ptuning2-no-dim", {"pet_type": "ptuning2", "prefix_projection": True}, PetConfigError, "projection_dim",
      "prefix_projection is true"),
    M("ptuning2-dim-negative", {"pet_type": "ptuning2", "prefix_projection": True, "projection_dim": -3},
      PetConfigError, "projection_dim", "-3"),
    M("prefix-mid-negative", {"pet_type": "prefixtuning", "mid_dim": -1}, PetConfigError, "mid_dim", "-1"),
    M("prefix-len-str", {"pet_type": "prefixtuning", "prefix_token_num": "16"}, PetConfigTypeError, "prefix_token_num",
      "'16'"),
    M("prefix-lora-key", {"pet_type": "prefixtuning", "lora_rank": 4}, PetConfigError, "lora_rank", "prefixtuning"),
    M("block-not-mapping", {"pet_config": [1, 2]}, PetConfigTypeError, "pet_config must be a mapping", "list"),
    M("mindformers-null-block", {"model": {"model_config": {"pet_config": None}}}, PetConfigError,
      "no PET configuration", "model.model_config.pet_config"),
    M("source-none", None, PetConfigTypeError, "NoneType"),
    M("source-list", [("pet_type", "lora")], PetConfigTypeError, "list"),
    # ---- configs that are valid but do not fit the model ----
    M("pattern-matches-nothing", {**CFG, "target_modules": ".*wq"}, NoMatchError, "'.*wq' matches no cell",
      "TinyGPT", "dense1"),
    M("list-entry-matches-nothing", {**CFG, "target_modules": ["dense1", "q_proj"]}, NoMatchError,
      "'q_proj' matches no cell"),
    M("pattern-hits-layernorm", {**CFG, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "LayerNorm"),
    M("pattern-hits-attention-block", {**CFG, "target_modules": ".*attention"}, UnsupportedCellError,
      "blocks.0.attention", "type Attention"),
    M("exclude-everything", {**CFG, "exclude_layers": ["blocks.*"]}, PetConfigError, "excludes all", "['blocks.*']"),
    M("freeze-exclude-matches-nothing", {**CFG, "freeze_exclude": ["no_such_param*"]}, ValueError,
      "freeze_exclude", "no_such_param*"),
    # modules_to_save (branch i29_aux): a name that ends no cell's path; a bad type; a cell also adapted
    M("modules-to-save-matches-nothing", {**CFG, "modules_to_save": ["dense9"]}, NoMatchError, "modules_to_save",
      "'dense9'", "'dense1'"),
    M("modules-to-save-int", {**CFG, "modules_to_save": [3]}, PetConfigTypeError, "modules_to_save", "[3]"),
    M("modules-to-save-adapted", {**CFG, "modules_to_save": ["blocks.0.attention.dense1"]}, PetConfigError,
      "modules_to_save", "'blocks.0.attention.dense1'", "also a target"),
    # trainable_token_indices (branch i29_aux): past the vocabulary (256 rows), negative, twice, not ints, a bad key
    M("tokens-past-vocabulary", {**CFG, "trainable_token_indices": [5, 300]}, PetConfigError,
      "trainable_token_indices", "index 300", "vocabulary size 256", "'embedding'"),
    M("tokens-negative", {**CFG, "trainable_token_indices": [-1]}, PetConfigError, "trainable_token_indices", "-1"),
    M("tokens-twice", {**CFG, "trainable_token_indices": [4, 4]}, PetConfigError, "trainable_token_indices",
      "listed twice"),
    M("tokens-str", {**CFG, "trainable_token_indices": ["a"]}, PetConfigTypeError, "trainable_token_indices", "'a'"),
    M("tokens-empty", {**CFG, "trainable_token_indices": []}, PetConfigTypeError, "trainable_token_indices", "[]"),
    M("tokens-key-matches-nothing", {**CFG, "trainable_token_indices": {"tok_embeddings": [1]}}, NoMatchError,
      "trainable_token_indices", "'tok_embeddings'"),
    M("tokens-key-not-embedding", {**CFG, "trainable_token_indices": {"head": [1]}}, UnsupportedCellError,
      "trainable_token_indices", "'head'", "not an embedding"),
    M("tokens-and-lora-on-embedding", {**CFG, "target_modules": ".*dense1|embedding", "trainable_token_indices": [1]},
      PetConfigError, "trainable_token_indices", "'embedding'", "also a target"),
    M("prefix-on-a-dense", {"pet_type": "prefixtuning", "target_modules": [".*dense1"]}, NoMatchError,
      ".*dense1"),
    M("embedding-dora", {**CFG, "target_modules": ".*embedding", "use_dora": True}, UnsupportedCellError, "'embedding'",
      "Embedding", "use_dora"),
    M("embedding-pissa", {**CFG, "target_modules": ["embedding"], "init_lora_weights": "pissa"}, UnsupportedCellError,
      "'embedding'", "Embedding", "'pissa'"),
    M("embedding-olora", {**CFG, "target_modules": "position_embedding", "init_lora_weights": "olora"},
      UnsupportedCellError,
      "'position_embedding'", "'olora'"),
    # lora_bias / bias (issue 29 item 6)
    M("lora-bias-str", {**SEED, "lora_bias": "yes"}, PetConfigTypeError, "lora_bias", "'yes'"),
    M("lora-bias-dora", {**SEED, "lora_bias": True, "use_dora": True}, PetConfigError, "lora_bias", "DoRA"),
    M("lora-bias-pissa", {**SEED, "lora_bias": True, "init_lora_weights": "pissa"}, PetConfigError, "lora_bias",
      "'pissa'"),
    M("lora-bias-embedding", {**CFG, "target_modules": ".*embedding", "lora_bias": True}, UnsupportedCellError,
      "'embedding'", "lora_bias"),
    M("bias-unknown", {**SEED, "bias": "some"}, PetConfigError, "bias", "'some'"),
    M("bias-bool", {**SEED, "bias": True}, PetConfigError, "bias", "True"),
    # ---- IA3, BitFit, bottleneck adapters: a bad value per field, a pattern matching nothing, a cell they refuse ----
    M("ia3-target-missing", {"pet_type": "ia3"}, PetConfigError, "target_modules", "required"),
    # OFT (issue 30 item 5)
    M("oft-target-missing", {"pet_type": "oft"}, PetConfigError, "target_modules", "required"),
    M("oft-r-and-block-size", {**OFT, "r": 2}, PetConfigError, "exactly one of r and oft_block_size", "r=2",
      "oft_block_size=4"),
    M("oft-neither-r-nor-block-size", {**OFT, "oft_block_size": 0}, PetConfigError, "exactly one", "r=0"),
    M("oft-block-size-negative", {**OFT, "oft_block_size": -4}, PetConfigError, "oft_block_size", "-4"),
    M("oft-block-size-str", {**OFT, "oft_block_size": "4"}, PetConfigTypeError, "oft_block_size", "'4'"),
    M("oft-block-size-not-dividing", {**OFT, "oft_block_size": 5}, PetConfigError, "oft_block_size=5",
      "in_features 16", "'blocks.0.attention.dense1'"),
    M("oft-r-over-in-features", {**OFT, "r": 32, "oft_block_size": 0}, PetConfigError, "r=32", "in_features 16"),
    M("oft-neumann-terms-0", {**OFT, "num_cayley_neumann_terms": 0}, PetConfigError, "num_cayley_neumann_terms",
      "got 0"),
    M("oft-eps-0", {**OFT, "eps": 0}, PetConfigError, "eps must be > 0", "got 0"),
    M("oft-coft-str", {**OFT, "coft": "yes"}, PetConfigTypeError, "coft", "'yes'"),
    M("oft-module-dropout-1", {**OFT, "module_dropout": 1.0}, PetConfigError, "module_dropout", "1.0"),
    M("oft-on-layernorm", {**OFT, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "LayerNorm"),
    M("ia3-ff-int", {**IA3, "feedforward_modules": 3}, PetConfigTypeError, "feedforward_modules", "got 3"),
    M("ia3-ff-bad-regex", {**IA3, "feedforward_modules": "(ff"}, PetConfigError, "feedforward_modules", "(ff"),
    M("ia3-init-str", {**IA3, "init_ia3_weights": "yes"}, PetConfigTypeError, "init_ia3_weights", "'yes'"),
    M("ia3-exclude-bad-regex", {**IA3, "exclude_layers": ["[bad"]}, PetConfigError, "exclude_layers", "[bad"),
    M("ia3-pattern-matches-nothing", {**IA3, "target_modules": ".*wk"}, NoMatchError, "'.*wk' matches no cell",
      "dense2"),
    M("ia3-ff-not-among-targets", {**IA3, "feedforward_modules": ".*dense1"}, NoMatchError, "feedforward_modules",
      "'.*dense1'", "subset"),
    M("ia3-on-layernorm", {**IA3, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "LayerNorm"),
    M("ia3-output-after-activation", {**IA3, "target_modules": ".*mapping", "feedforward_modules": None},
      UnsupportedCellError, "blocks.0.mlp.mapping", "activation", "feedforward_modules"),
    # LoHa / LoKr (issue 30 item 3)
    M("loha-target-missing", {"pet_type": "loha"}, PetConfigError, "target_modules", "required"),
    M("loha-r-0", {**LOHA, "r": 0}, PetConfigError, "r must be", "got 0"),
    M("loha-alpha-str", {**LOHA, "alpha": "8"}, PetConfigTypeError, "alpha", "'8'"),
    M("loha-rank-dropout-1", {**LOHA, "rank_dropout": 1.0}, PetConfigError, "rank_dropout", "1.0"),
    M("lokr-module-dropout-negative", {**LOKR, "module_dropout": -0.1}, PetConfigError, "module_dropout", "-0.1"),
    M("loha-init-lycoris", {**LOHA, "init_weights": "lycoris"}, PetConfigError, "init_weights", "'lycoris'"),
    M("loha-effective-conv2d-str", {**LOHA, "use_effective_conv2d": "no"}, PetConfigTypeError,
      "use_effective_conv2d", "'no'"),
    M("lokr-decompose-factor-0", {**LOKR, "decompose_factor": 0}, PetConfigError, "decompose_factor", "got 0"),
    M("lokr-decompose-both-str", {**LOKR, "decompose_both": "yes"}, PetConfigTypeError, "decompose_both", "'yes'"),
    M("lokr-pattern-matches-nothing", {**LOKR, "target_modules": ".*wk"}, NoMatchError, "'.*wk' matches no cell"),
    M("loha-on-layernorm", {**LOHA, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "LayerNorm"),
    M("loha-on-embedding", {**LOHA, "target_modules": "embedding"}, UnsupportedCellError, "'embedding'", "LoHa"),
    M("lokr-on-activated-layer", {**LOKR, "target_modules": ".*mapping"}, UnsupportedCellError,
      "blocks.0.mlp.mapping", "activation", "LoKr"),
    # VeRA (issue 30 item 4)
    M("vera-target-missing", {"pet_type": "vera"}, PetConfigError, "target_modules", "required"),
    M("vera-r-0", {**VERA, "r": 0}, PetConfigError, "r must be", "got 0"),
    M("vera-save-projection-false", {**VERA, "save_projection": False}, PetConfigError, "save_projection",
      "projection_prng_key"),
    M("vera-prng-key-negative", {**VERA, "projection_prng_key": -1}, PetConfigError, "projection_prng_key", "-1"),
    M("vera-prng-key-str", {**VERA, "projection_prng_key": "0"}, PetConfigTypeError, "projection_prng_key", "'0'"),
    M("vera-dropout-1", {**VERA, "vera_dropout": 1.0}, PetConfigError, "vera_dropout", "1.0"),
    M("vera-d-initial-str", {**VERA, "d_initial": "0.1"}, PetConfigTypeError, "d_initial", "'0.1'"),
    M("vera-fan-in-fan-out", {**VERA, "fan_in_fan_out": True}, PetConfigError, "fan_in_fan_out", "Conv1D"),
    M("vera-bias-all", {**VERA, "bias": "vera_only"}, PetConfigError, "bias", "'vera_only'"),
    M("vera-on-layernorm", {**VERA, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "VeRA"),
    # AdaLoRA (issue 30 item 1): PEFT's checks, and pet_hooks' own
    M("adalora-total-step-missing", {k: v for k, v in ADALORA.items() if k != "total_step"}, PetConfigError,
      "total_step is required"),
    M("adalora-total-step-0", {**ADALORA, "total_step": 0}, PetConfigError, "total_step", "got 0"),
    M("adalora-target-r-over-init-r", {**ADALORA, "target_r": 5}, PetConfigError, "target_r=5", "init_r=4"),
    M("adalora-no-budgeting-phase", {**ADALORA, "tinit": 6, "tfinal": 4}, PetConfigError, "tinit=6",
      "total_step - tfinal", "10", "4"),
    M("adalora-beta1-1", {**ADALORA, "beta1": 1.0}, PetConfigError, "beta1", "(0, 1)", "1.0"),
    M("adalora-orth-negative", {**ADALORA, "orth_reg_weight": -0.1}, PetConfigError, "orth_reg_weight", "-0.1"),
    M("adalora-deltaT-0", {**ADALORA, "deltaT": 0}, PetConfigError, "deltaT", "got 0"),
    M("adalora-init-r-str", {**ADALORA, "init_r": "4"}, PetConfigTypeError, "init_r", "'4'"),
    M("adalora-rank-pattern-wrong-length", {**ADALORA, "rank_pattern": {"blocks.0.attention.dense1": [True]}},
      PetConfigError, "rank_pattern", "init_r=4"),
    M("adalora-rank-pattern-unknown-cell", {**ADALORA, "rank_pattern": {"blocks.0.nosuch": [True] * 4}},
      PetConfigError, "rank_pattern", "blocks.0.nosuch"),
    M("adalora-target-missing", {k: v for k, v in ADALORA.items() if k != "target_modules"}, PetConfigError,
      "target_modules", "required"),
    M("adalora-on-layernorm", {**ADALORA, "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1", "AdaLoRA"),
    # prompt tuning (issue 30 item 2; a model without an adapter or an embedding: tests/tuners/test_prompt_tuning.py)
    M("prompt-tokens-0", {**PROMPT, "num_virtual_tokens": 0}, PetConfigError, "num_virtual_tokens", "got 0"),
    M("prompt-tokens-str", {**PROMPT, "num_virtual_tokens": "3"}, PetConfigTypeError, "num_virtual_tokens", "'3'"),
    M("prompt-init-unknown", {**PROMPT, "prompt_tuning_init": "ZEROS"}, PetConfigError, "prompt_tuning_init",
      "'ZEROS'"),
    M("prompt-text-without-text", {**PROMPT, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "tok/"},
      PetConfigError, "prompt_tuning_init_text", "None"),
    M("prompt-text-without-tokenizer", {**PROMPT, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Hi"},
      PetConfigError, "tokenizer_name_or_path", "None"),
    M("prompt-tokenizer-not-there", {**PROMPT, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Hi",
                                     "tokenizer_name_or_path": "/no/such/tokenizer"}, PetConfigError,
      "'/no/such/tokenizer'", "tokenizer.json"),
    M("prompt-tokenizer-kwargs", {**PROMPT, "tokenizer_kwargs": {"gguf_file": "x.gguf"}}, PetConfigError,
      "tokenizer_kwargs", "gguf_file"),
    M("prompt-chunked-loss", {**PROMPT, "chunked_loss": 4}, PetConfigError, "chunked_loss=4", "prompt_tuning"),
    M("prompt-target-not-a-model", {**PROMPT, "target_modules": ".*attention"}, UnsupportedCellError,
      "blocks.0.attention", "no prompt adapter"),
    M("bitfit-target-int", {"pet_type": "bitfit", "target_modules": 5}, PetConfigTypeError, "target_modules", "got 5"),
    M("bitfit-exclude-everything", {"pet_type": "bitfit", "exclude_layers": [".*"]}, NoMatchError,
      "no cell with a 'bias'",
      "exclude_layers", "['.*']"),
    M("bitfit-pattern-matches-nothing", {"pet_type": "bitfit", "target_modules": ".*wq"}, NoMatchError,
      "'.*wq' matches no cell"),
    M("bitfit-cell-without-bias", {"pet_type": "bitfit", "target_modules": ["head"]}, UnsupportedCellError,
      "'head'", "Dense",
      "bias"),
    M("bitfit-on-layernorm", {"pet_type": "bitfit", "target_modules": ".*ln1"}, UnsupportedCellError, "blocks.0.ln1",
      "LayerNorm"),
    M("bitfit-lora-key", {"pet_type": "bitfit", "lora_rank": 4}, PetConfigError, "lora_rank", "bitfit"),
    M("adapter-bottleneck-0", {**ADAPTER, "bottleneck_size": 0}, PetConfigError, "bottleneck_size", "got 0"),
    M("adapter-bottleneck-str", {**ADAPTER, "bottleneck_size": "8"}, PetConfigTypeError, "bottleneck_size", "'8'"),
    M("adapter-non-linearity", {**ADAPTER, "non_linearity": "swish"}, PetConfigError, "non_linearity", "swish"),
    M("adapter-target-missing", {"pet_type": "adapter"}, PetConfigError, "target_modules", "required"),
    M("adapter-param-dtype", {**ADAPTER, "param_init_type": "int8"}, PetConfigError, "param_init_type", "int8"),
    M("adapter-compute-dtype", {**ADAPTER, "compute_dtype": "float64"}, PetConfigError, "compute_dtype", "float64"),
    M("adapter-pattern-matches-nothing", {**ADAPTER, "target_modules": ["q_proj"]}, NoMatchError,
      "'q_proj' matches no cell"),
    M("adapter-on-attention-block", {**ADAPTER, "target_modules": ".*attention"}, UnsupportedCellError,
      "blocks.0.attention", "type Attention"),
    M("low-rank-reduction-0", {**LOW_RANK, "reduction_factor": 0}, PetConfigError, "reduction_factor", "got 0"),
    M("low-rank-size-negative", {**LOW_RANK, "low_rank_size": -1}, PetConfigError, "low_rank_size", "-1"),
    M("low-rank-w-init", {**LOW_RANK, "low_rank_w_init": "ones"}, PetConfigError, "low_rank_w_init", "ones"),
    M("low-rank-non-linearity-int", {**LOW_RANK, "non_linearity": 3}, PetConfigError, "non_linearity", "got 3"),
    M("low-rank-reduction-wider-than-layer", {**LOW_RANK, "reduction_factor": 64}, UnsupportedCellError,
      "reduction_factor 64",
      "blocks.0.attention.projection"),
    M("low-rank-on-layernorm", {**LOW_RANK, "target_modules": ".*ln2"}, UnsupportedCellError, "blocks.0.ln2",
      "LayerNorm"),
    # ---- issue 29 items 2/3: layers_to_transform / layers_pattern, "all-linear", exclude_modules ----
    M("layers-index-missing", {**CFG, "target_modules": ["dense1"], "layers_to_transform": [0, 7]}, PetConfigError,
      "layers_to_transform", "layer index 7", "0, 1 under 'blocks'"),
    M("layers-negative", {**CFG, "layers_to_transform": -1}, PetConfigError, "layers_to_transform", "-1"),
    M("layers-str", {**CFG, "layers_to_transform": "0"}, PetConfigTypeError, "layers_to_transform", "'0'"),
    M("layers-bool", {**CFG, "layers_to_transform": [True]}, PetConfigTypeError, "layers_to_transform", "True"),
    M("layers-empty", {**CFG, "layers_to_transform": []}, PetConfigError, "layers_to_transform", "empty list"),
    M("layers-pattern-matches-nothing", {**CFG, "layers_to_transform": 0, "layers_pattern": "layers"},
      PetConfigError, "layers_pattern 'layers'", "matches no cell path", "'blocks'"),
    M("layers-pattern-alone", {**CFG, "layers_pattern": "blocks"}, PetConfigError, "layers_pattern",
      "needs layers_to_transform"),
    M("layers-pattern-bad-regex", {**CFG, "layers_to_transform": 0, "layers_pattern": "("}, PetConfigError,
      "layers_pattern", "'('"),
    M("layers-leave-nothing", {**CFG, "target_modules": "head", "layers_to_transform": [1]}, NoMatchError,
      "'head'", "none of them is in layers_to_transform [1]"),
    M("exclude-modules-matches-nothing", {**CFG, "exclude_modules": ["dense9"]}, NoMatchError,
      "exclude_modules 'dense9' matches no cell"),
    M("exclude-modules-excludes-all", {**CFG, "exclude_modules": ".*"}, PetConfigError, "exclude_modules '.*'",
      "excludes all"),
    M("exclude-modules-int", {**CFG, "exclude_modules": 3}, PetConfigTypeError, "exclude_modules", "3"),
    M("exclude-modules-empty-entry", {**CFG, "exclude_modules": ["dense1", ""]}, PetConfigTypeError,
      "exclude_modules", "''"),
    M("all-linear-in-a-list", {**CFG, "target_modules": ["all-linear"]}, NoMatchError, "'all-linear' matches no cell"),
    M("all-linear-for-bitfit", {"pet_type": "bitfit", "target_modules": "all-linear"}, PetConfigError,
      "'all-linear' is not supported"),
    M("all-linear-ia3-activation", {"pet_type": "ia3", "target_modules": "all-linear"}, UnsupportedCellError,
      "blocks.0.mlp.mapping", "feedforward_modules"),
    # ---- config files ----
    F("list.yaml", b"- 1\n- 2\n", PetConfigError, "top level must be a mapping", "got list"),
    F("empty.yaml", b"", PetConfigError, "top level must be a mapping", "NoneType"),
    F("scalar.yaml", b"lora\n", PetConfigError, "top level must be a mapping", "got str"),
    F("list.json", b"[1]", PetConfigError, "top level must be a mapping", "got list"),
    F("none.yaml", b"model:\n  model_config:\n    num_layers: 2\n", PetConfigError, "no PET configuration"),
    F("latin1.yaml", "pet_type: lora  # caf\xe9\n".encode("latin-1"), PetConfigError, "not UTF-8"),
    F("binary.yaml", b"\xff\xfe\x00\x01\x80", PetConfigError, "not UTF-8"),
    F("broken.yaml", b"pet_config: {pet_type: lora, lora_rank: [\n", PetConfigError, "cannot parse"),
    F("broken.json", b"{\"pet_type\": ", PetConfigError, "cannot parse"),
    F("tag.yaml", b"pet_config: !!python/object/apply:os.system ['echo hacked']\n", PetConfigError,
      "cannot parse", "python/object/apply"),
    F("name-tag.yaml", b"pet_type: !!python/name:os.system ''\n", PetConfigError, "cannot parse", "python/name"),
    F("mf-bad-type.yaml", b"model:\n  model_config:\n    pet_config:\n      pet_type: qlora\n", PetConfigError,
      "pet_type", "qlora", names_file=False),
    F("unknown-key.yaml", b"pet_type: lora\ntarget_modules: '.*dense1'\nrank: 4\n", PetConfigError, "'rank'",
      names_file=False),
    F("bad-value.json", json.dumps({**CFG, "lora_dropout": 2}).encode(), PetConfigError, "lora_dropout", "got 2",
      names_file=False),
    Row("missing.yaml", "file", None, FileNotFoundError, ["missing.yaml", "not found"], name="missing.yaml"),
    Row("a-directory", "file", "dir", PetConfigError, ["is a directory", "confdir"], name="confdir"),
    # ---- adapter directories and checkpoint files ----
    A("missing-directory", lambda d: {"path": d / "nowhere"}, AdapterNotFoundError, "nowhere"),
    A("missing-weights", lambda d: os.remove(_weights(d)), AdapterNotFoundError, "adapter_model.safetensors"),
    A("missing-config", lambda d: os.remove(_config(d)), AdapterNotFoundError, "adapter_config.json"),
    A("weights-is-a-directory", lambda d: (os.remove(_weights(d)), os.mkdir(_weights(d))), AdapterNotFoundError,
      "adapter_model.safetensors"),
    A("empty-weights", lambda d: _weights(d).write_bytes(b""), AdapterFileError, "adapter_model.safetensors",
      "not a readable safetensors"),
    A("truncated-weights", lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:100]), AdapterFileError,
      "adapter_model.safetensors", "not a readable safetensors"),
    A("garbage-weights", lambda d: _weights(d).write_bytes(b"\x00" * 64), AdapterFileError, "adapter_model.safetensors",
      "not a readable safetensors"),
    A("corrupt-header", lambda d: _weights(d).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
      AdapterFileError, "adapter_model.safetensors", "not a readable safetensors"),
    A("pickle-as-weights", lambda d: _weights(d).write_bytes(pickle.dumps(_Bomb())), AdapterFileError,
      "adapter_model.safetensors", "not a readable safetensors"),
    A("wrong-shape", lambda d: _set(d, NAME, np.zeros((4, 32), np.float32)), AdapterFileError, NAME, "(4, 32)",
      "(4, 16)"),
    A("wrong-dtype-float16", lambda d: _set(d, NAME, np.zeros((4, 16), np.float16)), AdapterFileError, NAME, "float16"),
    A("wrong-dtype-int32", lambda d: _set(d, NAME, np.zeros((4, 16), np.int32)), AdapterFileError, NAME, "int32"),
    A("missing-tensor", lambda d: _rewrite(_weights(d), lambda t: t.pop(NAME)), AdapterFileError, NAME, "no tensor"),
    A("extra-tensor", lambda d: _set(d, "head.lora_A", np.zeros((4, 16), np.float32)), AdapterFileError,
      "head.lora_A", "match no adapter parameter"),
    A("corrupt-config", lambda d: _config(d).write_text("{not json"), AdapterFileError, "adapter_config.json",
      "not a readable JSON"),
    A("config-not-utf8", lambda d: _config(d).write_bytes(b"{\"pet_config\": \"\xff\"}"), AdapterFileError,
      "adapter_config.json", "not a readable JSON", "utf-8"),
    A("config-not-a-mapping", lambda d: _config(d).write_text("[]"), PetConfigError, "adapter_config.json",
      "top level must be a mapping"),
    A("config-without-pet-config", lambda d: _write_config(d, {"format": "pet_hooks"}), PetConfigError,
      "adapter_config.json", "no PET configuration"),
    A("config-bad-value", lambda d: _write_config(d, {"pet_config": {**CFG, "lora_rank": 0}}), PetConfigError,
      "adapter_config.json", "lora_rank", "got 0"),
    A("config-bad-init-lora-weights", lambda d: _write_config(d, {"pet_config": {**CFG, "init_lora_weights": "eva"}}),
      PetConfigError, "adapter_config.json", "init_lora_weights", "eva"),
    A("config-bad-rank-pattern", lambda d: _write_config(d, {"pet_config": {**CFG, "rank_pattern": {"dense1": -1}}}),
      PetConfigError, "adapter_config.json", "rank_pattern", "'dense1'", "-1"),     # rank_pattern (issue 29)
    A("config-unknown-key", lambda d: _write_config(d, {"pet_config": {**CFG, "rank": 8}}), PetConfigError,
      "adapter_config.json", "'rank'"),
    A("config-for-a-bigger-rank", lambda d: _write_config(d, {"pet_config": {**CFG, "lora_rank": 8}}), AdapterFileError,
      NAME, "(4, 16)", "(8, 16)"),
    A("config-for-another-method", lambda d: _write_config(d, {"pet_config": {"pet_type": "ptuning2",
                                                                              "pre_seq_len": 4}}),
      AdapterFileError, "pet_prefix_encoder", "no tensor"),
    # ---- PEFT OFT (issue 30 item 5) ----
    A("peft-oft-bias-all", lambda d: _oft_peft_dir(d, (4, 6), bias="all"), AdapterFileError, "bias='all'", "OFT"),
    A("peft-oft-wrong-shape", lambda d: _oft_peft_dir(d, (4, 5)), AdapterFileError, "oft_R", "(4, 5)", "(4, 6)"),
    A("peft-oft-both-sizes", lambda d: _oft_peft_dir(d, (4, 6), r=4), AdapterFileError, "exactly one", "r=4"),
    A("config-for-another-model", lambda d: _write_config(d, {"pet_config": {**CFG, "target_modules": ".*wq"}}),
      NoMatchError, "'.*wq' matches no cell"),
    A("net-has-another-pet", lambda d: {"pre_apply": {**CFG, "lora_rank": 2}}, PetStateError, "different PET config",
      "'lora_rank': 4", "'lora_rank': 2"),
    A("cfg-differs-from-saved", lambda d: {"cfg": {**CFG, "lora_rank": 2}}, PetStateError, "cfg differs",
      "adapter_config.json"),
    A("text-file-as-checkpoint", lambda d: _file_arg(d, "notes.txt", b"hello"), AdapterFileError, "notes.txt",
      ".ckpt or .safetensors"),
    A("corrupt-ckpt", lambda d: {**_file_arg(d, "lora.ckpt", b"\x00garbage" * 8), "cfg": CFG}, AdapterFileError,
      "lora.ckpt", "not a readable checkpoint"),
    A("pickle-as-ckpt", lambda d: {**_file_arg(d, "lora.ckpt", pickle.dumps(_Bomb())), "cfg": CFG}, AdapterFileError,
      "lora.ckpt", "not a readable checkpoint"),
    A("ckpt-without-lora", _ckpt_without_lora, AdapterFileError, "base.ckpt", "no MindFormers LoRA tensors"),
    # ---- PEFT LoHa / LoKr (issue 30 item 3) ----
    A("peft-loha-rank-pattern", lambda d: _lycoris_peft_dir(d, "LOHA", _HADA, rank_pattern={"dense1": 4}),
      AdapterFileError, "rank_pattern", "LOHA"),
    A("peft-loha-without-a-factor", lambda d: _lycoris_peft_dir(d, "LOHA", {k: v for k, v in _HADA.items()
                                                                            if k != "hada_w2_b"}),
      AdapterFileError, "module 'blocks.0.attention.dense1' has no hada_w2_b"),
    A("peft-lokr-factor-pet_hooks-would-not-make", lambda d: _lycoris_peft_dir(
        d, "LOKR", {"lokr_w1": (4, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}),
      AdapterFileError, "has no tensor", "dense1.lokr_w2'"),
    A("peft-loha-wrong-shape", lambda d: _lycoris_peft_dir(d, "LOHA", {**_HADA, "hada_w1_a": (15, 2)}),
      AdapterFileError, "hada_w1_a", "(15, 2)", "(16, 2)"),
    # ---- PEFT VeRA (issue 30 item 4) ----
    # (save_projection=False without torch: tests/tuners/test_vera.py, torch hidden)
    A("peft-vera-without-projection", lambda d: _vera_peft_dir(d, {k: v for k, v in _VERA.items()
                                                                   if k != "base_model.vera_B"}),
      AdapterFileError, "has no 'base_model.vera_B'", "save_projection=true"),
    A("peft-vera-projection-wrong-shape", lambda d: _vera_peft_dir(d, {**_VERA, "base_model.vera_A": (2, 15)}),
      AdapterFileError, "vera_A", "(2, 15)", "(2, 16)"),
    # ---- PEFT AdaLoRA (issue 30 item 1) ----
    A("peft-adalora-rank-pattern-misfit", lambda d: _adalora_peft_dir(d, 3, [True, False, True, False]),
      AdapterFileError, "blocks.0.attention.dense1", "holds 3 rank(s)", "keeps 2 of 4"),
    A("peft-adalora-fan-in-fan-out", lambda d: _adalora_peft_dir(d, 4, None, fan_in_fan_out=True),
      AdapterFileError, "fan_in_fan_out=true"),
    # ---- PEFT prompt tuning (issue 30 item 2) ----
    A("peft-prompt-extra-key", lambda d: _prompt_peft_dir(d, {"prompt_embeddings": (3, 16), EMB + "weight": (3, 16)}),
      AdapterFileError, "expected exactly ['prompt_embeddings']", "base_model.model.embedding.weight"),
    A("peft-prompt-other-hidden", lambda d: _prompt_peft_dir(d, {"prompt_embeddings": (3, 15)}),
      AdapterFileError, "prompt_embeddings", "(3, 15)", "(3, 16)"),
    A("peft-prompt-encoder-decoder", lambda d: _prompt_peft_dir(d, {"prompt_embeddings": (6, 16)},
                                                                num_transformer_submodules=2),
      AdapterFileError, "num_transformer_submodules=2", "causal"),
    # ---- PEFT LoRA of an embedding (lora_embedding_A / _B, PEFT's copy of the table) ----
    A("peft-embedding-without-b", lambda d: _peft_dir(d, {EMB + "lora_embedding_A": (4, 256)}), AdapterFileError,
      "module 'embedding' has no lora_embedding_B"),
    A("peft-embedding-and-linear-tensors", lambda d: _peft_dir(d, {EMB + "lora_embedding_A": (4, 256),
                                                                   EMB + "lora_embedding_B": (16, 4),
                                                                   EMB + "lora_A.weight": (4, 256)}),
      AdapterFileError, "module 'embedding' has both", "lora_A"),
    A("peft-embedding-wrong-shape", lambda d: _peft_dir(d, {EMB + "lora_embedding_A": (4, 255),
                                                            EMB + "lora_embedding_B": (16, 4)}),
      AdapterFileError, "embedding.lora_embedding_A", "(4, 255)", "(4, 256)"),
    A("peft-table-copy-of-another-vocabulary", lambda d: _peft_dir(d, {EMB + "lora_embedding_A": (4, 256),
                                                                       EMB + "lora_embedding_B": (16, 4),
                                                                       EMB + "base_layer.weight": (300, 16)}),
      AdapterFileError, "base_model.model.embedding.base_layer.weight", "(300, 16)", "another vocabulary"),
    A("peft-table-copy-without-lora", lambda d: _peft_dir(d, {EMB + "lora_embedding_A": (4, 256),
                                                              EMB + "lora_embedding_B": (16, 4),
                                                              "base_model.model.head.base_layer.weight": (256, 16)}),
      AdapterFileError, "base_model.model.head.base_layer.weight", "without LoRA tensors"),
    # lora_bias / bias (issue 29 item 6): base biases in a PEFT file
    A("peft-base-bias-with-bias-none", lambda d: _peft_bias_dir(
        d, "none", {"base_model.model.blocks.0.attention.dense1.base_layer.bias": (16,)}), AdapterFileError,
      "holds base biases", "blocks.0.attention.dense1", "bias='none'"),
    A("peft-lora-bias-into-lora-without", lambda d: _peft_bias_dir(
        d, "none", {"base_model.model.blocks.0.attention.dense1.lora_B.bias": (16,)}, lora_bias=True) or {
        "pre_apply": {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*dense1"}},
      PetStateError, "lora_bias=True differs", "(False)"),
    A("peft-bias-of-no-cell", lambda d: _peft_bias_dir(d, "all", {"base_model.model.nosuch.bias": (16,)}),
      AdapterFileError, "base_model.model.nosuch.bias", "names no cell with a bias"),
    # ---- several adapters: names, switching, deleting, loading into one, rows ----
    N("add-taken-name", lambda net, d: pet_hooks.add_adapter(net, "b", CFG), PetConfigError, "'b'", "taken"),
    N("add-reserved-name", lambda net, d: pet_hooks.add_adapter(net, "all", CFG), PetConfigError, "'all'",
      "adapter_name"),
    N("add-name-with-slash", lambda net, d: pet_hooks.add_adapter(net, "a/b", CFG), PetConfigError, "'a/b'"),
    N("add-not-lora", lambda net, d: pet_hooks.add_adapter(net, "p", {"pet_type": "ptuning2", "pre_seq_len": 2}),
      PetConfigError, "LoRA config", "ptuning2"),
    N("add-pattern-matching-nothing", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "target_modules": ".*wq"}),
      NoMatchError, "'.*wq' matches no cell"),
    N("add-freezing-base", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "freeze_exclude": ["*ln1*"]}),
      PetConfigError, "freeze_exclude", "['*ln1*']"),
    N("add-modules-to-save", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "modules_to_save": ["head"]}),
      PetConfigError, "modules_to_save", "['head']"),                 # modules_to_save (branch i29_aux)
    N("add-trainable-tokens", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "trainable_token_indices": [1]}),
      PetConfigError, "trainable_token_indices"),                   # trainable_token_indices (branch i29_aux)
    N("add-dora", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "use_dora": True}), PetConfigError,
      "use_dora"),
    # lora_bias / bias (issue 29 item 6): one adapter per net
    N("add-lora-bias", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "lora_bias": True}), PetConfigError,
      "lora_bias=True", "one adapter per net"),
    N("add-bias-all", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "bias": "all"}), PetConfigError,
      "bias", "'all'"),
    N("add-pissa", lambda net, d: pet_hooks.add_adapter(net, "c", {**CFG, "init_lora_weights": "pissa"}),
      PetConfigError,
      "init_lora_weights", "'pissa'"),
    N("set-unknown-name", lambda net, d: pet_hooks.set_adapter(net, "c"), PetConfigError, "'c'", "not an adapter"),
    N("set-name-twice", lambda net, d: pet_hooks.set_adapter(net, ["b", "b"]), PetConfigError, "['b']",
      "more than once"),
    N("set-empty-list", lambda net, d: pet_hooks.set_adapter(net, []), PetConfigError, "non-empty list", "got []"),
    N("set-incompatible", lambda net, d: pet_hooks.set_adapter(net, ["default", "d"]), PetConfigError, "'d'",
      "lora_dropout", "(0.0 vs 0.1)", setup=lambda net: pet_hooks.add_adapter(net, "d", {**CFG, "lora_dropout": 0.1})),
    N("delete-active", lambda net, d: pet_hooks.delete_adapter(net, "default"), PetStateError,
      "'default'", "active"),
    N("delete-unknown", lambda net, d: pet_hooks.delete_adapter(net, "zz"), PetConfigError, "'zz'"),
    N("load-onto-existing-name", lambda net, d: pet_hooks.load_adapter(net, d, adapter_name="b"),
      PetStateError, "'b'", "hotswap=True"),
    N("hotswap-unknown-name", lambda net, d: pet_hooks.load_adapter(net, d, adapter_name="zz", hotswap=True),
      PetStateError, "'zz'"),
    N("hotswap-misfit", lambda net, d: pet_hooks.load_adapter(net, d, adapter_name="b", hotswap=True),
      PetStateError, "does not fit adapter 'b'", "'lora_rank': 4", "'lora_rank': 2"),
    N("hotswap-without-name", lambda net, d: pet_hooks.load_adapter(net, d, hotswap=True), PetConfigError,
      "adapter_name"),
    N("save-unknown-name", lambda net, d: pet_hooks.save_adapter(net, d / "out", adapter_name="zz"), PetConfigError,
      "'zz'"),
    N("save-several-active", lambda net, d: pet_hooks.save_adapter(net, d / "out"), PetStateError,
      "adapter_name", "['default', 'b']", setup=lambda net: pet_hooks.set_adapter(net, ["default", "b"])),
    N("weighted-weights-mismatch", lambda net, d: pet_hooks.add_weighted_adapter(net, ["default", "b"], [1.0], "w",
                                                                                "cat"), PetConfigError,
      "got 1 weights for 2 adapters"),
    N("weighted-unknown-adapter", lambda net, d: pet_hooks.add_weighted_adapter(net, ["default", "zz"], [1, 1], "w"),
      PetConfigError, "'zz'"),
    N("weighted-linear-different-ranks", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "b"], [1, 1], "w", "linear"), PetConfigError, "same r", "'b': r=2"),
    N("weighted-linear-different-targets", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "t"], [1, 1], "w", "linear"), PetConfigError, "'linear'", "different cells",
      setup=lambda net: pet_hooks.add_adapter(net, "t", {**CFG, "target_modules": ".*dense1"})),
    N("weighted-unknown-type", lambda net, d: pet_hooks.add_weighted_adapter(net, ["default", "b"], [1, 1], "w",
                                                                             "average"), PetConfigError, "'average'"),
    # add_weighted_adapter DARE (issue 29 item 7): seed required, density in (0, 1]
    N("weighted-dare-without-seed", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "b"], [1, 1], "w", "dare_linear_svd", density=0.5), PetConfigError, "'dare_linear_svd'",
      "pass seed"),
    N("weighted-dare-density-zero", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "b"], [1, 1], "w", "dare_ties_svd", density=0.0, seed=1), PetConfigError, "density",
      "(0, 1]", "got 0.0"),
    N("weighted-dare-density-above-one", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "b"], [1, 1], "w", "dare_linear_svd", density=1.5, seed=1), PetConfigError, "density",
      "got 1.5"),
    N("weighted-dare-bad-seed", lambda net, d: pet_hooks.add_weighted_adapter(
        net, ["default", "b"], [1, 1], "w", "dare_linear_svd", density=0.5, seed=-2), PetConfigError, "seed",
      "got -2"),
    N("rows-unknown-name", lambda net, d: _rows_of(net, ["default", "zz"]), PetConfigError, "'zz'"),
    N("rows-not-a-list", lambda net, d: _rows_of(net, "default"), PetConfigError, "list of adapter names",
      "got 'default'"),
    N("checkpoint-of-another-config", lambda net, d: pet_hooks.load_checkpoint(
        net, None, _checkpoint_of(d, {**CFG, "lora_alpha": 3})), PetStateError, "step-4", "another PET config",
      "lora_alpha: 3"),
    N("checkpoint-of-another-model", lambda net, d: pet_hooks.load_checkpoint(
        net, None, _checkpoint_of(d, CFG, hidden_size=32)), PetStateError, "step-4", "another model or method",
      "has shape"),
    N("checkpoint-of-another-adapter", lambda net, d: pet_hooks.load_checkpoint(net, None, _checkpoint_of(
        d, CFG, adapter_name="x")), PetStateError, "step-4", "trains adapter 'x'", "['b', 'default']"),
    N("checkpoint-keep-0", lambda net, d: pet_hooks.save_checkpoint(net, None, 1, str(d), keep=0), ValueError,
      "keep must be a positive integer", "got 0"),
    N("checkpoint-step-negative", lambda net, d: pet_hooks.save_checkpoint(net, None, -1, str(d)), ValueError,
      "step must be a non-negative integer", "-1"),
    # ---- the command line ----
    C("no-command", [], "required: command"),
    C("unknown-command", ["train"], "invalid choice: 'train'"),
    C("run-config-without-value", ["run", "--config"], "--config", "expected one argument"),
    C("misspelt-flag", ["run", "--conifg", CONFIG, "x.py"], "unrecognized arguments: --conifg"),
    C("config-without-value", ["run", "--config"], "--config", "expected one argument"),
    C("save-dir-without-value", ["run", "--config", CONFIG, "--save-dir"], "--save-dir", "expected one argument"),
    C("missing-config-file", ["run", "--config", "{tmp}/missing.yaml", "x.py"], "missing.yaml"),
    C("bad-config-file", ["run", "--config", "{tmp}/bad.yaml", "x.py"], "lora_rank", "0"),
    C("missing-script", ["run", "--config", CONFIG], "needs a SCRIPT"),
    C("nothing-after-dashes", ["run", "--config", CONFIG, "--"], "after '--'"),
    C("script-not-found", ["run", "--config", CONFIG, "{tmp}/no_such_script.py"], "script not found",
      "no_such_script.py"),
    C("command-not-found", ["run", "--config", CONFIG, "--", "no-such-command-xyz"], "script not found",
      "no-such-command-xyz"),
    C("check-config-missing", ["check-config"], "required: config"),
    C("check-config-tag", ["check-config", "{tmp}/tag.yaml"], "tag.yaml", "python/object"),
    C("check-config-directory", ["check-config", "{tmp}"], "is a directory"),
    C("version-extra", ["version", "extra"], "unrecognized arguments: extra"),
    C("save-steps-without-save-dir", ["run", "--config", CONFIG, "--save-steps", "5", "x.py"],
      "save_steps needs save_dir"),
    C("resume-without-save-dir", ["run", "--config", CONFIG, "--resume", "x.py"], "resume needs save_dir"),
    C("keep-0", ["run", "--config", CONFIG, "--save-dir", "{tmp}/out", "--save-steps", "5", "--keep", "0", "x.py"],
      "keep must be a positive integer", "got 0"),
    C("save-steps-0", ["run", "--config", CONFIG, "--save-dir", "{tmp}/out", "--save-steps", "0", "x.py"],
      "save_steps must be a positive integer", "got 0"),
    C("save-steps-not-a-number", ["run", "--config", CONFIG, "--save-steps", "ten", "x.py"], "--save-steps",
      "invalid int value: 'ten'"),
    C("adapter-name-reserved", ["run", "--config", CONFIG, "--adapter-name", "all", "x.py"], "adapter_name 'all'"),
    # ---- MindFormers' own flow under a door (hooks.mindformers) ----
    MF("yaml-unknown-pet-type", lambda t: (None, lambda: _build_in_door(_run_yaml(t, pet_type="slora"))),
       PetConfigError, "model.model_config.pet_config", "unknown pet_type 'slora'", "ia3"),
    MF("yaml-bad-value", lambda t: (None, lambda: _build_in_door(_run_yaml(t, lora_rank=0))),
       PetConfigError, "model.model_config.pet_config", "lora_rank", "got 0"),
    MF("configs-conflict", lambda t: (None, lambda: _build_in_door(_run_yaml(t), {**SEED, "target_modules": ".*wq"})),
       PetConfigError, "differs from the pet_config of the run YAML", "target_modules: '.*wq' vs '.*wq|.*wk|.*wv|.*wo'",
       "lora_dropout: 0.1 vs 0.0"),
    MF("configs-conflict-type", lambda t: (None, lambda: _build_in_door(_run_yaml(t), {"pet_type": "ptuning2"})),
       PetConfigError, "differs from the pet_config", "pet_type: 'ptuning2' vs 'lora'"),
    MF("pet-method-vs-model-pet-config",
       lambda t: ((net := _llama_with_pet_config({"pet_type": "ptuning2"})), lambda: _trainer_in_door(net, t, "lora")),
       PetConfigError, "pet_method 'lora' conflicts with", "LlamaForCausalLM.config.pet_config", "'ptuning2'"),
    MF("pet-method-vs-given-config",
       lambda t: ((net := _llama_with_pet_config(None)), lambda: _trainer_in_door(net, t, "lora", {"pet_type": "ia3",
                                                                                            "target_modules": ".*wq"})),
       PetConfigError, "pet_method 'lora' conflicts with", "the PET config given to pet_hooks", "'ia3'"),
    MF("pet-method-unknown",
       lambda t: ((net := _llama_with_pet_config(None)), lambda: _trainer_in_door(net, t, "boft")),
       PetConfigError, "unknown pet_type 'boft'", "lora"),
    MF("pet-method-no-defaults",
       lambda t: ((net := _llama_with_pet_config(None)), lambda: _trainer_in_door(net, t, "adapter")),
       PetConfigError, "pet_method 'adapter' on LlamaForCausalLM", "target_modules"),
    MF("mindformers-pet-already",
       lambda t: ((net := _mindformers_pet_model()), lambda: _trainer_in_door(net, t, "lora")),
       PetConfigError, "already carries MindFormers' own PET", "LoRADense", "pet_hooks.enable()"),
]


def test_the_table_is_big_and_covers_every_door():
    kinds = [row.kind for row in ROWS]
    assert len(ROWS) >= 40 and len({row.id for row in ROWS}) == len(ROWS)
    assert all(kinds.count(kind) >= 10 for kind in ("mapping", "file", "adapter", "cli", "adapters"))


# ----------------------------------------------------------------------------- what must not change
PATCHED = [(nn.Cell, "__init__"), (nn.Cell, "__new__"), (nn.Optimizer, "__init__"), (nn.Optimizer, "__new__")]


def world(net) -> dict:
    """Everything a bad input must leave alone."""
    return {
        "classes": [(name, type(cell)) for name, cell in net.cells_and_names()],
        "params": [(p.name, p.requires_grad, p.shape, p.dtype) for p in net.get_parameters()],
        "values": {p.name: p.asnumpy().copy() for p in net.get_parameters()},
        "pet": pet_hooks.surgery.has_pet(net),
        "adapters": ((pet_hooks.list_adapters(net), pet_hooks.active_adapters(net))
                     if pet_hooks.surgery.has_pet(net) else None),
        "patches": [id(owner.__dict__.get(name)) for owner, name in PATCHED],
        "session": context.active_session(),
        "env": dict(os.environ),
    }


def assert_same_world(before: dict, net) -> None:
    after = world(net)
    values_before, values_after = before.pop("values"), after.pop("values")
    assert after == before
    assert values_after.keys() == values_before.keys()
    for name, value in values_before.items():
        np.testing.assert_array_equal(values_after[name], value, err_msg=name)


def assert_clear_error(err: BaseException, row: Row) -> None:
    assert type(err) is row.exc, (type(err), row.exc, err)   # the exact class, not only a base of it
    message = str(err)
    for word in row.words:
        assert word in message, (word, message)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    assert MS_DIR not in text, text                    # no frame from inside MindSpore, chained or not
    frames = traceback.extract_tb(err.__traceback__)
    assert frames[-1].filename.startswith(PET_DIR), frames[-1]   # raised by pet_hooks itself


# ----------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A LoRA adapter with non-zero deltas for the sample GPT (made once, copied per row)."""
    directory = tmp_path_factory.mktemp("adapter")
    net = pet_hooks.apply(build(seed=0, **SMALL), CFG)
    rng = np.random.default_rng(0)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    pet_hooks.save_adapter(net, directory)
    return directory


def prepare(row: Row, net, tmp_path, saved_adapter) -> Callable[[], Any]:
    """Set the row up (write the file, damage a copy of the adapter) and return the call that must fail."""
    if row.kind == "mapping":
        return lambda: pet_hooks.apply(net, row.given)
    if row.kind == "file":
        path = tmp_path / row.name
        if row.given == "dir":
            path.mkdir()
        elif row.given is not None:
            path.write_bytes(row.given)
        return lambda: pet_hooks.apply(net, str(path))
    directory = tmp_path / "adapter"
    shutil.copytree(saved_adapter, directory)
    if row.kind == "adapters":
        pet_hooks.apply(net, CFG)
        pet_hooks.add_adapter(net, "b", {**CFG, "lora_rank": 2})
        setup, call = row.given
        if setup is not None:
            setup(net)
        return lambda: call(net, directory)
    args = row.given(directory)
    args = args if isinstance(args, dict) else {}         # (most damage returns nothing useful)
    if "pre_apply" in args:                              # the net already has (other) PET
        pet_hooks.apply(net, args["pre_apply"])
    return lambda: pet_hooks.load_adapter(net, args.get("path", directory), cfg=args.get("cfg"))


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind not in ("cli", "mindformers")],
                         ids=lambda r: f"{r.kind}-{r.id}")
def test_bad_input_raises_one_clear_error_and_touches_nothing(row, tmp_path, saved_adapter):
    if os.path.exists(_BOMB_MARK):
        os.remove(_BOMB_MARK)
    net = build(seed=1, **SMALL)
    call = prepare(row, net, tmp_path, saved_adapter)
    before = world(net)
    with pytest.raises(BaseException) as info:
        call()
    assert_clear_error(info.value, row)
    assert_same_world(before, net)
    assert not os.path.exists(_BOMB_MARK)                # nothing was unpickled


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind == "mindformers"], ids=lambda r: f"mindformers-{r.id}")
def test_bad_input_to_mindformers_flow_is_one_clear_error_and_leaves_mindformers_itself(row, tmp_path):
    pytest.importorskip("mindformers")
    import mindformers.pet
    from tests.trainer_yaml import mindformers_context
    mindformers_context(ms.get_context("mode"))      # built once per process: its environment is not the row's
    original = mindformers.pet.__dict__["get_pet_model"]
    net, call = row.given(tmp_path)
    watched = net if net is not None else build(seed=1, **SMALL)     # the global world, when MindFormers builds it
    before = world(watched)
    with pytest.raises(BaseException) as info:
        call()
    assert_clear_error(info.value, row)
    assert_same_world(before, watched)
    assert mindformers.pet.__dict__["get_pet_model"] is original      # MindFormers itself again


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind == "cli"], ids=lambda r: f"cli-{r.id}")
def test_bad_command_line_is_one_error_line_and_exit_2(row, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("pet_type: lora\nlora_rank: 0\ntarget_modules: '.*'\n")
    (tmp_path / "tag.yaml").write_bytes(b"pet_config: !!python/object/apply:os.system ['echo hacked']\n")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in row.given]
    net = build(seed=1, **SMALL)
    before = world(net)
    try:
        code = cli.main(argv)
    except SystemExit as stop:                           # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in row.words:
        assert word in errors[0], (word, err)
    assert "Traceback" not in err
    assert_same_world(before, net)


# ----------------------------------------------------------------------------- random mappings
KEYS = ["pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "exclude_layers", "lora_a_init",
        "lora_b_init", "use_rslora", "param_init_type", "compute_dtype", "freeze_include", "freeze_exclude", "seed",
        "reuse_block_graphs", "chunked_loss", "fused_optimizer", "loraplus_lr_ratio", "pre_seq_len", "prefix_projection", "projection_dim",
        "dropout_rate", "dropout_prob", "prefix_token_num", "mid_dim", "feedforward_modules", "init_ia3_weights", "bottleneck_size", "non_linearity",
        "init_lora_weights", "use_dora",
        "rank_pattern", "alpha_pattern",             # rank_pattern / alpha_pattern (issue 29)
        # issue 29 items 2/3: PEFT's layer selection
        "exclude_modules", "layers_to_transform", "layers_pattern",
        "lora_bias", "bias",
        "modules_to_save", "trainable_token_indices",   # modules_to_save, trainable_token_indices (branch i29_aux)
        "reduction_factor", "low_rank_size", "low_rank_w_init",
        # LoHa / LoKr (issue 30 item 3)
        "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights", "decompose_both",
        "decompose_factor", "rank_dropout_scale",
        # OFT (issue 30 item 5; r, module_dropout and init_weights above)
        "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps", "block_share",
        # VeRA (issue 30 item 4; r and init_weights above)
        "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "fan_in_fan_out",
        # AdaLoRA (issue 30 item 1; rank_pattern, init_weights, lora_alpha, lora_dropout above)
        "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
        # prompt tuning (issue 30 item 2)
        "num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
        "tokenizer_kwargs",
        "rank", "pet_config"]
PATTERNS = [".*dense1", ".*dense1|.*dense3", ".*", ".*ln1", ".*attention", ".*core_attention", "head", "(", "",
            "*x", "blocks\\.0.*", ".*mapping", "dense2", ".*wq", ".*embedding", "embedding|.*dense2",
            "all-linear", "All-Linear"]  # issue 29 item 3: PEFT's shorthand
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(-1.5, 20),
                    st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                    st.sampled_from(PATTERNS + ["lora", "ptuning2", "prefixtuning", "float16", "zeros", "normal", "ia3",
                                                "bitfit", "gelu", "xavier_uniform", "pissa", "olora", "gaussian",
                                                "pissa_niter_2"]),
                    st.text(max_size=6))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
VALID = {"lora": {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3"},
         "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 3},
         "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 2, "mid_dim": 8},
         "ia3": IA3, "bitfit": {"pet_type": "bitfit"}, "adapter": ADAPTER, "low_rank_adapter": LOW_RANK,
         "loha": LOHA, "lokr": LOKR,                               # issue 30 item 3
         "oft": OFT,                                               # issue 30 item 5
         "vera": VERA,                                             # issue 30 item 4
         "adalora": ADALORA,                                       # issue 30 item 1
         "prompt_tuning": PROMPT}                                  # issue 30 item 2
assert set(VALID) == set(config_types()), "every registered method needs a valid block here"
# A valid block with up to two keys changed, bare or wrapped as a run YAML would hold it.
NEAR_VALID = st.builds(lambda kind, changes: {**VALID[kind], **changes}, st.sampled_from(sorted(VALID)),
                       st.one_of(st.just({}), st.dictionaries(st.sampled_from(KEYS[1:-1]), SCALARS, max_size=1),
                                 st.dictionaries(st.sampled_from(KEYS[1:-1]), VALUES, max_size=2)))
MAPPINGS = st.one_of(
    NEAR_VALID,
    NEAR_VALID.map(lambda block: {"pet_config": block}),
    NEAR_VALID.map(lambda block: {"model": {"model_config": {"num_layers": 2, "pet_config": block}}}),
    st.fixed_dictionaries({"pet_type": st.sampled_from([*config_types(), "LoRA", "qlora", 3])},
                          optional={k: VALUES for k in KEYS[1:]}),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5), st.integers()), VALUES, max_size=5),
)
_NET = {}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mapping=MAPPINGS)
def test_random_configs_either_work_or_raise_value_or_type_error_untouched(mapping):
    net = _NET.setdefault("gpt", build(seed=1, **SMALL))
    before = world(net)
    try:
        cfg = pet_hooks.load_config(mapping)
        pet_hooks.apply(net, cfg)
    except (ValueError, TypeError) as err:
        event(f"refused: {type(err).__name__}")
        assert str(err)                                   # says something
        assert MS_DIR not in "".join(traceback.format_exception(type(err), err, err.__traceback__))
        assert_same_world(before, net)
        return
    event(f"applied: {cfg.pet_type}")
    # It worked: only deltas are trainable, and remove brings back exactly the model from before.
    assert pet_hooks.surgery.has_pet(net)
    kept = {p.name for p in net.trainable_params()} - {p.name for p in pet_hooks.delta_parameters(net)}
    if not cfg.freeze_exclude and getattr(cfg, "bias", "none") == "none":   # (and LoRA's bias: all / lora_only)
        assert not kept, kept
    pet_hooks.remove(net)
    assert_same_world(before, net)
