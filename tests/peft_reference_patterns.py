"""The PyTorch side of tests/tuners/test_lora_patterns.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_patterns.py WORK_DIR

Reads ``WORK_DIR/job.npz`` (the weights of ``k``, ``v``, ``down`` in torch's [out, in] layout, an input
``x``, an upstream gradient ``g``, per config name ``<c>.<layer>.A`` / ``.B``) and ``job.json`` (the
configs: r, lora_alpha, use_rslora, use_dora, rank_pattern, alpha_pattern; the key-matching cases) and writes
``torch.npz`` with, from PEFT 0.21.2 on the same three-layer net, per config ``c``:

- ``c.out``, the gradients ``c.grad.<layer>.A`` / ``.B`` (``.m``: DoRA's magnitude) of ``sum(out * g)``, ``c.merged.<layer>``
  (``merge_adapter``) and ``c.shape.<layer>`` (the rank PEFT gave the layer), ``c.scaling.<layer>``;
- ``c.ours.out``: the output with pet_hooks' PEFT-format adapter ``WORK_DIR/ours_<c>`` read by
  ``PeftModel.from_pretrained``;
- ``theirs_<c>/``: PEFT's own adapter holding the job's values (for pet_hooks to read);
- ``pissa.A0.<layer>`` / ``pissa.B0.<layer>`` / ``pissa.res.<layer>``: PiSSA with the first config's
  patterns; ``pissa_lora.out``: pet_hooks' ``save_as_lora`` of it (``WORK_DIR/ours_pissa_lora``) read by PEFT;

and ``keys.json``: ``get_pattern_key`` of each matching case (``None`` where PEFT falls back to the path).
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key

# the three-layer net of the DoRA reference, and its modules (run from tests/, the script's folder)
from dora_reference import LAYERS, ThreeLayers, _modules  # noqa: E402


def _lora_config(spec, **extra):
    return LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
                      use_dora=spec.get("use_dora", False), target_modules=list(LAYERS),
                      rank_pattern=spec["rank_pattern"], alpha_pattern=spec["alpha_pattern"], **extra)


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    meta = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    out = {}
    for name, spec in meta["configs"].items():
        model = get_peft_model(ThreeLayers(job), _lora_config(spec))
        for layer, module in _modules(model).items():
            out[f"{name}.shape.{layer}"] = np.array(module.lora_A["default"].weight.shape)
            out[f"{name}.scaling.{layer}"] = np.array(module.scaling["default"])
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(torch.tensor(job[f"{name}.{layer}.A"]))
                module.lora_B["default"].weight.copy_(torch.tensor(job[f"{name}.{layer}.B"]))
        y = model(x)
        (y * g).sum().backward()
        out[f"{name}.out"] = y.detach().numpy()
        for layer, module in _modules(model).items():
            out[f"{name}.grad.{layer}.A"] = module.lora_A["default"].weight.grad.numpy()
            out[f"{name}.grad.{layer}.B"] = module.lora_B["default"].weight.grad.numpy()
            if spec.get("use_dora"):
                out[f"{name}.grad.{layer}.m"] = module.lora_magnitude_vector["default"].weight.grad.numpy()
        model.save_pretrained(os.path.join(work, f"theirs_{name}"))
        model.merge_adapter()
        for layer, module in _modules(model).items():
            out[f"{name}.merged.{layer}"] = module.base_layer.weight.detach().numpy().copy()
        ours = PeftModel.from_pretrained(ThreeLayers(job), os.path.join(work, f"ours_{name}"))
        with torch.no_grad():
            out[f"{name}.ours.out"] = ours(x).numpy()

    first = next(iter(meta["configs"].values()))
    model = get_peft_model(ThreeLayers(job), _lora_config(first, init_lora_weights="pissa"))
    for layer, module in _modules(model).items():
        out[f"pissa.A0.{layer}"] = module.lora_A["default"].weight.detach().numpy().copy()
        out[f"pissa.B0.{layer}"] = module.lora_B["default"].weight.detach().numpy().copy()
        out[f"pissa.res.{layer}"] = module.base_layer.weight.detach().numpy().copy()
    converted = PeftModel.from_pretrained(ThreeLayers(job), os.path.join(work, "ours_pissa_lora"))
    with torch.no_grad():
        out["pissa_lora.out"] = converted(x).numpy()
    np.savez(os.path.join(work, "torch.npz"), **out)

    keys = []
    for pattern_keys, path in meta["key_cases"]:
        found = get_pattern_key(pattern_keys, path)
        keys.append(found if found in pattern_keys else None)
    json.dump(keys, open(os.path.join(work, "keys.json"), "w", encoding="utf-8"))


if __name__ == "__main__":
    main(sys.argv[1])
