"""Turn the benchmark results into BENCHMARKS.md: tables, ratios and the targets of issue 6.

Everything here is arithmetic on the measured JSON; nothing is measured. The part of an
existing BENCHMARKS.md below ``ANALYSIS_MARKER`` (the hand-written analysis) is kept.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

ANALYSIS_MARKER = "<!-- analysis: kept when the benchmark rewrites this file -->"

VARIANT_TEXT = {
    "full": "full fine-tuning",
    "floor": "floor (all frozen but one norm weight of layer 0)",
    "lora_qkvo": "pet_hooks LoRA r=8, q/k/v/o",
    "lora_all": "pet_hooks LoRA r=8, all linear",
    "lora_qkvo_3more": "pet_hooks LoRA r=8, q/k/v/o, with 3 more adapters loaded (inactive)",
    "mflora_qkvo": "MindFormers LoRA r=8, q/k/v/o",
    "mflora_all": "MindFormers LoRA r=8, all linear",
    "ptuning2": "pet_hooks P-Tuning v2, 16 positions",
    "prefix": "pet_hooks Prefix-Tuning, 16 positions",
    "forward": "forward pass only, no training (reference)",
    "ia3": "pet_hooks IA3, k/v + MLP output (feed-forward)",
    "bitfit": "pet_hooks BitFit, every bias",
    "adapter": "pet_hooks adapter, bottleneck 64, after attention and MLP outputs",
    "low_rank_adapter": "pet_hooks low_rank_adapter, reduction 4, rank 8, same places",
    "dora_qkvo": "pet_hooks DoRA r=8, q/k/v/o",
    "pissa_qkvo": "pet_hooks LoRA r=8 q/k/v/o, PiSSA init",
}


def read_existing(path: str) -> str:
    """The text of an existing BENCHMARKS.md, or "" when there is none (the parts a rewrite keeps)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def median_ms(result: dict) -> float:
    return statistics.median(step["ms"] for step in result["steps"])


def ratio(results: Dict[str, dict], a: str, b: str) -> Optional[float]:
    """Median over the rounds of step(a) / step(b) in the same round (paired)."""
    if a not in results or b not in results:
        return None
    return statistics.median(x["ms"] / y["ms"] for x, y in zip(results[a]["steps"], results[b]["steps"]))


def mem_ratio(results: Dict[str, dict], a: str, b: str) -> Optional[float]:
    if a not in results or b not in results:
        return None
    return results[a]["done"]["peak_rss_above_baseline_mb"] / results[b]["done"]["peak_rss_above_baseline_mb"]


def paired(times: Dict[str, List[float]], a: str, b: str) -> float:
    """Median over repetitions of times[a][i] / times[b][i]."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _fmt(value: Optional[float], digits: int = 2, suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def training_table(results: Dict[str, dict]) -> List[str]:
    lines = ["| variant | trainable params | step ms: median (min-max) | x full | x floor | x MindFormers LoRA "
             "| peak RSS above baseline, MB | x full | of which before the first step, MB | CPU/wall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        steps = [s["ms"] for s in result["steps"]]
        mf = {"lora_qkvo": "mflora_qkvo", "lora_all": "mflora_all"}.get(name)
        cpu = statistics.median(s["cpu_per_wall"] for s in result["steps"])
        lines.append(
            f"| {VARIANT_TEXT.get(name, name)} | {result['ready']['trainable']:,} | "
            f"{statistics.median(steps):.1f} ({min(steps):.1f}-{max(steps):.1f}) | {_fmt(ratio(results, name, 'full'))} | "
            f"{_fmt(ratio(results, name, 'floor'))} | {_fmt(ratio(results, name, mf) if mf else None)} | "
            f"{result['done']['peak_rss_above_baseline_mb']:.0f} | {_fmt(mem_ratio(results, name, 'full'))} | "
            f"{result['ready'].get('rss_before_compile_mb', float('nan')):.0f} | {cpu:.2f} |")
    return lines


def _target(rows: list, text: str, value: Optional[float], goal: float, fmt: str = "{:.3f}x",
            higher_is_worse: bool = True) -> None:
    if value is None:
        rows.append(f"| {text} | not measured | {fmt.format(goal)} | - |")
        return
    met = value <= goal if higher_is_worse else value >= goal
    rows.append(f"| {text} | {fmt.format(value)} | {'<=' if higher_is_worse else '>='} {fmt.format(goal)} | "
                f"{'met' if met else '**missed**'} |")


def targets(training: Dict[Tuple[str, int, str], Dict[str, dict]], inference: Dict[Tuple[str, int], dict],
            hooks: dict) -> List[str]:
    rows = ["| target | measured | goal | |", "|---|---:|---:|---|"]
    for (model, hidden, dtype), results in training.items():
        if dtype != "float32":
            continue
        tag = f"{model} h{hidden}"
        for lora, mf in (("lora_qkvo", "mflora_qkvo"), ("lora_all", "mflora_all")):
            if lora not in results:
                continue
            if hidden >= 1024:
                _target(rows, f"{tag}: {lora} step / floor step", ratio(results, lora, "floor"), 1.05)
            _target(rows, f"{tag}: {lora} step / MindFormers LoRA step", ratio(results, lora, mf), 1.02)
            _target(rows, f"{tag}: {lora} step / full fine-tuning step", ratio(results, lora, "full"),
                    0.62 if hidden >= 1024 else 1.0, "{:.2f}x")
            if hidden >= 1024:
                _target(rows, f"{tag}: {lora} peak memory / full", mem_ratio(results, lora, "full"), 0.45)
            _target(rows, f"{tag}: {lora} peak memory / MindFormers LoRA", mem_ratio(results, lora, mf), 1.02)
    for (model, hidden), result in inference.items():
        _target(rows, f"{model} h{hidden}: merged forward / base forward", paired(result["ms"], "merged", "base"), 1.02)
        _target(rows, f"{model} h{hidden}: adapter forward / base forward", paired(result["ms"], "adapter", "base"),
                1.10)
    if "apply" in hooks:
        apply = hooks["apply"]
        _target(rows, f"apply() on {apply['layers']}-layer Llama, q/k/v/o ({apply['qkvo']['cells']} cells), s",
                apply["qkvo"]["apply_s"]["median"], 0.2, "{:.3f}")
    if "enable" in hooks:
        en = hooks["enable"]
        _target(rows, "build inside enable() / outside", en["inside_s"]["median"] / en["outside_s"]["median"], 1.05)
    if "callback" in hooks:
        _target(rows, "PetCallback time per step / step time", 100 * hooks["callback"]["overhead_fraction"], 1.0,
                "{:.4f}%")
    if "size" in hooks:
        for targets_name in ("qkvo", "all"):
            size = hooks["size"][targets_name]
            _target(rows, f"LoRA {targets_name} adapter weights file / raw delta bytes",
                    size["weights_file_bytes"] / size["raw_bytes"], 1.02, "{:.4f}x")
    return rows


def inference_table(inference: Dict[Tuple[str, int], dict]) -> List[str]:
    lines = ["| model | base ms | adapter active ms | merged ms | adapter / base | merged / base |",
             "|---|---:|---:|---:|---:|---:|"]
    for (model, hidden), result in inference.items():
        med = result["median_ms"]
        lines.append(f"| {model} h{hidden} | {med['base']:.2f} | {med['adapter']:.2f} | {med['merged']:.2f} | "
                     f"{paired(result['ms'], 'adapter', 'base'):.3f}x | {paired(result['ms'], 'merged', 'base'):.3f}x |")
    return lines


def hooks_lines(hooks: dict) -> List[str]:
    lines = []
    if "apply" in hooks:
        a = hooks["apply"]
        lines += [f"**apply() / remove()** on a {a['layers']}-layer Llama (hidden {a['hidden']}), median of "
                  f"{a['qkvo']['apply_s']['n']}:", "",
                  "| targets | cells | apply s: median (min-max) | remove s: median |", "|---|---:|---:|---:|"]
        for name in ("qkvo", "all"):
            t = a[name]
            lines.append(f"| {name} | {t['cells']} | {t['apply_s']['median']:.3f} ({t['apply_s']['min']:.3f}-"
                         f"{t['apply_s']['max']:.3f}) | {t['remove_s']['median']:.3f} |")
        lines.append("")
    if "enable" in hooks:
        e = hooks["enable"]
        lines += [f"**Building a model inside enable()** (Llama, {e['layers']} layers, hidden {e['hidden']}, "
                  f"alternating, {e['outside_s']['n']} each): outside {e['outside_s']['median']:.3f} s "
                  f"({e['outside_s']['min']:.3f}-{e['outside_s']['max']:.3f}), inside {e['inside_s']['median']:.3f} s "
                  f"({e['inside_s']['min']:.3f}-{e['inside_s']['max']:.3f}): "
                  f"{e['inside_s']['median'] / e['outside_s']['median']:.3f}x. Leaving the block (it adapts the "
                  f"model) takes {e['exit_apply_s']['median']:.3f} s more.", ""]
    if "callback" in hooks:
        c = hooks["callback"]
        lines += [f"**PetCallback per step** (Llama hidden {c['hidden']}, Model.train, {c['steps']} timed steps): "
                  f"the callback's own work {c['callback_ms_per_step']['median']:.4f} ms per step against a "
                  f"{c['step_ms']['median']:.1f} ms step ({100 * c['overhead_fraction']:.4f}%); once at train "
                  f"begin (apply + new optimizer) {c['train_begin_ms']:.0f} ms.", ""]
    if "size" in hooks:
        s = hooks["size"]
        lines += [f"**Adapter size** (Llama, {s['layers']} layers, hidden {s['hidden']}, "
                  f"{s['total_params']:,} base parameters; full checkpoint {s['full_checkpoint_bytes']:,} bytes):", "",
                  "| LoRA targets | delta params | raw delta bytes | weights file | whole adapter dir "
                  "| file / raw | dir / full checkpoint |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("qkvo", "all"):
            t = s[name]
            lines.append(f"| {name} | {t['delta_params']:,} | {t['raw_bytes']:,} | {t['weights_file_bytes']:,} | "
                         f"{t['adapter_dir_bytes']:,} | {t['weights_file_bytes'] / t['raw_bytes']:.4f}x | "
                         f"{t['adapter_dir_bytes'] / s['full_checkpoint_bytes']:.4f}x |")
        lines.append("")
    return lines


def torch_table(torch_results: Dict[int, Dict[str, dict]], training) -> List[str]:
    lines = ["| hidden | PyTorch LoRA q/k/v/o / full | PyTorch LoRA all / full | pet_hooks LoRA q/k/v/o / full "
             "| pet_hooks LoRA all / full | PyTorch full step ms | PyTorch peak RSS LoRA q/k/v/o / full |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for hidden, results in torch_results.items():
        ms_results = training.get(("llama", hidden, "float32"), {})
        lines.append(f"| {hidden} | {_fmt(ratio(results, 'lora_qkvo', 'full'))} | {_fmt(ratio(results, 'lora_all', 'full'))} | "
                     f"{_fmt(ratio(ms_results, 'lora_qkvo', 'full'))} | {_fmt(ratio(ms_results, 'lora_all', 'full'))} | "
                     f"{median_ms(results['full']):.1f} | {_fmt(mem_ratio(results, 'lora_qkvo', 'full'))} |")
    return lines


def graph_table(graphs: List[dict]) -> List[str]:
    """Kernel counts per (model, variant), and whether pet_hooks compiles to MindFormers' kernels."""
    by_key = {(g["model"], g["variant"]): g for g in graphs}
    lines = ["| model | variant | kernels | MatMul | Mul | same kernels as MindFormers LoRA, same targets |",
             "|---|---|---:|---:|---:|---|"]
    for g in graphs:
        twin = by_key.get((g["model"], "mf" + g["variant"])) if g["variant"].startswith("lora_") else None
        same = "n/a" if twin is None else ("yes" if twin["ops"] == g["ops"] else "**no**")
        lines.append(f"| {g['model']} | {VARIANT_TEXT.get(g['variant'], g['variant'])} | {g['kernels']} | "
                     f"{g['ops'].get('MatMul', 0)} | {g['ops'].get('Mul', 0)} | {same} |")
    return lines
