"""Per-file test times from a pytest JUnit XML report, in the format of tests/file_seconds.txt.

    python -m pytest --junitxml=/tmp/suite.xml            # the whole suite, on an idle machine
    python tools/file_seconds.py /tmp/suite.xml > tests/file_seconds.txt

or from the "slowest durations" lines every run prints (pytest.ini: ``--durations=0 --durations-min=1``), e.g.
the log of a CI run: phases under a second are left out there, so a file of many short tests counts less
than it took (the table only ranks the files)::

    python tools/file_seconds.py ci.log > tests/file_seconds.txt

tests/conftest.py hands the files to the two xdist workers longest first from that table, so the
short files fill the end of the run; a file missing from it counts 0.5 s per test. Each file's
figure is the sum of its tests' times (setup, call and teardown, as the report gives them).
"""
from __future__ import annotations

import collections
import re
import sys
import xml.etree.ElementTree as ET

HEADER = """\
# Seconds each test file takes in a whole-suite run, longest first (tools/file_seconds.py writes this from a run's
# durations lines or --junitxml). tests/conftest.py hands the files to the two xdist workers in this order, so the
# short files fill the end of the run; the figures only rank the files (a file not listed counts 0.5 s a
# test), so an update is due when a file's time changes a lot, not on every run.
"""


def file_seconds(report: str) -> dict:
    """test file name -> seconds, summed over its test cases."""
    seconds: dict = collections.defaultdict(float)
    for case in ET.parse(report).iter("testcase"):
        module = case.get("classname", "").split(".")
        # classname is "tests.io.test_adapter_io" or, for a test in a class, "tests.io.test_adapter_io.Class"
        name = next((part for part in reversed(module) if part.startswith("test_")), None)
        if name:
            seconds[name + ".py"] += float(case.get("time", 0))
    return dict(seconds)


def durations_seconds(log: str) -> dict:
    """test file name -> seconds, summed over the ``12.34s call     tests/x/test_y.py::test_z`` lines of a log
    (the first report in it: a second run's, such as .ci/run's MindSpore 2.10 lane, is left out)."""
    seconds: dict = collections.defaultdict(float)
    started = False
    with open(log, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if "slowest" in line and "durations" in line:
                if started:
                    break
                started = True
                continue
            match = re.match(r"\s*([\d.]+)s (?:setup|call|teardown)\s+\S*?([^/\s]+\.py)::", line)
            if started and match:
                seconds[match.group(2)] += float(match.group(1))
    return dict(seconds)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    totals = file_seconds(argv[0]) if argv[0].endswith(".xml") else durations_seconds(argv[0])
    sys.stdout.write(HEADER)
    for name, value in sorted(totals.items(), key=lambda kv: -kv[1]):
        sys.stdout.write(f"{value:7.1f} {name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
