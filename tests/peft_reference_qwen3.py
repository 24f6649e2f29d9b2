"""The PyTorch side of tests/models/test_mcore_peft.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_qwen3.py WORK_DIR

Reads ``WORK_DIR/job.json`` (the Qwen3 geometry), ``base.npz`` (Hugging Face names) and
``ids.npy``; builds ``transformers.Qwen3ForCausalLM`` with those weights (float32, eager
attention) and writes:

- ``torch_base.npy``: its logits;
- ``torch_ours.npy``: its logits with the adapter in ``WORK_DIR/ours`` (written by pet_hooks with
  ``name_map="qwen3"``) loaded by ``peft.PeftModel.from_pretrained``;
- ``theirs/``: a LoRA adapter made by PEFT itself on every projection (random A and B, seeded), where
  q/k/v and gate/up share their A (what one LoRA on MindFormers' fused cells is), and
  ``torch_theirs.npy``: the logits with it.
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM


def base_model(job, weights):
    config = Qwen3Config(vocab_size=job["vocab_size"], hidden_size=job["hidden_size"],
                         intermediate_size=job["intermediate_size"], num_hidden_layers=job["num_layers"],
                         num_attention_heads=job["num_heads"], num_key_value_heads=job["num_kv_heads"],
                         head_dim=job["head_dim"], rms_norm_eps=job["rms_norm_eps"], rope_theta=job["rope_theta"],
                         max_position_embeddings=job["max_position_embeddings"], tie_word_embeddings=False,
                         attn_implementation="eager", torch_dtype="float32")
    model = Qwen3ForCausalLM(config).eval()
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
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = get_peft_model(base_model(job, weights), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for layer in theirs.base_model.model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for module in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                           mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                module.lora_B["default"].weight.copy_(torch.randn_like(module.lora_B["default"].weight) * 0.2)
            for lead, followers in ((attention.q_proj, (attention.k_proj, attention.v_proj)),
                                    (mlp.gate_proj, (mlp.up_proj,))):
                for module in followers:        # one A per fused MindFormers cell
                    module.lora_A["default"].weight.copy_(lead.lora_A["default"].weight)
    theirs.eval()
    theirs.save_pretrained(os.path.join(work, "theirs"))
    np.save(os.path.join(work, "torch_theirs.npy"), logits(theirs, ids))


if __name__ == "__main__":
    main(sys.argv[1])
