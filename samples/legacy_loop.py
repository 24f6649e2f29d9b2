"""A legacy training loop that knows nothing about PET: ``value_and_grad`` and an optimizer.

    python samples/legacy_loop.py --steps 30
    pet-hooks run --config samples/configs/lora.yaml --save-dir adapter/ samples/legacy_loop.py --steps 30
"""
import argparse
import os
import sys

import mindspore as ms
from mindspore import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.data import lm_batches  # noqa: E402
from samples.tiny_gpt import LMLoss, build  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="train the sample GPT with a hand-written loop")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", type=int, default=1)
    parser.add_argument("--save-ckpt", default=None)
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    net = build(seed=0)
    loss_fn = LMLoss()
    optimizer = nn.Adam(net.get_parameters(), learning_rate=3e-3)

    def forward(ids, labels):
        return loss_fn(net(ids), labels)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    def train_step(ids, labels):
        loss, grads = grad_fn(ids, labels)
        optimizer(grads)
        return loss

    if args.mode == 0:
        train_step = ms.jit(train_step)
    batches = lm_batches(seq_length=net.config.seq_length, batch_size=8, seed=0)
    for step in range(1, args.steps + 1):
        ids, labels = next(batches)
        loss = train_step(Tensor(ids), Tensor(labels))
        if step == 1 or step % 10 == 0:
            print(f"step {step} loss {float(loss.asnumpy()):.4f}")
    if args.save_ckpt:
        ms.save_checkpoint(net, args.save_ckpt)
        print(f"checkpoint saved to {args.save_ckpt}")


if __name__ == "__main__":
    main()
