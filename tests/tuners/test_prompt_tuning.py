"""Prompt tuning against Hugging Face PEFT's own (``PromptTuningConfig``), in graph and PyNative mode.

MindFormers' Llama (tests/nets.tiny_llama, seq_length 8) and transformers' Llama with the same weights: pet_hooks
writes a PEFT-format adapter, PEFT loads it (one torch process for the module, tests/prompt_tuning_reference.py),
and pet_hooks loads it back into a fresh Llama; the logits at the real positions, the loss with PEFT's -100
labels and the prompt's gradient must be PEFT's. PEFT's own TEXT init (a tiny word-level tokenizer written here)
must be ours row for row, and PEFT's saved adapter must give PEFT's logits here. On the sample GPT: the prompted
model is the base model run on the prompt's tokens plus the input (an identity needing no reference), training
through PetCallback keeps the base bit for bit, disable / remove / the native format, enable(), inspect, the
launcher; the refusals; MindFormers' own flow (a run YAML's pet_config under enable()). SmolLM2 with TEXT init
from its own tokenizer against PEFT: tests/models/test_smollm2.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, assert_params_equal, snapshot
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
N = 3                                         # virtual tokens: 3 + 5 ids = tiny_llama's seq_length 8
WORDS = ["<s>", "review", "movie", "good"]    # the tiny tokenizer's vocabulary: ids 0..3 (+10 below)
TEXT = "review"                               # "<s> review": 2 ids, repeated to 3 as PEFT does


def _tokenizer(directory) -> None:
    """A word-level tokenizer.json adding "<s>" in front (as Llama's), and what AutoTokenizer needs beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {word: 10 + i for i, word in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as out:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}, out)


def _cfg(**changes) -> dict:
    return {"pet_type": "prompt_tuning", "num_virtual_tokens": N, **changes}


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    if not (HAS_TORCH_PEFT and HAS_MINDFORMERS):
        pytest.skip("torch, transformers, peft and mindformers are needed")
    from tests.io.test_peft_format import llama_ids, llama_with_weights, write_reference_job
    work = tmp_path_factory.mktemp("prompt_tuning")
    net = llama_with_weights()
    ids = llama_ids(2)[:, :8 - N]                                 # eval: n + 5 = seq_length
    write_reference_job(net, ids, work)
    np.save(work / "train_ids.npy", llama_ids(4)[:, :8 - N + 1])  # training: MindFormers drops the last id
    np.save(work / "n.npy", np.array(N))
    (work / "text.txt").write_text(TEXT)
    _tokenizer(work / "tokenizer")
    pet_hooks.apply(net, _cfg(seed=4))                            # RANDOM: standard normal rows
    pet_hooks.save_adapter(net, work / "ours", format="peft")
    out = run_reference([os.path.join(HERE, "prompt_tuning_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, dict(np.load(work / "torch.npz"))


def _eval_logits(net, ids) -> np.ndarray:
    net.set_train(False)
    return net(Tensor(ids))[0].asnumpy()


def test_llama_logits_loss_and_prompt_gradient_equal_peft(mode, peft_run):
    """Our PEFT file read back here: the logits at the real positions, PEFT's loss (the last virtual position
    predicts the first token; the others carry -100) and the prompt's gradient, as PEFT computes them."""
    from tests.io.test_peft_format import llama_with_weights
    work, torch_out = peft_run
    ids = np.load(work / "ids.npy")
    net = llama_with_weights()
    whole = np.concatenate([ids, ids[:, :N]], 1)                                 # seq_length ids for the base
    base = _eval_logits(net, whole)[:, :8 - N]
    pet_hooks.load_adapter(net, work / "ours")
    ours = _eval_logits(net, ids)
    assert ours.shape == (2, 8 - N, 64) and np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, torch_out["logits"][:, N:], rtol=1e-4, atol=1e-5)

    prompt = pet_hooks.delta_parameters(net)
    assert [p.name for p in prompt] == ["prompt_embeddings"]
    net.set_train(True)
    loss, grads = ms.value_and_grad(net, None, prompt)(Tensor(np.load(work / "train_ids.npy")))
    np.testing.assert_allclose(loss.asnumpy(), torch_out["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[0].asnumpy(), torch_out["grad"], rtol=1e-4, atol=1e-6)
    with pet_hooks.disable_adapters(net):                 # a structural switch: graph mode recompiles
        np.testing.assert_allclose(_eval_logits(net, whole)[:, :8 - N], base, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_eval_logits(net, ids), ours, rtol=1e-6, atol=1e-6)


def test_text_init_and_peft_s_own_adapter(peft_run, tmp_path):
    """TEXT init: the embedding rows of the tokenized text, repeated to n, exactly PEFT's; the native format loads
    without the tokenizer; PEFT's saved adapter (PROMPT_TUNING, ``prompt_embeddings`` alone) gives PEFT's logits here,
    also in MindFormers' predict mode; remove restores the Llama bit for bit. (PyNative: the default mode.)"""
    from tests.io.test_peft_format import llama_with_weights
    work, torch_out = peft_run
    net = llama_with_weights()
    before = snapshot(net)
    table = net.model.tok_embeddings.embedding_weight.asnumpy()
    shutil.copytree(work / "tokenizer", tmp_path / "tokenizer")
    pet_hooks.apply(net, _cfg(prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT,
                              tokenizer_name_or_path=str(tmp_path / "tokenizer")))
    prompt = pet_hooks.delta_parameters(net)[0].asnumpy()
    np.testing.assert_array_equal(prompt, table[[10, 11, 10]])             # "<s> review" repeated, cut to 3
    np.testing.assert_array_equal(prompt, torch_out["text_prompt"])
    pet_hooks.save_adapter(net, tmp_path / "native")
    shutil.rmtree(tmp_path / "tokenizer")             # loading needs no tokenizer: the values come from the file
    loaded = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "native")
    np.testing.assert_array_equal(pet_hooks.delta_parameters(loaded)[0].asnumpy(), prompt)
    pet_hooks.remove(net)
    assert_params_equal(before, net) and type(net).__name__ == "LlamaForCausalLM"
    assert sorted(p.name for p in net.get_parameters()) == sorted(before)

    theirs = pet_hooks.load_adapter(llama_with_weights(), work / "theirs")
    assert get_state(theirs).config.num_virtual_tokens == N
    np.testing.assert_allclose(_eval_logits(theirs, np.load(work / "ids.npy")), torch_out["theirs_logits"][:, N:],
                               rtol=1e-4, atol=1e-5)
    theirs.predict_run_mode = True                   # MindFormers' predict mode: 2-D logits, the prompt's rows cut too
    np.testing.assert_allclose(theirs(Tensor(np.load(work / "ids.npy"))).asnumpy(),
                               torch_out["theirs_logits"][:, N:].reshape(-1, 64), rtol=1e-4, atol=1e-5)
    # and a PEFT file written by us again is PEFT's layout: one key, the config PEFT reads (checked by torch above)
    pet_hooks.save_adapter(theirs, tmp_path / "again", format="peft")
    doc = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "PROMPT_TUNING" and doc["num_virtual_tokens"] == N and "target_modules" not in doc


# ----------------------------------------------------------------------------- the sample GPT
GPT = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, seq_length=12)
GPT_CFG = _cfg(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB", seed=3)


def _gpt():
    from samples.tiny_gpt import build
    return build(seed=0, **GPT)


def _batches(steps=2):
    rng = np.random.default_rng(1)
    data = [(rng.integers(0, 32, (4, 8)).astype(np.int32),) * 2 for _ in range(steps)]
    return ds.GeneratorDataset(data, ["ids", "labels"], shuffle=False)


@pytest.mark.parametrize("mode", [1], indirect=True, ids=["pynative"])
def test_sample_gpt_through_petcallback_disable_native_format_remove(mode, tmp_path):
    """PyNative (graph mode: the Llama above runs forward, gradient and disable compiled). The prompted GPT on x is the base GPT on (prompt tokens, x) at x's positions when the prompt is those tokens'
    embedding rows (SAMPLE_VOCAB: rows of random ids); PetCallback trains the prompt alone (the base bit for bit);
    the native format; disable gives the base; remove restores the class and every parameter."""
    from samples.tiny_gpt import LMLoss
    net = _gpt()
    before = snapshot(net)
    x = Tensor(np.random.default_rng(2).integers(0, 32, (2, 8)).astype(np.int32))
    base = net(x).asnumpy()
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    model.train(1, _batches(), callbacks=[pet_hooks.PetCallback(GPT_CFG, save_dir=str(tmp_path / "adapter"))])
    prompt = pet_hooks.delta_parameters(net)
    assert [p.name for p in model.train_network.optimizer.parameters] == [p.name for p in prompt]
    assert_params_equal(before, net)                                      # the base bit for bit
    table = before["embedding.embedding_table"]
    rows = table[np.random.default_rng(3).integers(0, 32, 4)]             # the init: rows of the seeded ids
    assert np.abs(prompt[0].asnumpy() - rows).max() > 1e-4                # trained

    # the identity: with the prompt set to the rows of ids p, net(x) is the base net on (p, x) at x's positions
    fresh = pet_hooks.load_adapter(_gpt(), tmp_path / "adapter")          # the native format, saved at train end
    np.testing.assert_allclose(fresh(x).asnumpy(), net(x).asnumpy(), rtol=1e-6, atol=1e-6)
    p = np.array([[5, 9, 9, 2]], np.int32)
    pet_hooks.delta_parameters(fresh)[0].set_data(Tensor(table[p[0]]))
    with pet_hooks.disable_adapters(fresh):
        np.testing.assert_allclose(fresh(x).asnumpy(), base, rtol=1e-6, atol=1e-6)
        whole = fresh(Tensor(np.concatenate([np.repeat(p, 2, 0), x.asnumpy()], 1))).asnumpy()
    np.testing.assert_allclose(fresh(x).asnumpy(), whole[:, 4:], rtol=1e-5, atol=1e-5)
    pet_hooks.remove(fresh)
    assert type(fresh).__name__ == "TinyGPT" and type(fresh.embedding).__name__ == "Embedding"
    assert sorted(p.name for p in fresh.get_parameters()) == sorted(before)
    np.testing.assert_array_equal(fresh(x).asnumpy(), base)


def test_enable_and_inspect():
    """enable() adapts the GPT built inside and its optimizer holds the prompt (SAMPLE_VOCAB's rows); inspect reports
    the two cells (the model and its embedding) and the prompt, and leaves the net as it was."""
    from pet_hooks.cli.inspection import format_report, inspect_net
    with pet_hooks.enable(GPT_CFG):
        net = _gpt()
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
    assert [p.name for p in optimizer.parameters] == ["prompt_embeddings"]
    table = net.embedding.embedding_table.asnumpy()                       # SAMPLE_VOCAB: the rows of seeded ids
    np.testing.assert_array_equal(optimizer.parameters[0].asnumpy(), table[np.random.default_rng(3).integers(0, 32, 4)])
    plain = _gpt()
    report = inspect_net(plain, GPT_CFG)
    assert report["error"] is None and [row["path"] for row in report["matched"]] == ["", "embedding"]
    assert report["shared"] == [{"name": "prompt_embeddings", "shape": [4, 16]}]
    assert report["summary"]["text"] == pet_hooks.trainable_summary(net)
    assert "prompt_tuning" in format_report(report) and type(plain).__name__ == "TinyGPT"


def test_models_it_cannot_adapt_are_refused_and_left_as_they_were():
    """No prompt adapter for the class (the mcore models, any net without one), an adapter naming no embedding, a
    MindFormers Llama setting the adapter does not support: one clear error each, the net unchanged."""
    from pet_hooks.errors import PetConfigError, UnsupportedCellError
    from tests.nets import TwoDense

    class NoEmbedding(TwoDense):
        pass

    class NoEmbeddingPrompt(pet_hooks.PromptModel):
        @staticmethod
        def embedding_path(cell):
            return "embedding"

        def construct(self, x):
            return self.pet_base_construct(x)

    net = NoEmbedding()
    before = snapshot(net)
    with pytest.raises(PetConfigError, match="NoEmbedding has no model cell prompt tuning knows.*register_prompt_model"):
        pet_hooks.apply(net, _cfg())
    pet_hooks.register_prompt_model(NoEmbedding, NoEmbeddingPrompt)
    with pytest.raises(UnsupportedCellError, match="NoEmbedding has no input embedding cell 'embedding'"):
        pet_hooks.apply(net, _cfg())
    with pytest.raises(TypeError, match="subclass of pet_hooks.PromptModel"):
        pet_hooks.register_prompt_model(NoEmbedding, TwoDense)
    assert type(net) is NoEmbedding and get_state(net) is None
    assert_params_equal(before, net)
    pet_hooks.unregister_prompt_model(NoEmbedding)                  # forgotten: the first refusal again
    with pytest.raises(PetConfigError, match="NoEmbedding has no model cell prompt tuning knows"):
        pet_hooks.apply(net, _cfg())
    with pytest.raises(KeyError, match="unregister_prompt_model: .*NoEmbedding.* was not registered"):
        pet_hooks.unregister_prompt_model(NoEmbedding)
    if HAS_MINDFORMERS:
        from tests.nets import tiny_llama
        llama = tiny_llama()
        llama.input_sliced_sig = True
        with pytest.raises(UnsupportedCellError, match="input_sliced_sig=True"):
            pet_hooks.apply(llama, _cfg())
        assert type(llama).__name__ == "LlamaForCausalLM" and get_state(llama) is None


def test_launcher(tmp_path):
    """pet-hooks run on the unmodified sample script (rows of 56 tokens: room for the 8 virtual ones in the GPT's
    64 positions), graph mode: the saved adapter is a trained prompt that loads into a fresh GPT."""
    import yaml
    from samples.tiny_gpt import build
    from tests.conftest import ROOT
    path = tmp_path / "pet.yaml"
    path.write_text(yaml.safe_dump(_cfg(num_virtual_tokens=8, seed=0)))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(path), "--save-dir",
                          str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"), "--steps", "2",
                          "--mode", "0", "--data-length", "56"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    net = pet_hooks.load_adapter(build(seed=0), tmp_path / "adapter")
    assert get_state(net).config.num_virtual_tokens == 8
    start = pet_hooks.delta_parameters(pet_hooks.apply(build(seed=0), _cfg(num_virtual_tokens=8, seed=0)))[0]
    assert np.abs(pet_hooks.delta_parameters(net)[0].asnumpy() - start.asnumpy()).max() > 1e-4    # trained


@pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
def test_mindformers_run_yaml_under_enable(tmp_path):
    """MindFormers' own flow: a run YAML whose pet_config is prompt tuning, built by build_network inside enable():
    pet_hooks' prompt tuning on the Llama (MindFormers' own PET leaves a pet_type it does not know alone)."""
    from tests.models.test_mindformers_flow import build_from_yaml, write_run_yaml
    path = write_run_yaml(tmp_path, {"pet_type": "prompt_tuning", "num_virtual_tokens": 2, "seed": 0})
    with pet_hooks.enable():
        net = build_from_yaml(path)
    state = get_state(net)
    assert state.config.num_virtual_tokens == 2 and [i.path for i in state.injections] == ["", "model.tok_embeddings"]
    assert [p.name for p in net.trainable_params()] == ["prompt_embeddings"]
