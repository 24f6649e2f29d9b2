"""Memory and step time of SmolLM2 LoRA training with MindSpore's AdamW and with pet_hooks.optim.AdamW.

    .venv/bin/python -m bench.fused_adamw              # both variants, each in its own process, all 30 blocks

Graph mode, SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, batch 4 x 128, 8 steps: peak RSS above the RSS
before the model was built, the first step (the compile) and the median of the later ones. The two
optimizers compute the same update (tests/training/test_fused_adamw.py); the fused one is
``nn.AdamWeightDecay``'s kernel per tensor with bias-corrected scalars. ``nn`` (MindSpore's
``nn.AdamWeightDecay``, no bias correction: another update) is the third row, for the cost.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(variant: str, layers, steps: int) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    from mindspore import nn
    from mindspore.experimental.optim import AdamW as MindSporeAdamW
    import pet_hooks
    from pet_hooks.optim import AdamW as FusedAdamW
    from bench.models import Shape, pet_config, peak_rss_mb, rss_mb
    from bench.smollm2_worker import batches
    from samples.smollm2 import load_smollm2

    ms.set_context(mode=0)
    base = rss_mb()
    net = load_smollm2(layers, seq_length=128, batch_size=4)
    pet_hooks.apply(net, pet_config(Shape("llama"), "lora_qkvo"))
    net.set_train(True)
    if variant == "nn":       # MindSpore's fused AdamWeightDecay (no bias correction: another update)
        optimizer = nn.AdamWeightDecay(net.trainable_params(), 1e-3, weight_decay=0.0)
    else:
        cls = FusedAdamW if variant == "fused" else MindSporeAdamW
        optimizer = cls(net.trainable_params(), lr=1e-3, weight_decay=0.0)
    step = nn.TrainOneStepCell(net, optimizer)
    step.set_train(True)
    data = batches(128, 4, "train")
    times, losses = [], []
    for index in range(steps):
        started = time.perf_counter()
        losses.append(float(step(ms.Tensor(data[index])).asnumpy()))
        times.append(time.perf_counter() - started)
    return {"variant": variant, "peak_mb_above_base": round(peak_rss_mb() - base), "first_step_s": round(times[0], 1),
            "later_step_s": round(float(np.median(times[1:])), 3), "losses": losses}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        layers = None if sys.argv[3] == "all" else int(sys.argv[3])
        print("RESULT " + json.dumps(worker(sys.argv[2], layers, int(sys.argv[4]))), flush=True)
        return
    layers = os.environ.get("LAYERS", "all")
    steps = os.environ.get("STEPS", "8")
    rows = []
    for variant in os.environ.get("VARIANTS", "mindspore,fused,nn").split(","):
        out = subprocess.run([sys.executable, "-m", "bench.fused_adamw", "--worker", variant, layers, steps],
                             cwd=ROOT, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(out.stderr[-3000:])
        rows.append(json.loads(line[7:]))
    for row in rows:
        print(json.dumps(row))
    print("| optimizer | peak RSS above base | first step | later steps |")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_mb_above_base']:,} MB | {row['first_step_s']} s | {row['later_step_s']} s |")


if __name__ == "__main__":
    main()
