"""Run benchmark worker processes and collect their JSON lines.

Workers print protocol lines as JSON objects with an ``event`` key; anything else on their
stdout (MindFormers logs there) is ignored, and stderr goes to a log file that is quoted when
a worker fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple, Union

from bench.models import ROOT


class WorkerError(RuntimeError):
    """A worker died or answered something unexpected."""


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("GLOG_v", "3")           # MindSpore: errors only
    return env


class Worker:
    """One worker process speaking the line protocol of :mod:`bench.train_worker`."""

    def __init__(self, name: str, argv: Sequence[str]):
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def read(self, event: str) -> dict:
        """The next protocol line, which must be ``event``."""
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict) or "event" not in message:
                continue
            if message["event"] != event:
                raise WorkerError(f"{self.name}: expected {event!r}, got {message}")
            return message
        self.proc.wait()
        raise WorkerError(f"{self.name} exited with {self.proc.returncode} before {event!r}:\n{self.log_tail()}")

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def log_tail(self, lines: int = 25) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def run_many(jobs: Sequence[Tuple[str, Sequence[str], Union[str, Tuple[str, ...]]]], parallel: int = 1) -> List[dict]:
    """Run one-shot workers to completion, ``parallel`` at a time (1 when they time things); their ``event`` lines
    in the order of the jobs (a job whose event is a tuple answers each of them in turn)."""
    results: List[Optional[List[dict]]] = [None] * len(jobs)
    running: List[Tuple[int, Worker]] = []
    try:
        for index, (name, argv, event) in enumerate(jobs):
            running.append((index, Worker(name, argv)))
            if len(running) >= parallel or index == len(jobs) - 1:
                while running:
                    done_index, worker = running.pop(0)
                    events = jobs[done_index][2]
                    results[done_index] = [worker.read(e) for e in ((events,) if isinstance(events, str) else events)]
                    worker.proc.wait()
                    worker.close()
    finally:
        for _, worker in running:
            worker.close()
    return [message for answers in results for message in answers]


def run_interleaved(commands: Dict[str, List[str]], rounds: int, warm_rounds: int = 0, parallel_setup: int = 2,
                    progress=None) -> Dict[str, dict]:
    """Start one stepping worker per variant, then hand out timed steps round-robin.

    Setup (build, compile, warm-up) runs ``parallel_setup`` workers at a time; during the
    rounds exactly one worker computes at any moment, the others wait on stdin. The order is
    reversed every other round (A B C, C B A, ...), so no variant always follows the same
    neighbour. The first ``warm_rounds`` rounds are not kept: right after setup every variant
    steps slower for a while (seen here: the first three rounds 10-20% slower than the rest).
    """
    names = list(commands)
    workers: Dict[str, Worker] = {}
    results = {name: {"steps": []} for name in names}
    try:
        pending = list(names)
        starting: List[str] = []
        while pending or starting:
            while pending and len(starting) < parallel_setup:
                name = pending.pop(0)
                workers[name] = Worker(name, commands[name])
                starting.append(name)
            name = starting.pop(0)
            results[name]["ready"] = workers[name].read("ready")
            if progress:
                progress(f"  ready: {name} ({results[name]['ready'].get('setup_s', '?')} s)")
        for index in range(warm_rounds + rounds):
            for name in (names if index % 2 == 0 else names[::-1]):
                workers[name].send("step")
                answer = workers[name].read("step")
                if index >= warm_rounds:
                    results[name]["steps"].append(answer)
        for name in names:
            workers[name].send("done")
            results[name]["done"] = workers[name].read("done")
    finally:
        for worker in workers.values():
            worker.close()
    return results


def torch_available() -> Optional[str]:
    """The torch and peft versions when both import in a child process, else None."""
    probe = "import torch, peft, transformers; print(torch.__version__, peft.__version__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), check=False)
    return done.stdout.strip() if done.returncode == 0 else None
