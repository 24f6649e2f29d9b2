"""P-Tuning v2 and Prefix-Tuning on the sample GPT and MindFormers' Llama, in graph and PyNative mode.

References: a NumPy attention with the prefix keys/values concatenated by hand (computed from
the encoder's parameters with the formulas of the issue), and Llama's own
``prefix_keys_values`` path fed the same prefix.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
from mindspore import Tensor, nn, ops
from mindspore.train import Callback

import pet_hooks
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import NEEDS_MINDFORMERS, ROOT, SMALL, assert_params_equal, snapshot
from tests.nets import tiny_llama
from tests.unchanged import unchanged

CONFIGS = {
    "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 3, "seed": 1},
    "ptuning2_projection": {"pet_type": "ptuning2", "pre_seq_len": 3, "prefix_projection": True,
                            "projection_dim": 8, "seed": 1},
    "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 4, "mid_dim": 6, "seed": 1},
}
CFG_PARAMS = [pytest.param(v, id=k) for k, v in CONFIGS.items()]


def np_encoder_output(net) -> np.ndarray:
    """(prefix_len, num_layers * 2 * kv_dim) from the encoder parameters, by the formulas."""
    params = {p.name.split("pet_prefix_encoder.")[1]: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    if "dense_in.weight" not in params:
        return params["embedding"]
    hidden = np.tanh(params["embedding"] @ params["dense_in.weight"].T + params["dense_in.bias"])
    return hidden @ params["dense_out.weight"].T + params["dense_out.bias"]


def np_attention(q, k, v, mask, scale):
    scores = q @ np.swapaxes(k, -1, -2) * scale + (1.0 - mask) * -1e9
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


def expected_count(cfg, layers, kv_dim, hidden):
    length = cfg.get("pre_seq_len", cfg.get("prefix_token_num"))
    out = layers * 2 * kv_dim
    mid = cfg.get("mid_dim", cfg.get("projection_dim") if cfg.get("prefix_projection") else None)
    if mid is None:
        return length * out
    return length * hidden + hidden * mid + mid + mid * out + out


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_attention_with_prefix_matches_numpy(mode, cfg, rng):
    net = build(seed=0, **SMALL)
    pet_hooks.apply(net, cfg)
    for p in pet_hooks.delta_parameters(net):  # non-trivial values everywhere
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.5))
    out = np_encoder_output(net)
    heads, head_dim, length = 2, 8, out.shape[0]
    kv_dim = heads * head_dim
    q, k, v = (rng.standard_normal((2, heads, 5, head_dim)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((5, 5), np.float32))
    for layer, block in enumerate(net.blocks):
        cols = out[:, layer * 2 * kv_dim:(layer + 1) * 2 * kv_dim]
        pk = cols[:, :kv_dim].reshape(length, heads, head_dim).transpose(1, 0, 2)
        pv = cols[:, kv_dim:].reshape(length, heads, head_dim).transpose(1, 0, 2)
        k_full = np.concatenate([np.broadcast_to(pk, (2,) + pk.shape), k], axis=2)
        v_full = np.concatenate([np.broadcast_to(pv, (2,) + pv.shape), v], axis=2)
        mask_full = np.concatenate([np.ones((5, length), np.float32), mask], axis=1)
        expected = np_attention(q, k_full, v_full, mask_full, 1 / np.sqrt(head_dim))
        got = block.attention.core_attention(Tensor(q), Tensor(k), Tensor(v), Tensor(mask)).asnumpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert pet_hooks.trainable_summary(net).startswith(
        f"trainable params: {expected_count(cfg, 2, kv_dim, 16):,d} ||")


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_training_moves_only_the_encoder_and_remove_restores(mode, cfg, rng):
    net = build(seed=0, **SMALL)
    ids = Tensor(rng.integers(0, 256, (2, 8)).astype(np.int32))
    base_out = net(ids).asnumpy()
    base = snapshot(net)
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    pet_hooks.apply(net, cfg)
    assert sorted(p.name for p in net.trainable_params()) == sorted(p.name for p in pet_hooks.delta_parameters(net))
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(ids).asnumpy(), base_out)
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 5e-2))
    step.set_train(True)
    losses = [float(step(ids, ids).asnumpy()) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert_params_equal(base, net)
    with unchanged(net):
        with pytest.raises(ValueError, match="has no weights to merge"):
            pet_hooks.merge(net)
    pet_hooks.remove(net)
    step.set_train(False)
    np.testing.assert_array_equal(net(ids).asnumpy(), base_out)
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert not any(hasattr(c, "pet_prefix_len") for _, c in net.cells_and_names())


@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_save_load_round_trip(mode, cfg, rng, tmp_path):
    net = pet_hooks.apply(build(seed=0, **SMALL), cfg)
    for p in pet_hooks.delta_parameters(net):
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    ids = Tensor(rng.integers(0, 256, (3, 8)).astype(np.int32))   # another batch size: taken at run time
    adapted = net(ids).asnumpy()
    pet_hooks.save_adapter(net, tmp_path)
    fresh = build(seed=0, **SMALL)
    pet_hooks.load_adapter(fresh, tmp_path)
    np.testing.assert_allclose(fresh(ids).asnumpy(), adapted, atol=1e-6)


def test_geometry_is_checked_against_the_model_config():
    net = build(seed=0, **SMALL)
    values = snapshot(net)
    for hints, words in [({"num_layers": 3}, "num_layers is 3 but the model has 2"),
                         ({"kv_channels": 4}, "kv_channels is 4 but the model has 8"),
                         ({"num_heads": 4}, "num_heads is 4 but the model has 2"),
                         ({"hidden_size": 16, "num_heads": 3}, "num_heads 3 does not divide hidden_size 16")]:
        cfg = pet_hooks.config.config_from_dict({"pet_type": "ptuning2", "pre_seq_len": 2}, hints)
        with unchanged(net):
            with pytest.raises(ValueError, match=words):
                pet_hooks.apply(net, cfg)
        assert not pet_hooks.surgery.has_pet(net)
    assert_params_equal(values, net)
    ok = pet_hooks.config.config_from_dict({"pet_type": "ptuning2", "pre_seq_len": 2},
                                           {"num_layers": 2, "kv_channels": 8, "num_heads": 2})
    pet_hooks.apply(net, ok)                       # hints that agree with the model: applied as usual
    assert pet_hooks.surgery.has_pet(net)
    assert [(p.name, p.shape) for p in pet_hooks.delta_parameters(net)] == [
        ("pet_prefix_encoder.embedding", (2, 2 * 2 * 2 * 8))]  # pre_seq_len x layers * (k, v) * heads * head_dim


def test_long_prefix_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.load_config({"pet_type": "prefixtuning", "prefix_token_num": 61})
    assert "prefix_token_num=61" in caplog.text and "converge poorly" in caplog.text


class ScoreAttention(nn.Cell):
    """A user's attention: (batch, seq, heads, dim) tensors and an additive mask bias (0 / -inf)."""

    def __init__(self, heads, dim):
        super().__init__()
        self.heads, self.dim = heads, dim

    def construct(self, q, k, v, bias):
        scores = ops.matmul(ops.transpose(q, (0, 2, 1, 3)), ops.transpose(k, (0, 2, 3, 1))) / np.sqrt(self.dim)
        probs = ops.softmax(scores + bias, -1)
        return ops.transpose(ops.matmul(probs, ops.transpose(v, (0, 2, 1, 3))), (0, 2, 1, 3))


class ScoreAttentionPrefix(pet_hooks.PrefixAttention):
    @staticmethod
    def geometry(cell):
        return cell.heads, cell.dim, cell.heads * cell.dim

    def construct(self, q, k, v, bias):
        if self.pet_prefix_active:
            pk, pv = self.prefix_key_value(q.shape[0])                      # (b, h, p, d)
            k = ops.concat((ops.transpose(pk, (0, 2, 1, 3)), k), 1)        # this class is (b, s, h, d)
            v = ops.concat((ops.transpose(pv, (0, 2, 1, 3)), v), 1)
            bias = ops.concat((ops.zeros(bias.shape[:-1] + (self.pet_prefix_len,), bias.dtype), bias), -1)
        return self.pet_base_construct(q, k, v, bias)


class UserNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.proj = nn.Dense(8, 8)
        self.attn = ScoreAttention(2, 4)

    def construct(self, q, k, v, bias):
        k = ops.reshape(self.proj(ops.reshape(k, (k.shape[0], k.shape[1], 8))), k.shape)
        return self.attn(q, k, v, bias)


def test_register_attention_for_a_user_class(mode, rng):
    net = UserNet()
    with unchanged(net):
        with pytest.raises(ValueError, match="no attention cell the prefix adapters know"):
            pet_hooks.apply(net, {"pet_type": "ptuning2", "pre_seq_len": 2})
    with pytest.raises(TypeError, match="PrefixAttention"):
        pet_hooks.register_attention(ScoreAttention, object)
    pet_hooks.register_attention(ScoreAttention, ScoreAttentionPrefix)
    try:
        pet_hooks.apply(net, {"pet_type": "ptuning2", "pre_seq_len": 2, "seed": 3})
    finally:
        pet_hooks.unregister_attention(ScoreAttention)
    with pytest.raises(KeyError, match="was not registered"):
        pet_hooks.unregister_attention(ScoreAttention)
    q, k, v = (rng.standard_normal((2, 3, 2, 4)).astype(np.float32) for _ in range(3))
    bias = np.where(np.tril(np.ones((3, 3))) > 0, 0.0, -1e9).astype(np.float32)
    got = net(*map(Tensor, (q, k, v, bias))).asnumpy()
    kp = k.reshape(2, 3, 8) @ net.proj.weight.asnumpy().T + net.proj.bias.asnumpy()
    emb = np_encoder_output(net)                                   # (2, 1 * 2 * 8)
    pk, pv = emb[:, :8].reshape(2, 2, 4), emb[:, 8:].reshape(2, 2, 4)
    k_full = np.concatenate([np.broadcast_to(pk, (2, 2, 2, 4)), kp.reshape(2, 3, 2, 4)], 1).transpose(0, 2, 1, 3)
    v_full = np.concatenate([np.broadcast_to(pv, (2, 2, 2, 4)), v], 1).transpose(0, 2, 1, 3)
    mask = np.concatenate([np.ones((3, 2)), np.tril(np.ones((3, 3)))], 1)
    expected = np_attention(q.transpose(0, 2, 1, 3), k_full, v_full, mask, 1 / 2.0).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------- MindFormers' Llama
@NEEDS_MINDFORMERS
def test_llama_matches_its_own_prefix_path_and_trains(mode, rng):
    """Both methods against one reference Llama (its base and prefix graphs compiled once per mode); P-Tuning v2
    comes in through ``enable`` (the optimizer built inside gets the encoder only)."""
    reference = tiny_llama()
    reference.set_train(False)
    base_names = [p.name for p in reference.get_parameters()]
    ids = Tensor(rng.integers(0, 64, (2, 8)).astype(np.int32))
    base = reference(ids)[0].asnumpy()
    train_ids = Tensor(rng.integers(0, 64, (2, 9)).astype(np.int32))
    for name in ("ptuning2", "prefixtuning"):
        cfg = CONFIGS[name]
        if name == "ptuning2":
            with pet_hooks.enable(cfg) as session:
                net = tiny_llama()
                optimizer = nn.AdamWeightDecay(net.trainable_params(), 5e-2)
            assert session.models == [net], name
            assert [p.name for p in optimizer.parameters] == ["pet_prefix_encoder.embedding"]
        else:
            net = pet_hooks.apply(tiny_llama(), cfg)
            optimizer = nn.Adam(net.trainable_params(), 5e-2)
        assert [n for n, c in net.cells_and_names() if hasattr(c, "pet_prefix_len")] == [
            "model.layers.0.attention", "model.layers.1.attention"], name
        for p in pet_hooks.delta_parameters(net):
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
        net.set_train(False)
        out = np_encoder_output(net)
        length, layers, kv_dim = out.shape[0], 2, 32
        prefix = out.reshape(length, layers * 2, kv_dim).transpose(1, 0, 2).reshape(layers, 2, 1, length, kv_dim)
        prefix = np.broadcast_to(prefix, (layers, 2, 2, length, kv_dim)).copy()
        theirs = reference(ids, prefix_keys_values=Tensor(prefix))[0].asnumpy()
        ours = net(ids)[0].asnumpy()
        assert np.abs(ours - base).max() > 1e-3, name
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5, err_msg=name)

        before = snapshot(net)
        net.set_train(True)
        step = nn.TrainOneStepCell(net, optimizer)
        losses = [float(step(train_ids).asnumpy()) for _ in range(5)]
        assert losses[-1] < losses[0], (name, losses)
        assert_params_equal(before, net, names=base_names)


# ----------------------------------------------------------------------------- the front doors
def _gpt_dataset(steps=3):
    import mindspore.dataset as ds
    from samples.data import lm_batches
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    return ds.GeneratorDataset([next(batches) for _ in range(steps)], ["ids", "labels"], shuffle=False)


def test_callback_and_enable_on_the_sample_gpt(mode, tmp_path):
    from mindspore.train import Model
    from pet_hooks.utils.ms_compat import write_values
    from samples.tiny_gpt import LMLoss
    net = build(seed=0, **SMALL)
    base = snapshot(net)
    # the callback before the optimizer, as its error says: it installs the recorder that keeps AdamWeightDecay's
    # arguments (built first, the test passed only after another test in the process had installed it)
    callback = pet_hooks.PetCallback(CONFIGS["ptuning2_projection"], save_dir=str(tmp_path / "cb"))
    model = Model(net, LMLoss(), nn.AdamWeightDecay(net.trainable_params(), 1e-2))
    model.train(1, _gpt_dataset(), callbacks=[callback])
    assert {p.name for p in model.train_network.optimizer.parameters} == {
        p.name for p in pet_hooks.delta_parameters(net)} and len(pet_hooks.delta_parameters(net)) == 5
    assert_params_equal(base, net)
    ids = Tensor(np.random.default_rng(3).integers(0, 256, (2, 8)).astype(np.int32))
    loaded = pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "cb")   # the trained prefix, saved at the end
    initial = pet_hooks.apply(build(seed=0, **SMALL), CONFIGS["ptuning2_projection"])   # the same prefix untrained
    net.set_train(False)
    trained = net(ids).asnumpy()
    np.testing.assert_allclose(loaded(ids).asnumpy(), trained, atol=1e-6)
    # the untrained values written into the trained net (in place: its compiled graph computes them, no new one)
    untrained = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(initial)}
    for param in pet_hooks.delta_parameters(net):
        write_values(param, untrained[param.name])
    assert np.abs(net(ids).asnumpy() - trained).max() > 1e-4

    with pet_hooks.enable(CONFIGS["prefixtuning"]) as session:
        other = build(seed=0, **SMALL)
        optimizer = nn.Adam(other.get_parameters(), 1e-2)
    assert session.models == [other]
    assert [p.name for p in optimizer.parameters] == [p.name for p in pet_hooks.delta_parameters(other)]


class InitialDeltas(Callback):
    """Placed after a PetCallback: the deltas as they were when training began."""

    def __init__(self, pet_callback):
        super().__init__()
        self.pet_callback, self.initial = pet_callback, None

    def on_train_begin(self, run_context):
        self.initial = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(self.pet_callback.model)}


@NEEDS_MINDFORMERS
def test_callback_on_llama_from_the_run_yaml(mode, tmp_path):
    import os
    from mindspore.train import Model
    import mindspore.dataset as ds
    from samples.llama_train import build_llama
    yaml_path = os.path.join(ROOT, "samples", "configs", "llama_prefixtuning.yaml")
    net = build_llama(yaml_path)
    base = snapshot(net)
    rows = np.random.default_rng(0).integers(0, 256, (3, 2, 33)).astype(np.int32)
    model = Model(net, optimizer=nn.Adam(net.trainable_params(), 1e-2))
    callback = pet_hooks.PetCallback(yaml_path, save_dir=str(tmp_path / "ad"))
    spy = InitialDeltas(callback)
    model.train(1, ds.GeneratorDataset([(r,) for r in rows], ["input_ids"], shuffle=False),
                callbacks=[callback, spy])
    assert callback.model is net and callback.config.model_hints["num_layers"] == 2
    assert_params_equal(base, net)
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.numpy import load_file
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))    # the trained encoder, not its init
    deltas = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    assert sorted(saved) == sorted(deltas) and {n.split(".")[0] for n in deltas} == {"pet_prefix_encoder"}
    for name, value in deltas.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    assert any(not np.array_equal(spy.initial[name], value) for name, value in deltas.items())  # training moved it


@NEEDS_MINDFORMERS
def test_use_past_is_refused(mode):
    """(``enable`` on Llama, with training: test_llama_matches_its_own_prefix_path_and_trains.)"""
    from mindformers import LlamaConfig, LlamaForCausalLM
    decoding = LlamaForCausalLM(LlamaConfig(num_layers=1, hidden_size=32, num_heads=4, vocab_size=64, seq_length=8,
                                            use_past=True, use_flash_attention=False, compute_dtype="float32",
                                            param_init_type="float32", batch_size=1))
    with unchanged(decoding):
        with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'model.layers.0.attention'.*use_past=True"):
            pet_hooks.apply(decoding, CONFIGS["ptuning2"])
    assert not pet_hooks.surgery.has_pet(decoding)
