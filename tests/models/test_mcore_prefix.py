"""P-Tuning v2 and Prefix-Tuning on the mcore Qwen3's attention (grouped-query: 4 query heads, 2 kv heads).

pet_hooks adapts the core attention (``self_attention.core_attention``, MindFormers' ``FlashAttention``;
here its CPU stand-in from ``tests/mcore_cpu.py``, registered with ``pet_hooks.register_attention``
under pet_hooks' own adapter for FlashAttention).

The reference is MindFormers' own prefix path: the same patched model called with
``prefix_keys_values`` built from the encoder's parameters by the formulas (``tests/tuners/test_prefix.py``'s
NumPy encoder); ``GPTModel`` widens the mask and hands each layer's attention its prefix. That path
does not run as shipped: ``Attention._cat_prefix`` concatenates ``[S, B, heads, head_dim]`` tensors
along axis 2 (``self.cat = Concat(2)``); the reference gets ``Concat(0)`` there (a fix in this test
only). It also reshapes a batch-major prefix ``(B, P, kv)`` to ``(P, B, ...)`` without a transpose,
right for one row only, so the reference runs batch 1; batch independence of pet_hooks' path is
checked on its own. Graph mode only (``Morph``).
"""
from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor, ops

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.mcore_cpu import CpuCoreAttention, adam_losses, register_prefix_stand_in, tiny_qwen3
from tests.tuners.test_prefix import np_encoder_output
from tests.unchanged import unchanged

pytestmark = NEEDS_MINDFORMERS
LAYERS, KV_DIM, V = 2, 2 * 8, 97          # 2 layers; 2 kv heads of 8
CONFIGS = {
    "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 3, "seed": 1},
    "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 4, "mid_dim": 6, "seed": 1},
}


@pytest.fixture(autouse=True, scope="module")
def prefix_stand_in(mcore_graph_mode):
    """The CPU core attention registered for the prefix methods, inside the mcore graph-mode context."""
    register_prefix_stand_in()
    yield
    pet_hooks.unregister_attention(CpuCoreAttention)


def logits(net, ids, **kwargs):
    net.set_train(False)
    return net(Tensor(ids), **kwargs).asnumpy().reshape(ids.shape[0], ids.shape[1], V)


@pytest.mark.parametrize("cfg", [pytest.param(v, id=k) for k, v in CONFIGS.items()])
def test_prefix_on_mcore_attention_matches_mindformers_prefix_path(cfg):
    reference, net = tiny_qwen3(), tiny_qwen3()
    for ours, theirs in zip(net.get_parameters(), reference.get_parameters()):
        np.testing.assert_array_equal(ours.asnumpy(), theirs.asnumpy())
    pet_hooks.apply(net, cfg)
    assert [n for n, c in net.cells_and_names() if hasattr(c, "pet_prefix_len")] == [
        "model.decoder.layers.0.self_attention.core_attention", "model.decoder.layers.1.self_attention.core_attention"]
    for layer in reference.model.decoder.layers:        # MindFormers' prefix concat, on the sequence axis
        layer.self_attention.cat = ops.Concat(0)
    rng = np.random.default_rng(0)
    for p in pet_hooks.delta_parameters(net):
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))

    out = np_encoder_output(net)                                   # (P, layers * 2 * kv_dim)
    length = out.shape[0]
    prefix = out.reshape(length, LAYERS, 2, KV_DIM).transpose(1, 2, 0, 3)[:, :, None]   # (L, 2, B=1, P, kv)
    ids = rng.integers(0, V, (2, 8)).astype(np.int32)
    base = logits(reference, ids[:1])
    theirs = logits(reference, ids[:1], prefix_keys_values=Tensor(np.ascontiguousarray(prefix, np.float32)))
    ours = logits(net, ids[:1])
    assert np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max())
    both = logits(net, ids)                                        # batch 2: each row as when alone
    np.testing.assert_allclose(both[:1], ours, atol=2e-5 * np.abs(ours).max())
    np.testing.assert_allclose(both[1:], logits(net, ids[1:]), atol=2e-5 * np.abs(ours).max())


def test_prefix_training_moves_only_the_encoder_and_remove_restores():
    net = tiny_qwen3()
    ids = np.random.default_rng(4).integers(0, V, (2, 8)).astype(np.int32)
    before, flags = snapshot(net), {p.name: p.requires_grad for p in net.get_parameters()}
    classes = {path: type(cell) for path, cell in net.cells_and_names()}
    base = logits(net, ids)
    pet_hooks.apply(net, CONFIGS["prefixtuning"])
    losses = adam_losses(net, Tensor(ids), lr=5e-2)
    assert losses[-1] < losses[0]
    assert_params_equal(before, net)
    pet_hooks.remove(net)
    assert {path: type(cell) for path, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    np.testing.assert_array_equal(logits(net, ids), base)


def test_the_qwen3_yaml_geometry_is_checked(tmp_path):
    """num_hidden_layers / num_key_value_heads / head_dim of a Qwen3 model_config are read and checked."""
    import yaml
    from tests.mcore_train import build_qwen3
    doc = yaml.safe_load(open("samples/configs/qwen3_lora.yaml", encoding="utf-8"))
    doc["model"]["model_config"]["pet_config"] = {"pet_type": "ptuning2", "pre_seq_len": 2}
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(doc))
    net = build_qwen3(str(good))
    pet_hooks.apply(net, pet_hooks.load_config(str(good)))
    pet_hooks.remove(net)
    doc["model"]["model_config"]["num_key_value_heads"] = 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with unchanged(net):
        with pytest.raises(pet_hooks.PetConfigError, match=r"model_config num_heads is 4 but the model has 2"):
            pet_hooks.apply(net, pet_hooks.load_config(str(bad)))
