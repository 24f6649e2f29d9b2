"""tests/torch_runner.py: a reference script run by the torch server behaves as ``subprocess.run`` of it would."""
import subprocess
import sys

import pytest

from tests.conftest import HAS_TORCH_PEFT
from tests.torch_runner import run_reference

pytestmark = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")


def test_argv_cwd_output_and_exit_code_are_the_script_s(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nprint('out', sys.argv[1:], os.getcwd())\nprint('err', file=sys.stderr)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    done = run_reference([str(script), "3"], timeout=60, cwd=str(tmp_path))
    assert (done.returncode, done.stdout, done.stderr) == (3, f"out ['3'] {tmp_path}\n", "err\n")
    failed = run_reference(["-c", "raise ValueError('the message')"], timeout=60)
    assert failed.returncode == 1 and "ValueError: the message" in failed.stderr


def test_each_script_starts_fresh(tmp_path):
    """What a script leaves behind (a module it imported, a changed global, torch's seed) is gone for the next."""
    (tmp_path / "left_behind.py").write_text("")
    first = run_reference(["-c", "import json, sys, torch; torch.manual_seed(0); sys.modules['json'].LEFT = 1; "
                                 "import left_behind; print(torch.rand(1).item())"], timeout=60, cwd=str(tmp_path))
    second = run_reference(["-c", "import json, sys; print(hasattr(json, 'LEFT'), 'left_behind' in sys.modules)"],
                           timeout=60)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert second.stdout.split() == ["False", "False"]
    alone = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0); print(torch.rand(1).item())"],
                           capture_output=True, text=True, timeout=120)
    assert first.stdout == alone.stdout                     # the same numbers as in a process of its own


def test_a_script_past_its_timeout_is_stopped_and_the_server_goes_on():
    with pytest.raises(subprocess.TimeoutExpired):
        run_reference(["-c", "import time; time.sleep(30)"], timeout=1)
    assert run_reference(["-c", "print('next')"], timeout=60).stdout == "next\n"
