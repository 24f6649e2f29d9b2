"""What several adapters cost (issue 18): training one with three more loaded, switching, hot swap, mixed batches.

    .venv/bin/python -m bench.adapters                  # both parts, markdown for BENCHMARKS.md
    .venv/bin/python -m bench.adapters --quick          # tiny sizes, 2 rounds: checks the script

Part 1 (training, ``bench.train_worker`` processes, timed steps interleaved round by round, paired
ratios): MindFormers' legacy Llama (hidden 256, 4 layers, batch 4 x 128), LoRA r=8 q/k/v/o alone
against the same with three more adapters of that config loaded and inactive (``lora_qkvo_3more``).

Part 2 (switching, one process, graph mode, predict mode, the same Llama at batch 4): warm calls
against the first call after ``set_adapter`` (same ranks), a hot swap (``load_adapter(...,
hotswap=True)`` into the active adapter), entering ``adapter_per_row`` and changing its rows, and a
forced recompile (a fresh compile of the net); RSS growth over 20 ``set_adapter`` cycles; and the
warm forward of a mixed batch over four adapters against the single-adapter forward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from bench import report
from bench.runner import run_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(quick: bool) -> list:
    shape = ["--layers", "2", "--seq", "16", "--batch", "2"] if quick else []
    hidden, rounds, warm = (32, 2, 0) if quick else (256, 21, 3)
    commands = {v: ["-m", "bench.train_worker", "--model", "llama", "--hidden", str(hidden), "--variant", v,
                    "--warmup", "2", *shape] for v in ("floor", "lora_qkvo", "lora_qkvo_3more")}
    started = time.perf_counter()
    results = run_interleaved(commands, rounds, warm, parallel_setup=1,
                              progress=lambda text: print(f"[{time.perf_counter() - started:6.1f} s] {text}",
                                                          file=sys.stderr, flush=True))
    lines = [f"Llama, hidden {hidden}, float32, {rounds} timed rounds", ""] + report.training_table(results)
    lines += ["", f"Training the active adapter with three more loaded: "
                  f"**{report.ratio(results, 'lora_qkvo_3more', 'lora_qkvo'):.3f}x** the step time of the net with "
                  f"only that adapter (paired median; goal <= 1.02x)."]
    return lines


def measure_switching(quick: bool) -> dict:
    """Part 2, in this process."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    from bench.models import Shape, build_base, load_average, rss_mb, start_mindspore
    import pet_hooks
    from pet_hooks.utils.ms_compat import force_recompile

    start_mindspore()
    shape = Shape("llama", 32 if quick else 256, 2 if quick else 4, 16 if quick else 128, 4)
    net = build_base(shape)
    net.set_train(False)
    cfg = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "target_modules": r".*wq|.*wk|.*wv|.*wo"}
    pet_hooks.apply(net, {**cfg, "seed": 0})
    rng = np.random.default_rng(0)
    for name in ("b", "c", "d"):
        pet_hooks.add_adapter(net, name, {**cfg, "seed": ord(name)})
    for name in ("default", "b", "c", "d"):             # B != 0 everywhere: each adapter changes the output
        pet_hooks.set_adapter(net, name)
        for param in pet_hooks.delta_parameters(net):
            param.set_data(ms.Tensor((0.01 * rng.standard_normal(param.shape)).astype(np.float32)))
    pet_hooks.set_adapter(net, "default")
    x = ms.Tensor(rng.integers(1, 500, (shape.batch, shape.seq)).astype(np.int32))

    def timed() -> float:
        begin = time.perf_counter()
        out = net(x)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        return time.perf_counter() - begin

    result = {"load_start": load_average(), "compile_s": timed()}
    for _ in range(3):
        timed()
    warm_n = 3 if quick else 7

    def switch(key: str, action) -> None:
        result[key + "_warm_s"] = statistics.median(timed() for _ in range(warm_n))
        action()
        ms.runtime.synchronize()
        result[key + "_s"] = timed()

    folder = tempfile.mkdtemp(prefix="bench-adapters-")
    pet_hooks.save_adapter(net, folder, adapter_name="c")
    switch("set_adapter", lambda: pet_hooks.set_adapter(net, "b"))
    switch("set_adapter_back", lambda: pet_hooks.set_adapter(net, "default"))
    switch("hot_swap", lambda: pet_hooks.load_adapter(net, folder, adapter_name="default", hotswap=True))
    switch("forced_recompile", force_recompile)
    # no leak: RSS over 20 switch-and-call cycles, after 5 to warm the allocator
    names = ["b", "c", "d", "default"]
    for index in range(5):
        pet_hooks.set_adapter(net, names[index % 4])
        timed()
    before = rss_mb()
    for index in range(20):
        pet_hooks.set_adapter(net, names[index % 4])
        timed()
    result["rss_mb_per_switch"] = (rss_mb() - before) / 20
    # mixed batch: one row per adapter, against the single adapter's forward
    single = statistics.median(timed() for _ in range(warm_n))
    rows = ["default", "b", "c", "d"][:shape.batch]
    with pet_hooks.adapter_per_row(net, rows) as selection:
        result["per_row_enter_s"] = timed()                  # entering the mode compiles
        for _ in range(3):
            timed()
        result["per_row_warm_s"] = statistics.median(timed() for _ in range(warm_n))
        selection.set(list(reversed(rows)))
        ms.runtime.synchronize()
        result["per_row_set_s"] = timed()
    result["single_warm_s"] = single
    result["per_row_over_single"] = result["per_row_warm_s"] / single
    result["shape"] = f"Llama hidden {shape.hidden}, {shape.layers} layers, batch {shape.batch} x {shape.seq}"
    return result


def _switch_table(r: dict) -> list:
    lines = [f"{r['shape']}, graph mode, predict; four LoRA r=8 q/k/v/o adapters (load at start {r['load_start']}). "
             f"The first call of the net (compile) took {r['compile_s']:.2f} s.", "",
             "| first call after | warm call s | first call s | first / warm |", "| --- | ---: | ---: | ---: |"]
    labels = {"set_adapter": "`set_adapter(net, 'b')` (same ranks: values only)",
              "set_adapter_back": "`set_adapter(net, 'default')`",
              "hot_swap": "`load_adapter(..., adapter_name='default', hotswap=True)` (active adapter)",
              "forced_recompile": "`force_recompile()` (a fresh compile, for comparison)"}
    for key, label in labels.items():
        warm = r[key + "_warm_s"]
        lines.append(f"| {label} | {warm:.3f} | {r[key + '_s']:.3f} | {r[key + '_s'] / warm:.2f}x |")
    lines += ["", f"RSS growth over 20 `set_adapter` + call cycles: {r['rss_mb_per_switch']:.2f} MB per cycle.", "",
              f"Mixed batch (`adapter_per_row`, one row per adapter): entering the block compiles once "
              f"({r['per_row_enter_s']:.2f} s); then a forward takes {r['per_row_warm_s']:.3f} s against "
              f"{r['single_warm_s']:.3f} s with one adapter: **{r['per_row_over_single']:.2f}x**; the first call "
              f"after `selection.set(...)` (another composition) took {r['per_row_set_s']:.3f} s."]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("train", "switch", "both"), default="both")
    parser.add_argument("--switch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.switch_worker:
        print(json.dumps(measure_switching(args.quick)))
        return 0
    lines = []
    if args.part in ("train", "both"):
        lines += _train(args.quick) + [""]
    if args.part in ("switch", "both"):
        done = subprocess.run([sys.executable, "-m", "bench.adapters", "--switch-worker"]
                              + (["--quick"] if args.quick else []), cwd=ROOT, capture_output=True, text=True,
                              check=True)
        lines += _switch_table(json.loads(done.stdout.strip().splitlines()[-1]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
