"""The pet-hooks command line: config checking and its one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pet_hooks", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_check_config_prints_the_normalised_block():
    out = _run("check-config", "samples/configs/gpt2_lora_mindformers.yaml")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["pet_config"]["target_modules"] == ".*dense1|.*dense2|.*dense3"
    assert doc["model_hints"]["num_layers"] == 2


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pet_type: lora\nlora_rank: 0\ntarget_modules: '.*'\n")
    out = _run("check-config", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["pet-hooks: error: lora_rank must be >= 1, got 0"]
    missing = _run("check-config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml" in missing.stderr and "Traceback" not in missing.stderr
