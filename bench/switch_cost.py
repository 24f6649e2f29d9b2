"""What switching an adapter costs in graph mode: RSS growth per cycle, and the first call after a switch.

    .venv/bin/python -m bench.switch_cost            # prints the markdown table of BENCHMARKS.md
    .venv/bin/python -m bench.switch_cost --smollm2  # the first call after each switch on the real model

Each row runs in its own process on a 2-layer hidden-64 MindFormers Llama (tests.nets.tiny_llama),
graph mode: 40 cycles, growth averaged over cycles 11-40 (the first ten warm the allocator up).
``--smollm2`` runs one process on SmolLM2-135M-Instruct (all 30 blocks, ``samples.smollm2``,
LoRA r=8 on q/k/v/o, predict mode, batch 1 x 64): the first call after each switch, and after a
forced recompile (what each switch cost before it became data), against warm calls.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {
    "call": "`net(x)` alone",
    "bump": "`force_recompile(); net(x)` (MindSpore's own cost of one recompile)",
    "apply_remove": "`apply; net(x); remove`",
    "disable": "`with disable_adapters(net): net(x)` then `net(x)`",
    "merge": "`merge; net(x); unmerge; net(x)`",
}
CFG = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*wq|.*wv"}


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(row: str, cycles: int = 40, skip: int = 10) -> dict:
    """One row, in this process."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=0)
    import pet_hooks
    from pet_hooks.utils.ms_compat import force_recompile
    from tests.nets import tiny_llama

    net = tiny_llama()
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).integers(1, 64, (2, 8)).astype(np.int32))
    if row in ("disable", "merge"):
        pet_hooks.apply(net, CFG)
    net(x)

    def cycle():
        if row == "call":
            net(x)
        elif row == "bump":
            force_recompile()
            net(x)
        elif row == "apply_remove":
            pet_hooks.apply(net, CFG)
            net(x)
            pet_hooks.remove(net)
        elif row == "disable":
            with pet_hooks.disable_adapters(net):
                net(x)
            net(x)
        elif row == "merge":
            pet_hooks.merge(net)
            net(x)
            pet_hooks.unmerge(net)
            net(x)

    values = []
    for _ in range(cycles):
        cycle()
        values.append(_rss_mb())
    result = {"row": row, "mb_per_cycle": (values[-1] - values[skip - 1]) / (cycles - skip)}
    if row in ("disable", "merge"):   # the first call after the switch against warm calls
        warm = []
        for _ in range(5):
            start = time.perf_counter()
            net(x)
            warm.append(time.perf_counter() - start)
        context = pet_hooks.disable_adapters(net) if row == "disable" else None
        if context is not None:
            context.__enter__()
        else:
            pet_hooks.merge(net)
        start = time.perf_counter()
        net(x)
        result["first_over_warm"] = (time.perf_counter() - start) / sorted(warm)[2]
    return result


def measure_smollm2(warm_calls: int = 3) -> dict:
    """Seconds of the first call after each switch on the real model, and of warm calls, in this process."""
    sys.path.insert(0, ROOT)
    import tempfile
    import numpy as np
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=0)
    import pet_hooks
    from pet_hooks.utils.ms_compat import force_recompile, write_values
    from samples.smollm2 import load_smollm2

    net = load_smollm2(seq_length=64, batch_size=1)
    net.set_train(False)
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "target_modules": ".*wq|.*wk|.*wv|.*wo"})
    x = ms.Tensor(np.random.default_rng(0).integers(1, 49152, (1, 64)).astype(np.int32))

    def timed() -> float:
        start = time.perf_counter()
        out = net(x)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        return time.perf_counter() - start

    out = {"compile_s": timed()}
    for _ in range(3):              # the first calls after a compile are still slow
        timed()

    def switch(name: str, action) -> None:
        """Warm calls (median of 3) right before, then the switch and the first call after it."""
        out[name + "_warm_s"] = sorted(timed() for _ in range(warm_calls))[warm_calls // 2]
        action()
        ms.runtime.synchronize()    # writes queued by the switch (ops.assign) belong to the switch, not the call
        out[name + "_s"] = timed()

    def write_b():
        for param in pet_hooks.delta_parameters(net):      # B != 0: the branches change the output
            if ".lora_B" in param.name:
                write_values(param, np.full(param.shape, 0.01, np.float32))

    folder = tempfile.mkdtemp(prefix="switch-cost-")
    disabled = pet_hooks.disable_adapters(net)
    switch("after_writing_B", write_b)
    switch("disable", disabled.__enter__)
    switch("enable", lambda: disabled.__exit__(None, None, None))
    switch("merge", lambda: pet_hooks.merge(net))
    switch("unmerge", lambda: pet_hooks.unmerge(net))
    pet_hooks.save_adapter(net, folder)
    switch("hot_swap", lambda: pet_hooks.load_adapter(net, folder))   # new values into the existing deltas
    switch("forced_recompile", force_recompile)
    return out


def smollm2_table(result: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, 30 blocks, LoRA r=8 q/k/v/o, predict mode, batch 1 x 64; the first call "
             f"(compile) took {result['compile_s']:.1f} s. Each switch: the median of 3 warm calls right before it, "
             "then the first call after it.", "",
             "| first call after | warm call s | first call s | first / warm |", "| --- | ---: | ---: | ---: |"]
    labels = {"after_writing_B_s": "writing new values into B (`write_values`)",
              "disable_s": "entering `disable_adapters`", "enable_s": "leaving it",
              "merge_s": "`merge`", "unmerge_s": "`unmerge`",
              "hot_swap_s": "`load_adapter` into the existing deltas (hot swap)",
              "forced_recompile_s": "`force_recompile()` (what each switch cost before issue 16)"}
    for key, label in labels.items():
        warm = result[key[:-2] + "_warm_s"]
        lines.append(f"| {label} | {warm:.2f} | {result[key]:.2f} | {result[key] / warm:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--row":
        print(json.dumps(measure(sys.argv[2])))
        return
    if sys.argv[1:] == ["--smollm2"]:
        result = measure_smollm2()
        print(json.dumps(result))
        print(smollm2_table(result))
        return
    lines = ["| cycle (graph mode) | RSS growth per cycle | first call after the switch / warm call |",
             "| --- | --- | --- |"]
    for row, label in ROWS.items():
        out = subprocess.run([sys.executable, "-m", "bench.switch_cost", "--row", row], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = f"{result['first_over_warm']:.2f}x" if "first_over_warm" in result else "-"
        lines.append(f"| {label} | {result['mb_per_cycle']:.2f} MB | {ratio} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
