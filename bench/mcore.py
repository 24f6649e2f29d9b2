"""pet_hooks LoRA against MindFormers' own mcore LoRA on the (patched) Qwen3: step time, memory, kernels.

    .venv/bin/python -m bench.mcore [--rounds 8] [--hidden 256] [--quick]

Each variant of ``bench.mcore_worker`` (full fine-tuning, the floor, pet_hooks LoRA, MindFormers'
mcore LoRA; r=8 on linear_qkv / linear_proj / linear_fc1 / linear_fc2) runs in its own process; the
timed steps are handed out round-robin, order reversed every other round (``bench.runner``), and the
medians are compared. Then the compiled training step of each LoRA (2 layers, hidden 64) is read from
MindSpore's kernel graph: the same kernels cost the same whatever a noisy machine says. Writes
``bench/mcore_last_run.json`` and prints a Markdown summary. The model carries the CPU stand-ins of
``tests/mcore_cpu.py``; graph mode (the mcore layers run only there).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench.models import ROOT
from bench.runner import run_interleaved, run_many

VARIANTS = ("full", "floor", "lora", "mflora")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="hidden 64, 2 layers, seq 32, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq, args.rounds = 64, 2, 32, 2
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--seq", str(args.seq),
             "--batch", str(args.batch)]
    worker = ["-m", "bench.mcore_worker"]          # bench.runner puts the interpreter in front
    started = time.perf_counter()
    timed = run_interleaved({v: worker + ["--variant", v] + shape for v in VARIANTS}, rounds=args.rounds,
                            warm_rounds=2, parallel_setup=1, progress=print)
    graphs = run_many([(v, worker + ["--variant", v, "--graph", "--hidden", "64", "--layers", "2", "--seq", "16",
                                     "--batch", "2"], "graph") for v in ("lora", "mflora")])
    summary = {}
    for variant, result in timed.items():
        steps = [s["ms"] for s in result["steps"]]
        summary[variant] = {"median_ms": round(statistics.median(steps), 2), "steps_ms": steps,
                            "peak_rss_above_baseline_mb": result["done"]["peak_rss_above_baseline_mb"],
                            "trainable": result["ready"]["trainable"], "total": result["ready"]["total"]}
    ours, theirs = summary["lora"], summary["mflora"]
    report = {
        "shape": {"hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                  "rounds": args.rounds},
        "variants": summary,
        "ratios": {"lora_vs_mflora_time": round(ours["median_ms"] / theirs["median_ms"], 3),
                   "lora_vs_full_time": round(ours["median_ms"] / summary["full"]["median_ms"], 3),
                   "lora_vs_floor_time": round(ours["median_ms"] / summary["floor"]["median_ms"], 3),
                   "lora_vs_mflora_peak_memory": round(ours["peak_rss_above_baseline_mb"]
                                                       / theirs["peak_rss_above_baseline_mb"], 3)},
        "kernels": {g["variant"]: {"kernels": g["kernels"], "ops": g["ops"]} for g in graphs},
        "same_kernels": graphs[0]["ops"] == graphs[1]["ops"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(ROOT, "bench", "mcore_last_run.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print("\n| variant | median step ms | peak RSS above baseline MB | trainable |")
    print("| --- | --- | --- | --- |")
    for variant in VARIANTS:
        s = summary[variant]
        print(f"| {variant} | {s['median_ms']} | {s['peak_rss_above_baseline_mb']} | {s['trainable']:,} |")
    print(f"\nratios: {report['ratios']}")
    kernels = report["kernels"]
    print(f"kernels (2 layers, hidden 64): pet_hooks {kernels['lora']['kernels']}, MindFormers "
          f"{kernels['mflora']['kernels']}, same kernels by operator: {report['same_kernels']}")
    if not report["same_kernels"]:
        ops = sorted(set(kernels["lora"]["ops"]) | set(kernels["mflora"]["ops"]))
        diff = {op: (kernels["lora"]["ops"].get(op, 0), kernels["mflora"]["ops"].get(op, 0)) for op in ops
                if kernels["lora"]["ops"].get(op, 0) != kernels["mflora"]["ops"].get(op, 0)}
        print(f"  differing operators (pet_hooks, MindFormers): {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
