"""PEFT's selection options: ``layers_to_transform`` / ``layers_pattern``, ``"all-linear"`` and ``exclude_modules``.

The references are PEFT 0.21.2's own rules, written out here from ``peft/tuners/tuners_utils.py``
(``check_target_module_exists``; torch cannot share this process): the layer-index regexes and the
``exclude_modules`` rule. pet_hooks must agree with them wherever PEFT finds an index, and also find
the blocks at the root of a net (the sample GPT's ``blocks``), where PEFT's rule finds none.
"""
from __future__ import annotations

import re

import pytest
from mindspore import nn

from pet_hooks.config.pet_config import IA3Config, LoraConfig
from pet_hooks.errors import NoMatchError, PetConfigError, PetConfigTypeError, UnsupportedCellError
from pet_hooks.matching.all_linear import output_heads
from pet_hooks.matching.cells import module_excluded, named_cells, select_cells
from pet_hooks.matching.layers import layer_filter, layer_index
from pet_hooks.tuners.lora.tuner import is_linear, select_targets
from samples.tiny_gpt import build
from tests.conftest import NEEDS_MINDFORMERS, SMALL


# ----------------------------------------------------------------------------- PEFT's rules, copied
def peft_layer_index(key, layers_pattern=None):
    """PEFT 0.21.2 check_target_module_exists: the layer index of ``key`` (None when it finds none)."""
    if layers_pattern is None or len(layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        layers_pattern = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if not match else int(match.groupdict()["idx"])


def peft_excluded(exclude_modules, key):
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, key) is not None
    return key in exclude_modules or any(key.endswith(f".{k}") for k in exclude_modules)


HF_PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "model.embed_tokens", "lm_head",
            "model.layers.3", "transformer.h.5.attn.c_attn", "model.decoder.layers.2.self_attention.linear_qkv",
            "model.layers.1.mlp.experts.0.w1", "encoder.block.4.layer.1.DenseReluDense.wi",
            "model.stages.2.layers.7.proj", "model.norm"]


@pytest.mark.parametrize("pattern", [None, "layers", ["h", "layers"], "decoder.layers", "block", "layer"])
def test_the_layer_index_is_peft_s_wherever_peft_finds_one(pattern):
    patterns = None if pattern is None else ([pattern] if isinstance(pattern, str) else pattern)
    for path in HF_PATHS:
        assert layer_index(path, patterns) == peft_layer_index(path, pattern), (path, pattern)


def test_blocks_at_the_root_are_found_where_peft_finds_none():
    # PEFT needs a segment before the container (HF models start with "model."); a pet_hooks net need not
    assert peft_layer_index("blocks.1.attention.dense1") is None
    assert layer_index("blocks.1.attention.dense1") == 1
    assert layer_index("blocks.1.attention.dense1", ["blocks"]) == 1 == peft_layer_index("blocks.1.x.y", "blocks")
    assert layer_index("blocks.1") is None and layer_index("head") is None     # the block itself, the head


@pytest.mark.parametrize("excludes", [["dense1", "blocks.1.mlp.mapping"], ".*dense[12]", "blocks\\.0\\..*",
                                      ["attention.dense3"], ["ense1"]])
def test_exclude_modules_is_peft_s_rule(excludes):
    paths = [path for path, _ in named_cells(build(seed=0, **SMALL))]
    assert [p for p in paths if module_excluded(p, excludes)] == [p for p in paths if peft_excluded(excludes, p)]


# ----------------------------------------------------------------------------- on the sample GPT
GPT = build(seed=0, num_layers=3, hidden_size=16, num_heads=2, seq_length=8)
LINEAR = ["attention.dense1", "attention.dense2", "attention.dense3", "attention.projection", "mlp.mapping",
          "mlp.projection"]


def chosen(cfg, net=GPT):
    return [path for path, _ in select_targets(net, LoraConfig(**cfg))]


def test_layers_to_transform_on_the_sample_gpt():
    assert chosen({"target_modules": ["dense1", "mapping"], "layers_to_transform": [0, 2]}) == [
        "blocks.0.attention.dense1", "blocks.0.mlp.mapping", "blocks.2.attention.dense1", "blocks.2.mlp.mapping"]
    assert chosen({"target_modules": ".*dense1", "layers_to_transform": 1, "layers_pattern": "blocks"}) == [
        "blocks.1.attention.dense1"]
    # the head is in no layer: left out, as PEFT leaves it out
    assert chosen({"target_modules": ".*dense3|head", "layers_to_transform": [2]}) == ["blocks.2.attention.dense3"]


def test_all_linear_is_every_dense_but_the_head():
    assert chosen({"target_modules": "ALL-LINEAR"}) == [f"blocks.{i}.{leaf}" for i in range(3) for leaf in LINEAR]
    assert chosen({"target_modules": "all-linear", "layers_to_transform": [1], "exclude_modules": ["projection"]}) == [
        "blocks.1.attention.dense1", "blocks.1.attention.dense2", "blocks.1.attention.dense3", "blocks.1.mlp.mapping"]
    # exclude_modules (PEFT's, own path) and exclude_layers (MindFormers', ancestors too) add up
    assert chosen({"target_modules": "all-linear", "exclude_modules": ".*mlp\\..*",
                   "exclude_layers": ["blocks\\.[01]"]}) == [f"blocks.2.{leaf}" for leaf in LINEAR[:4]]
    assert output_heads(GPT, named_cells(GPT), is_linear) == {"head": "named 'head', outside the numbered layers"}


class TiedNet(nn.Cell):
    """An embedding and an output projection (not named like a head) sharing one weight, and an inner Dense."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4)
        self.inner = nn.Dense(4, 4)
        self.to_vocab = nn.Dense(4, 12, has_bias=False)
        self.to_vocab.weight = self.emb.embedding_table

    def construct(self, ids):
        return self.to_vocab(self.inner(self.emb(ids)))


class WithGetter(TiedNet):
    """A net that says which cell is its output layer, as a Hugging Face model does."""

    def get_output_embeddings(self):
        return self.inner


def test_tied_heads_and_get_output_embeddings_are_left_out():
    assert chosen({"target_modules": "all-linear"}, TiedNet()) == ["inner"]
    assert output_heads(TiedNet(), named_cells(TiedNet()), is_linear) == {"to_vocab": "its weight is tied to 'emb'"}
    net = WithGetter()
    assert set(output_heads(net, named_cells(net), is_linear)) == {"inner", "to_vocab"}
    with pytest.raises(NoMatchError, match="'all-linear' finds no linear cell .* left out: inner, to_vocab"):
        chosen({"target_modules": "all-linear"}, net)


class OwnConstruct(nn.Dense):
    def construct(self, x):
        return super().construct(x) * 2


class WithOddDense(nn.Cell):
    def __init__(self):
        super().__init__()
        self.a = nn.Dense(4, 4)
        self.b = OwnConstruct(4, 4)

    def construct(self, x):
        return self.b(self.a(x))


def test_all_linear_leaves_out_a_linear_cell_lora_cannot_adapt_and_says_so(caplog):
    assert chosen({"target_modules": "all-linear"}, WithOddDense()) == ["a"]
    assert "leaves out 1 linear cell" in caplog.text and "'b' (OwnConstruct)" in caplog.text


def test_ia3_takes_all_linear_and_exclude_modules():
    cfg = IA3Config(target_modules="all-linear", exclude_modules=["dense2", "mapping"])
    from pet_hooks.tuners.ia3 import IA3Tuner
    paths = [path for path, _ in IA3Tuner().select_targets(GPT, cfg)]
    assert paths == [f"blocks.{i}.{leaf}" for i in range(3) for leaf in LINEAR if leaf not in (
        "attention.dense2", "mlp.mapping")]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cfg,exc,words", [
    ({"target_modules": ["dense1"], "layers_to_transform": [0, 3]}, PetConfigError,
     ["layer index 3 does not exist in TinyGPT", "0, 1, 2 under 'blocks'"]),
    ({"target_modules": ["dense1"], "layers_to_transform": 0, "layers_pattern": ["blocks", "layers"]},
     PetConfigError, ["layers_pattern 'layers' matches no cell path", "0, 1, 2 under 'blocks'"]),
    ({"target_modules": "head", "layers_to_transform": [0]}, NoMatchError,
     ["selects 1 cell(s)", "none of them is in layers_to_transform [0]"]),
    ({"target_modules": ["dense1"], "exclude_modules": ["dense9"]}, NoMatchError,
     ["exclude_modules 'dense9' matches no cell"]),
    ({"target_modules": ["dense1"], "exclude_modules": "blocks.*"}, PetConfigError,
     ["exclude_modules 'blocks.*' excludes all of them"]),
])
def test_errors_name_the_field_and_the_value(cfg, exc, words):
    with pytest.raises(exc) as err:
        chosen(cfg)
    assert type(err.value) is exc and all(w in str(err.value) for w in words), str(err.value)


class Flat(nn.Cell):
    def __init__(self):
        super().__init__()
        self.a = nn.Dense(2, 2)

    def construct(self, x):
        return self.a(x)


def test_a_net_without_numbered_layers_is_told_to_name_them():
    with pytest.raises(NoMatchError, match="no cell path of Flat holds '<container>.<index>.'"):
        chosen({"target_modules": ["a"], "layers_to_transform": [0]}, Flat())
    assert layer_filter(["a"], None, None, "Flat") is None


@pytest.mark.parametrize("fields,exc,words", [
    ({"layers_to_transform": -1}, PetConfigError, ["layers_to_transform", "-1"]),
    ({"layers_to_transform": "0"}, PetConfigTypeError, ["layers_to_transform", "'0'"]),
    ({"layers_to_transform": [0, True]}, PetConfigTypeError, ["layers_to_transform", "True"]),
    ({"layers_to_transform": []}, PetConfigError, ["layers_to_transform is an empty list"]),
    ({"layers_pattern": "blocks"}, PetConfigError, ["layers_pattern ['blocks'] needs layers_to_transform"]),
    ({"layers_to_transform": 0, "layers_pattern": "("}, PetConfigError, ["layers_pattern", "'('"]),
    ({"exclude_modules": [""]}, PetConfigTypeError, ["exclude_modules", "''"]),
    ({"exclude_modules": 3}, PetConfigTypeError, ["exclude_modules", "3"]),
    ({"exclude_modules": "("}, PetConfigError, ["exclude_modules", "'('"]),
])
def test_config_values_are_checked(fields, exc, words):
    with pytest.raises(exc) as err:
        LoraConfig(target_modules=".*", **fields)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_config_normal_forms():
    cfg = LoraConfig(target_modules="All-Linear", layers_to_transform=[2, 0, 2], layers_pattern="blocks",
                     exclude_modules={"b", "a"})
    assert (cfg.target_modules, cfg.layers_to_transform, cfg.layers_pattern, cfg.exclude_modules) == (
        "all-linear", [0, 2], ["blocks"], ["a", "b"])
    assert LoraConfig(target_modules=".*", layers_to_transform=3).layers_to_transform == [3]


def test_select_cells_without_a_linear_notion_refuses_all_linear():
    with pytest.raises(PetConfigError, match="'all-linear' is not supported by this method"):
        select_cells(GPT, "all-linear", can_adapt=lambda cell: None)


# ----------------------------------------------------------------------------- MindFormers' nets
@NEEDS_MINDFORMERS
def test_mindformers_llama_layers_and_all_linear():
    from tests.nets import tiny_llama
    llama = tiny_llama()
    names = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3"]
    assert chosen({"target_modules": "all-linear"}, llama) == [f"model.layers.{i}.{n}" for i in range(2) for n in names]
    assert chosen({"target_modules": ["wq", "wv"], "layers_to_transform": 1}, llama) == [
        "model.layers.1.attention.wq", "model.layers.1.attention.wv"]
    assert chosen({"target_modules": ".*wq", "layers_to_transform": 0, "layers_pattern": "layers"}, llama) == [
        "model.layers.0.attention.wq"]
    assert set(output_heads(llama, named_cells(llama), is_linear)) == {"lm_head"}
    # PEFT's (Hugging Face's) names: an error that says what they mean here
    with pytest.raises(NoMatchError, match="'down_proj' matches no cell .* name map 'llama': here it would be the "
                                           "2 cell\\(s\\) named w2"):
        chosen({"target_modules": "all-linear", "exclude_modules": ["down_proj"]}, llama)


@NEEDS_MINDFORMERS
def test_mcore_qwen3_decoder_layers_and_all_linear(mcore_graph):
    from tests.mcore_cpu import tiny_qwen3
    qwen = tiny_qwen3()
    names = ["self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"]
    assert chosen({"target_modules": "all-linear"}, qwen) == [
        f"model.decoder.layers.{i}.{n}" for i in range(2) for n in names]
    assert chosen({"target_modules": "all-linear", "layers_to_transform": [1], "layers_pattern": "decoder.layers",
                   "exclude_modules": ["linear_proj"]}, qwen) == [f"model.decoder.layers.1.{n}" for n in names[1:]]
    assert set(output_heads(qwen, named_cells(qwen), is_linear)) == {"model.output_layer"}
    with pytest.raises(PetConfigError, match="layer index 2 does not exist .* 0, 1 under 'layers'"):
        chosen({"target_modules": ["linear_qkv"], "layers_to_transform": [2]}, qwen)
    # what the config asks of a linear cell it cannot give is an error, not a cell left out
    with pytest.raises(UnsupportedCellError, match="linear_proj.*DoRA"):
        chosen({"target_modules": "all-linear", "use_dora": True}, qwen)
