"""The PyTorch side of tests/tuners/test_dora_init.py, run in its own process (torch and MindSpore apart).

    python tests/dora_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz`` (the weights of ``k``, ``v``, ``down`` in torch's [out, in] layout, an
input ``x``, an upstream gradient ``g`` and DoRA values ``dora.<layer>.A / .B / .m``) and writes
``torch.npz`` with, from PEFT itself on the same three-layer net:

- DoRA (r=2, lora_alpha=8): ``dora.out``, the gradients ``dora.grad.<layer>.A / .B / .m`` of
  ``sum(out * g)``, ``dora.merged.<layer>`` (merge_adapter), ``dora.unmerged.<layer>`` (unmerge_adapter)
  and ``dora.init_m.<layer>`` (the magnitude PEFT initialises);
- per init in pissa, olora: ``<init>.A0.<layer>``, ``<init>.B0.<layer>``, ``<init>.res.<layer>`` (the residual
  base weight) and ``<init>.out0`` (the output at init);
- ``ours_dora.out`` / ``ours_pissa.out``: the outputs with pet_hooks' PEFT-format adapters in
  ``WORK_DIR/ours_dora`` / ``ours_pissa`` loaded by ``PeftModel.from_pretrained`` on the original
  weights, and ``ours_lora.out`` with ``WORK_DIR/ours_lora`` (the PiSSA adapter converted to a plain LoRA);
- ``theirs_dora/``: PEFT's own DoRA adapter holding the job's values (for pet_hooks to read).
"""
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

LAYERS = ("k", "v", "down")


class ThreeLayers(torch.nn.Module):
    def __init__(self, job):
        super().__init__()
        for layer in LAYERS:
            w = torch.tensor(job[f"{layer}.weight"])
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(torch.tensor(job[f"{layer}.bias"]))
            setattr(self, layer, lin)

    def forward(self, x):
        return self.down(torch.relu(self.v(torch.relu(self.k(x)))))


def _modules(model):
    return {layer: getattr(model.base_model.model, layer) for layer in LAYERS}


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    out = {}

    # DoRA: forward, gradients, merge / unmerge, the magnitude at init
    model = get_peft_model(ThreeLayers(job), LoraConfig(r=2, lora_alpha=8, target_modules=list(LAYERS),
                                                        use_dora=True))
    for layer, module in _modules(model).items():
        out[f"dora.init_m.{layer}"] = module.lora_magnitude_vector["default"].weight.detach().numpy().copy()
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(torch.tensor(job[f"dora.{layer}.A"]))
            module.lora_B["default"].weight.copy_(torch.tensor(job[f"dora.{layer}.B"]))
            module.lora_magnitude_vector["default"].weight.copy_(torch.tensor(job[f"dora.{layer}.m"]))
    y = model(x)
    (y * g).sum().backward()
    out["dora.out"] = y.detach().numpy()
    for layer, module in _modules(model).items():
        out[f"dora.grad.{layer}.A"] = module.lora_A["default"].weight.grad.numpy()
        out[f"dora.grad.{layer}.B"] = module.lora_B["default"].weight.grad.numpy()
        out[f"dora.grad.{layer}.m"] = module.lora_magnitude_vector["default"].weight.grad.numpy()
    model.save_pretrained(os.path.join(work, "theirs_dora"))
    model.merge_adapter()
    for layer, module in _modules(model).items():
        out[f"dora.merged.{layer}"] = module.base_layer.weight.detach().numpy().copy()
    model.unmerge_adapter()
    for layer, module in _modules(model).items():
        out[f"dora.unmerged.{layer}"] = module.base_layer.weight.detach().numpy().copy()

    # PiSSA / OLoRA: the initial A, B and residual, the output at init
    for init in ("pissa", "olora"):
        model = get_peft_model(ThreeLayers(job), LoraConfig(r=2, lora_alpha=8, target_modules=list(LAYERS),
                                                            init_lora_weights=init))
        for layer, module in _modules(model).items():
            out[f"{init}.A0.{layer}"] = module.lora_A["default"].weight.detach().numpy().copy()
            out[f"{init}.B0.{layer}"] = module.lora_B["default"].weight.detach().numpy().copy()
            out[f"{init}.res.{layer}"] = module.base_layer.weight.detach().numpy().copy()
        with torch.no_grad():
            out[f"{init}.out0"] = model(x).numpy()

    # pet_hooks' adapters read by PEFT on the original weights
    for name in ("ours_dora", "ours_pissa", "ours_lora"):
        model = PeftModel.from_pretrained(ThreeLayers(job), os.path.join(work, name))
        with torch.no_grad():
            out[f"{name}.out"] = model(x).numpy()
    np.savez(os.path.join(work, "torch.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
