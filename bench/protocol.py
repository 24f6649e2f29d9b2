"""The worker side of the stepping protocol that :mod:`bench.runner` drives.

A worker prints one JSON line per event on stdout. After its setup it announces ``ready``;
then each ``step`` line on stdin runs one timed step, answered by a ``step`` event, and
``done`` answers with the peak memory above the worker's baseline and ends the loop.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Dict, Optional

from bench.models import peak_rss_mb


def say(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def serve_steps(step: Callable[[], float], baseline_mb: float,
                extra: Optional[Dict[str, Callable[[], dict]]] = None) -> int:
    """Answer ``step`` / ``done`` commands until ``done``; ``step()`` runs one step and returns its loss.

    ``extra`` maps further commands (``eval`` ...) to functions whose dict is sent back as
    an event of the command's name (untimed by the protocol).
    """
    extra = extra or {}
    for line in sys.stdin:
        command = line.strip()
        if command in extra:
            say(event=command, **extra[command]())
        elif command == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            loss = step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            say(event="step", ms=round(1000 * wall, 3), cpu_per_wall=round(cpu / wall, 3), loss=loss)
        elif command == "done":
            say(event="done", peak_rss_above_baseline_mb=round(peak_rss_mb() - baseline_mb, 1),
                baseline_rss_mb=round(baseline_mb, 1))
            return 0
        else:
            say(event="error", message=f"unknown command {command!r}")
            return 2
    return 0
