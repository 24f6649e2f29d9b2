"""The PyTorch side of tests/tuners/test_lycoris.py (LoHa, LoKr), run in its own process (torch and MindSpore apart).

    python tests/lycoris_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz`` (the three-layer net of tests/ia3_reference.py: ``k`` 6 -> 10, ``v`` 10 -> 8,
``down`` 8 -> 4, relu between; the input ``x``, the upstream gradient ``g``) and ``WORK_DIR/variants.json``
(name -> PEFT config fields, ``peft_type`` LOHA or LOKR). For each variant the job holds pet_hooks'
factors as ``<variant>/<layer>.<factor>``. Builds the net with PEFT's own LoHaConfig / LoKrConfig, checks that
PEFT made exactly these factors with these shapes, sets them, and writes ``WORK_DIR/torch.npz``:

- ``<variant>/out``: the output; ``<variant>/grad/<layer>.<factor>``: the gradient of ``sum(out * g)``;
- ``<variant>/ours``: the output with pet_hooks' PEFT-format adapter ``WORK_DIR/<variant>_ours`` loaded by
  ``peft.PeftModel.from_pretrained``;
- ``<variant>/merged/<layer>.weight``: the base weights after ``merge_and_unload``;
- ``<variant>/init``: the output right after ``get_peft_model`` with PEFT's default init (the base's);
- and saves PEFT's adapter to ``WORK_DIR/<variant>_theirs`` (``save_pretrained``) for pet_hooks to read.
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model

# the three-layer net and its weights, as the IA3 reference builds them (run from tests/, the script's folder)
from ia3_reference import LAYERS, base_net  # noqa: E402

CONFIGS = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}


def run(work, job, name, fields, result):
    fields = dict(fields)
    config = CONFIGS[fields.pop("peft_type")](target_modules=list(LAYERS), **fields)
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    with torch.no_grad():
        result[f"{name}/init"] = get_peft_model(base_net(job), config).eval()(x).numpy()

    model = get_peft_model(base_net(job), config).eval()       # eval: rank/module dropout off
    ours = {key.split("/", 1)[1]: value for key, value in job.items() if key.startswith(f"{name}/")}
    params = {}
    for key, param in model.named_parameters():
        if ".hada_" in key or ".lokr_" in key:
            short = key.replace("base_model.model.", "").replace(".default", "")
            params[short] = param
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    expected = {k: tuple(v.shape) for k, v in ours.items()}
    assert shapes == expected, f"{name}: PEFT made {shapes}, pet_hooks {expected}"
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(torch.tensor(ours[key]))
    out = model(x)
    (out * g).sum().backward()
    result[f"{name}/out"] = out.detach().numpy()
    for key, param in params.items():
        result[f"{name}/grad/{key}"] = param.grad.numpy()
    model.save_pretrained(os.path.join(work, f"{name}_theirs"))
    merged = model.merge_and_unload()
    for layer in LAYERS:
        result[f"{name}/merged/{layer}.weight"] = getattr(merged, layer).weight.detach().numpy()

    loaded = PeftModel.from_pretrained(base_net(job), os.path.join(work, f"{name}_ours")).eval()
    with torch.no_grad():
        result[f"{name}/ours"] = loaded(x).numpy()


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    with open(os.path.join(work, "variants.json")) as fh:
        variants = json.load(fh)
    result = {}
    for name, fields in variants.items():
        run(work, job, name, fields, result)
    np.savez(os.path.join(work, "torch.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
