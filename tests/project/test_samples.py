"""The samples: the demo runs end to end, the seed YAML fits the sample GPT, the corpus is real text."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

import pet_hooks
from samples.data import corpus_ids, lm_batches
from samples.tiny_gpt import build
from samples.tokenizer import ByteTokenizer
from tests.conftest import ROOT



def test_demo_trains_and_saves(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "samples", "demo.py"), "--steps", "30",
                          "--save-dir", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", out.stdout)
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out.stdout).groups())
    assert last < first - 0.3, out.stdout
    assert f"adapter saved to {tmp_path / 'adapter'}" in out.stdout
    fresh = build(seed=0)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")
    assert len(pet_hooks.delta_parameters(fresh)) == 2 * 6 * fresh.config.num_layers
    # the trained values were saved and loaded (at init every lora_B is zero)
    assert all(p.asnumpy().any() for p in pet_hooks.delta_parameters(fresh) if p.name.endswith("lora_B"))


def test_seed_yaml_selects_the_sample_gpts_query_key_value():
    net = build(seed=0)
    pet_hooks.apply(net, pet_hooks.load_config(os.path.join(ROOT, "samples", "configs", "gpt2_lora_mindformers.yaml")))
    adapted = sorted(name for name, cell in net.cells_and_names() if hasattr(cell, "lora_A"))
    assert adapted == sorted(f"blocks.{i}.attention.dense{j}" for i in range(2) for j in (1, 2, 3))


def test_corpus_and_tokenizer():
    ids = corpus_ids()
    assert len(ids) > 100_000 and ids.max() < 128                # ASCII prose
    text = ByteTokenizer().decode(ids[:2000])
    assert "the" in text and ByteTokenizer().encode(text) == ids[:2000].tolist()
    inputs, labels = next(lm_batches(seq_length=16, batch_size=3))
    assert inputs.shape == labels.shape == (3, 16) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
