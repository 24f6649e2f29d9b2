"""The PyTorch side of tests/tuners/test_ia3.py, run in its own process (torch and MindSpore apart).

    python tests/ia3_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz``: the weights of a three-layer net (``k``: 6 -> 10, ``v``: 10 -> 8,
``down``: 8 -> 4, as torch ``Linear`` [out, in]; relu between them), the input ``x``, the upstream gradient ``g``
and one ``ia3_l`` per layer in PEFT's shapes. Builds the net, puts PEFT's own ``IA3Config`` on
k, v and down (``down`` feed-forward), sets the vectors, and writes ``WORK_DIR/torch.npz``:

- ``out``: the output; ``grad.<layer>``: the gradient of ``sum(out * g)`` for each ``ia3_l``;
- ``ours``: the output with the adapter in ``WORK_DIR/ours`` (written by pet_hooks) loaded by
  ``peft.PeftModel.from_pretrained``;
- ``merged.<layer>.weight`` / ``.bias``: the base weights after PEFT's ``merge_and_unload``;
- and saves PEFT's adapter to ``WORK_DIR/theirs`` (``save_pretrained``) for pet_hooks to read.
"""
import os
import sys

import numpy as np
import torch
from peft import IA3Config, PeftModel, get_peft_model

LAYERS = ("k", "v", "down")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(6, 10)
        self.v = torch.nn.Linear(10, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.v(torch.relu(self.k(x)))))


def base_net(job):
    net = Net()
    net.load_state_dict({f"{layer}.{kind}": torch.tensor(job[f"{layer}.{kind}"])
                         for layer in LAYERS for kind in ("weight", "bias")}, strict=True)
    return net


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    result = {}

    model = get_peft_model(base_net(job), IA3Config(target_modules=list(LAYERS), feedforward_modules=["down"]))
    vectors = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                layer = name.split(".")[-3]
                param.copy_(torch.tensor(job[f"ia3.{layer}"]))
                vectors[layer] = param
    out = model(x)
    (out * g).sum().backward()
    result["out"] = out.detach().numpy()
    for layer, param in vectors.items():
        result[f"grad.{layer}"] = param.grad.numpy()
    model.save_pretrained(os.path.join(work, "theirs"))

    merged = model.merge_and_unload()
    for layer in LAYERS:
        result[f"merged.{layer}.weight"] = getattr(merged, layer).weight.detach().numpy()
        result[f"merged.{layer}.bias"] = getattr(merged, layer).bias.detach().numpy()

    ours = PeftModel.from_pretrained(base_net(job), os.path.join(work, "ours")).eval()
    with torch.no_grad():
        result["ours"] = ours(x).numpy()
    np.savez(os.path.join(work, "torch.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
