"""The PyTorch side of tests/tuners/test_lora_embedding.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_embedding.py WORK_DIR

Reads ``WORK_DIR/job.json`` (what to run) and writes ``torch.npz`` with what PEFT 0.21's own
``lora.Embedding`` gives on the same weights:

- the cell (``job.json["cell"]``, weights in ``job.npz``): an ``nn.Embedding`` (``padding_idx`` None and 0) followed by a plain ``nn.Linear`` head,
  LoRA (r=3, lora_alpha=6) on the embedding with the job's A and B: ``<pad>.out``, the gradients
  ``<pad>.grad.A`` / ``<pad>.grad.B`` of ``sum(out * g)``, ``<pad>.merged`` / ``<pad>.unmerged``
  (merge_adapter / unmerge_adapter); ``init.A`` / ``init.B``: what PEFT initialises on a 50 x 64
  embedding (r=8), ``init_false.A`` for ``init_lora_weights=False``;
  ``ours_cell.out``: pet_hooks' PEFT-format adapter of the cell (``WORK_DIR/ours_cell``) read by
  ``PeftModel.from_pretrained``; ``theirs_cell/``: PEFT's own adapter of the cell (embedding and head)
  with random values, and ``theirs_cell.out``;
- per Llama in ``job.json["llamas"]`` (``llama`` untied, ``llama_tied`` with ``tie_word_embeddings``):
  ``transformers.LlamaForCausalLM`` with ``WORK_DIR/<name>/base.npz``: ``<name>.base`` and
  ``<name>.ours`` (the logits with ``WORK_DIR/<name>/ours`` read by PEFT); for the untied one also
  ``theirs_llama/`` (PEFT's adapter on embed_tokens, q_proj, v_proj, all values random, written by
  ``save_pretrained``, which adds its copy of the embedding table) and ``llama.theirs``;
- ``qwen3`` (when ``job.json["qwen3"]``): ``transformers.Qwen3ForCausalLM`` with ``WORK_DIR/qwen3/base.npz``,
  ``qwen3.base`` and ``qwen3.ours`` (``WORK_DIR/qwen3/ours``, the published MindFormers block's adapter).
"""
import json
import os
import sys
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

warnings.simplefilter("ignore")     # PEFT warns about tied embeddings and saving the embedding layer


class Cell(torch.nn.Module):
    def __init__(self, job, padding_idx=None):
        super().__init__()
        weight = torch.tensor(job["W"])
        self.emb = torch.nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx)
        self.head = torch.nn.Linear(weight.shape[1], job["head.weight"].shape[0])
        with torch.no_grad():
            self.emb.weight.copy_(weight)
            self.head.weight.copy_(torch.tensor(job["head.weight"]))
            self.head.bias.copy_(torch.tensor(job["head.bias"]))

    def forward(self, ids):
        return self.head(self.emb(ids))


def _cell(work, job, out):
    ids, g = torch.tensor(job["ids"].astype(np.int64)), torch.tensor(job["g"])
    for pad in ("none", "pad0"):
        model = get_peft_model(Cell(job, None if pad == "none" else 0),
                               LoraConfig(r=3, lora_alpha=6, target_modules=["emb"]))
        emb = model.base_model.model.emb
        with torch.no_grad():
            emb.lora_embedding_A["default"].copy_(torch.tensor(job["A"]))
            emb.lora_embedding_B["default"].copy_(torch.tensor(job["B"]))
        y = model(ids)
        (y * g).sum().backward()
        out[f"{pad}.out"] = y.detach().numpy()
        out[f"{pad}.grad.A"] = emb.lora_embedding_A["default"].grad.numpy()
        out[f"{pad}.grad.B"] = emb.lora_embedding_B["default"].grad.numpy()
        model.merge_adapter()
        out[f"{pad}.merged"] = emb.base_layer.weight.detach().numpy().copy()
        model.unmerge_adapter()
        out[f"{pad}.unmerged"] = emb.base_layer.weight.detach().numpy().copy()
    torch.manual_seed(0)
    big = {"W": np.zeros((50, 64), np.float32), "head.weight": np.zeros((2, 64), np.float32),
           "head.bias": np.zeros(2, np.float32)}
    emb = get_peft_model(Cell(big), LoraConfig(r=8, lora_alpha=8, target_modules=["emb"])).base_model.model.emb
    out["init.A"] = emb.lora_embedding_A["default"].detach().numpy()
    out["init.B"] = emb.lora_embedding_B["default"].detach().numpy()
    emb = get_peft_model(Cell(big), LoraConfig(r=8, lora_alpha=8, target_modules=["emb"],
                                               init_lora_weights=False)).base_model.model.emb
    out["init_false.A"] = emb.lora_embedding_A["default"].detach().numpy()

    ours = PeftModel.from_pretrained(Cell(job, 0), os.path.join(work, "ours_cell")).eval()
    with torch.no_grad():
        out["ours_cell.out"] = ours(ids).numpy()
    torch.manual_seed(3)
    theirs = get_peft_model(Cell(job, 0), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "head"]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:         # A of the embedding and B of the head start at zero: give them values
                param.copy_(torch.randn_like(param) * 0.5)
        out["theirs_cell.out"] = theirs.eval()(ids).numpy()
    theirs.save_pretrained(os.path.join(work, "theirs_cell"))


def _llama(spec, weights):
    config = LlamaConfig(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                         intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_heads"],
                         rms_norm_eps=spec["rms_norm_eps"], rope_theta=spec["theta"],
                         max_position_embeddings=spec["seq_length"], tie_word_embeddings=spec["tied"])
    model = LlamaForCausalLM(config).eval()
    if spec["tied"]:                    # one tensor under two names, as the tied model keeps it
        weights = dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"]})
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
    if spec["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _qwen3(spec, weights):
    config = Qwen3Config(vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"],
                         intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
                         num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
                         head_dim=spec["head_dim"], rms_norm_eps=spec["rms_norm_eps"], rope_theta=spec["rope_theta"],
                         max_position_embeddings=spec["max_position_embeddings"], tie_word_embeddings=False,
                         attn_implementation="eager", torch_dtype="float32")
    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in weights.items()}, strict=True)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids.astype(np.int64))).logits.numpy()


def _model(work, name, spec, build, out):
    folder = os.path.join(work, name)
    weights = dict(np.load(os.path.join(folder, "base.npz")))
    ids = np.load(os.path.join(folder, "ids.npy"))
    out[f"{name}.base"] = _logits(build(spec, weights), ids)
    ours = PeftModel.from_pretrained(build(spec, weights), os.path.join(folder, "ours")).eval()
    out[f"{name}.ours"] = _logits(ours, ids)
    if name == "llama":
        torch.manual_seed(5)
        theirs = get_peft_model(build(spec, weights), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["embed_tokens", "q_proj", "v_proj"],
                                                                 task_type="CAUSAL_LM"))
        with torch.no_grad():
            for param_name, param in theirs.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn_like(param) * 0.2)
        theirs.eval()
        out["llama.theirs"] = _logits(theirs, ids)
        theirs.save_pretrained(os.path.join(work, "theirs_llama"))


def main(work):
    meta = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    out = {}
    if meta.get("cell"):
        _cell(work, dict(np.load(os.path.join(work, "job.npz"))), out)
    for name, spec in meta.get("llamas", {}).items():
        _model(work, name, spec, _llama, out)
    if meta.get("qwen3"):
        _model(work, "qwen3", meta["qwen3"], _qwen3, out)
    np.savez(os.path.join(work, "torch.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
