"""LoRA on embeddings against PEFT's own ``lora.Embedding``: nn.Embedding, LlamaEmbedding, VocabParallelEmbedding.

PyTorch runs in its own process (``tests/peft_reference_embedding.py``) on the same weights, once for
the cell (``peft_run``) and once for the whole models (``peft_models``, slow tests only); every number
below is compared with what it wrote, or with a NumPy formula:

* the cell (an embedding then a plain head), for ``mindspore.nn.Embedding`` with and without
  ``padding_idx``, MindFormers' ``LlamaEmbedding`` (both modes) and mcore ``VocabParallelEmbedding``
  (graph mode, the only mode of the mcore layers): PEFT's init, the output, the gradients of A and B,
  the merged and unmerged table; disable and remove give the base back bit for bit;
* the PEFT format both ways: pet_hooks' adapter (an embedding and a Dense in one file) read by
  ``PeftModel.from_pretrained``, PEFT's ``save_pretrained`` read by pet_hooks;
* a MindFormers Llama against ``transformers`` + PEFT, untied and with ``tie_word_embeddings``
  (as SmolLM2): the delta changes the lookup only, as PEFT computes it, and merging is refused;
* MindFormers' published Qwen3 LoRA block (``configs/qwen3/README.md``) on the tiny mcore Qwen3 with
  MindFormers' own ``VocabParallelEmbedding`` kept (``tiny_qwen3(keep_embedding=True)``): it applies
  as published, trains, and its adapter gives ``transformers`` + PEFT's logits;
* several adapters, mixed batches and weighted adapters on an embedding, against the NumPy formula;
  switching them compiles nothing; the gradient sentinel (A) reports an embedding that is never called;
* DoRA, PiSSA, OLoRA and an embedding an MTP block reads are refused, naming the cell.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

import pet_hooks
from pet_hooks.training.grad_guard import GradGuard
from pet_hooks.cli.inspection import inspect_net
from pet_hooks.surgery.core import get_state, has_pet
from tests.conftest import (HAS_TORCH_PEFT, NEEDS_MINDFORMERS, NEEDS_TORCH_PEFT,
                            assert_params_equal, snapshot)
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
V, D, O, R, ALPHA = 13, 6, 5, 3, 6           # vocabulary, width, head outputs, rank, alpha: scaling 2
CELL = {"pet_type": "lora", "lora_rank": R, "lora_alpha": ALPHA, "target_modules": "emb"}
LLAMA = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
         "target_modules": ".*tok_embeddings|.*wq|.*wv"}
# MindFormers 1.9's published Qwen3 LoRA block (site-packages/configs/qwen3/README.md), as published
QWEN3_PUBLISHED = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                   "lora_a_init": "normal", "lora_b_init": "zeros",
                   "target_modules": ".*word_embeddings|.*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2",
                   "freeze_include": ["*"], "freeze_exclude": ["*lora*"]}
KINDS = ["nn", "nn_pad", pytest.param("llama", marks=NEEDS_MINDFORMERS),
         pytest.param("mcore", marks=NEEDS_MINDFORMERS)]


def close(ours, theirs, err_msg="", tol=1e-5) -> float:
    """Equal within float32 rounding at the array's scale; returns the max abs difference."""
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, np.abs(theirs).max()), err_msg=err_msg)
    return float(np.abs(np.asarray(ours) - theirs).max())


# ----------------------------------------------------------------------------- the cell
def _job() -> dict:
    rng = np.random.default_rng(11)
    return {"W": rng.standard_normal((V, D)).astype(np.float32),
            "head.weight": (rng.standard_normal((O, D)) * 0.5).astype(np.float32),
            "head.bias": rng.standard_normal(O).astype(np.float32),
            # padding id 0 and repeated ids (their gradients add up in A's columns)
            "ids": np.array([[1, 2, 2, 0, 5, 12, 3], [0, 7, 7, 7, 11, 1, 4]], np.int32),
            "g": rng.standard_normal((2, 7, O)).astype(np.float32),
            "A": (rng.standard_normal((R, V)) * 0.5).astype(np.float32),
            "B": (rng.standard_normal((D, R)) * 0.5).astype(np.float32)}


class EmbedNet(nn.Cell):
    """``head(emb(ids))`` with the embedding of ``kind``: nn.Embedding (``nn_pad``: padding_idx 0),
    MindFormers' LlamaEmbedding, or mcore VocabParallelEmbedding (given the model config)."""

    def __init__(self, job: dict, kind: str, config=None):
        super().__init__()
        table = Tensor(job["W"])
        if kind in ("nn", "nn_pad"):
            self.emb = nn.Embedding(V, D, padding_idx=0 if kind == "nn_pad" else None)
            self.emb.embedding_table.set_data(table)        # padding_idx zeroed that row at init: the job's again
        elif kind == "llama":
            from mindformers.models.llama.llama_layer import LlamaEmbedding
            self.emb = LlamaEmbedding(V, D)
            self.emb.embedding_weight.set_data(table)
        else:
            from mindformers.parallel_core.training_graph.tensor_parallel.layers import VocabParallelEmbedding
            self.emb = VocabParallelEmbedding(V, D, init_method=lambda shape: table, config=config)
        self.head = nn.Dense(D, O)
        self.head.weight.set_data(Tensor(job["head.weight"]))
        self.head.bias.set_data(Tensor(job["head.bias"]))
        self.mcore = kind == "mcore"

    def construct(self, ids):
        h = self.emb(ids)
        if self.mcore:      # as LanguageModelEmbedding does: the Morph declares the ids' dtype for its output
            h = ops.cast(h, ms.float32)
        return self.head(h)


@pytest.fixture
def cell_kind(request, mode):
    """(kind, a factory of EmbedNet for it); the mcore one in graph mode under MindFormers' mcore context."""
    kind = request.param
    if kind != "mcore":
        yield kind, lambda job: EmbedNet(job, kind)
        return
    if mode != 0:
        pytest.skip("MindFormers' mcore layers run in graph mode only (Morph)")
    from tests.mcore_cpu import mcore_context, restore_legacy_context, tiny_qwen3
    mcore_context()
    config = tiny_qwen3(keep_embedding=True).model.config
    try:
        yield kind, lambda job: EmbedNet(job, kind, config)
    finally:
        restore_legacy_context()


def _emb_table(net) -> np.ndarray:
    return pet_hooks.tuners.lora.tuner.base_weight(net.emb).asnumpy()


def _set_ab(cell, a, b) -> None:
    cell.lora_A.set_data(Tensor(a))
    cell.lora_B.set_data(Tensor(b))


def _run_reference(work) -> dict:
    out = run_reference([os.path.join(HERE, "peft_reference_embedding.py"), str(work)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(np.load(work / "torch.npz"))


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's numbers for the cell of _job() (one torch process); pet_hooks' adapter of it written first."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("embedding")
    job = _job()
    np.savez(work / "job.npz", **job)
    before = ms.get_context("mode")
    ms.set_context(mode=1)                       # writing an adapter compiles nothing
    rng = np.random.default_rng(2)
    cell = pet_hooks.apply(EmbedNet(job, "nn_pad"), {**CELL, "target_modules": ".*emb|.*head"})
    for param in pet_hooks.delta_parameters(cell):
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.5).astype(np.float32)))
    pet_hooks.save_adapter(cell, work / "ours_cell", format="peft", task_type=None)
    ms.set_context(mode=before)
    (work / "job.json").write_text(json.dumps({"cell": True}))
    return work, job, _run_reference(work)


@pytest.fixture(scope="module")
def peft_models(tmp_path_factory):
    """PEFT's logits for the Llamas (untied, tied) and the Qwen3 below, one torch process; our adapters first."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("embedding_models")
    meta = {"llamas": {name: _write_llama(work / name, tied) for name, tied in (("llama", False), ("llama_tied", True))},
            "qwen3": _write_qwen3(work / "qwen3")}
    (work / "job.json").write_text(json.dumps(meta))
    return work, _run_reference(work)


@pytest.mark.parametrize("cell_kind", KINDS, indirect=True)
@NEEDS_TORCH_PEFT
def test_outputs_gradients_and_merge_equal_peft(cell_kind, peft_run, mode):
    kind, build = cell_kind
    _, job, theirs = peft_run
    pad = "pad0" if kind == "nn_pad" else "none"
    net = build(job)
    ids, g = Tensor(job["ids"]), Tensor(job["g"])
    base = net(ids).asnumpy()
    pet_hooks.apply(net, CELL)
    cell = net.emb
    assert type(cell).__name__.startswith("LoraEmbedding_of_")
    assert [(p.name, p.shape) for p in pet_hooks.delta_parameters(net)] == [
        ("emb.lora_embedding_A", (R, V)), ("emb.lora_embedding_B", (D, R))]
    np.testing.assert_array_equal(net(ids).asnumpy(), base)          # A starts at zero
    _set_ab(cell, job["A"], job["B"])
    deltas = pet_hooks.delta_parameters(net)

    def loss(x, grad_out):
        return (net(x) * grad_out).sum()

    _, grads = ms.value_and_grad(loss, None, deltas)(ids, g)
    out = net(ids).asnumpy()
    diffs = {"out": close(out, theirs[f"{pad}.out"]),
             "grad A": close(grads[0].asnumpy(), theirs[f"{pad}.grad.A"]),
             "grad B": close(grads[1].asnumpy(), theirs[f"{pad}.grad.B"])}
    assert np.abs(out - base).max() > 0.1                            # the branch is reached
    if kind == "nn_pad":        # PEFT's F.embedding(padding_idx=0): no gradient to A's padding column
        assert not grads[0].asnumpy()[:, 0].any() and not theirs["pad0.grad.A"][:, 0].any()
    else:
        assert np.abs(theirs["none.grad.A"][:, 0]).max() > 0
    pet_hooks.merge(net)
    diffs["merged W"] = close(_emb_table(net), theirs[f"{pad}.merged"])
    close(net(ids).asnumpy(), out)
    pet_hooks.unmerge(net)
    close(_emb_table(net), theirs[f"{pad}.unmerged"])
    close(_emb_table(net), job["W"])
    print(f"{kind} mode {mode}: max |ours - PEFT| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


@pytest.mark.parametrize("cell_kind", KINDS, indirect=True)
def test_disable_and_remove_give_the_base_back_bit_for_bit(cell_kind, mode, caplog):
    kind, build = cell_kind
    job = _job()
    net = build(job)
    net.emb.get_parameters().__next__().requires_grad = False        # the user's own flag, to be kept
    ids = Tensor(job["ids"])
    base = net(ids).asnumpy()
    classes = {path: type(c) for path, c in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.apply(net, {**CELL, "lora_dropout": 0.3})
    assert "not applied on the embedding(s) emb (as in PEFT)" in caplog.text
    assert net.emb.lora_dropout is None                               # PEFT never calls its embedding dropout
    _set_ab(net.emb, job["A"], job["B"])
    net.set_train(True)                                               # no dropout even in training
    adapted = net(ids).asnumpy()
    np.testing.assert_array_equal(net(ids).asnumpy(), adapted)
    net.set_train(False)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(ids).asnumpy(), base)
    np.testing.assert_array_equal(net(ids).asnumpy(), adapted)
    assert [p.name for p in net.trainable_params()] == ["emb.lora_embedding_A", "emb.lora_embedding_B"]
    pet_hooks.remove(net)
    assert {path: type(c) for path, c in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert_params_equal(values, net)
    assert [p.name for p in net.get_parameters()] == list(values)
    assert not any(hasattr(net.emb, attr) for attr in ("lora_A", "pet_lora_gather", "pet_lora_scale"))
    np.testing.assert_array_equal(net(ids).asnumpy(), base)


@NEEDS_TORCH_PEFT
def test_init_is_peft_s_whatever_lora_a_init_says(peft_run):
    """A zeros and B ~ N(0, 1) (PEFT's, loralib's); lora_a_init (a linear layer's random A) does not change it."""
    _, _, theirs = peft_run
    assert not theirs["init.A"].any() and abs(theirs["init.B"].std() - 1) < 0.1
    def big(**extra):               # PEFT's 50 x 64 embedding, r=8
        net = nn.SequentialCell([nn.Embedding(50, 64)])
        return pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 8, "target_modules": "0",
                                     "seed": 0, **extra})[0]

    for extra in ({}, {"lora_a_init": "normal"}, {"init_lora_weights": "gaussian"}):
        cell = big(**extra)
        assert not cell.lora_A.asnumpy().any(), extra
        assert cell.lora_B.shape == theirs["init.B"].shape
        assert abs(cell.lora_B.asnumpy().std() - theirs["init.B"].std()) < 0.1, extra
        assert abs(cell.lora_B.asnumpy().mean()) < 0.1
    cell = big(init_lora_weights=False)
    assert abs(cell.lora_A.asnumpy().std() - theirs["init_false.A"].std()) < 0.1   # both N(0, 1)


@NEEDS_TORCH_PEFT
def test_peft_reads_our_cell_adapter_and_we_read_peft_s(peft_run, mode, tmp_path):
    work, job, theirs = peft_run
    ids = Tensor(job["ids"])
    doc = json.loads((work / "ours_cell" / "adapter_config.json").read_text())
    assert doc["target_modules"] == ["emb", "head"]
    from safetensors.numpy import load_file
    assert sorted(load_file(str(work / "ours_cell" / "adapter_model.safetensors"))) == [
        "base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
        "base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"]
    ours = pet_hooks.load_adapter(EmbedNet(job, "nn_pad"), work / "ours_cell")     # both layouts in one file
    close(ours(ids).asnumpy(), theirs["ours_cell.out"])
    pet_hooks.save_adapter(ours, tmp_path / "native")                          # and our own format
    again = pet_hooks.load_adapter(EmbedNet(job, "nn_pad"), tmp_path / "native")
    close(again(ids).asnumpy(), theirs["ours_cell.out"])
    fresh = pet_hooks.load_adapter(EmbedNet(job, "nn_pad"), work / "theirs_cell")
    assert sorted(p.name for p in pet_hooks.delta_parameters(fresh)) == [
        "emb.lora_embedding_A", "emb.lora_embedding_B", "head.lora_A", "head.lora_B"]
    out = fresh(ids).asnumpy()
    close(out, theirs["theirs_cell.out"])
    with pet_hooks.disable_adapters(fresh):
        assert np.abs(fresh(ids).asnumpy() - out).max() > 0.1


def test_lookup_with_an_unreached_embedding_is_reported_by_the_gradient_sentinel(mode, caplog):
    """The sentinel of an embedding is A (zero at init): under weight decay it stays zero when no gradient
    arrives, where B (random at init) would decay and pass for trained."""

    class ReadsTable(nn.Cell):          # reads emb's table, never calls emb
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.used = nn.Embedding(V, D)
            self.head = nn.Dense(D, O)

        def construct(self, ids):
            return self.head(ops.gather(self.emb.embedding_table, ids, 0) + self.used(ids))

    net = pet_hooks.apply(ReadsTable(), {**CELL, "target_modules": "emb|used"})
    guard = GradGuard(net)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()),
                               nn.AdamWeightDecay(net.trainable_params(), 1e-2, weight_decay=0.1))
    ids = Tensor(_job()["ids"])
    target = Tensor(np.ones((2, 7, O), np.float32))
    for _ in range(3):
        step(ids, target)
    assert guard.unmoved() == ["emb"]
    assert np.abs(net.emb.lora_B.asnumpy()).max() > 0             # B decayed: no witness


# ----------------------------------------------------------------------------- several adapters
def _formula(job, table, adapters, rows) -> np.ndarray:
    """NumPy: head(W[ids] + sum over the row's adapters of s * A^T[ids] @ B^T)."""
    ids = job["ids"]
    h = table[ids].astype(np.float64)
    for row, names in enumerate(rows):
        for name in names:
            a, b, s = adapters[name]
            h[row] += s * a.T[ids[row]] @ b.T
    return (h @ job["head.weight"].T + job["head.bias"]).astype(np.float32)


def test_several_adapters_and_mixed_batches_on_an_embedding(mode):
    job = _job()
    net = pet_hooks.apply(EmbedNet(job, "nn"), CELL)
    pet_hooks.add_adapter(net, "b", {**CELL, "lora_rank": 2, "lora_alpha": 8})
    rng = np.random.default_rng(4)
    values = {}
    for name, rank, scaling in (("default", R, 2.0), ("b", 2, 4.0)):
        pet_hooks.set_adapter(net, name)
        a, b = (rng.standard_normal((rank, V)) * 0.5).astype(np.float32), (rng.standard_normal((D, rank)) * 0.5
                                                                            ).astype(np.float32)
        _set_ab(net.emb, a, b)
        values[name] = (a, b, scaling)
    ids, both = Tensor(job["ids"]), [["default", "b"]] * 2
    net.set_train(False)
    for active, rows in (("default", [["default"]] * 2), ("b", [["b"]] * 2), (["default", "b"], both)):
        pet_hooks.set_adapter(net, active)
        close(net(ids).asnumpy(), _formula(job, job["W"], values, rows), str(active))
    with pet_hooks.adapter_per_row(net, ["b", "default"]) as selection:
        close(net(ids).asnumpy(), _formula(job, job["W"], values, [["b"], ["default"]]))
        selection.set(["__base__", "b"])
        close(net(ids).asnumpy(), _formula(job, job["W"], values, [[], ["b"]]))
    pet_hooks.set_adapter(net, "b")
    pet_hooks.delete_adapter(net, "default")
    close(net(ids).asnumpy(), _formula(job, job["W"], values, [["b"]] * 2))


def test_weighted_adapters_of_an_embedding_add_their_deltas(mode):
    """add_weighted_adapter 'cat', and 'svd' at full rank, are exactly sum_i w_i s_i B_i A_i (PEFT's math)."""
    job = _job()
    net = pet_hooks.apply(EmbedNet(job, "nn"), CELL)
    pet_hooks.add_adapter(net, "b", CELL)
    rng = np.random.default_rng(5)
    values = {}
    for name in ("default", "b"):
        pet_hooks.set_adapter(net, name)
        a, b = rng.standard_normal((R, V)).astype(np.float32), rng.standard_normal((D, R)).astype(np.float32)
        _set_ab(net.emb, a, b)
        values[name] = (a, b, 2.0)
    weights = {"default": 0.5, "b": 1.5}
    delta = sum(w * 2.0 * values[n][1] @ values[n][0] for n, w in weights.items())       # [D, V]
    expected = _formula(job, job["W"] + delta.T, {}, [[], []])
    for kind, extra in (("cat", {}), ("svd", {"svd_rank": 2 * R})):
        pet_hooks.add_weighted_adapter(net, list(weights), list(weights.values()), kind, kind, **extra)
        pet_hooks.set_adapter(net, kind)
        assert net.emb.lora_A.shape == (2 * R, V) and net.emb.lora_B.shape == (D, 2 * R)
        close(net(Tensor(job["ids"])).asnumpy(), expected, kind)


@pytest.mark.parametrize("mode", [pytest.param(0, id="graph")], indirect=True)
def test_switching_an_embedding_s_adapters_compiles_nothing(mode):
    """disable, merge / unmerge and set_adapter between adapters of one rank write values only (graph mode)."""
    from tests.conftest import NoCompile as _NoCompile
    job = _job()
    net = pet_hooks.apply(EmbedNet(job, "nn"), CELL)
    pet_hooks.add_adapter(net, "b", {**CELL, "lora_alpha": 3})
    rng = np.random.default_rng(8)
    values = {}
    for name, scaling in (("b", 1.0), ("default", 2.0)):
        pet_hooks.set_adapter(net, name)
        a, b = (rng.standard_normal((R, V)) * 0.5).astype(np.float32), (rng.standard_normal((D, R)) * 0.5
                                                                            ).astype(np.float32)
        _set_ab(net.emb, a, b)
        values[name] = (a, b, scaling)
    net.set_train(False)
    ids = Tensor(job["ids"])
    net(ids)                                                           # compiled: default active
    with _NoCompile(net):
        with pet_hooks.disable_adapters(net):
            close(net(ids).asnumpy(), _formula(job, job["W"], values, [[], []]))
        pet_hooks.merge(net)
        a, b, scaling = values["default"]
        close(_emb_table(net), job["W"] + scaling * (b @ a).T)
        close(net(ids).asnumpy(), _formula(job, job["W"], values, [["default"]] * 2))
        pet_hooks.unmerge(net)
        pet_hooks.set_adapter(net, "b")
        close(net(ids).asnumpy(), _formula(job, job["W"], values, [["b"]] * 2))


# ----------------------------------------------------------------------------- refused
def test_dora_pissa_olora_on_an_embedding_are_refused_naming_the_cell_and_the_option():
    from tests.project.test_bad_input import assert_same_world, world
    for extra, word in (({"use_dora": True}, "DoRA (use_dora: true)"), ({"init_lora_weights": "pissa"}, "'pissa'"),
                        ({"init_lora_weights": "olora"}, "'olora'")):
        net = EmbedNet(_job(), "nn")
        before = world(net)
        with pytest.raises(pet_hooks.UnsupportedCellError, match="cell 'emb' of type Embedding") as err:
            pet_hooks.apply(net, {**CELL, **extra})
        assert word in str(err.value)
        assert_same_world(before, net)


def test_an_embedding_whose_weight_an_mtp_block_reads_is_refused():
    """An mcore model with multi-token prediction hands the MTP block the word embeddings' weight."""

    class Embedding(nn.Cell):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(V, D)

    class Gpt(nn.Cell):             # the attributes of an mcore GPTModel that matter here
        def __init__(self, mtp):
            super().__init__()
            self.embedding = Embedding()
            self.mtp_process = mtp

    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"cell 'embedding\.word_embeddings'.*"
                                                             r"multi-token-prediction"):
        pet_hooks.apply(Gpt(True), {**CELL, "target_modules": ".*word_embeddings"})
    assert has_pet(pet_hooks.apply(Gpt(False), {**CELL, "target_modules": ".*word_embeddings"}))


# ----------------------------------------------------------------------------- a MindFormers Llama
def _llama(tied: bool):
    from mindformers import LlamaConfig, LlamaForCausalLM
    ms.set_seed(0)
    net = LlamaForCausalLM(LlamaConfig(
        num_layers=2, hidden_size=32, num_heads=4, vocab_size=64, seq_length=8, intermediate_size=64,
        use_flash_attention=False, use_past=False, compute_dtype="float32", param_init_type="float32",
        layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
        use_rope_slice=True, fused_rms_norm=False, batch_size=2, tie_word_embeddings=tied))
    rng = np.random.default_rng(3)
    for param in net.get_parameters():
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))
    return net


def _llama_ids() -> np.ndarray:
    # No token 0: MindFormers' pad_token_id, masked out of attention there and not in transformers.
    return np.random.default_rng(9).integers(1, 64, (2, 8)).astype(np.int32)


def _write_llama(folder, tied: bool) -> dict:
    from tests.io.test_peft_format import hf_name
    folder.mkdir()
    net = _llama(tied)
    np.savez(folder / "base.npz", **{hf_name(p.name): p.asnumpy() for p in net.get_parameters()})
    np.save(folder / "ids.npy", _llama_ids())
    pet_hooks.apply(net, LLAMA)
    rng = np.random.default_rng(6)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.2).astype(np.float32)))
    pet_hooks.save_adapter(net, folder / "ours", format="peft", name_map="llama")
    pet_hooks.save_adapter(net, folder / "native")
    config = net.config
    return {**{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                "num_heads", "rms_norm_eps", "theta", "seq_length")}, "tied": tied}


def _llama_logits(net) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(_llama_ids()))[0].asnumpy()


@NEEDS_MINDFORMERS
@NEEDS_TORCH_PEFT
def test_llama_embedding_and_projections_equal_transformers_and_peft_both_ways(peft_models, mode):
    work, theirs = peft_models
    doc = json.loads((work / "llama" / "ours" / "adapter_config.json").read_text())
    assert doc["target_modules"] == ["embed_tokens", "q_proj", "v_proj"]
    for source in ("native", "ours"):                                 # ours in both formats, read by PEFT
        net = pet_hooks.load_adapter(_llama(False), work / "llama" / source)
        assert type(net.model.tok_embeddings).__name__ == "LoraEmbedding_of_LlamaEmbedding"
        ours = _llama_logits(net)
        if source == "native":
            # the base: this net switched off (the base bit for bit: test_disable_and_remove_give_the_base_back_
            # bit_for_bit[llama]; a value switch, no Llama of its own to build and compile)
            with pet_hooks.disable_adapters(net):
                base = _llama_logits(net)
            close(base, theirs["llama.base"], "the same model to begin with", 1e-4)
        assert np.abs(ours - base).max() > 1e-2
        close(ours, theirs["llama.ours"], source, 1e-4)
    pet_hooks.merge(net)                                              # untied: merging is allowed
    close(_llama_logits(net), theirs["llama.ours"], "merged", 1e-4)
    pet_hooks.unmerge(net)

    from safetensors.numpy import load_file                          # PEFT's own adapter, with its table copy
    keys = load_file(str(work / "theirs_llama" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    fresh = pet_hooks.load_adapter(_llama(False), work / "theirs_llama")
    assert sorted({p.name.rsplit(".", 1)[-1] for p in pet_hooks.delta_parameters(fresh)}) == [
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"]
    got = _llama_logits(fresh)
    assert np.abs(got - base).max() > 1e-2
    close(got, theirs["llama.theirs"], "theirs", 1e-4)


@NEEDS_MINDFORMERS
@NEEDS_TORCH_PEFT
def test_a_tied_embedding_changes_the_lookup_only_as_in_peft_and_merge_is_refused(peft_models, mode, tmp_path):
    from tests.project.test_bad_input import assert_same_world, world
    work, theirs = peft_models
    net = _llama(True)
    table = net.model.tok_embeddings.embedding_weight
    assert net.lm_head.weight is table
    close(_llama_logits(net), theirs["llama_tied.base"], "the same model to begin with", 1e-4)
    pet_hooks.load_adapter(net, work / "llama_tied" / "native")
    values = table.asnumpy().copy()
    ours = _llama_logits(net)
    close(ours, theirs["llama_tied.ours"], "PEFT on the tied transformers model", 1e-4)
    assert np.abs(ours - theirs["llama_tied.base"]).max() > 1e-2
    assert net.lm_head.weight is table
    np.testing.assert_array_equal(table.asnumpy(), values)          # the head's weight is the base table

    for call in (lambda: pet_hooks.merge(net),
                 lambda: pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))):
        before = world(net)
        with pytest.raises(pet_hooks.PetStateError, match=r"the LoRA of 'model\.tok_embeddings'.*"
                                                          r"model\.tok_embeddings\.embedding_weight.*tied to 'lm_head'"):
            call()
        assert_same_world(before, net)
    assert not (tmp_path / "merged.ckpt").exists()
    with pet_hooks.disable_adapters(net):
        close(_llama_logits(net), theirs["llama_tied.base"], "disabled", 1e-4)
    report = inspect_net(_llama(True), LLAMA)
    assert {row["path"]: row["tied_to"] for row in report["matched"]}["model.tok_embeddings"] == "lm_head"


# ----------------------------------------------------------------------------- MindFormers' mcore Qwen3
def _qwen3(hf: dict, **overrides):
    """The tiny mcore Qwen3 with MindFormers' own VocabParallelEmbedding, holding ``hf``'s weights (MindFormers'
    converter); MindFormers' mcore context must be set."""
    from tests.mcore_cpu import tiny_qwen3
    net = tiny_qwen3(keep_embedding=True, **overrides)
    converted = net.convert_weight_dict(dict(hf), qkv_dict={}, condition=threading.Condition())
    params = {p.name: p for p in net.get_parameters()}
    for name, value in converted.items():
        params[name].set_data(Tensor(np.asarray(value, np.float32)))
    return net


def _qwen3_ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 97, (2, 8)).astype(np.int32)


def _qwen3_logits(net) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(_qwen3_ids())).asnumpy().reshape(2, 8, 97)


def _write_qwen3(folder) -> dict:
    from tests.mcore_cpu import TINY, mcore_context, restore_legacy_context
    from tests.models.test_mcore_peft import hf_weights
    folder.mkdir()
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    mcore_context()
    try:
        hf = hf_weights()
        np.savez(folder / "base.npz", **hf)
        np.save(folder / "ids.npy", _qwen3_ids())
        net = pet_hooks.apply(_qwen3(hf), QWEN3_PUBLISHED)
        rng = np.random.default_rng(1)
        for param in pet_hooks.delta_parameters(net):
            param.set_data(Tensor((rng.standard_normal(param.shape) * 0.2).astype(np.float32)))
        pet_hooks.save_adapter(net, folder / "ours", format="peft", name_map="qwen3")
        pet_hooks.save_adapter(net, folder / "native")
        spec = {"vocab_size": 97, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                "num_kv_heads": 2, "head_dim": 8, "rms_norm_eps": TINY["rms_norm_eps"],
                "rope_theta": float(net.config.rope_theta), "max_position_embeddings": TINY["max_position_embeddings"]}
    finally:
        restore_legacy_context()
        ms.set_context(mode=before)
    return spec




@NEEDS_MINDFORMERS
def test_mindformers_published_qwen3_block_applies_and_trains_the_real_vocab_parallel_embedding(mcore_graph, caplog):
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import VocabParallelEmbedding
    from tests.mcore_cpu import adam_losses
    from tests.models.test_mcore_peft import hf_weights
    net = _qwen3(hf_weights())
    embedding = net.model.embedding.word_embeddings
    assert type(embedding) is VocabParallelEmbedding                  # MindFormers' own class, no stand-in
    ids = Tensor(_qwen3_ids())
    base = _qwen3_logits(net)
    values, classes = snapshot(net), {path: type(c) for path, c in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.apply(net, QWEN3_PUBLISHED)
    assert "not applied on the embedding(s) model.embedding.word_embeddings" in caplog.text
    assert isinstance(embedding, VocabParallelEmbedding) and type(embedding).__name__ == \
        "LoraEmbedding_of_VocabParallelEmbedding"
    trainable = [p.name for p in net.trainable_params()]
    assert trainable[:2] == ["model.embedding.word_embeddings.lora_embedding_A",
                             "model.embedding.word_embeddings.lora_embedding_B"]
    assert len(trainable) == 2 + 2 * 4 * 2 and all(".lora_" in name for name in trainable)
    assert embedding.lora_A.shape == (8, 97) and embedding.lora_B.shape == (32, 8)
    np.testing.assert_array_equal(_qwen3_logits(net), base)          # every delta that starts at zero does
    losses = adam_losses(net, ids, 1e-2, steps=4)
    assert losses[-1] < losses[0], losses
    assert np.abs(embedding.lora_A.asnumpy()).max() > 0                # the embedding's delta trained
    assert_params_equal(values, net)                                   # the base did not move
    pet_hooks.remove(net)
    assert {path: type(c) for path, c in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    np.testing.assert_array_equal(_qwen3_logits(net), base)


@NEEDS_MINDFORMERS
@NEEDS_TORCH_PEFT
def test_the_published_qwen3_adapter_gives_transformers_and_peft_logits(peft_models, mcore_graph):
    from tests.models.test_mcore_peft import hf_weights
    work, theirs = peft_models
    doc = json.loads((work / "qwen3" / "ours" / "adapter_config.json").read_text())
    assert "embed_tokens" in doc["target_modules"]
    scale = np.abs(theirs["qwen3.base"]).max()
    tol = 2e-3 * scale                                 # float16 q/k/v in MindFormers' attention (test_mcore_peft)
    base = _qwen3_logits(_qwen3(hf_weights()))
    np.testing.assert_allclose(base, theirs["qwen3.base"], atol=tol)
    for source in ("native", "ours"):
        net = pet_hooks.load_adapter(_qwen3(hf_weights()), work / "qwen3" / source, name_map=None if
                                     source == "native" else "qwen3")
        assert get_state(net).config.lora_rank == 8
        ours = _qwen3_logits(net)
        assert np.abs(ours - base).max() > 20 * tol
        np.testing.assert_allclose(ours, theirs["qwen3.ours"], atol=tol, err_msg=source)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(_qwen3_logits(net), base)


@NEEDS_MINDFORMERS
def test_a_qwen3_embedding_shared_with_the_output_layer_refuses_merge(mcore_graph):
    from tests.mcore_cpu import tiny_qwen3
    from tests.project.test_bad_input import assert_same_world, world
    net = pet_hooks.apply(tiny_qwen3(keep_embedding=True, tie_word_embeddings=True),
                          {**QWEN3_PUBLISHED, "lora_dropout": 0.0})
    assert net.model.output_layer.skip_weight_param_allocation        # no weight of its own: given the table
    before = world(net)
    with pytest.raises(pet_hooks.PetStateError, match=r"'model\.embedding\.word_embeddings'.*tied to "
                                                      r"'model\.output_layer'"):
        pet_hooks.merge(net)
    assert_same_world(before, net)


@NEEDS_MINDFORMERS
def test_the_embedding_classes_have_what_lora_reads(mcore_graph):
    """Guard of pet_hooks/utils/internals.py 'embedding_attributes'."""
    from mindformers.models.llama.llama_layer import LlamaEmbedding
    from tests.mcore_cpu import tiny_qwen3
    plain = nn.Embedding(V, D, padding_idx=2)
    assert plain.embedding_table.shape == (V, D) and plain.padding_idx == 2 and isinstance(plain.gather, ops.Gather)
    llama = LlamaEmbedding(V, D)
    assert llama.embedding_weight.shape == (V, D) and isinstance(llama.gather, ops.Gather)
    model = tiny_qwen3(keep_embedding=True).model
    mcore = model.embedding.word_embeddings
    assert mcore.weight.shape == (97, 32) and mcore.sequence_parallel is False
    assert (mcore.config.data_parallel_size, mcore.config.context_parallel_size) == (1, 1)
    assert model.share_embeddings_and_output_weights is False and model.mtp_process is False
