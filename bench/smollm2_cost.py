"""Issue 28's table: what one training step of the full SmolLM2 costs, pet_hooks against the alternatives.

    .venv/bin/python -m bench.smollm2_cost [--rounds 2] [--steps 6] [--rows demo,floor,...]

Rows (each run in its own process, one at a time, the rows alternating over ``--rounds`` rounds), all on
SmolLM2-135M-Instruct with its 30 blocks, batch 4 x 128, graph mode, ``nn.AdamWeightDecay`` on the MindSpore
side (``torch.optim.AdamW`` on PEFT's):

- ``demo``: pet_hooks LoRA applying the demo's own config file, ``samples/configs/smollm2_lora.yaml`` (so the
  memory settings that file ships, ``chunked_loss``, count), with MindSpore's compile cache in a fresh folder;
- ``demo_again``: the same run started again right after, loading the compiled graphs from that folder
  (what ``pet-hooks run --compile-cache DIR`` gives a second run);
- ``lora``: pet_hooks LoRA r=8 q/k/v/o with no memory setting (the issue's first row);
- ``floor``: plain MindSpore, every weight frozen but block 0's norm (what the frozen backward costs);
- ``mindformers``: MindFormers' own LoRA (``mindformers.pet.get_pet_model``) with the same settings;
- ``peft``: PEFT LoRA on transformers' load of the same file (``bench/memory_study/torch_peft.py``).

The workers are ``bench/memory_study/run.py`` and ``torch_peft.py``: first step (the compile, for MindSpore),
median of the later steps, peak RSS above the RSS before the model was loaded. Writes
``bench/smollm2_cost_last_run.json`` and prints the Markdown table BENCHMARKS.md carries.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

from bench.models import ROOT, load_average

STUDY = os.path.join("bench", "memory_study")
DEMO_CONFIG = os.path.join("samples", "configs", "smollm2_lora.yaml")
ROWS: Dict[str, tuple] = {
    "demo": ("pet_hooks LoRA, the demo's config (`chunked_loss` included)", "run.py",
             ["--variant", "lora", "--pet-config", DEMO_CONFIG, "--optimizer", "adamwd"]),
    "demo_again": ("the same, started again (compile cache)", "run.py",
                   ["--variant", "lora", "--pet-config", DEMO_CONFIG, "--optimizer", "adamwd"]),
    "lora": ("pet_hooks LoRA, no memory setting", "run.py", ["--variant", "lora", "--optimizer", "adamwd"]),
    "floor": ("plain MindSpore, every weight frozen but block 0's norm", "run.py",
              ["--variant", "floor", "--optimizer", "adamwd"]),
    "mindformers": ("MindFormers' own LoRA (`get_pet_model`)", "run.py",
                    ["--variant", "mindformers_lora", "--optimizer", "adamwd"]),
    "peft": ("PEFT LoRA on PyTorch", "torch_peft.py", ["--variant", "lora"]),
}
OUT = os.path.join(ROOT, "bench", "smollm2_cost_last_run.json")


def run_row(key: str, steps: int, cache: str) -> dict:
    """One process of row ``key``: its RESULT line (``error`` set when it failed), with the load at its start;
    the demo rows compile into (``demo``) and load from (``demo_again``) MindSpore's cache in ``cache``."""
    _, script, extra = ROWS[key]
    argv = [sys.executable, os.path.join(STUDY, script), "--blocks", "30", "--seq", "128", "--batch", "4",
            "--steps", str(steps), *extra]
    env = dict(os.environ)
    if key in ("demo", "demo_again"):
        env.update(MS_COMPILER_CACHE_ENABLE="1", MS_COMPILER_CACHE_PATH=cache)
    load = load_average()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600, check=False)
    lines = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1]) if lines else {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    return {**result, "load_start": load}


def table(runs: Dict[str, List[dict]]) -> List[str]:
    """The Markdown rows: per row the range over rounds of first step, later-step median and peak memory,
    and the ratios to PEFT LoRA (medians over rounds)."""
    def values(key, field):
        return [r[field] for r in runs.get(key, []) if "error" not in r and r.get(field) is not None]

    def span(items, fmt):
        if not items:
            return "failed"
        low, high = min(items), max(items)
        return fmt.format(low) if fmt.format(low) == fmt.format(high) else f"{fmt.format(low)}–{fmt.format(high)}"

    peft_time, peft_mem = values("peft", "later_median_s"), values("peft", "peak_above_base_mb")
    out = ["| | first step s | later steps s | peak RSS above base, MB | step time / PEFT | memory / PEFT |",
           "|---|---:|---:|---:|---:|---:|"]
    for key, (label, _, _) in ROWS.items():
        if key not in runs:
            continue
        later, peak = values(key, "later_median_s"), values(key, "peak_above_base_mb")
        time_ratio = (f"{statistics.median(later) / statistics.median(peft_time):.2f}x"
                      if later and peft_time else "n/a")
        mem_ratio = f"{statistics.median(peak) / statistics.median(peft_mem):.2f}x" if peak and peft_mem else "n/a"
        out.append(f"| {label} | {span(values(key, 'first_s'), '{:.1f}')} | {span(later, '{:.2f}')} | "
                   f"{span(peak, '{:,.0f}')} | {time_ratio} | {mem_ratio} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = [row for row in args.rows.split(",") if row]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    started = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "load_start": load_average()}
    runs: Dict[str, List[dict]] = {row: [] for row in rows}
    for round_index in range(args.rounds):
        order = list(rows) if round_index % 2 == 0 else list(reversed(rows))    # alternate: no row always runs first
        if "demo_again" in order:                                            # right after the run that fills the cache
            order.remove("demo_again")
            order.insert(order.index("demo") + 1 if "demo" in order else 0, "demo_again")
        cache = tempfile.mkdtemp(prefix="smollm2_cost_cache_")
        for row in order:
            print(f"round {round_index + 1}: {row}", flush=True)
            runs[row].append(run_row(row, args.steps, cache))
            result = runs[row][-1]
            print("    " + (result["error"][:300] if "error" in result else
                            f"first {result['first_s']} s, later {result['later_median_s']} s, "
                            f"peak {result['peak_above_base_mb']} MB, losses {result.get('losses')}"), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    data = {**started, "load_end": load_average(), "rounds": args.rounds, "steps": args.steps, "runs": runs}
    with open(OUT, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    print("\n".join(table(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
