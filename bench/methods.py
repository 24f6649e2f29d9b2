"""Step time of issue 19's methods (IA3, BitFit, bottleneck adapters, DoRA, PiSSA) against LoRA q/k/v/o and the floor.

    .venv/bin/python -m bench.methods                       # sample GPT, hidden 256: prints the markdown table
    .venv/bin/python -m bench.methods --quick               # tiny sizes, 2 rounds: checks the script

The same machinery as ``bench.run``'s training sections (:mod:`bench.train_worker`, one process
per variant, timed steps interleaved round by round, paired ratios), on the sample GPT (it has
biases, which MindFormers' Llama has not, so BitFit has something to train). Setup runs one worker
at a time. The variants are described in :mod:`bench.models`.
"""
from __future__ import annotations

import argparse
import time

from bench import report
from bench.models import METHOD_VARIANTS
from bench.runner import run_interleaved

VARIANTS = ("full", "floor", "lora_qkvo", *METHOD_VARIANTS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="gpt", choices=("gpt", "llama"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    shape = ["--layers", "2", "--seq", "16", "--batch", "2"] if args.quick else []
    hidden, rounds, warm = (32, 2, 0) if args.quick else (args.hidden, args.rounds, 3)
    variants = [v for v in VARIANTS if args.model == "gpt" or v != "bitfit"]
    commands = {v: ["-m", "bench.train_worker", "--model", args.model, "--hidden", str(hidden), "--variant", v,
                    "--warmup", "2", *shape] for v in variants}
    started = time.perf_counter()
    results = run_interleaved(commands, rounds, warm, parallel_setup=1,
                              progress=lambda text: print(f"[{time.perf_counter() - started:6.1f} s] {text}",
                                                          flush=True))
    print(f"\n{args.model}, hidden {hidden}, float32, {rounds} timed rounds "
          f"({time.perf_counter() - started:.0f} s)\n")
    print("\n".join(report.training_table(results)))
    print("\n| variant | step / LoRA q/k/v/o step (paired median) |\n|---|---:|")
    for name in variants:
        if name not in ("full", "floor", "lora_qkvo"):
            print(f"| {report.VARIANT_TEXT[name]} | {report.ratio(results, name, 'lora_qkvo'):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
