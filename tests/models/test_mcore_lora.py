"""LoRA on MindFormers' mcore projections (ColumnParallelLinear / RowParallelLinear) of a tiny Qwen3.

The model is ``TrainingQwen3ForCausalLM`` with CPU stand-ins for its Ascend-only cells
(``tests/mcore_cpu.py``). Graph mode only: the mcore layers compute through ``Morph``, which
MindSpore runs in graph mode only ("Morph is only supported in GRAPH_MODE").

The reference is MindFormers' own mcore LoRA (``mindformers.pet.get_pet_model``, which puts
``ColumnParallelLinearWithLoRA`` / ``RowParallelLinearWithLoRA`` from
``parallel_core/training_graph/tensor_parallel/lora_layers.py`` in place of the projections) on
the same patched model, with the same base and delta values; merging against ``W + s B A`` in NumPy;
and ``SequenceParallelLinear`` (DeepSeek-V3's MLA down projection, which MindFormers' LoRA does not
cover) against ``x W^T + b + s x A^T B^T`` and its gradients in NumPy.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindspore import nn

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.mcore_cpu import adam_losses, tiny_qwen3

TARGETS = ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"
CFG = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 6, "lora_dropout": 0.0, "target_modules": TARGETS}


pytestmark = [NEEDS_MINDFORMERS, pytest.mark.usefixtures("mcore_graph_mode")]   # graph mode, use_legacy False


def their_name(name: str) -> str:
    """Our delta ``model.<cell>.lora_A`` is MindFormers' ``<cell>.lora_A.weight`` (its top cell does not prefix)."""
    if name.endswith((".lora_A", ".lora_B")):
        return name[len("model."):] + ".weight"
    return name


def ids_of(seed=0, shape=(2, 8)):
    return Tensor(np.random.default_rng(seed).integers(0, 97, shape).astype(np.int32))


def loss_and_grads(net, ids):
    params = net.trainable_params()

    def forward(x):
        return net(x, labels=x)[0]

    loss, grads = ms.value_and_grad(forward, None, params)(ids)
    return float(loss.asnumpy().reshape(-1)[0]), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def logits(net, ids):
    net.set_train(False)
    return net(ids).asnumpy()


def random_deltas(net, seed=0):
    rng = np.random.default_rng(seed)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))


def test_tiny_qwen3_runs_on_the_cpu_with_its_own_names():
    """The helper's model: a finite loss near ln(vocab) at init, every weight gets a gradient, MindFormers' names."""
    net = tiny_qwen3()
    names = [p.name for p in net.get_parameters()]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in names
    assert "embedding.word_embeddings.weight" in names
    net.set_train(True)
    loss, grads = loss_and_grads(net, ids_of())
    assert abs(loss - np.log(97)) < 0.2
    assert all(np.abs(g).max() > 0 for g in grads.values()), [n for n, g in grads.items() if not np.abs(g).max()]
    assert [p.name for p in net.get_parameters()] == names


def test_same_loss_and_delta_gradients_as_mindformers_mcore_lora(tmp_path, monkeypatch):
    from mindformers.pet import get_pet_model
    monkeypatch.chdir(tmp_path)                    # MindFormers' PetModel writes output/adapter_config.json
    ours = pet_hooks.apply(tiny_qwen3(), CFG)
    theirs = get_pet_model(tiny_qwen3(seed=1), dict(CFG, freeze_include=["*"], freeze_exclude=["*lora*"]))
    their_params = {p.name: p for p in theirs.get_parameters()}
    their_classes = {type(cell).__name__ for _, cell in theirs.cells_and_names()}
    assert {"ColumnParallelLinearWithLoRA", "RowParallelLinearWithLoRA"} <= their_classes
    random_deltas(ours)
    for param in ours.get_parameters():            # the same base weights and deltas in both
        if not param.name.endswith("pet_lora_scale"):         # (our on/off switch)
            their_params[their_name(param.name)].set_data(param.data.copy())
    assert sorted(their_name(p.name) for p in ours.trainable_params()) == sorted(
        p.name for p in theirs.trainable_params())

    ids = ids_of(1)
    ours.set_train(True)
    theirs.set_train(True)
    our_loss, our_grads = loss_and_grads(ours, ids)
    their_loss, their_grads = loss_and_grads(theirs, ids)
    assert our_loss == pytest.approx(their_loss, rel=1e-6)
    assert len(our_grads) == 2 * 4 * 2
    for name, grad in our_grads.items():
        assert np.abs(grad).max() > 0, name
        # float32 rounding: we scale A, MindFormers scales the branch output (seen: 7e-6 of the largest entry)
        theirs_grad = their_grads[their_name(name)]
        np.testing.assert_allclose(grad, theirs_grad, rtol=1e-5, atol=2e-5 * np.abs(theirs_grad).max(), err_msg=name)


def test_starts_at_the_base_output_and_remove_restores_the_original():
    net = tiny_qwen3()
    ids = ids_of(2)
    before, classes = snapshot(net), {path: type(cell) for path, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    base = logits(net, ids)
    pet_hooks.apply(net, CFG)
    qkv = net.model.decoder.layers[0].self_attention.linear_qkv
    assert type(qkv).__name__ == "LoraColumnParallelLinear_of_ColumnParallelLinear"
    assert qkv.lora_A.shape == (4, 32) and qkv.lora_B.shape == (64, 4)
    np.testing.assert_array_equal(logits(net, ids), base)          # B starts at zero
    random_deltas(net)
    assert np.abs(logits(net, ids) - base).max() > 1e-4           # the branch is reached
    pet_hooks.remove(net)
    assert {path: type(cell) for path, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert_params_equal(before, net)
    np.testing.assert_array_equal(logits(net, ids), base)


def weight_out_in(cell) -> np.ndarray:
    """A copy of the cell's weight as [out, in] (``asnumpy`` shares the Parameter's memory, which merge writes)."""
    weight = cell.weight.asnumpy().copy()
    return weight if cell.transpose_b else weight.T


def test_training_moves_only_the_deltas_and_merge_folds_them():
    net = pet_hooks.apply(tiny_qwen3(), CFG)
    base_names = [p.name for p in net.get_parameters() if ".lora_" not in p.name and not p.name.endswith("pet_lora_scale")]
    before = snapshot(net)
    ids = ids_of(4)
    base = logits(net, ids)                                       # B = 0: the base model's logits
    losses = adam_losses(net, ids_of(3), lr=1e-2)
    assert losses[-1] < losses[0]
    assert_params_equal(before, net, base_names)                 # the base is untouched
    adapted = logits(net, ids)
    rtol, atol = 1e-4, 1e-5                                       # merged against adapted logits, below
    assert np.abs(adapted - base).max() > 20 * (atol + rtol * np.abs(adapted).max())   # the trained adapter shows
    cells = {path: cell for path, cell in net.cells_and_names() if hasattr(cell, "lora_A")}
    assert len(cells) == 2 * 4
    unmerged = {path: (weight_out_in(cell), cell.lora_A.asnumpy(), cell.lora_B.asnumpy()) for path, cell in cells.items()}
    pet_hooks.merge(net)
    scaling = CFG["lora_alpha"] / CFG["lora_rank"]
    for path, cell in cells.items():                              # W' = W + s B A, written out here
        w, a, b = unmerged[path]
        delta = scaling * b @ a
        assert np.abs(delta).max() > 20 * 1e-6, path
        np.testing.assert_allclose(weight_out_in(cell), w + delta, rtol=0, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(logits(net, ids), adapted, rtol=rtol, atol=atol)
    pet_hooks.unmerge(net)
    for path, cell in cells.items():
        np.testing.assert_allclose(weight_out_in(cell), unmerged[path][0], rtol=0, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(logits(net, ids), adapted, rtol=rtol, atol=atol)


class _Down(nn.Cell):
    """A ``SequenceParallelLinear`` as DeepSeek-V3's MLA builds its ``linear_qkv`` (with a bias here, to cover the
    bias path too), input ``[S, B, H]``."""

    def __init__(self, config, out_size: int):
        super().__init__()
        from mindformers.parallel_core.training_graph.tensor_parallel.layers import SequenceParallelLinear
        self.linear_qkv = SequenceParallelLinear(32, out_size, config=config, init_method=config.init_method,
                                                 bias=True, skip_bias_add=False)

    def construct(self, x):
        return self.linear_qkv(x)[0]


def test_lora_on_a_sequence_parallel_linear_equals_numpy():
    """LoRA on ``SequenceParallelLinear`` (DeepSeek-V3's MLA down projection, the shared experts): output,
    gradients of A and B, merge, against NumPy; the branch large against the tolerance."""
    rng = np.random.default_rng(11)
    config = tiny_qwen3().model.decoder.layers[0].self_attention.linear_qkv.config
    net = _Down(config, 40)
    w = (rng.standard_normal((40, 32)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(40) * 0.2).astype(np.float32)
    net.linear_qkv.weight.set_data(Tensor(w))
    net.linear_qkv.bias.set_data(Tensor(bias))
    pet_hooks.apply(net, dict(CFG, target_modules="linear_qkv"))
    cell = net.linear_qkv
    assert type(cell).__name__ == "LoraColumnParallelLinear_of_SequenceParallelLinear"
    a = (rng.standard_normal((4, 32)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((40, 4)) * 0.3).astype(np.float32)
    cell.lora_A.set_data(Tensor(a))
    cell.lora_B.set_data(Tensor(b))
    x = rng.standard_normal((8, 2, 32)).astype(np.float32)              # [S, B, H]
    g = rng.standard_normal((8, 2, 40)).astype(np.float32)
    s = CFG["lora_alpha"] / CFG["lora_rank"]

    def loss(x, g):
        return (net(x) * g).sum()

    out = net(Tensor(x)).asnumpy()
    _, (grad_a, grad_b) = ms.value_and_grad(loss, None, [cell.lora_A, cell.lora_B])(Tensor(x), Tensor(g))
    x64, g64 = x.astype(np.float64).reshape(-1, 32), g.astype(np.float64).reshape(-1, 40)
    base = x64 @ w.T + bias
    expected = base + s * (x64 @ a.T) @ b.T
    tol = 1e-5 * np.abs(expected).max()
    assert np.abs(expected - base).max() > 20 * tol                     # the branch shows
    np.testing.assert_allclose(out.reshape(-1, 40), expected, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(grad_a.asnumpy(), s * (g64 @ b).T @ x64, rtol=1e-5,
                               atol=1e-5 * np.abs(s * (g64 @ b).T @ x64).max())
    np.testing.assert_allclose(grad_b.asnumpy(), s * g64.T @ (x64 @ a.T), rtol=1e-5,
                               atol=1e-5 * np.abs(s * g64.T @ (x64 @ a.T)).max())
    pet_hooks.merge(net)
    np.testing.assert_allclose(cell.weight.asnumpy(), w + s * b @ a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy().reshape(-1, 40), expected, rtol=1e-5, atol=tol)
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(cell.weight.asnumpy(), w, rtol=0, atol=1e-6)
    pet_hooks.remove(net)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy().reshape(-1, 40), base, rtol=1e-5, atol=tol)


def test_cells_lora_cannot_adapt_are_named():
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import ColumnParallelLinear
    net = tiny_qwen3()
    config = net.model.decoder.layers[0].self_attention.linear_qkv.config
    tied = ColumnParallelLinear(32, 97, config=config, init_method=config.init_method, bias=False,
                                skip_weight_param_allocation=True)
    net.model.tied_head = tied
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"tied_head.*skip_weight_param_allocation"):
        pet_hooks.apply(net, dict(CFG, target_modules=".*tied_head"))
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"core_attention.*CpuCoreAttention"):
        pet_hooks.apply(net, dict(CFG, target_modules=".*core_attention"))
    assert not any(".lora_" in p.name for p in net.get_parameters())     # nothing was left behind


def test_mcore_projections_have_what_lora_reads():
    """Guard of pet_hooks/utils/internals.py 'mcore_linear_attributes'."""
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear)
    attention = tiny_qwen3().model.decoder.layers[0].self_attention
    column, row = attention.linear_qkv, attention.linear_proj
    assert isinstance(column, ColumnParallelLinear) and isinstance(row, RowParallelLinear)
    assert (column.input_size, column.output_size, column.transpose_b) == (32, 64, True)
    assert (row.input_size, row.output_size, row.sequence_parallel) == (32, 32, False)
    assert column.skip_weight_param_allocation is False and column.weight.shape == (64, 32)
    for cell in (column, row):
        assert cell.compute_dtype == ms.float32
        assert (cell.config.data_parallel_size, cell.config.context_parallel_size,
                cell.config.tensor_model_parallel_size) == (1, 1, 1)


def test_a_mindformers_mcore_lora_checkpoint_loads(tmp_path, monkeypatch):
    """MindFormers' mcore LoRA saved with ms.save_checkpoint (deltas '<cell>.lora_A.weight', no 'model.' prefix)
    loads into pet_hooks and gives MindFormers' logits."""
    from mindformers.pet import get_pet_model
    monkeypatch.chdir(tmp_path)
    theirs = get_pet_model(tiny_qwen3(), dict(CFG, freeze_include=["*"], freeze_exclude=["*lora*"]))
    ours = tiny_qwen3()
    their_params = {p.name: p for p in theirs.get_parameters()}
    for param in ours.get_parameters():                       # the same base (MindFormers re-initialised its own)
        their_params[param.name].set_data(param.data.copy())
    rng = np.random.default_rng(5)
    for name, param in their_params.items():
        if ".lora_" in name:
            param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.1))
    ms.save_checkpoint(theirs, str(tmp_path / "mf_lora.ckpt"))
    pet_hooks.load_adapter(ours, str(tmp_path / "mf_lora.ckpt"), cfg=CFG)
    ids = ids_of(6)
    expected = logits(theirs, ids)
    np.testing.assert_allclose(logits(ours, ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
