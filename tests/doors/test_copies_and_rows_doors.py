"""modules_to_save and trainable_token_indices through the doors that build the optimizer themselves: enable()
and pet-hooks run (the launcher). Both share pet_hooks/doors/flow.py with PetCallback, which
tests/surgery/test_modules_to_save.py and test_trainable_tokens.py train through; one test per door here.

What every door must do: the copy and the rows train (they are in the optimizer), every base weight, the
copied cell's and the embedding table included, stays bit for bit, and the adapter saved holds them."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import ROOT, SMALL, assert_params_equal, snapshot

CFG = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1", "modules_to_save": ["ln_f"],
       "trainable_token_indices": [32, 101, 255]}     # a space and "e" (in every batch), and 255 (in none)
OWN = ["ln_f.modules_to_save.default.gamma", "ln_f.modules_to_save.default.beta",
       "embedding.token_adapter.trainable_tokens_delta"]


def test_enable_trains_the_copy_and_the_rows(mode):
    with pet_hooks.enable(CFG):
        net = build(seed=0, **SMALL)
        base = snapshot(net)
        optimizer = nn.Adam(net.trainable_params(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
        batches = lm_batches(8, 4, seed=2)
        for _ in range(2):
            step(*map(Tensor, next(batches)))
    held = {p.name for p in optimizer.parameters}
    assert held == {p.name for p in pet_hooks.delta_parameters(net)} and set(OWN) <= held
    assert_params_equal(base, net)
    now = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    assert np.abs(now[OWN[0]] - base["ln_f.gamma"]).max() > 1e-4
    moved = np.abs(now[OWN[2]] - base["embedding.embedding_table"][[32, 101, 255]]).max(axis=1)
    assert moved[0] > 1e-4 and moved[1] > 1e-4 and moved[2] == 0      # the rows looked up, not the other


def test_launcher_trains_and_saves_the_copy_and_the_rows(tmp_path):
    config = tmp_path / "pet.yaml"
    config.write_text("pet_config:\n  pet_type: lora\n  lora_rank: 4\n  target_modules: '.*dense1'\n"
                      "  modules_to_save: [ln_f]\n  trainable_token_indices: [32, 101, 255]\n")
    ckpt = tmp_path / "after.ckpt"
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(config), "--save-dir",
                          str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"), "--steps", "3",
                          "--mode", "0", "--save-ckpt", str(ckpt)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = ms.load_checkpoint(str(ckpt))
    base = build(seed=0)
    for param in base.get_parameters():                 # the script's checkpoint: base weights untouched
        np.testing.assert_array_equal(saved[param.name].asnumpy(), param.asnumpy(), err_msg=param.name)
    assert np.abs(saved[OWN[0]].asnumpy() - base.ln_f.gamma.asnumpy()).max() > 1e-5     # the copy trained
    pet_hooks.load_adapter(base, tmp_path / "adapter")
    for param in pet_hooks.delta_parameters(base):      # the adapter holds what trained, the copy and rows too
        np.testing.assert_array_equal(param.asnumpy(), saved[param.name].asnumpy(), err_msg=param.name)
    assert set(OWN) <= {p.name for p in pet_hooks.delta_parameters(base)}
