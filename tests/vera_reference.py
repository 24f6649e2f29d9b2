"""The PyTorch side of tests/tuners/test_vera.py (VeRA), run in its own process (torch and MindSpore apart).

    python tests/vera_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz``: the three-layer net of tests/ia3_reference.py (``k`` 6 -> 10, ``v`` 10 -> 8,
``down`` 8 -> 4, relu between; torch ``Linear`` weights [out, in]), the input ``x``, the upstream gradient ``g``,
``r``, and pet_hooks' adapter: the shared ``vera_A`` / ``vera_B`` and ``<layer>.vera_lambda_b`` / ``.vera_lambda_d``.
Builds the net with PEFT's own ``VeraConfig(r)`` on k, v and down, checks that PEFT made the same shapes (one
shared pair sized by the largest layer), sets pet_hooks' values, and writes ``WORK_DIR/torch.npz``:

- ``counts``: PEFT's (trainable, all) parameter counts; ``out``: the output; ``grad/<layer>.vera_lambda_b`` / ``_d``: the gradients of ``sum(out * g)``;
- ``merged/<layer>.weight``: the base weights after ``merge_and_unload``;
- ``init``: the output right after ``get_peft_model`` with PEFT's default init (the base's);
- ``ours``: the output with pet_hooks' PEFT-format adapter ``WORK_DIR/ours`` loaded by ``PeftModel.from_pretrained``;
- ``theirs_out``: the output of a second PEFT model with PEFT's OWN projections (``projection_prng_key`` 3) and
  random lambdas, saved to ``WORK_DIR/theirs`` (``save_pretrained``) for pet_hooks to read; its keys in ``keys.txt``;
- ``bare_out``, ``bare/vera_A`` / ``_B``: the same with ``save_projection=False`` (key 5), saved to ``WORK_DIR/bare``
  (the lambdas only: pet_hooks re-derives the projections with torch).
"""
import os
import sys

import numpy as np
import torch
from peft import PeftModel, VeraConfig, get_peft_model

# the three-layer net and its weights, as the IA3 reference builds them (run from tests/, the script's folder)
from ia3_reference import LAYERS, base_net  # noqa: E402


def lambdas(model):
    """``<layer>.vera_lambda_b`` / ``_d`` -> PEFT's parameter."""
    return {key.replace("base_model.model.", "").replace(".default", ""): param
            for key, param in model.named_parameters() if ".vera_lambda_" in key}


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    r = int(job["r"])
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    result = {}
    with torch.no_grad():
        result["init"] = get_peft_model(base_net(job), VeraConfig(r=r, target_modules=list(LAYERS)))(x).numpy()

    model = get_peft_model(base_net(job), VeraConfig(r=r, target_modules=list(LAYERS))).eval()
    vera = model.base_model
    assert tuple(vera.vera_A["default"].shape) == job["vera_A"].shape, (vera.vera_A["default"].shape, job["vera_A"].shape)
    assert tuple(vera.vera_B["default"].shape) == job["vera_B"].shape
    # the layers hold references to the model's pair: one write reaches them all
    assert all(getattr(vera.model, layer).vera_A["default"] is vera.vera_A["default"] for layer in LAYERS)
    params = lambdas(model)
    assert {k: tuple(p.shape) for k, p in params.items()} == {k: job[k].shape for k in params}
    with torch.no_grad():
        vera.vera_A["default"].copy_(torch.tensor(job["vera_A"]))
        vera.vera_B["default"].copy_(torch.tensor(job["vera_B"]))
        for key, param in params.items():
            param.copy_(torch.tensor(job[key]))
    result["counts"] = np.array(model.get_nb_trainable_parameters())      # (trainable, all), PEFT's print
    out = model(x)
    (out * g).sum().backward()
    result["out"] = out.detach().numpy()
    for key, param in params.items():
        result[f"grad/{key}"] = param.grad.numpy()
    merged = model.merge_and_unload()
    for layer in LAYERS:
        result[f"merged/{layer}.weight"] = getattr(merged, layer).weight.detach().numpy()

    loaded = PeftModel.from_pretrained(base_net(job), os.path.join(work, "ours")).eval()
    with torch.no_grad():
        result["ours"] = loaded(x).numpy()

    theirs = get_peft_model(base_net(job), VeraConfig(r=r, target_modules=list(LAYERS), projection_prng_key=3)).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in lambdas(theirs).values():
            param.copy_(torch.randn(param.shape, generator=generator))
        result["theirs_out"] = theirs(x).numpy()
    theirs.save_pretrained(os.path.join(work, "theirs"))
    from safetensors.numpy import load_file
    keys = sorted(load_file(os.path.join(work, "theirs", "adapter_model.safetensors")))
    with open(os.path.join(work, "keys.txt"), "w") as fh:
        fh.write("\n".join(keys))

    # save_projection=False: the file holds the lambdas only, the projections come from the key (5)
    bare = get_peft_model(base_net(job), VeraConfig(r=r, target_modules=list(LAYERS), projection_prng_key=5,
                                                    save_projection=False)).eval()
    with torch.no_grad():
        for param in lambdas(bare).values():
            param.copy_(torch.randn(param.shape, generator=generator))
        result["bare_out"] = bare(x).numpy()
    result["bare/vera_A"] = bare.base_model.vera_A["default"].numpy()
    result["bare/vera_B"] = bare.base_model.vera_B["default"].numpy()
    bare.save_pretrained(os.path.join(work, "bare"))
    np.savez(os.path.join(work, "torch.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
