"""What a run checkpoint costs on SmolLM2-135M: its size, and the time a save adds to training.

    .venv/bin/python -m bench.checkpoint_cost                 # all 30 blocks, 21 steps, a save every 10
    .venv/bin/python -m bench.checkpoint_cost --layers 2 --steps 6 --every 2    # a quick look

One process, graph mode: SmolLM2-135M-Instruct (``samples.smollm2``, all blocks unless ``--layers``),
LoRA r=8 on q/k/v/o (the demo's targets), batch 4 x 128, ``mindspore.experimental.optim.AdamW`` in a
``TrainOneStepCell`` (the run of BENCHMARKS.md's SmolLM2 section). Each step and each
``pet_hooks.save_checkpoint`` (what ``PetCallback(save_steps=N)`` and ``pet-hooks run --save-steps N``
call) is timed on its own; the overhead is the time of the saves over the time of the steps they
follow (the first step, which compiles, left out). Prints a JSON record and the markdown rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_bytes(path: str) -> dict:
    return {entry: os.path.getsize(os.path.join(path, entry)) for entry in sorted(os.listdir(path))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="cut SmolLM2 to this many blocks (default: all)")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--every", type=int, default=10, help="save a checkpoint every this many steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import numpy as np
    import mindspore as ms
    from mindspore import nn
    from mindspore.experimental.optim import AdamW
    import pet_hooks
    from bench.models import Shape, pet_config
    from bench.smollm2_worker import batches
    from samples.smollm2 import load_smollm2

    ms.set_context(mode=0)
    net = load_smollm2(args.layers, seq_length=args.seq, batch_size=args.batch)
    pet_hooks.apply(net, pet_config(Shape("llama"), "lora_qkvo"))
    net.set_train(True)
    optimizer = AdamW(net.trainable_params(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step_cell = nn.TrainOneStepCell(net, optimizer)
    step_cell.set_train(True)
    data = batches(args.seq, args.batch, "train")
    folder = tempfile.mkdtemp(prefix="pet_hooks_ckpt_bench_")
    steps, saves = [], []
    try:
        for index in range(args.steps):
            started = time.perf_counter()
            loss = float(step_cell(ms.Tensor(data[index % len(data)])).asnumpy())
            steps.append(time.perf_counter() - started)
            if (index + 1) % args.every == 0:
                started = time.perf_counter()
                path = pet_hooks.save_checkpoint(net, step_cell, index + 1, folder)
                saves.append(time.perf_counter() - started)
        sizes = _folder_bytes(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    timed = steps[1:]
    delta_bytes = sum(int(np.prod(p.shape)) * 4 for p in pet_hooks.delta_parameters(net))
    base_bytes = sum(int(np.prod(p.shape)) * 4 for p in net.get_parameters()) - delta_bytes
    record = {
        "layers": args.layers or "all", "steps": args.steps, "every": args.every, "last_loss": loss,
        "first_step_s": round(steps[0], 2), "step_s_mean": round(float(np.mean(timed)), 3),
        "save_s": [round(s, 3) for s in saves], "save_s_mean": round(float(np.mean(saves)), 3),
        "overhead": round(float(np.sum(saves)) / float(np.sum(timed)), 4),
        "checkpoint_bytes": sum(sizes.values()), "files": sizes, "delta_bytes": delta_bytes,
        "base_bytes": base_bytes,
    }
    print(json.dumps(record, indent=1))
    print(f"| SmolLM2 ({record['layers']} blocks), LoRA r=8 q/k/v/o, AdamW | {record['checkpoint_bytes']:,} B "
          f"(adapter {sizes.get('adapter_model.safetensors', 0):,} B, optimizer state "
          f"{sizes.get('train_state.safetensors', 0):,} B; base {base_bytes:,} B) | {record['save_s_mean']} s "
          f"| {record['step_s_mean']} s | {100 * record['overhead']:.2f}% with a save every {args.every} steps |")
    return record


if __name__ == "__main__":
    main()
