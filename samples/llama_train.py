"""A legacy MindFormers script that knows nothing about PET: a tiny LlamaForCausalLM with Model.train.

    python samples/llama_train.py --yaml samples/configs/llama_ptuning2.yaml --steps 20
    pet-hooks run --config samples/configs/llama_ptuning2.yaml --save-dir adapter/ \\
        samples/llama_train.py --yaml samples/configs/llama_ptuning2.yaml --steps 20

The model is built from the run YAML's model.model_config (pet_config ignored here), with the
CPU settings MindFormers needs (no flash attention, float32). It trains on the sample corpus.
"""
import argparse
import os
import sys

import yaml
import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import LossMonitor, Model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.data import lm_batches  # noqa: E402


def build_llama(yaml_path: str):
    from mindformers import LlamaConfig, LlamaForCausalLM
    with open(yaml_path, encoding="utf-8") as handle:
        model_config = dict(yaml.safe_load(handle)["model"]["model_config"])
    for key in ("type", "pet_config"):
        model_config.pop(key, None)
    ms.set_seed(0)
    return LlamaForCausalLM(LlamaConfig(**model_config))


def main():
    parser = argparse.ArgumentParser(description="train a tiny MindFormers Llama")
    parser.add_argument("--yaml", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", type=int, default=0)
    parser.add_argument("--save-ckpt", default=None)
    args = parser.parse_args()

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    net = build_llama(args.yaml)
    seq = net.config.seq_length
    batches = lm_batches(seq_length=seq + 1, batch_size=net.config.batch_size, seed=0)
    data = [next(batches)[0] for _ in range(args.steps)]   # LlamaForCausalLM shifts the labels itself
    dataset = ds.GeneratorDataset([(d,) for d in data], ["input_ids"], shuffle=False)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-2)
    model = Model(net, optimizer=optimizer)
    model.train(1, dataset, callbacks=[LossMonitor(5)])
    if args.save_ckpt:
        ms.save_checkpoint(net, args.save_ckpt)
        print(f"checkpoint saved to {args.save_ckpt}")


if __name__ == "__main__":
    main()
