"""Identically adapted repeated blocks share one compiled graph (pet_hooks.surgery.graph_reuse, issue 14).

The reference is the same net adapted with ``reuse_block_graphs: false``: training results must
be equal; that the graph is really shared is read from MindSpore's own parser log.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mindspore import Tensor, lazy_inline, nn

import pet_hooks
from pet_hooks.surgery.graph_reuse import MARK_PREFIX, block_fingerprint
from samples.tiny_gpt import Block, GPTConfig, GPTWithLoss, build
from tests.conftest import GPT_LORA, NEEDS_MINDFORMERS, ROOT, snapshot, assert_params_equal

FOUR = dict(num_layers=4, hidden_size=16, num_heads=2, seq_length=8)


def _marks(blocks) -> list:
    return [block.__dict__.get("_cell_init_args") for block in blocks]


def _train(loss_net, net, args, steps=3):
    loss_net.set_train(True)
    step = nn.TrainOneStepCell(loss_net, nn.SGD(net.trainable_params(), learning_rate=0.5))
    return [float(step(*args).asnumpy()) for _ in range(steps)]


def _gpt_run(reuse: bool):
    net = pet_hooks.apply(build(seed=0, **FOUR), {**GPT_LORA, "seed": 0, "reuse_block_graphs": reuse})
    ids = Tensor(np.random.default_rng(0).integers(0, net.config.vocab_size, (2, 8)).astype(np.int32))
    return net, _train(GPTWithLoss(net), net, (ids, ids))


def test_identical_blocks_are_marked_and_train_exactly_as_without(mode):
    net, losses = _gpt_run(True)
    marks = _marks(net.blocks)
    assert len(set(marks)) == 1 and marks[0].startswith(MARK_PREFIX + "Block_pet_hooks_"), marks
    assert all(block.no_inline is False for block in net.blocks)
    reference, reference_losses = _gpt_run(False)
    assert _marks(reference.blocks) == [None] * 4
    assert losses[0] != losses[-1]                                   # it trained
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)
    ours = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    for param in pet_hooks.delta_parameters(reference):
        np.testing.assert_allclose(ours[param.name], param.asnumpy(), rtol=1e-5, atol=1e-7, err_msg=param.name)
    base = build(seed=0, **FOUR)
    assert_params_equal(snapshot(base), net, names=[p.name for p in base.get_parameters()])


@NEEDS_MINDFORMERS
def test_mindformers_llama_decoder_layers_train_exactly_as_without(mode):
    from tests.nets import tiny_llama
    ids = Tensor(np.random.default_rng(0).integers(1, 64, (2, 9)).astype(np.int32))
    runs = {}
    for reuse in (True, False):
        net = pet_hooks.apply(tiny_llama(), {"pet_type": "lora", "lora_rank": 4, "seed": 0,
                                             "target_modules": ".*wq|.*wk|.*wv|.*wo", "reuse_block_graphs": reuse})
        runs[reuse] = (_marks(net.model.layers), _train(net, net, (ids,)))
    assert len(set(runs[True][0])) == 1 and runs[True][0][0].startswith(MARK_PREFIX + "LLamaDecodeLayer_")
    assert runs[False][0] == [None, None]
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-6)


_COUNT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn
    sys.path.insert(0, {root!r})
    ms.set_device("CPU")
    ms.set_context(mode=0)
    import pet_hooks
    from samples.tiny_gpt import GPTWithLoss, build
    net = pet_hooks.apply(build(seed=0, num_layers=4, hidden_size=16, num_heads=2, seq_length=8),
                          {{"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3|.*mapping",
                            "reuse_block_graphs": sys.argv[1] == "1"}})
    ids = Tensor(np.zeros((2, 8), np.int32))
    loss = GPTWithLoss(net)
    loss.set_train(True)
    nn.TrainOneStepCell(loss, nn.SGD(net.trainable_params(), 0.1))(ids, ids)
""")


def _parser_log(reuse: bool) -> str:
    env = dict(os.environ, GLOG_v="1", GLOG_logtostderr="1")
    done = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT.format(root=ROOT), "1" if reuse else "0"],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    return done.stderr


def test_graph_mode_parses_the_block_once_and_reuses_it_for_the_others():
    log = _parser_log(True)
    assert log.count("Lazy inline reusing graph: CR_samples_tiny_gpt_Block_construct") >= 1
    assert log.count("Lazy inline cell: samples_tiny_gpt_Block_ID") == 4      # every block takes the shared graph
    assert "Lazy inline" not in _parser_log(False)


def test_remove_leaves_every_cell_as_it_was():
    net = build(seed=0, **FOUR)
    before = {path: sorted(cell.__dict__) for path, cell in net.cells_and_names()}
    init_args = {path: cell.__dict__.get("_cell_init_args") for path, cell in net.cells_and_names()}
    pet_hooks.apply(net, GPT_LORA)
    assert _marks(net.blocks)[0] is not None
    pet_hooks.remove(net)
    assert {path: sorted(cell.__dict__) for path, cell in net.cells_and_names()} == before
    assert {path: cell.__dict__.get("_cell_init_args") for path, cell in net.cells_and_names()} == init_args


@pytest.mark.parametrize("cfg, why", [
    pytest.param({**GPT_LORA, "lora_dropout": 0.1}, "each block's dropout has its own seed", id="dropout-seeds"),
    pytest.param({"pet_type": "ptuning2", "pre_seq_len": 3}, "each block reads its own prefix slice", id="ptuning2"),
    pytest.param({"pet_type": "prefixtuning", "prefix_token_num": 2, "mid_dim": 8}, "the same", id="prefixtuning"),
])
def test_blocks_the_graph_could_tell_apart_are_not_marked(cfg, why):
    net = pet_hooks.apply(build(seed=0, **FOUR), cfg)
    assert _marks(net.blocks) == [None] * 4, why


def test_a_block_adapted_differently_keeps_its_own_graph():
    net = pet_hooks.apply(build(seed=0, **FOUR), {**GPT_LORA, "target_modules": r"blocks\.0\..*dense1"})
    marks = _marks(net.blocks)
    assert marks[0] is None and len(set(marks[1:])) == 1 and marks[1] is not None   # 1-3: plain and alike


def test_a_constant_read_by_construct_tells_blocks_apart():
    net = build(seed=0, **FOUR)
    assert len({block_fingerprint(b) for b in net.blocks}) == 1
    net.blocks[2].attention.core_attention.scale = 0.5            # read by CoreAttention.construct
    assert len({block_fingerprint(b) for b in net.blocks}) == 2
    pet_hooks.apply(net, GPT_LORA)
    marks = _marks(net.blocks)
    assert marks[2] is None and len({marks[0], marks[1], marks[3]}) == 1


class _LazyBlock(Block):
    @lazy_inline
    def __init__(self, cfg):
        super().__init__(cfg)


def test_a_net_that_uses_mindspores_own_lazy_inline_is_left_alone():
    net = build(seed=0, **FOUR)
    net.blocks = nn.CellList([_LazyBlock(GPTConfig(**{**FOUR, "vocab_size": net.config.vocab_size}))
                              for _ in range(4)])
    theirs = _marks(net.blocks)
    pet_hooks.apply(net, GPT_LORA)
    assert _marks(net.blocks) == theirs and all(MARK_PREFIX + "_LazyBlock" in m for m in theirs)
    assert not any(hasattr(block, "no_inline") for block in net.blocks)


def test_reuse_can_be_switched_off_and_is_not_part_of_the_adapter():
    on = pet_hooks.load_config(GPT_LORA)
    off = pet_hooks.load_config({**GPT_LORA, "reuse_block_graphs": False})
    assert on.reuse_block_graphs is True and off.reuse_block_graphs is False
    assert on == off                                                 # the same adapter either way
