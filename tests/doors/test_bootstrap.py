"""The child-process bootstrap (``_bootstrap/sitecustomize.py``): off with PET_HOOKS_DISABLE=1, one line when it cannot start."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

BOOTSTRAP_DIR = os.path.join(ROOT, "pet_hooks", "doors", "_bootstrap")
GOOD = json.dumps({"pet_config": {"pet_type": "lora", "target_modules": ".*dense1"}, "model_hints": {}})


def _child(code: str, **env) -> subprocess.CompletedProcess:
    """``python -c code`` started as the launcher starts children (its sitecustomize first on the path)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PET_HOOKS_")}
    full["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, ROOT])
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_a_child_whose_hooks_cannot_start_says_why_in_one_line_and_runs_on():
    for config, cause in ((json.dumps({"pet_config": {"pet_type": "lora", "lora_rank": 0, "target_modules": "x"}}),
                           "lora_rank must be >= 1, got 0"),
                          ("{not json", "PET_HOOKS_CONFIG is not a usable config"),
                          (json.dumps({"no": "pet_config"}), "PET_HOOKS_CONFIG is not a usable config")):
        out = _child("print('the script ran')", PET_HOOKS_CONFIG=config)
        assert out.returncode == 0 and out.stdout == "the script ran\n", out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("pet-hooks: the PET hooks did not start in this process") and cause in lines[0]


def test_pet_hooks_disable_turns_the_hooks_off():
    code = "import sys; print('pet_hooks' in sys.modules, 'mindspore' in sys.modules)"
    off = _child(code, PET_HOOKS_CONFIG=GOOD, PET_HOOKS_DISABLE="1")
    assert off.returncode == 0 and off.stdout.split() == ["False", "False"] and off.stderr == "", off.stderr
    # No config at all: the bootstrap does nothing either (a Python child of a child without hooks).
    none = _child(code)
    assert none.stdout.split() == ["False", "False"] and none.stderr == ""


def test_the_user_sitecustomize_still_runs_when_the_hooks_are_off(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.USER_SITE = 'loaded'\n")
    out = _child("print(USER_SITE)", PET_HOOKS_CONFIG=GOOD, PET_HOOKS_DISABLE="1",
                 PYTHONPATH=os.pathsep.join([BOOTSTRAP_DIR, ROOT, str(tmp_path)]))
    assert out.stdout == "loaded\n", out.stderr
