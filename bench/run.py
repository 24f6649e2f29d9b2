"""Every benchmark of issue 6 in one run, written to BENCHMARKS.md.

    .venv/bin/python -m bench.run                 # the full run (about 30 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick --out /tmp/b.md   # tiny sizes, one round: checks the scripts
    .venv/bin/python -m bench.run --smollm2       # only the SmolLM2-135M section (bench/smollm2.py, ~30 min)

Training variants each run in their own process (:mod:`bench.train_worker`), their timed
steps interleaved round by round; inference and the cost of the hooks run in their own
processes too. The PyTorch comparison runs when torch, transformers and peft import.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Tuple

from bench import report
from bench.models import ROOT, VARIANTS
from bench.runner import run_interleaved, run_many, torch_available
from bench.torch_worker import TORCH_VARIANTS


def plan(quick: bool) -> dict:
    """What to measure: the full issue-6 plan, or a tiny one that only exercises the scripts."""
    if quick:
        shape = ["--layers", "2", "--seq", "16", "--batch", "2"]
        return {"shape": shape, "rounds": 1, "warm_rounds": 0, "warmup": "1", "parallel": 2,
                "hooks_in_one_process": True,
                "training": [("llama", 32, "float32", ("full", "floor", "lora_qkvo", "mflora_qkvo", "ptuning2"), 1),
                             ("gpt", 32, "float32", ("lora_all", "mflora_all", "prefix"), 1)],
                "inference": [("gpt", 32)], "torch_hidden": [32], "inference_warm": "0",
                "apply": ["--layers", "4", "--hidden", "32", "--reps", "1"],
                "enable": ["--hidden", "32", "--reps", "1", *shape],
                "callback": ["--hidden", "32", "--steps", "4", *shape],
                "size": ["--hidden", "32", *shape],
                "graphs": [("llama", v) for v in ("floor", "lora_qkvo", "mflora_qkvo")]}
    return {"shape": [], "rounds": 11, "warm_rounds": 3, "warmup": "2", "parallel": 1, "hooks_in_one_process": False,
            # (model, hidden, dtype, variants, timed rounds): more rounds where steps are short,
            # because short steps swing more in relative terms.
            "training": [("gpt", 256, "float32", VARIANTS, 31), ("llama", 256, "float32", VARIANTS, 31),
                         ("gpt", 1024, "float32", VARIANTS, 11), ("llama", 1024, "float32", VARIANTS, 11),
                         # bfloat16 does not run on MindSpore's CPU kernels (Reshape has none); float16 does.
                         ("llama", 256, "float16", ("full", "floor", "lora_qkvo", "mflora_qkvo"), 21)],
            "inference": [("gpt", 1024), ("llama", 1024)], "torch_hidden": [256, 1024], "inference_warm": "3",
            "apply": ["--layers", "32", "--hidden", "1024", "--reps", "5"],
            "enable": ["--hidden", "1024", "--reps", "5"],
            "callback": ["--hidden", "256", "--steps", "20"],
            "size": ["--hidden", "1024"],
            "graphs": [(m, v) for m in ("gpt", "llama")
                       for v in ("full", "floor", "lora_qkvo", "mflora_qkvo", "lora_all", "mflora_all")]}


def machine() -> str:
    import mindspore
    import mindformers
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, MindSpore {mindspore.__version__}, MindFormers {mindformers.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round, to check the scripts")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--smollm2", action="store_true",
                        help="run only the SmolLM2-135M parity/quality/speed section instead (python -m bench.smollm2; "
                             "with --quick: 2 blocks, 2 steps)")
    args = parser.parse_args(argv)
    if args.smollm2:
        from bench import smollm2
        return smollm2.main((["--quick"] if args.quick else []) + ["--out", args.out]
                            + (["--json", args.json] if args.json else []))
    todo = plan(args.quick)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {text}", flush=True)

    training: Dict[Tuple[str, int, str], Dict[str, dict]] = {}
    for model, hidden, dtype, variants, rounds in todo["training"]:
        say(f"training: {model} hidden {hidden} {dtype}: {', '.join(variants)}")
        commands = {v: ["-m", "bench.train_worker", "--model", model, "--hidden", str(hidden), "--dtype", dtype,
                        "--variant", v, "--warmup", todo["warmup"], *todo["shape"]] for v in variants}
        training[(model, hidden, dtype)] = run_interleaved(commands, rounds, todo["warm_rounds"], progress=say)

    # One-shot workers: inference (three nets timed in turn in one process) and the hooks.
    say("inference and the cost of the hooks")
    jobs = [(f"inference-{model}", ["-m", "bench.inference_worker", "--model", model, "--hidden", str(hidden),
                                    "--reps", str(max(3, 2 * todo["rounds"] + 1)), "--warm-reps", todo["inference_warm"],
                                    *todo["shape"]], "inference")
            for model, hidden in todo["inference"]]
    measures = ("apply", "enable", "callback", "size")
    if todo["hooks_in_one_process"]:      # --quick checks the scripts, times nothing: one process, three imports saved
        command = [token for what in measures for token in ("+", what, *todo[what])][1:]
        jobs.append(("hooks", ["-m", "bench.hooks_worker", *command], measures))
    else:
        jobs += [(what, ["-m", "bench.hooks_worker", what, *todo[what]], what) for what in measures]
    answers = run_many(jobs, todo["parallel"])
    inference = {(m["model"], m["hidden"]): m for m in answers if m["event"] == "inference"}
    hooks = {m["event"]: m for m in answers if m["event"] != "inference"}

    say("compiled kernels of each variant")
    graphs = run_many([(f"graph-{m}-{v}", ["-m", "bench.graph_worker", "--model", m, "--variant", v], "graph")
                       for m, v in todo["graphs"]], parallel=2)     # nothing timed: two at a time

    torch_results: Dict[int, Dict[str, dict]] = {}
    versions = None if args.no_torch else torch_available()
    if versions:
        for hidden in todo["torch_hidden"]:
            say(f"pytorch: hidden {hidden}")
            commands = {v: ["-m", "bench.torch_worker", "--hidden", str(hidden), "--variant", v,
                            "--warmup", todo["warmup"], *todo["shape"]] for v in TORCH_VARIANTS}
            torch_results[hidden] = run_interleaved(commands, todo["rounds"], todo["warm_rounds"], progress=say)

    seconds = time.perf_counter() - started
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    from bench.smollm2 import kept_section
    text = document(todo, training, inference, hooks, graphs, torch_results, versions, command, seconds,
                    kept_analysis(args.out), kept_section(args.out))
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"training": {"/".join(map(str, k)): v for k, v in training.items()},
                       "inference": {"/".join(map(str, k)): v for k, v in inference.items()},
                       "hooks": hooks, "graphs": graphs, "torch": {str(k): v for k, v in torch_results.items()}},
                      handle, indent=1)
    say(f"wrote {args.out}")
    return 0


def kept_analysis(path: str) -> str:
    """The hand-written part of an existing BENCHMARKS.md, from the marker on."""
    text = report.read_existing(path)
    index = text.find(report.ANALYSIS_MARKER)
    return text[index:] if index >= 0 else ""


def document(todo, training, inference, hooks, graphs, torch_results, versions, command, seconds, analysis,
             smollm2_section: str = "") -> str:
    shape = " ".join(todo["shape"]) or "--layers 4 --seq 128 --batch 4"
    lines: List[str] = [
        "# Benchmarks", "",
        f"Written by `{command}` on {datetime.date.today().isoformat()} in {seconds / 60:.1f} minutes.",
        f"Machine: {machine()}.", "",
        f"Workload: {shape}, vocabulary 512, 8 heads, graph mode (`mode=0`), AdamWeightDecay, one fixed batch. "
        "The Llama is MindFormers' `LlamaForCausalLM` (intermediate size 2 x hidden); the GPT is "
        "`samples/tiny_gpt.py` (MLP 4 x hidden). Each training variant runs in its own process: it is built, "
        f"compiled and warmed up ({todo['warmup']} steps); then the orchestrator runs rounds in which each "
        "variant takes one step in turn, reversing the order every round (A B C, C B A, ...), so only one "
        f"variant computes at a time: {todo['warm_rounds']} rounds not kept, then the timed rounds "
        "(how many, each section's heading says). "
        "A time ratio is the median over the timed rounds of the ratio of the two variants' steps in the "
        "same round (paired, so that a slow moment of the machine hits both). Peak memory is the process's peak "
        "RSS above its RSS just before the model was built (all variants import the same packages). "
        "The float16 group computes in float16 with float32 parameters (MindFormers' mixed precision); bfloat16 "
        "has no CPU kernels in MindSpore 2.9 (Reshape refuses it). "
        "Every figure comes from this one run; absolute times are for context only.", "",
        "## Targets", "", *report.targets(training, inference, hooks), "",
    ]
    for (model, hidden, dtype), results in training.items():
        rounds = len(next(iter(results.values()))["steps"])
        lines += [f"## Training step: {model}, hidden {hidden}, {dtype} ({rounds} timed rounds)", "",
                  *report.training_table(results), ""]
    lines += ["## Inference (forward pass, one process, alternating)", "", *report.inference_table(inference), "",
              "## Cost of the hooks, and adapter size", "", *report.hooks_lines(hooks)]
    lines += ["## Compiled kernels of the training step (no timing, no noise)", "",
              "The final kernel graph MindSpore 2.9 compiles for each variant (`save_graphs`, 2 layers, hidden 64; "
              "parameter loads not counted), by `bench/graph_worker.py`.", "", *report.graph_table(graphs), ""]
    lines += ["## PyTorch + PEFT, same Llama shape", ""]
    if torch_results:
        lines += [f"torch / peft {versions}; Hugging Face `LlamaForCausalLM`, AdamW, 2 threads, same "
                  "interleaving.", "", *report.torch_table(torch_results, training), ""]
    else:
        lines += ["Not run: torch, transformers and peft do not all import here "
                  "(`pip install torch==2.13.0 peft` enables it).", ""]
    if smollm2_section:     # written by bench.smollm2, kept as it is
        lines += [smollm2_section, ""]
    lines += [analysis.rstrip() or report.ANALYSIS_MARKER, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
