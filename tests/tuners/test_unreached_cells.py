"""Adapters on cells their parent never calls: MindSpore's attention cells, and the guard for the rest.

``nn.MultiheadAttention`` reads ``out_proj.weight`` and its packed ``in_proj_weight`` instead of
calling a projection cell; LoRA there must still enter the computation (checked against a NumPy
reference and against the plain cell with the effective weight written in), get gradients,
train, merge, disable, remove, save and load. A home-made parent that reads ``child.weight``
must be reported by the gradient guard (PetCallback, enable()) and flagged by inspect.
Every test runs in graph and PyNative mode.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.train import Model

import pet_hooks
from pet_hooks.training.grad_guard import GradGuard
from pet_hooks.cli.inspection import format_report, inspect_net
from tests.conftest import assert_params_equal, snapshot

E, HEADS, SEQ, BATCH, RANK = 8, 2, 3, 2, 2
SCALING = 4 / RANK  # lora_alpha 4


class SelfAttention(nn.Cell):
    """A bare nn.MultiheadAttention as self-attention, returning the attention output only."""

    def __init__(self, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim)

    def construct(self, x, kv):
        return self.attn(x, kv, kv, need_weights=False)[0]


class ReadsWeights(nn.Cell):
    """A parent that reads ``proj``'s weights instead of calling it; ``head`` is called normally."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Dense(4, 4)
        self.head = nn.Dense(4, 2)

    def construct(self, x):
        h = ops.matmul(x, self.proj.weight.T) + self.proj.bias
        return self.head(ops.relu(h))


def _lora(target, **extra) -> dict:
    return {"pet_type": "lora", "lora_rank": RANK, "lora_alpha": 4, "seed": 1, "target_modules": target, **extra}


def _x(rng, last=E) -> Tensor:
    return Tensor(rng.standard_normal((SEQ, BATCH, last)).astype(np.float32))


def _randomise(net, rng) -> None:
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))


def _effective(cell_with_deltas) -> np.ndarray:
    return SCALING * cell_with_deltas.lora_B.asnumpy() @ cell_with_deltas.lora_A.asnumpy()


def _np_attention(x, kv, w_in, b_in, w_out, b_out) -> np.ndarray:
    """torch / MindSpore multi-head attention forward (packed in-projection, no masks, no dropout)."""
    q = x @ w_in[:E].T + b_in[:E]
    k = kv @ w_in[E:2 * E].T + b_in[E:2 * E]
    v = kv @ w_in[2 * E:].T + b_in[2 * E:]
    hd = E // HEADS

    def heads(t):  # (L, N, E) -> (N * heads, L, hd)
        return t.reshape(t.shape[0], BATCH * HEADS, hd).transpose(1, 0, 2)

    scores = heads(q) @ heads(k).transpose(0, 2, 1) / np.sqrt(hd)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ heads(v)).transpose(1, 0, 2).reshape(x.shape[0], BATCH, E)
    return out @ w_out.T + b_out


# ----------------------------------------------------------------------------- the attention cell itself
TARGETS = {  # id -> (config extras, which branches exist)
    "in_and_out": (dict(target_modules="attn"), (True, True)),
    "out_only": (dict(target_modules=".*out_proj"), (False, True)),
    "in_only": (dict(target_modules="attn", exclude_layers=[".*out_proj"]), (True, False)),
}


@pytest.mark.parametrize("which", list(TARGETS))
def test_mha_branches_enter_the_computation(mode, which, rng):
    extras, (has_in, has_out) = TARGETS[which]
    net = SelfAttention()
    x = _x(rng)
    base = net(x, x).asnumpy()                        # compiled before apply, on purpose
    pet_hooks.apply(net, {**_lora(None), **extras})
    names = [p.name for p in pet_hooks.delta_parameters(net)]
    assert names == ["attn.lora_A", "attn.lora_B"] * has_in + ["attn.out_proj.lora_A", "attn.out_proj.lora_B"] * has_out
    if has_in:
        assert net.attn.lora_A.shape == (RANK, E) and net.attn.lora_B.shape == (3 * E, RANK)
    np.testing.assert_array_equal(net(x, x).asnumpy(), base)  # B = 0: exactly the base output

    _randomise(net, rng)
    out = net(x, x).asnumpy()
    attn = net.attn
    w_in = attn.in_proj_weight.asnumpy() + (_effective(attn) if has_in else 0)
    w_out = attn.out_proj.weight.asnumpy() + (_effective(attn.out_proj) if has_out else 0)
    expected = _np_attention(x.asnumpy(), x.asnumpy(), w_in, attn.in_proj_bias.asnumpy(), w_out,
                             attn.out_proj.bias.asnumpy())
    assert not np.allclose(expected, base, atol=1e-3), "the deltas should change the output"
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    if which != "in_and_out":
        return  # one graph compile fewer per variant; the comparison below covers both branches at once
    values = {p.name: p.asnumpy() for p in net.get_parameters()}
    values.update({"attn.in_proj_weight": w_in, "attn.out_proj.weight": w_out})
    plain = SelfAttention()                            # the unadapted cell with W + scaling * B @ A written in
    for param in plain.get_parameters():
        param.set_data(Tensor(values[param.name]))
    np.testing.assert_allclose(out, plain(x, x).asnumpy(), atol=1e-6, rtol=1e-6)


def test_separate_qkv_weights_adapt_out_proj_only(mode, rng):
    net = SelfAttention(kdim=6)
    with pytest.raises(ValueError, match="kdim/vdim"):
        pet_hooks.apply(net, _lora("attn"))
    x, kv = _x(rng), _x(rng, 6)
    base = net(x, kv).asnumpy()
    pet_hooks.apply(net, _lora(".*out_proj"))
    _randomise(net, rng)
    out = net(x, kv).asnumpy()
    assert not np.allclose(out, base, atol=1e-3)
    weight = net.attn.out_proj.weight
    delta = _effective(net.attn.out_proj)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x, kv).asnumpy(), base)
        weight.set_data(Tensor(weight.asnumpy() + delta))   # the plain computation, effective weight
        np.testing.assert_allclose(net(x, kv).asnumpy(), out, atol=1e-6)


def test_multihead_attention_has_what_lora_reads():
    """Guard of the registry entry ``mha_attributes`` (pet_hooks/utils/internals.py)."""
    packed, separate = nn.MultiheadAttention(E, HEADS), nn.MultiheadAttention(E, HEADS, kdim=6, vdim=6)
    assert packed._qkv_same_embed_dim is True and separate._qkv_same_embed_dim is False
    assert packed.in_proj_weight.shape == (3 * E, E) and separate.in_proj_weight is None
    assert isinstance(packed.out_proj, nn.Dense) and packed.embed_dim == E


# ----------------------------------------------------------------------------- inside a Transformer layer
def _encoder():
    return nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0)


def _grads(net, x, target):
    # A new function each time: a graph-mode value_and_grad reused after set_data on the
    # parameters was seen to keep computing with their old values.
    def loss(data):
        return ((net(data) - target) ** 2).mean()
    return ms.value_and_grad(loss, None, pet_hooks.delta_parameters(net))(x)[1]


def test_encoder_gradients_reach_the_deltas_and_training_moves_them(mode, rng):
    net = _encoder()
    pet_hooks.apply(net, _lora("self_attn"))           # in-projection and out_proj
    x = _x(rng)
    target = Tensor(rng.standard_normal((SEQ, BATCH, E)).astype(np.float32))
    deltas = pet_hooks.delta_parameters(net)
    assert [p.name for p in deltas] == ["self_attn.lora_A", "self_attn.lora_B",
                                        "self_attn.out_proj.lora_A", "self_attn.out_proj.lora_B"]
    grads = dict(zip([p.name for p in deltas], _grads(net, x, target)))
    for name in ("self_attn.lora_B", "self_attn.out_proj.lora_B"):  # at init only B has a gradient
        assert np.abs(grads[name].asnumpy()).max() > 1e-6, name
    _randomise(net, rng)
    for name, grad in zip([p.name for p in deltas], _grads(net, x, target)):
        assert np.abs(grad.asnumpy()).max() > 1e-6, name

    base = {k: v for k, v in snapshot(net).items() if "lora_" not in k}
    before = {p.name: p.asnumpy().copy() for p in deltas}
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 1e-2))
    step.set_train(True)
    losses = [float(step(x, target).asnumpy()) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert_params_equal(base, net)
    for param in deltas:
        assert not np.array_equal(param.asnumpy(), before[param.name]), param.name


def test_encoder_merge_unmerge_disable_remove(mode, rng, caplog):
    net = _encoder()
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    values = snapshot(net)
    x = _x(rng)
    base = net(x).asnumpy()
    pet_hooks.apply(net, _lora(".*self_attn|.*out_proj", lora_dropout=0.1))
    assert "lora_dropout 0.1 is not applied" in caplog.text and net.self_attn.out_proj.lora_dropout is None
    _randomise(net, rng)
    adapted = net(x).asnumpy()
    assert not np.allclose(adapted, base, atol=1e-3)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    attn = net.self_attn
    w_in, w_out = attn.in_proj_weight.asnumpy().copy(), attn.out_proj.weight.asnumpy().copy()
    pet_hooks.merge(net)
    np.testing.assert_allclose(attn.in_proj_weight.asnumpy(), w_in + _effective(attn), atol=1e-6)
    np.testing.assert_allclose(attn.out_proj.weight.asnumpy(), w_out + _effective(attn.out_proj), atol=1e-6)
    np.testing.assert_allclose(net(x).asnumpy(), adapted, atol=1e-5)
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(attn.in_proj_weight.asnumpy(), w_in, atol=1e-6)
    np.testing.assert_allclose(net(x).asnumpy(), adapted, atol=1e-5)

    pet_hooks.remove(net)  # after a merge/unmerge: float tolerance (bit-for-bit is checked without merging below)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert sorted(p.name for p in net.get_parameters()) == sorted(values)
    assert not {"pet_lora_in", "pet_lora_out", "lora_A"} & (set(attn.__dict__) | set(attn._params))
    for param in net.get_parameters():
        np.testing.assert_allclose(param.asnumpy(), values[param.name], atol=1e-6, err_msg=param.name)
    np.testing.assert_allclose(net(x).asnumpy(), base, atol=1e-5)


def test_out_proj_only_parent_restored_and_save_load(mode, rng, tmp_path):
    ms.set_seed(3)
    net = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0)
    values = snapshot(net)
    x, memory = _x(rng), _x(rng)
    base = net(x, memory).asnumpy()
    pet_hooks.apply(net, _lora(".*out_proj"))          # the self- and the cross-attention's out_proj
    assert [p.name for p in pet_hooks.delta_parameters(net)] == [
        "self_attn.out_proj.lora_A", "self_attn.out_proj.lora_B",
        "multihead_attn.out_proj.lora_A", "multihead_attn.out_proj.lora_B"]
    _randomise(net, rng)
    adapted = net(x, memory).asnumpy()
    assert not np.allclose(adapted, base, atol=1e-3)
    pet_hooks.save_adapter(net, tmp_path)

    other = nn.TransformerDecoderLayer(E, HEADS, dim_feedforward=16, dropout=0.0)
    for param in other.get_parameters():
        param.set_data(Tensor(values[param.name]))
    pet_hooks.load_adapter(other, tmp_path)
    np.testing.assert_allclose(other(x, memory).asnumpy(), adapted, atol=1e-6)

    pet_hooks.remove(net)
    assert type(net.self_attn) is nn.MultiheadAttention and type(net.multihead_attn) is nn.MultiheadAttention
    assert "pet_lora_out" not in net.self_attn.__dict__
    np.testing.assert_array_equal(net(x, memory).asnumpy(), base)


# ----------------------------------------------------------------------------- the guard and inspect
def _dataset(rng, n=4):
    import mindspore.dataset as ds
    data = rng.standard_normal((n, 4)).astype(np.float32)
    label = rng.standard_normal((n, 2)).astype(np.float32)
    return ds.NumpySlicesDataset({"x": data, "y": label}, shuffle=False).batch(1)


def _guard_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "pet_hooks" and r.levelno == logging.WARNING
            and "received no gradient" in r.getMessage()]


def test_callback_warns_about_the_cell_its_parent_never_calls(mode, rng, caplog):
    net = ReadsWeights()
    # Weight decay moves proj.lora_A without any gradient: only lora_B (still exactly 0) tells.
    model = Model(net, nn.MSELoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9, weight_decay=0.01))
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        model.train(1, _dataset(rng), callbacks=[pet_hooks.PetCallback(_lora(".*proj|.*head"))],
                    dataset_sink_mode=False)
    warnings = _guard_warnings(caplog)
    assert len(warnings) == 1, warnings                 # once: after step 2, not again at train end
    assert "after 2 steps" in warnings[0] and "proj.lora_A, proj.lora_B" in warnings[0]
    assert "head.lora" not in warnings[0]
    assert net.head.lora_B.asnumpy().any() and not net.proj.lora_B.asnumpy().any()  # head trained, proj did not
    fresh = pet_hooks.apply(ReadsWeights(), _lora(".*proj|.*head"))  # seeded: proj.lora_A as training began
    assert not np.array_equal(net.proj.lora_A.asnumpy(), fresh.proj.lora_A.asnumpy())  # decay moved it


def test_callback_silent_when_every_delta_is_reached(mode, rng, caplog):
    net = nn.SequentialCell(nn.Dense(4, 4), nn.ReLU(), nn.Dense(4, 2))
    model = Model(net, nn.MSELoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9))
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        model.train(1, _dataset(rng), callbacks=[pet_hooks.PetCallback(_lora(["0", "2"]))], dataset_sink_mode=False)
    assert _guard_warnings(caplog) == []


def test_enable_warns_at_block_exit(mode, rng, caplog):
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        with pet_hooks.enable(_lora(".*proj|.*head")):
            net = ReadsWeights()
            opt = nn.Adam(net.get_parameters(), 1e-2)
            step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), opt)
            x = Tensor(rng.standard_normal((3, 4)).astype(np.float32))
            y = Tensor(rng.standard_normal((3, 2)).astype(np.float32))
            for _ in range(2):
                step(x, y)
            assert _guard_warnings(caplog) == []
    warnings = _guard_warnings(caplog)
    assert len(warnings) == 1 and "proj.lora_A, proj.lora_B" in warnings[0] and "head.lora" not in warnings[0]
    assert "enable() block" in warnings[0]


def test_guard_waits_when_nothing_moved_yet(mode, caplog):
    net = ReadsWeights()
    pet_hooks.apply(net, _lora(".*proj|.*head"))
    guard = GradGuard(net)
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        assert guard.check_early(2) == []              # no optimizer step yet: nothing to conclude
        assert guard.check("at train end") == ["proj.lora_A", "proj.lora_B", "head.lora_A", "head.lora_B"]
        assert guard.check("again") == []              # each cell reported once
    assert "No delta changed at all" in caplog.text


def test_inspect_flags_the_cell_its_parent_never_calls(mode):
    report = inspect_net(ReadsWeights(), _lora(".*proj|.*head"))
    rows = {row["path"]: row for row in report["matched"]}
    assert report["unreached"] == ["proj"] and rows["head"]["unreached"] is None
    assert "never calls it" in rows["proj"]["unreached"] and "proj.weight" in rows["proj"]["unreached"]
    text = format_report(report)
    assert "warning: 1 matched cell(s) are never called" in text and "  proj: its parent ReadsWeights" in text

    attention = inspect_net(_encoder(), _lora("self_attn"))  # pet_hooks computes MHA's projections itself
    assert attention["unreached"] == [] and "warning" not in format_report(attention)
    assert [(r["path"], r["in"], r["out"]) for r in attention["matched"]] == [
        ("self_attn", E, 3 * E), ("self_attn.out_proj", E, E)]
