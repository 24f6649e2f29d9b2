"""The PyTorch side of tests/tuners/test_prompt_tuning.py (prompt tuning), run in its own process.

    python tests/prompt_tuning_reference.py WORK_DIR

Reads what ``tests/io/test_peft_format.write_reference_job`` writes (``job.json``, ``base.npz`` in Hugging Face's
names, ``ids.npy``), ``train_ids.npy`` and ``n.npy`` (num_virtual_tokens), and pet_hooks' PEFT-format adapter
``WORK_DIR/ours``. Builds ``transformers.LlamaForCausalLM`` with those weights and writes ``WORK_DIR/torch.npz``:

- ``logits``: PEFT's logits with ``ours`` (``PeftModel.from_pretrained``) on ``ids``, all ``n + S`` positions;
- ``loss``, ``grad``: PEFT's loss with ``labels = train_ids`` (PEFT puts -100 in front) and the prompt's gradient;
- ``text_prompt``: the prompt PEFT's own ``TEXT`` init makes from ``WORK_DIR/tokenizer`` and ``text.txt``,
  saved with ``save_pretrained`` to ``WORK_DIR/theirs``, and ``theirs_logits``: the logits with it.
"""
import os
import sys

import numpy as np
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peft_reference import base_model  # noqa: E402


def main(work):
    import json
    job = json.load(open(os.path.join(work, "job.json"), encoding="utf-8"))
    weights = dict(np.load(os.path.join(work, "base.npz")))
    ids = torch.tensor(np.load(os.path.join(work, "ids.npy")).astype(np.int64))
    train = torch.tensor(np.load(os.path.join(work, "train_ids.npy")).astype(np.int64))
    n = int(np.load(os.path.join(work, "n.npy")))
    result = {}

    ours = PeftModel.from_pretrained(base_model(job, weights), os.path.join(work, "ours")).eval()
    prompt = ours.prompt_encoder["default"].embedding.weight
    prompt.requires_grad_(True)                  # PEFT loads a prompt adapter frozen (is_trainable is refused)
    assert tuple(prompt.shape) == (n, job["hidden_size"]), prompt.shape
    with torch.no_grad():
        result["logits"] = ours(input_ids=ids).logits.numpy()
    loss = ours(input_ids=train, labels=train).loss
    loss.backward()
    result["loss"], result["grad"] = loss.detach().numpy(), prompt.grad.numpy()

    text = open(os.path.join(work, "text.txt"), encoding="utf-8").read()
    theirs = get_peft_model(base_model(job, weights), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=os.path.join(work, "tokenizer"))).eval()
    result["text_prompt"] = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    with torch.no_grad():
        result["theirs_logits"] = theirs(input_ids=ids).logits.numpy()
    theirs.save_pretrained(os.path.join(work, "theirs"))
    np.savez(os.path.join(work, "torch.npz"), **result)


if __name__ == "__main__":
    main(sys.argv[1])
