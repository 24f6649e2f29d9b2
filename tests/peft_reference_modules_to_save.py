"""The PyTorch side of tests/surgery/test_modules_to_save.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_modules_to_save.py WORK_DIR [llama]

Reads ``WORK_DIR/job.npz``: the weights of the three-layer net of tests/nets.py (``k``: 6 -> 10, ``v``:
10 -> 8, ``down``: 8 -> 4, torch ``Linear`` [out, in], relu between), the input ``x``, the upstream gradient
``g``, LoRA's ``A.<layer>`` / ``B.<layer>`` for k and v, and ``copy.weight`` / ``copy.bias``, the values of
PEFT's trainable copy of ``down`` (``modules_to_save=["down"]``). Writes ``WORK_DIR/torch.npz``:

- ``out``: PEFT's output; ``grad.<name>``: the gradient of ``sum(out * g)`` for each trainable parameter
  (``A.k``, ``B.k``, ``A.v``, ``B.v``, ``copy.weight``, ``copy.bias``); ``disabled``: the output inside
  ``disable_adapter()``; ``merged``: the output after ``merge_adapter()``; ``unloaded``: the output of
  ``merge_and_unload()``'s model, and ``unloaded.down.weight``: its ``down`` weight;
- ``ours``: the output with pet_hooks' PEFT-format adapter ``WORK_DIR/ours`` read by ``PeftModel.from_pretrained``;
- PEFT's own adapter in ``WORK_DIR/theirs`` (``save_pretrained``), and ``keys``: its tensor names, sorted.

With ``llama``: a tiny Llama through the ``llama`` name map instead (see :func:`llama`).
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file

# the three-layer net and its weights, as the IA3 reference builds them (run from tests/, the script's folder)
from ia3_reference import base_net  # noqa: E402


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    result = {}
    model = get_peft_model(base_net(job), LoraConfig(r=2, lora_alpha=4, target_modules=["k", "v"],
                                                     modules_to_save=["down"]))
    inner = model.base_model.model
    params = {}
    with torch.no_grad():
        for layer in ("k", "v"):
            for ab in ("A", "B"):
                param = getattr(getattr(inner, layer), f"lora_{ab}")["default"].weight
                param.copy_(torch.tensor(job[f"{ab}.{layer}"]))
                params[f"{ab}.{layer}"] = param
        copy = inner.down.modules_to_save["default"]
        for kind in ("weight", "bias"):
            getattr(copy, kind).copy_(torch.tensor(job[f"copy.{kind}"]))
            params[f"copy.{kind}"] = getattr(copy, kind)
    assert all(p.requires_grad for p in params.values())
    assert not inner.down.original_module.weight.requires_grad
    out = model(x)
    (out * g).sum().backward()
    result["out"] = out.detach().numpy()
    for name, param in params.items():
        result[f"grad.{name}"] = param.grad.numpy()
    with torch.no_grad():
        with model.disable_adapter():
            result["disabled"] = model(x).numpy()
        model.merge_adapter()
        result["merged"] = model(x).numpy()
        model.unmerge_adapter()
    model.save_pretrained(os.path.join(work, "theirs"))
    result["keys"] = np.array(sorted(load_file(os.path.join(work, "theirs", "adapter_model.safetensors"))))
    unloaded = model.merge_and_unload()
    with torch.no_grad():
        result["unloaded"] = unloaded(x).numpy()
    result["unloaded.down.weight"] = unloaded.down.weight.detach().numpy()

    ours = PeftModel.from_pretrained(base_net(job), os.path.join(work, "ours")).eval()
    with torch.no_grad():
        result["ours"] = ours(x).numpy()
    np.savez(os.path.join(work, "torch.npz"), **result)


def llama(work):
    """A tiny untied ``transformers`` Llama (``llama.json``: its geometry; ``llama.npz``: ``w.<name>`` weights,
    ``ids``, ``copy``: the values of the copy of ``model.norm``). Writes ``llama_torch.npz``: ``ours`` (pet_hooks'
    ``WORK_DIR/llama_ours``, ``modules_to_save`` of ``model.norm`` and LoRA on q_proj, read by PEFT), ``theirs``
    (PEFT's own LoRA on q_proj with ``modules_to_save=["norm"]``, the copy set to ``copy``, saved to
    ``WORK_DIR/llama_theirs``), ``base``."""
    from peft_reference_tokens import build
    spec = json.load(open(os.path.join(work, "llama.json"), encoding="utf-8"))
    job = dict(np.load(os.path.join(work, "llama.npz")))
    weights = {k[len("w."):]: v for k, v in job.items() if k.startswith("w.")}
    ids = torch.tensor(job["ids"].astype(np.int64))
    out = {}
    with torch.no_grad():
        out["base"] = build(spec, weights)(ids).logits.numpy()
        out["ours"] = PeftModel.from_pretrained(build(spec, weights), os.path.join(work, "llama_ours")).eval()(
            ids).logits.numpy()
        theirs = get_peft_model(build(spec, weights), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                 modules_to_save=["norm"])).eval()
        theirs.base_model.model.model.norm.modules_to_save["default"].weight.copy_(torch.tensor(job["copy"]))
        out["theirs"] = theirs(ids).logits.numpy()
        theirs.save_pretrained(os.path.join(work, "llama_theirs"))
    np.savez(os.path.join(work, "llama_torch.npz"), **out)


if __name__ == "__main__":
    if sys.argv[2:] == ["llama"]:
        llama(sys.argv[1])
    else:
        main(sys.argv[1])
