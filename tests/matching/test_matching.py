"""Target matching on the sample GPT: regex fullmatch on dotted paths, lists, excludes, and errors."""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import nn

import pet_hooks
from samples.tiny_gpt import build
from tests.conftest import snapshot
from tests.nets import TwoDense


def lora_paths(net):
    return sorted(name for name, cell in net.cells_and_names() if hasattr(cell, "lora_A"))


@pytest.fixture
def gpt():
    return build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)


def test_regex_fullmatches_the_full_path(gpt):
    pet_hooks.apply(gpt, {"pet_type": "lora", "target_modules": ".*dense1|.*dense2|.*dense3"})
    assert lora_paths(gpt) == sorted(f"blocks.{i}.attention.dense{j}" for i in range(2) for j in (1, 2, 3))


def test_regex_must_match_whole_path_not_a_prefix(gpt):
    pet_hooks.apply(gpt, {"pet_type": "lora", "target_modules": r"blocks\.0\.mlp\.mapping"})
    assert lora_paths(gpt) == ["blocks.0.mlp.mapping"]
    other = build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
    with pytest.raises(ValueError, match="'dense1' matches no cell") as info:  # a regex is not a suffix
        pet_hooks.apply(other, {"pet_type": "lora", "target_modules": "dense1"})
    assert "blocks.0.attention.dense1" in str(info.value)  # the hint lists the near names


def test_list_entries_match_name_or_suffix(gpt):
    pet_hooks.apply(gpt, {"pet_type": "lora", "target_modules": ["dense1", "blocks.1.mlp.projection", "head"]})
    assert lora_paths(gpt) == ["blocks.0.attention.dense1", "blocks.1.attention.dense1",
                               "blocks.1.mlp.projection", "head"]


def test_exclude_layers_skips_paths_and_subtrees(gpt):
    pet_hooks.apply(gpt, {"pet_type": "lora", "target_modules": ".*dense[123]|.*projection",
                          "exclude_layers": [r"blocks\.0", ".*mlp.projection"]})
    assert lora_paths(gpt) == ["blocks.1.attention.dense1", "blocks.1.attention.dense2",
                               "blocks.1.attention.dense3", "blocks.1.attention.projection"]


@pytest.mark.parametrize("cfg,words", [
    ({"target_modules": ".*query"}, ["'.*query' matches no cell", "TinyGPT", "adaptable cells end in dense1, dense2, "
                                     "dense3, embedding, head, mapping, position_embedding, projection"]),
    ({"target_modules": ["dense1", "wq"]}, ["'wq' matches no cell"]),
    ({"target_modules": ".*attention"}, ["blocks.0.attention", "type Attention", "cannot adapt"]),
    ({"target_modules": ".*ln1"}, ["blocks.0.ln1", "LayerNorm"]),
    ({"target_modules": ".*embedding", "use_dora": True}, ["'embedding'", "Embedding", "DoRA"]),   # LoRA only
    ({"target_modules": ".*dense1", "exclude_layers": ["blocks.*"]}, ["excludes all"]),
    ({"target_modules": ".*dense1", "freeze_exclude": ["no_such_param*"]}, ["freeze_exclude", "no_such_param*"]),
])
def test_bad_targets_name_the_culprit_and_leave_the_net_alone(gpt, cfg, words):
    classes = {name: type(cell) for name, cell in gpt.cells_and_names()}
    flags = {p.name: p.requires_grad for p in gpt.get_parameters()}
    values = snapshot(gpt)
    with pytest.raises(ValueError) as info:
        pet_hooks.apply(gpt, {"pet_type": "lora", **cfg})
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert {name: type(cell) for name, cell in gpt.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in gpt.get_parameters()} == flags
    assert snapshot(gpt).keys() == values.keys()
    assert not pet_hooks.surgery.has_pet(gpt)


def test_a_dense_subclass_with_its_own_construct_is_refused():
    class Scaled(nn.Dense):
        def construct(self, x):
            return super().construct(x) * 2

    net = TwoDense()
    net.dense2 = Scaled(10, 4)
    with pytest.raises(ValueError, match="'dense2' of type Scaled.*overrides Dense.construct"):
        pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ["dense1", "dense2"]})
    assert type(net.dense1) is nn.Dense and not hasattr(net.dense1, "lora_A")


def test_prefix_method_without_known_attention_is_refused_cleanly():
    net = TwoDense()
    with pytest.raises(ValueError, match="TwoDense has no attention cell the prefix adapters know"):
        pet_hooks.apply(net, {"pet_type": "ptuning2", "pre_seq_len": 4})
    with pytest.raises(ValueError, match="'dense1' of type Dense.*no prefix attention adapter"):
        pet_hooks.apply(net, {"pet_type": "prefixtuning", "target_modules": ["dense1"]})
    assert all(p.requires_grad for p in net.get_parameters())


def test_operations_on_a_net_without_pet_explain_themselves():
    net = TwoDense()
    for op in (pet_hooks.remove, pet_hooks.merge, pet_hooks.unmerge, pet_hooks.delta_parameters):
        with pytest.raises(ValueError, match="no PET applied"):
            op(net)
    with pytest.raises(ValueError, match="no PET applied"):
        with pet_hooks.disable_adapters(net):
            pass
    with pytest.raises(TypeError, match="mindspore.nn.Cell"):
        pet_hooks.apply(np.zeros(3), {"pet_type": "lora", "target_modules": ".*"})


def test_a_failed_injection_undoes_the_cells_already_done():
    net = TwoDense()
    net.dense2.lora_scaling = "the user's own attribute"
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    with pytest.raises(ValueError, match=r"'dense2' \(Dense\) already has attribute\(s\) \['lora_scaling'\]"):
        pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ["dense1", "dense2"]})
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert not hasattr(net.dense1, "lora_A") and net.dense2.lora_scaling == "the user's own attribute"
    assert [p.name for p in net.get_parameters()] == ["dense1.weight", "dense1.bias", "dense2.weight", "dense2.bias"]
