"""The PyTorch side of tests/tuners/test_oft.py (OFT), run in its own process (torch and MindSpore apart).

    python tests/oft_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz`` (the three-layer net of tests/ia3_reference.py: ``k`` 6 -> 10, ``v`` 10 -> 8,
``down`` 8 -> 4, relu between; the input ``x``, the upstream gradient ``g``) and ``WORK_DIR/variants.json``
(name -> PEFT OFTConfig fields). For each variant the job holds pet_hooks' ``oft_R`` as
``<variant>/<layer>.oft_R``. Builds the net with PEFT's own OFTConfig, checks that PEFT made ``oft_R`` of
these shapes, sets them, and writes ``WORK_DIR/torch.npz``:

- ``<variant>/out``: the output; ``<variant>/grad/<layer>.oft_R``: the gradient of ``sum(out * g)``;
- ``<variant>/after/<layer>.oft_R``: ``oft_R`` after that forward (COFT writes its projection back);
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
from peft import OFTConfig, PeftModel, get_peft_model

# the three-layer net and its weights, as the IA3 reference builds them (run from tests/, the script's folder)
from ia3_reference import LAYERS, base_net  # noqa: E402


def run(work, job, name, fields, result):
    config = OFTConfig(target_modules=list(LAYERS), **fields)
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    with torch.no_grad():
        result[f"{name}/init"] = get_peft_model(base_net(job), config).eval()(x).numpy()

    model = get_peft_model(base_net(job), config).eval()
    params = {key.replace("base_model.model.", "").replace(".default.weight", ""): param
              for key, param in model.named_parameters() if ".oft_R." in key}
    ours = {key.split("/", 1)[1]: value for key, value in job.items() if key.startswith(f"{name}/")}
    assert {k: tuple(p.shape) for k, p in params.items()} == {k: v.shape for k, v in ours.items()}, \
        f"{name}: PEFT made {[(k, tuple(p.shape)) for k, p in params.items()]}, pet_hooks {ours.keys()}"
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(torch.tensor(ours[key]))
    out = model(x)
    (out * g).sum().backward()
    result[f"{name}/out"] = out.detach().numpy()
    for key, param in params.items():
        result[f"{name}/grad/{key}"] = param.grad.numpy()
        result[f"{name}/after/{key}"] = param.detach().numpy().copy()
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
