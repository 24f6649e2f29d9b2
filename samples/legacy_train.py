"""A legacy training script that knows nothing about PET: the sample GPT with ``Model.train``.

    python samples/legacy_train.py --steps 40 --save-ckpt base.ckpt
    pet-hooks run --config samples/configs/lora.yaml --save-dir adapter/ samples/legacy_train.py --steps 40

With ``--save-ckpt`` it writes a full checkpoint of the network after training (and with
``--save-init-ckpt`` one before training, once the optimizer is built).

Data parallel on the CPU, one process per rank under MindSpore's ``msrun``::

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \
        samples/legacy_train.py --data-parallel --steps 40 --save-ckpt 'out/rank{rank}.ckpt'

``--data-parallel`` calls ``mindspore.communication.init()`` and sets ``DATA_PARALLEL`` with
``gradients_mean=True``. Every rank draws the same global batches of ``batch-size * ranks``
rows and trains on its own slice (rank r takes rows ``[r * batch-size, (r + 1) * batch-size)``),
so the averaged gradient is the gradient of the whole global batch. ``{rank}`` in a
checkpoint path is replaced by the rank.
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


def _init_data_parallel():
    """(rank, ranks): join the msrun cluster and average gradients over it."""
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return get_rank(), get_group_size()


def main():
    parser = argparse.ArgumentParser(description="train the sample GPT")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", choices=("adamw", "momentum"), default="adamw")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (per rank)")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    parser.add_argument("--data-parallel", action="store_true", help="one rank of an msrun job")
    parser.add_argument("--save-init-ckpt", default=None)
    parser.add_argument("--save-ckpt", default=None)
    parser.add_argument("--data-length", type=int, default=None,
                        help="tokens per row (default: the GPT's seq_length; prompt tuning needs room for its tokens)")
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    rank, ranks = _init_data_parallel() if args.data_parallel else (0, 1)
    net = build(seed=0, hidden_size=args.hidden)
    batches = lm_batches(seq_length=args.data_length or net.config.seq_length, batch_size=args.batch_size * ranks,
                         seed=0)
    rows = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    data = [tuple(part[rows] for part in next(batches)) for _ in range(args.steps)]
    dataset = ds.GeneratorDataset(data, ["input_ids", "labels"], shuffle=False)
    if args.optimizer == "momentum":
        optimizer = nn.Momentum(net.trainable_params(), learning_rate=args.lr, momentum=0.9)
    else:
        optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=args.lr, weight_decay=0.01)
    if args.save_init_ckpt:
        ms.save_checkpoint(net, args.save_init_ckpt.format(rank=rank))
    model = Model(net, LMLoss(), optimizer)
    model.train(1, dataset, callbacks=[LossMonitor(args.log_every)])
    if args.save_ckpt:
        path = args.save_ckpt.format(rank=rank)
        ms.save_checkpoint(net, path)
        print(f"checkpoint saved to {path}")


if __name__ == "__main__":
    main()
