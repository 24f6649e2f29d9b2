"""The PyTorch side of tests/tuners/test_lora_bias.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_bias.py WORK_DIR

Reads ``WORK_DIR/job.npz``: the base weights of a three-layer net (``fc1`` 6 -> 10 with relu, ``fc2``
10 -> 4, ``fc3`` 4 -> 3, all with biases), LoRA values for ``fc1`` / ``fc2`` (``<cell>.lora_A``,
``<cell>.lora_B``, ``<cell>.lora_B_bias``: pet_hooks' names), an input ``x`` and an upstream gradient ``g``.
For every case of ``CASES`` (PEFT's ``lora_bias`` and ``bias``; r=2, lora_alpha=4 on fc1 and fc2) it
writes into ``torch.npz`` what PEFT 0.21 gives on those values:

- ``<case>.out``; ``<case>.grad.<name>``: the gradient of ``sum(out * g)`` for every parameter PEFT trains,
  under pet_hooks' name (``fc1.lora_B_bias`` for ``fc1.lora_B.default.bias``, ``fc1.bias`` for
  ``fc1.base_layer.bias``); ``trainable.json``: those names per case;
- ``<case>.merged.<cell>.weight`` / ``.bias`` and ``<case>.merged.out`` after ``merge_adapter``;
- ``<case>.ours.out``: pet_hooks' PEFT-format adapter ``WORK_DIR/ours_<case>`` read by
  ``PeftModel.from_pretrained`` onto the base net (the base biases it trained come from the file);
- ``WORK_DIR/theirs_<case>``: PEFT's own ``save_pretrained`` of the same model with every base bias PEFT
  trains moved by ``BIAS_STEP`` (as if trained; the lora values are the job's), for pet_hooks to read, and
  ``<case>.theirs.out`` its output.
"""
import json
import os
import sys
import warnings

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

warnings.simplefilter("ignore")

#: case -> (lora_bias, bias)
CASES = {"lb": (True, "none"), "lb_all": (True, "all"), "lora_only": (False, "lora_only"), "all": (False, "all")}
SIZES = {"fc1": (6, 10), "fc2": (10, 4), "fc3": (4, 3)}
ADAPTED = ("fc1", "fc2")
BIAS_STEP = 0.25


class Net(torch.nn.Module):
    def __init__(self, job):
        super().__init__()
        for name, (fan_in, fan_out) in SIZES.items():
            layer = torch.nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(job[f"{name}.weight"]))
                layer.bias.copy_(torch.tensor(job[f"{name}.bias"]))
            setattr(self, name, layer)

    def forward(self, x):
        return self.fc3(self.fc2(torch.relu(self.fc1(x))))


def ours(name: str) -> str:
    """PEFT's parameter name -> pet_hooks'."""
    name = name.removeprefix("base_model.model.")
    for theirs, mine in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                         (".lora_B.default.bias", ".lora_B_bias"), (".base_layer.bias", ".bias"),
                         (".base_layer.weight", ".weight")):
        if name.endswith(theirs):
            return name[: -len(theirs)] + mine
    return name


def _model(job, lora_bias, bias):
    model = get_peft_model(Net(job), LoraConfig(r=2, lora_alpha=4, target_modules=list(ADAPTED),
                                                lora_bias=lora_bias, bias=bias))
    with torch.no_grad():
        for cell in ADAPTED:
            layer = getattr(model.base_model.model, cell)
            layer.lora_A["default"].weight.copy_(torch.tensor(job[f"{cell}.lora_A"]))
            layer.lora_B["default"].weight.copy_(torch.tensor(job[f"{cell}.lora_B"]))
            if lora_bias:
                layer.lora_B["default"].bias.copy_(torch.tensor(job[f"{cell}.lora_B_bias"]))
    return model


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    out, trainable = {}, {}
    for case, (lora_bias, bias) in CASES.items():
        model = _model(job, lora_bias, bias)
        layers = model.base_model.model
        y = model(x)
        (y * g).sum().backward()
        out[f"{case}.out"] = y.detach().numpy()
        trainable[case] = sorted(ours(n) for n, p in model.named_parameters() if p.requires_grad)
        for name, param in model.named_parameters():
            if param.requires_grad:
                out[f"{case}.grad.{ours(name)}"] = param.grad.numpy().copy()
        trained = _model(job, lora_bias, bias)
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if param.requires_grad and ours(name).endswith(".bias") and ".lora_B" not in name:
                    param.add_(BIAS_STEP)
            out[f"{case}.theirs.out"] = trained(x).numpy()
        trained.save_pretrained(os.path.join(work, f"theirs_{case}"))
        model.base_model.merge_adapter()
        with torch.no_grad():
            out[f"{case}.merged.out"] = model(x).numpy()
            for cell in ADAPTED:
                base = getattr(layers, cell).base_layer
                out[f"{case}.merged.{cell}.weight"] = base.weight.numpy().copy()
                out[f"{case}.merged.{cell}.bias"] = base.bias.numpy().copy()
        ours_dir = os.path.join(work, f"ours_{case}")
        if os.path.isdir(ours_dir):
            config = LoraConfig.from_pretrained(ours_dir)
            config.task_type = None         # pet_hooks writes CAUSAL_LM; this net is a plain module
            loaded = PeftModel.from_pretrained(Net(job), ours_dir, config=config)
            with torch.no_grad():
                out[f"{case}.ours.out"] = loaded(x).numpy()
    np.savez(os.path.join(work, "torch.npz"), **out)
    with open(os.path.join(work, "trainable.json"), "w", encoding="utf-8") as handle:
        json.dump(trainable, handle)


if __name__ == "__main__":
    main(sys.argv[1])
