"""The PyTorch side of tests/io/test_peft_layer_selection.py, run in its own process (torch and MindSpore apart).

    python tests/peft_reference_layers.py WORK_DIR

Reads what ``peft_reference.py`` reads (``job.json``, ``base.npz``, ``ids.npy``) and writes:

- ``torch_base.npy``: the base logits;
- for every adapter ``WORK_DIR/ours/<name>`` (written by pet_hooks): ``torch_ours_<name>.npy``, the logits
  with it loaded by ``peft.PeftModel.from_pretrained``, and ``modules_ours_<name>.json``, the modules
  PEFT adapted;
- for every config of ``THEIRS``: ``theirs/<name>/`` (PEFT's adapter, random B, seeded), its logits
  ``torch_theirs_<name>.npy`` and ``modules_theirs_<name>.json``.
"""
import json
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_reference import base_model, logits

#: PEFT configs using the selection options, by name (the test holds their pet_hooks equivalents)
THEIRS = {
    "layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1],
                   layers_pattern="layers"),
    "all-linear": dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"]),
    "exclude-regex": dict(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                          exclude_modules=r"model\.layers\.0\.self_attn\..*", layers_to_transform=[0, 1]),
}


def adapted(model):
    prefix = "base_model.model."
    return sorted(name[len(prefix):] for name, module in model.named_modules() if isinstance(module, LoraLayer))


def main(work):
    job = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    weights = dict(np.load(os.path.join(work, "base.npz")))
    ids = np.load(os.path.join(work, "ids.npy"))
    np.save(os.path.join(work, "torch_base.npy"), logits(base_model(job, weights), ids))

    ours_dir = os.path.join(work, "ours")
    for name in sorted(os.listdir(ours_dir)) if os.path.isdir(ours_dir) else []:
        model = PeftModel.from_pretrained(base_model(job, weights), os.path.join(ours_dir, name)).eval()
        np.save(os.path.join(work, f"torch_ours_{name}.npy"), logits(model, ids))
        json.dump(adapted(model), open(os.path.join(work, f"modules_ours_{name}.json"), "w", encoding="utf-8"))

    for index, (name, fields) in enumerate(sorted(THEIRS.items())):
        torch.manual_seed(11 + index)
        model = get_peft_model(base_model(job, weights), LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **fields))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:  # PEFT starts B at zero; give it values so the adapter shows
                    param.copy_(torch.randn_like(param) * 0.2)
        model.eval()
        model.save_pretrained(os.path.join(work, "theirs", name))
        np.save(os.path.join(work, f"torch_theirs_{name}.npy"), logits(model, ids))
        json.dump(adapted(model), open(os.path.join(work, f"modules_theirs_{name}.json"), "w", encoding="utf-8"))


if __name__ == "__main__":
    main(sys.argv[1])
