"""The main demo: a short LoRA fine-tune of the sample GPT on the standard-library corpus.

    python samples/demo.py [--config samples/configs/lora.yaml] [--steps 60] [--save-dir demo_adapter]

Prints the trainable summary, the loss as it goes down, and where the adapter was saved.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pet_hooks  # noqa: E402
from samples.data import lm_batches  # noqa: E402
from samples.tiny_gpt import GPTWithLoss, build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "lora.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-dir", default="demo_adapter")
    parser.add_argument("--mode", type=int, default=0, help="0 graph (default), 1 PyNative")
    args = parser.parse_args(argv)

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    net = build(seed=0)
    cfg = pet_hooks.load_config(args.config)
    pet_hooks.apply(net, cfg)
    print(pet_hooks.trainable_summary(net))

    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=3e-3)
    step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
    step.set_train(True)
    batches = lm_batches(seq_length=net.config.seq_length, batch_size=8, seed=0)
    losses, start = [], time.perf_counter()
    for i in range(1, args.steps + 1):
        ids, labels = next(batches)
        losses.append(float(step(Tensor(ids), Tensor(labels)).asnumpy()))
        if i == 1 or i % 10 == 0:
            print(f"step {i:4d}  loss {np.mean(losses[-10:]):.4f}")
    print(f"loss {losses[0]:.4f} -> {np.mean(losses[-10:]):.4f} in {args.steps} steps "
          f"({time.perf_counter() - start:.1f} s)")
    path = pet_hooks.save_adapter(net, args.save_dir)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"adapter saved to {os.path.abspath(path)} ({size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
