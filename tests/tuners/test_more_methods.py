"""IA3, BitFit and the bottleneck adapters through the shared machinery, on the sample GPT.

Each method's own numerics are checked against its reference in test_ia3.py (PEFT),
test_bitfit.py and test_adapter.py (NumPy). Here: a front door end to end (PetCallback on a
``Model.train`` run: the optimizer holds exactly the deltas, the rest of the net is bit for bit
unchanged, the adapter saved at the end loads into a fresh net with the same logits); one
compiled graph per repeated block in graph mode, training exactly as without; and what
``pet-hooks inspect`` reports.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks.surgery.graph_reuse import MARK_PREFIX
from pet_hooks.surgery.core import all_delta_parameters
from pet_hooks.cli.inspection import format_report, inspect_net
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, LMLoss, build
from tests.conftest import SMALL, assert_params_equal, snapshot

METHODS = {
    "ia3": {"pet_type": "ia3", "target_modules": ".*dense2|.*dense3|.*mlp.projection",
            "feedforward_modules": ".*mlp.projection"},
    "bitfit": {"pet_type": "bitfit", "target_modules": ".*dense[123]|.*mapping|.*projection"},
    "adapter": {"pet_type": "adapter", "bottleneck_size": 4, "target_modules": ".*projection"},
    "low_rank_adapter": {"pet_type": "low_rank_adapter", "reduction_factor": 4, "low_rank_size": 2,
                         "target_modules": ".*projection"},
    # issue 30 item 3 (their numerics against PEFT: test_lycoris.py)
    "loha": {"pet_type": "loha", "r": 2, "target_modules": ".*dense1|.*dense3|.*mlp.projection"},
    "lokr": {"pet_type": "lokr", "r": 2, "target_modules": ".*dense1|.*dense3|.*mlp.projection"},
    # issue 30 item 5 (its numerics against PEFT: test_oft.py)
    "oft": {"pet_type": "oft", "oft_block_size": 4, "target_modules": ".*dense1|.*dense3|.*mlp.projection"},
    # issue 30 item 4 (its numerics against PEFT: test_vera.py)
    "vera": {"pet_type": "vera", "r": 8, "target_modules": ".*dense1|.*dense3|.*mlp.projection"},
    # issue 30 item 1 (its numerics and the allocator against PEFT: test_adalora.py); no mask in 3 steps (tinit)
    "adalora": {"pet_type": "adalora", "init_r": 4, "target_r": 2, "total_step": 20, "tinit": 5,
                "target_modules": ".*dense1|.*dense3|.*mlp.projection"},
}
METHOD_PARAMS = [pytest.param(cfg, id=name) for name, cfg in METHODS.items()]


def _dataset(steps=3):
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    return ds.GeneratorDataset([next(batches) for _ in range(steps)], ["ids", "labels"], shuffle=False)


@pytest.mark.parametrize("cfg", METHOD_PARAMS)
def test_callback_trains_only_the_method_s_parameters(mode, tmp_path, cfg):
    net = build(seed=0, **SMALL)
    before = snapshot(net)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    cfg = {**cfg, "seed": 0}                              # the same initial deltas as `start` below
    callback = pet_hooks.PetCallback(cfg, save_dir=str(tmp_path / "adapter"))
    model.train(1, _dataset(), callbacks=[callback])

    assert callback.model is net
    deltas = pet_hooks.delta_parameters(net)
    names = {p.name for p in deltas}
    assert {p.name for p in model.train_network.optimizer.parameters} == names
    assert_params_equal(before, net, [name for name in before if name not in names])   # the rest bit for bit
    start = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(pet_hooks.apply(build(seed=0, **SMALL), cfg))}
    assert [p.name for p in deltas if np.array_equal(p.asnumpy(), start[p.name])] == []     # every one trained
    # saved: the trained deltas and the frozen ones (VeRA's shared projections, issue 30 item 4)
    saved = {p.name for p in all_delta_parameters(net)}
    assert saved - names <= {"vera_A", "vera_B"}
    assert sorted(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == sorted(saved)

    fresh = build(seed=0, **SMALL)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")
    ids = Tensor(next(lm_batches(8, 2, seed=5))[0])
    np.testing.assert_allclose(fresh(ids).asnumpy(), net(ids).asnumpy(), rtol=1e-6, atol=1e-6)


def _train(net, steps=3):
    ids = Tensor(np.random.default_rng(0).integers(0, net.config.vocab_size, (2, 8)).astype(np.int32))
    loss_net = GPTWithLoss(net)
    loss_net.set_train(True)
    step = nn.TrainOneStepCell(loss_net, nn.SGD(net.trainable_params(), learning_rate=0.5))
    return [float(step(ids, ids).asnumpy()) for _ in range(steps)]


@pytest.mark.parametrize("cfg", METHOD_PARAMS)
def test_repeated_blocks_share_a_graph_and_train_exactly_as_without(cfg):
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        shared = pet_hooks.apply(build(seed=0, **SMALL), {**cfg, "seed": 0})
        marks = [block.__dict__.get("_cell_init_args") for block in shared.blocks]
        assert len(set(marks)) == 1 and marks[0].startswith(MARK_PREFIX), marks
        own = pet_hooks.apply(build(seed=0, **SMALL), {**cfg, "seed": 0, "reuse_block_graphs": False})
        losses, reference = _train(shared), _train(own)
    finally:
        ms.set_context(mode=before)
    assert losses[0] != losses[-1]
    np.testing.assert_allclose(losses, reference, rtol=1e-6)


@pytest.mark.parametrize("cfg", METHOD_PARAMS)
def test_inspect_reports_the_matched_cells_and_leaves_the_net(cfg):
    net = build(seed=0, **SMALL)
    classes = [(name, type(cell)) for name, cell in net.cells_and_names()]
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    report = inspect_net(net, cfg)
    assert report["error"] is None and report["matched"]
    applied = pet_hooks.apply(build(seed=0, **SMALL), cfg)
    state = pet_hooks.surgery.get_state(applied)
    assert [row["path"] for row in report["matched"]] == [record.path for record in state.injections]
    deltas = {f"{row['path']}.{d['name']}" for row in report["matched"] for d in row["deltas"]}
    assert deltas == {p.name for p in pet_hooks.delta_parameters(applied)}
    assert report["summary"]["text"] == pet_hooks.trainable_summary(applied)
    assert cfg["pet_type"] in format_report(report)
    assert [(name, type(cell)) for name, cell in net.cells_and_names()] == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags


@pytest.mark.parametrize("cfg", METHOD_PARAMS)
def test_switching_off_compiles_nothing_and_gives_the_base_bit_for_bit(cfg):
    """disable_adapters (and IA3's merge/unmerge) write values only: no new graph, no hook-version bump."""
    from pet_hooks.utils.ms_compat import hook_version, write_values
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        net = build(seed=0, **SMALL)
        net.set_train(False)
        ids = Tensor(np.random.default_rng(0).integers(0, net.config.vocab_size, (2, 8)).astype(np.int32))
        base = net(ids).asnumpy()
        pet_hooks.apply(net, cfg)
        rng = np.random.default_rng(1)
        for param in pet_hooks.delta_parameters(net):
            write_values(param, param.asnumpy() + rng.standard_normal(param.shape).astype(np.float32) * 0.3)
        active = net(ids).asnumpy()
        assert not np.allclose(active, base, atol=1e-4)
        phases, version = set(net.compile_cache), hook_version()
        with pet_hooks.disable_adapters(net):
            np.testing.assert_array_equal(net(ids).asnumpy(), base)
        np.testing.assert_array_equal(net(ids).asnumpy(), active)
        if cfg["pet_type"] in ("ia3", "loha", "lokr", "oft", "vera", "adalora"):      # OFT's merge is multiplicative (PEFT's)
            pet_hooks.merge(net)
            np.testing.assert_allclose(net(ids).asnumpy(), active, rtol=1e-5, atol=1e-5)
            pet_hooks.unmerge(net)
            np.testing.assert_allclose(net(ids).asnumpy(), active, rtol=1e-5, atol=1e-5)
        assert hook_version() == version, "the hook version moved: every graph recompiles"
        assert set(net.compile_cache) == phases, "a new graph was compiled"
    finally:
        ms.set_context(mode=before)
