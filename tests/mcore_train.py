"""A Model.train script for the tiny mcore Qwen3 that knows nothing about PET (the launcher's and inspect's subject).

    python tests/mcore_train.py --yaml samples/configs/qwen3_lora.yaml --steps 4
    pet-hooks run --config samples/configs/qwen3_lora.yaml --save-dir adapter/ \\
        tests/mcore_train.py --yaml samples/configs/qwen3_lora.yaml --steps 4

The model is ``TrainingQwen3ForCausalLM`` built from the run YAML's ``model.model_config``
(``pet_config`` ignored here) with the CPU stand-ins of ``tests/mcore_cpu.py``; graph mode (the
mcore layers run only there). It trains on random token ids, next-token labels.
"""
import argparse
import os
import sys

import numpy as np
import yaml
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import LossMonitor, Model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.mcore_cpu import tiny_qwen3  # noqa: E402


def build_qwen3(yaml_path: str):
    with open(yaml_path, encoding="utf-8") as handle:
        model_config = dict(yaml.safe_load(handle)["model"]["model_config"])
    for key in ("type", "pet_config"):
        model_config.pop(key, None)
    return tiny_qwen3(**model_config)


class LossOf(nn.Cell):
    """The model's loss for (input_ids, labels): its training output is (loss, mtp loss, aux losses)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)     # as WithLossCell: the model's parameters keep their names
        self.net = net

    def construct(self, input_ids, labels):
        return self.net(input_ids, labels=labels)[0]


def batches(steps: int, batch: int, seq: int, vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (steps, batch, seq + 1)).astype(np.int32)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def main():
    parser = argparse.ArgumentParser(description="train a tiny mcore Qwen3")
    parser.add_argument("--yaml", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-ckpt", default=None)
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=0)
    net = build_qwen3(args.yaml)
    data = batches(args.steps, 2, 8, 97)
    dataset = ds.GeneratorDataset(data, ["input_ids", "labels"], shuffle=False)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
    model = Model(LossOf(net), optimizer=optimizer)
    model.train(1, dataset, callbacks=[LossMonitor(1)], dataset_sink_mode=False)
    if args.save_ckpt:
        ms.save_checkpoint(net, args.save_ckpt)
        print(f"checkpoint saved to {args.save_ckpt}")


if __name__ == "__main__":
    main()
