"""The PyTorch side of tests/surgery/test_trainable_tokens.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_tokens.py WORK_DIR [smollm2]

Reads ``WORK_DIR/job.json`` (a Llama's geometry, ``tied``, the ``indices``) and ``job.npz`` (the base weights
under Hugging Face's names, ``ids``, the upstream gradient ``g``, ``delta``: the trainable rows' values). Builds
``transformers.LlamaForCausalLM`` with those weights (``tie_word_embeddings`` as ``tied``) and PEFT 0.21's
``LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices)`` on it (LoRA's B zero, so the
rows are all that changes), sets the rows, and writes ``WORK_DIR/torch.npz``:

- ``base``: the logits without PEFT; ``out``: with it; ``grad``: the gradient of ``sum(out * g)`` for the rows;
  ``disabled``: inside ``disable_adapter()``; ``head_wrapped``: 1 when PEFT wrapped the tied ``lm_head`` too;
- ``unloaded``: the logits of ``merge_and_unload()``'s model;
- ``ours``: the logits with pet_hooks' adapter ``WORK_DIR/ours`` read by ``PeftModel.from_pretrained``;
- PEFT's own adapter in ``WORK_DIR/theirs`` (``save_pretrained``), ``keys``: its tensor names, sorted.

With ``smollm2``: the same on SmolLM2's first two blocks instead (see :func:`smollm2`).
"""
import copy
import json
import os
import sys
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import TrainableTokensWrapper
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

warnings.simplefilter("ignore")


def build(spec, weights):
    config = LlamaConfig(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                         intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_heads"],
                         rms_norm_eps=spec["rms_norm_eps"], rope_theta=spec["theta"],
                         max_position_embeddings=spec["seq_length"], tie_word_embeddings=spec["tied"])
    model = LlamaForCausalLM(config).eval()
    if spec["tied"]:
        weights = dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"]})
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
    return model


def main(work):
    spec = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    job = dict(np.load(os.path.join(work, "job.npz")))
    weights = {k[len("w."):]: v for k, v in job.items() if k.startswith("w.")}
    ids, g = torch.tensor(job["ids"].astype(np.int64)), torch.tensor(job["g"])
    out = {}
    with torch.no_grad():
        out["base"] = build(spec, weights)(ids).logits.numpy()
    model = get_peft_model(build(spec, weights), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                            trainable_token_indices=spec["indices"]))
    inner = model.base_model.model
    out["head_wrapped"] = np.array(int(isinstance(inner.lm_head, TrainableTokensWrapper)))
    delta = inner.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.copy_(torch.tensor(job["delta"]))
    logits = model(ids).logits
    (logits * g).sum().backward()
    out["out"] = logits.detach().numpy()
    out["grad"] = delta.grad.numpy()
    with torch.no_grad():
        with model.disable_adapter():
            out["disabled"] = model(ids).logits.numpy()
    model.save_pretrained(os.path.join(work, "theirs"))
    out["keys"] = np.array(sorted(load_file(os.path.join(work, "theirs", "adapter_model.safetensors"))))
    with torch.no_grad():
        out["unloaded"] = model.merge_and_unload()(ids).logits.numpy()
        ours = PeftModel.from_pretrained(build(spec, weights), os.path.join(work, "ours")).eval()
        out["ours"] = ours(ids).logits.numpy()
    np.savez(os.path.join(work, "torch.npz"), **out)


def smollm2(work):
    """SmolLM2's first two blocks (tied) as transformers loads the GGUF: ``smollm2.json`` holds ``ids`` and
    ``indices``. Writes ``smollm2.npz``: ``ours`` (pet_hooks' ``WORK_DIR/smollm2_ours`` read by PEFT),
    ``base``, ``theirs`` (PEFT's own adapter with random rows, saved to ``WORK_DIR/smollm2_theirs``),
    ``head_wrapped``."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from samples import smollm2 as S
    job = json.load(open(os.path.join(work, "smollm2.json"), encoding="utf-8"))
    ids = torch.tensor([job["ids"]])
    out = {}
    # each load dequantizes the whole GGUF and builds the model (about 8 s for two blocks): load once, copy for
    # the two PEFT models (deepcopy keeps the head tied to the embedding)
    base = S.load_reference_transformers(2)
    with torch.no_grad():
        out["base"] = base(input_ids=ids).logits[0].numpy()
        ours = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(work, "smollm2_ours")).eval()
        out["ours"] = ours(input_ids=ids).logits[0].numpy()
        torch.manual_seed(3)
        theirs = get_peft_model(copy.deepcopy(base),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                           trainable_token_indices=job["indices"])).eval()
        out["head_wrapped"] = np.array(int(isinstance(theirs.base_model.model.lm_head, TrainableTokensWrapper)))
        delta = theirs.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
        delta.add_(torch.randn_like(delta) * 0.05)
        out["theirs"] = theirs(input_ids=ids).logits[0].numpy()
        theirs.save_pretrained(os.path.join(work, "smollm2_theirs"))
    np.savez(os.path.join(work, "smollm2.npz"), **out)


if __name__ == "__main__":
    if sys.argv[2:] == ["smollm2"]:
        smollm2(sys.argv[1])
    else:
        main(sys.argv[1])
