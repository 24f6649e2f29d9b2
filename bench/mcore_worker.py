"""One variant of the mcore Qwen3 training step in its own process (bench.mcore runs them).

    python -m bench.mcore_worker --variant lora --hidden 256            # stepping worker (protocol.py)
    python -m bench.mcore_worker --variant lora --hidden 64 --graph     # kernel counts of the compiled step

The model is MindFormers' ``TrainingQwen3ForCausalLM`` with the CPU stand-ins of
``tests/mcore_cpu.py`` (FlashAttention, FusedRMSNorm, Outer and the embedding replaced by CPU
cells, in that test helper only): the same patched model for every variant. Variants:

``full``    every weight trains
``floor``   every weight frozen but layer 0's input norm (the gradient still crosses every layer)
``lora``    pet_hooks LoRA r=8 on linear_qkv, linear_proj, linear_fc1, linear_fc2
``mflora``  MindFormers' own mcore LoRA (``get_pet_model``: ColumnParallelLinearWithLoRA /
            RowParallelLinearWithLoRA), same targets, rank and alpha
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np

from bench.models import ROOT, count, rss_mb
from bench.protocol import say, serve_steps

TARGETS = ".*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2"
VARIANTS = ("full", "floor", "lora", "mflora")
VOCAB = 512


def build(variant: str, hidden: int, layers: int, seq: int, batch: int):
    from tests.mcore_cpu import tiny_qwen3
    import pet_hooks
    heads, kv_heads = max(hidden // 32, 2), max(hidden // 64, 1)
    net = tiny_qwen3(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                     vocab_size=VOCAB, max_position_embeddings=max(2 * seq, 64), seq_length=seq, batch_size=batch)
    cfg = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}
    if variant == "lora":
        pet_hooks.apply(net, cfg)
    elif variant == "mflora":
        from mindformers.pet import get_pet_model
        net = get_pet_model(net, dict(cfg, freeze_include=["*"], freeze_exclude=["*lora*"]))
    elif variant == "floor":
        for param in net.get_parameters():
            param.requires_grad = param.name == "decoder.layers.0.input_layernorm.weight"
    return net


def step_of(net, seq: int, batch: int):
    import mindspore as ms
    from mindspore import nn
    from tests.mcore_train import LossOf
    tokens = np.random.RandomState(0).randint(0, VOCAB, (batch, seq + 1)).astype(np.int32)
    inputs = (ms.Tensor(tokens[:, :-1]), ms.Tensor(tokens[:, 1:]))
    trainable = net.trainable_params()
    step = nn.TrainOneStepCell(LossOf(net), nn.AdamWeightDecay(trainable, learning_rate=1e-4))
    step.set_train(True)
    return (lambda: float(step(*inputs).asnumpy())), trainable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--graph", action="store_true", help="print the compiled step's kernel counts and exit")
    args = parser.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import mindspore as ms
    import mindformers.pet  # noqa: F401  (every variant imports the same packages: RSS baselines compare)
    import pet_hooks  # noqa: F401
    from tests.mcore_cpu import mcore_context
    ms.set_device("CPU")
    out_dir = tempfile.mkdtemp(prefix="bench-mcore-") if args.graph else None
    ms.set_context(mode=0, **({"save_graphs": 1, "save_graphs_path": out_dir} if args.graph else {}))
    os.chdir(tempfile.mkdtemp(prefix="bench-mcore-cwd-"))     # MindFormers writes output/ into the cwd
    mcore_context()
    baseline = rss_mb()
    start = time.perf_counter()
    net = build(args.variant, args.hidden, args.layers, args.seq, args.batch)
    step, trainable = step_of(net, args.seq, args.batch)
    first = None
    for _ in range(args.warmup):
        loss = step()
        first = loss if first is None else first
    if args.graph:
        from bench.graph_worker import count_kernels
        files = sorted(glob.glob(os.path.join(out_dir, "graph_build_0_*.ir")))
        with open(files[-1], encoding="utf-8", errors="replace") as handle:
            ops = count_kernels(handle.read())
        ops.pop("Load", None)
        say(event="graph", variant=args.variant, kernels=sum(ops.values()), ops=ops)
        return 0
    say(event="ready", trainable=count(trainable), total=count(net.get_parameters()),
        setup_s=round(time.perf_counter() - start, 2), first_loss=first)
    return serve_steps(step, baseline)


if __name__ == "__main__":
    sys.exit(main())
