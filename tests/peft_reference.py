"""The PyTorch side of tests/io/test_peft_format.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference.py WORK_DIR

Reads ``WORK_DIR/job.json`` (the Llama geometry), ``base.npz`` (Hugging Face names) and
``ids.npy``; builds ``transformers.LlamaForCausalLM`` with those weights and writes:

- ``torch_base.npy``: its logits;
- ``torch_ours.npy``: its logits with the adapter in ``WORK_DIR/ours`` (written by pet_hooks)
  loaded by ``peft.PeftModel.from_pretrained``;
- ``theirs/``: a LoRA adapter made by PEFT itself (q_proj and v_proj, random A and B, seeded),
  and ``torch_theirs.npy``: the logits with it. ``WORK_DIR/theirs_fields.json``, when there, holds more
  ``LoraConfig`` fields for it (``rank_pattern`` / ``alpha_pattern``: tests/io/test_peft_patterns.py).
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def base_model(job, weights):
    config = LlamaConfig(vocab_size=job["vocab_size"], hidden_size=job["hidden_size"],
                         intermediate_size=job["intermediate_size"], num_hidden_layers=job["num_layers"],
                         num_attention_heads=job["num_heads"], num_key_value_heads=job["num_heads"],
                         rms_norm_eps=job["rms_norm_eps"], rope_theta=job["theta"],
                         max_position_embeddings=job["seq_length"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids.astype(np.int64))).logits.numpy()


def main(work):
    job = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    weights = dict(np.load(os.path.join(work, "base.npz")))
    ids = np.load(os.path.join(work, "ids.npy"))
    np.save(os.path.join(work, "torch_base.npy"), logits(base_model(job, weights), ids))

    ours = PeftModel.from_pretrained(base_model(job, weights), os.path.join(work, "ours")).eval()
    np.save(os.path.join(work, "torch_ours.npy"), logits(ours, ids))

    torch.manual_seed(7)
    fields_path = os.path.join(work, "theirs_fields.json")
    fields = json.load(open(fields_path, encoding="utf-8")) if os.path.exists(fields_path) else {}
    theirs = get_peft_model(base_model(job, weights), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 lora_dropout=0.0, task_type="CAUSAL_LM", **fields))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give it values so the adapter shows
                param.copy_(torch.randn_like(param) * 0.2)
    theirs.eval()
    theirs.save_pretrained(os.path.join(work, "theirs"))
    np.save(os.path.join(work, "torch_theirs.npy"), logits(theirs, ids))


if __name__ == "__main__":
    main(sys.argv[1])
