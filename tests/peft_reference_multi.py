"""The PyTorch side of tests/multi/test_adapters.py's PEFT check of several adapters, in its own process.

    python tests/peft_reference_multi.py WORK_DIR

Reads what tests/peft_reference.py reads (``job.json``, ``base.npz``, ``ids.npy``) and writes:

- ``torch_ours_<name>.npy``: the logits with each adapter of ``WORK_DIR/ours`` (written by pet_hooks with
  ``adapter_name="all"``: "default" in the folder, "b" in ``ours/b``) loaded by PEFT and made active;
- ``theirs/``: two adapters made by PEFT itself ("default": q/v r=4; "extra": k/o/down r=2, random B),
  saved with ``save_pretrained`` as PEFT lays several out, and ``torch_theirs_<name>.npy`` their logits;
- ``torch_theirs_mixed.npy``: one forward with PEFT's ``adapter_names`` per row (default, extra,
  __base__, extra for the batch's rows in turn, cycled).
"""
import os
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_reference import base_model, logits  # noqa: E402  (the same Llama and logits)

import json  # noqa: E402


def _randomise_b(model, name: str) -> None:
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f"lora_B.{name}." in key:
                param.copy_(torch.randn_like(param) * 0.2)


def main(work):
    job = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    weights = dict(np.load(os.path.join(work, "base.npz")))
    ids = np.load(os.path.join(work, "ids.npy"))

    ours = PeftModel.from_pretrained(base_model(job, weights), os.path.join(work, "ours")).eval()
    ours.load_adapter(os.path.join(work, "ours", "b"), adapter_name="b")
    for name in ("default", "b"):
        ours.set_adapter(name)
        np.save(os.path.join(work, f"torch_ours_{name}.npy"), logits(ours, ids))

    torch.manual_seed(11)
    theirs = get_peft_model(base_model(job, weights), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    theirs.add_adapter("extra", LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"],
                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
    _randomise_b(theirs, "default")
    _randomise_b(theirs, "extra")
    theirs.eval()
    for name in ("default", "extra"):
        theirs.set_adapter(name)
        np.save(os.path.join(work, f"torch_theirs_{name}.npy"), logits(theirs, ids))
    theirs.set_adapter("default")
    theirs.save_pretrained(os.path.join(work, "theirs"))      # both adapters: default here, extra in theirs/extra
    rows = [["default", "extra", "__base__", "extra"][i % 4] for i in range(ids.shape[0])]
    with torch.no_grad():
        mixed = theirs(torch.tensor(ids.astype(np.int64)), adapter_names=rows).logits.numpy()
    np.save(os.path.join(work, "torch_theirs_mixed.npy"), mixed)


if __name__ == "__main__":
    main(sys.argv[1])
