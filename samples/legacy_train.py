"""A legacy training script that knows nothing about PET: the sample GPT with ``Model.train``.

    python samples/legacy_train.py --steps 40 --save-ckpt base.ckpt
    pet-hooks run --config samples/configs/lora.yaml --save-dir adapter/ samples/legacy_train.py --steps 40

With ``--save-ckpt`` it writes a full checkpoint of the network after training.
"""
import argparse
import os
import sys

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import LossMonitor, Model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.data import lm_batches  # noqa: E402
from samples.tiny_gpt import LMLoss, build  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description="train the sample GPT")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--save-ckpt", default=None)
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    net = build(seed=0, hidden_size=args.hidden)
    batches = lm_batches(seq_length=net.config.seq_length, batch_size=8, seed=0)
    data = [next(batches) for _ in range(args.steps)]
    dataset = ds.GeneratorDataset(data, ["input_ids", "labels"], shuffle=False)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=args.lr, weight_decay=0.01)
    model = Model(net, LMLoss(), optimizer)
    model.train(1, dataset, callbacks=[LossMonitor(10)])
    if args.save_ckpt:
        ms.save_checkpoint(net, args.save_ckpt)
        print(f"checkpoint saved to {args.save_ckpt}")


if __name__ == "__main__":
    main()
