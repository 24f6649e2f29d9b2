"""Part "memory" of ``python -m bench.smollm2``: issue 14's table on the full model, before and after.

Each row is one training run of its own process (``bench/memory_study/run.py`` for MindSpore,
``bench/memory_study/torch_peft.py`` for PyTorch), one after another and never two at once
(MindSpore full fine-tuning alone takes 12 to 16 GB). Peak memory repeats exactly from run to
run; the times are one run each on a shared machine, so the ratios against PEFT LoRA are
indicative. "Before" is pet_hooks with ``reuse_block_graphs: false`` (every decoder block
compiled on its own, as before issue 14); "after" is the default.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional

from bench.models import ROOT, load_average

STUDY = os.path.join("bench", "memory_study")
# key -> (label, script, arguments); the order is the order of the runs (before/after pairs adjacent)
ROWS = {
    "ms_full": ("MindSpore full fine-tuning, graph mode", "run.py", ["--variant", "full"]),
    "lora_before": ("pet_hooks LoRA q/k/v/o, graph mode, before", "run.py", ["--variant", "lora", "--lever", "noreuse"]),
    "lora_after": ("pet_hooks LoRA q/k/v/o, graph mode, after", "run.py", ["--variant", "lora"]),
    "lora_o0_before": ("pet_hooks LoRA, graph mode, `jit_level` O0, before", "run.py",
                       ["--variant", "lora", "--lever", "jitO0,noreuse"]),
    "lora_o0_after": ("pet_hooks LoRA, graph mode, `jit_level` O0, after", "run.py", ["--variant", "lora", "--lever", "jitO0"]),
    "lora_fused_optimizer": ("pet_hooks LoRA, graph mode, after, `nn.AdamWeightDecay` (fused kernels, no bias "
                             "correction)", "run.py", ["--variant", "lora", "--optimizer", "adamwd"]),
    "lora_pynative": ("pet_hooks LoRA, PyNative", "run.py", ["--variant", "lora", "--lever", "pynative"]),
    "ptuning2": ("pet_hooks P-Tuning v2, 16 positions, graph mode", "run.py", ["--variant", "ptuning2"]),
    "prefix": ("pet_hooks Prefix-Tuning, 16 positions, MLP 64, graph mode", "run.py", ["--variant", "prefix"]),
    "torch_full": ("PyTorch full fine-tuning (transformers)", "torch_peft.py", ["--variant", "full"]),
    "peft_lora": ("PEFT LoRA q/k/v/o (transformers)", "torch_peft.py", ["--variant", "lora"]),
}


def run_row(key: str, blocks: int, steps: int) -> dict:
    """One row's process; its RESULT line as a dict (``error`` set when it failed)."""
    _, script, extra = ROWS[key]
    argv = [sys.executable, os.path.join(STUDY, script), "--steps", str(steps), "--seq", "128", "--batch", "4", *extra]
    if blocks:
        argv += ["--blocks", str(blocks)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False)
    lines = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


def memory(todo: dict, progress: Callable[[str], None] = print) -> dict:
    """Every row (or the rows ``todo["memory_rows"]`` names, the others kept from ``todo["memory_kept"]``),
    one process at a time."""
    blocks = todo.get("memory_blocks", 30)
    kept = todo.get("memory_kept") or {}
    rows = todo.get("memory_rows") or list(ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown memory rows {unknown}; known: {list(ROWS)}")
    if kept and (kept.get("blocks"), kept.get("steps")) != (blocks, todo["memory_steps"]):
        kept = {}                                  # rows of another size cannot share a table
    results: Dict[str, dict] = {k: v for k, v in kept.get("results", {}).items() if k not in rows}
    for key in rows:
        progress(f"memory: {key} ({blocks} blocks, {todo['memory_steps']} steps)")
        load = load_average()
        results[key] = {**run_row(key, blocks, todo["memory_steps"]), "load_start": load,
                        "date": datetime.date.today().isoformat()}
        if "error" in results[key]:
            progress(f"    failed: {results[key]['error'][:300]}")
    return {"blocks": blocks, "steps": todo["memory_steps"], "results": results}


def _cell(result: dict, field: str, fmt: str) -> str:
    value = result.get(field)
    return "failed" if "error" in result else ("n/a" if value is None else fmt.format(value))


def _load(result: dict) -> Optional[float]:
    match = re.match(r"\s*([0-9.]+)", str(result.get("load_start", "")))
    return float(match.group(1)) if match else None


def _similar_load(a: dict, b: dict) -> bool:
    """Timings of two rows compare only when the machine was about as busy for both."""
    load_a, load_b = _load(a), _load(b)
    return load_a is not None and load_b is not None and abs(load_a - load_b) < 1.0


def lines(data: dict) -> List[str]:
    """The "Memory and compile time" subsection of the SmolLM2 section."""
    res, blocks = data["results"], data["blocks"]
    peft = res.get("peft_lora", {})
    out = [f"### Memory and compile time, before and after issue 14 ({blocks} blocks, batch 4 x 128, "
           f"{data['steps']} steps)", "",
           "Issue 14's table, each row its own process, one after another (`bench/smollm2_memory.py`, workers "
           "`bench/memory_study/run.py` and `torch_peft.py`); AdamW with torch's formula "
           "(`mindspore.experimental.optim.AdamW` / `torch.optim.AdamW`), weight decay 0. \"Before\": "
           "`reuse_block_graphs: false`, every decoder block compiled on its own; \"after\": the default, identically "
           "adapted blocks share one compiled graph (`pet_hooks/surgery/graph_reuse.py`, docs/memory_and_speed.md). Peak "
           "memory: peak RSS above the RSS before loading the model; it repeats exactly between runs. Times are one "
           "run each on a shared machine: indicative, and only comparable between rows run at a similar load (last column; "
           "`--memory-rows` reruns single rows).", "",
           "| variant | blocks sharing one graph | first step s | later steps: median s | peak RSS above base, MB | "
           "time / PEFT LoRA | memory / PEFT LoRA | load average at its start |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, (label, _, _) in ROWS.items():
        r = res.get(key)
        if r is None:
            continue
        time_ratio = mem_ratio = "n/a"
        if "error" not in r and "error" not in peft and peft and r.get("later_median_s"):
            mem_ratio = f"{r['peak_above_base_mb'] / peft['peak_above_base_mb']:.2f}x"
            time_ratio = (f"{r['later_median_s'] / peft['later_median_s']:.2f}x" if _similar_load(r, peft)
                          else "n/a (other load)")
        sharing = "failed" if "error" in r else (r.get("blocks_sharing_a_graph", "n/a") if r.get("mode") == 0
                                                 and r.get("variant") != "full" else "n/a")
        out.append(f"| {label} | {sharing} | "
                   f"{_cell(r, 'first_s', '{:.1f}')} | {_cell(r, 'later_median_s', '{:.2f}')} | "
                   f"{_cell(r, 'peak_above_base_mb', '{:,.0f}')} | {time_ratio} | {mem_ratio} | "
                   f"{r.get('load_start', 'not recorded')} |")
    for before, after, what in (("lora_before", "lora_after", "LoRA, graph mode"),
                                ("lora_o0_before", "lora_o0_after", "LoRA, O0")):
        b, a = res.get(before, {}), res.get(after, {})
        if b and a and "error" not in b and "error" not in a and _similar_load(a, b):
            out.append("")
            out.append(f"{what}, after against before: peak memory {a['peak_above_base_mb'] - b['peak_above_base_mb']:+,.0f} MB "
                       f"({a['peak_above_base_mb'] / b['peak_above_base_mb'] - 1:+.1%}), first step "
                       f"{a['first_s'] / b['first_s'] - 1:+.0%}, later steps {a['later_median_s'] / b['later_median_s'] - 1:+.0%}; "
                       f"first three losses {'identical' if a['losses'] == b['losses'] else 'DIFFERENT'}.")
    out.append("")
    return out
