"""The PyTorch side of tests/tuners/test_adalora.py (AdaLoRA), run in its own process (torch and MindSpore apart).

    python tests/adalora_reference.py WORK_DIR

Reads ``WORK_DIR/job.npz``: the three-layer net of tests/vera_reference.py (``k`` 6 -> 10, ``v`` 10 -> 8, ``down``
8 -> 4), the inputs ``x`` / upstream gradients ``g`` (one pair per training step, ``xs`` / ``gs``), the config
numbers, and pet_hooks' adapter values ``<layer>.lora_A`` / ``.lora_E`` / ``.lora_B``. Builds the net with PEFT's
own ``AdaLoraConfig`` on k, v and down (the net returns an object with ``loss = sum(out * g)``, so PEFT's
``AdaLoraModel.forward`` adds its orthogonality regulariser), sets pet_hooks' values and writes
``WORK_DIR/torch.npz``:

- ``out``, ``loss`` (with the regulariser), ``reg`` (the regulariser term), ``grad/<layer>.lora_*`` (of ``loss``);
- ``merged/<layer>.weight`` after ``merge_and_unload``;
- ``train/E<step>/<layer>``, ``train/pattern<step>/<layer>``: ``lora_E`` and the rank pattern after each of the
  ``steps`` SGD steps, each followed by PEFT's ``update_and_allocate(step)``;
- ``ours``: the output of pet_hooks' PEFT-format adapter ``WORK_DIR/ours`` (saved with a rank_pattern) read by
  ``PeftModel.from_pretrained``; ``theirs_out``: the output of the trained model, saved to ``WORK_DIR/theirs``.
"""
import os
import sys

import numpy as np
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

LAYERS = ("k", "v", "down")
FACTORS = ("lora_A", "lora_E", "lora_B")


class Output:
    def __init__(self, logits, loss):
        self.logits, self.loss = logits, loss


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Linear(6, 10)
        self.v = torch.nn.Linear(10, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x, g=None):
        out = self.down(torch.relu(self.v(torch.relu(self.k(x)))))
        return Output(out, None if g is None else (out * g).sum())


def base_net(job):
    net = Net()
    net.load_state_dict({f"{layer}.{kind}": torch.tensor(job[f"{layer}.{kind}"])
                         for layer in LAYERS for kind in ("weight", "bias")}, strict=True)
    return net


def config(job):
    return AdaLoraConfig(init_r=int(job["init_r"]), target_r=int(job["target_r"]), lora_alpha=float(job["alpha"]),
                         tinit=int(job["tinit"]), tfinal=int(job["tfinal"]), deltaT=int(job["deltaT"]),
                         total_step=int(job["total_step"]), orth_reg_weight=float(job["orth"]),
                         target_modules=list(LAYERS))


def factors(model):
    """``<layer>.lora_A`` ... -> PEFT's parameter."""
    return {key.replace("base_model.model.", "").replace(".default", ""): param
            for key, param in model.named_parameters() if any(f".{f}." in key for f in FACTORS)}


def adapted(job):
    model = get_peft_model(base_net(job), config(job))
    params = factors(model)
    assert {k: tuple(p.shape) for k, p in params.items()} == {k: job[k].shape for k in params}, params.keys()
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(torch.tensor(job[key]))
    return model, params


def main(work):
    job = dict(np.load(os.path.join(work, "job.npz")))
    x, g = torch.tensor(job["x"]), torch.tensor(job["g"])
    result = {}
    model, params = adapted(job)
    with torch.no_grad():
        plain = model.base_model.model(x, g).loss
    output = model.base_model(x, g)          # AdaLoraModel.forward: adds the regulariser (as a task model does)
    output.loss.backward()
    result["out"] = output.logits.detach().numpy()
    result["loss"] = output.loss.detach().numpy()
    result["reg"] = (output.loss - plain).detach().numpy()
    for key, param in params.items():
        result[f"grad/{key}"] = param.grad.numpy()
    merged = model.merge_and_unload()
    for layer in LAYERS:
        result[f"merged/{layer}.weight"] = getattr(merged, layer).weight.detach().numpy()

    # training: SGD, PEFT's update_and_allocate after each step (before zero_grad), as PEFT's docs say
    model, params = adapted(job)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(job["lr"]))
    for step in range(int(job["steps"])):
        model.base_model(torch.tensor(job["xs"][step]), torch.tensor(job["gs"][step])).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = model.peft_config["default"].rank_pattern or {}
        for layer in LAYERS:
            result[f"train/E{step}/{layer}"] = params[f"{layer}.lora_E"].detach().numpy().copy()
            key = f"{layer}.lora_E.default"
            if key in pattern:
                result[f"train/pattern{step}/{layer}"] = np.array(pattern[key], bool)
    with torch.no_grad():
        result["theirs_out"] = model(x).logits.numpy()
    model.save_pretrained(os.path.join(work, "theirs"))

    loaded = PeftModel.from_pretrained(base_net(job), os.path.join(work, "ours")).eval()
    with torch.no_grad():
        result["ours"] = loaded(x).logits.numpy()
    np.savez(os.path.join(work, "torch.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
