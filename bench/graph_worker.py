"""The kernels MindSpore compiles for one training variant: a count that does not depend on noise.

    python -m bench.graph_worker --model llama --variant lora_qkvo

Compiles the training step of a small model (2 layers, hidden 64) with MindSpore's
``save_graphs`` on, reads the final kernel graph (``graph_build_0_*.ir``) and prints one JSON
line with the number of kernels by operator. Two LoRA implementations that compile to the
same kernels cost the same, whatever a noisy machine's timings say; the floor's count shows
which weight-gradient MatMuls the compiler leaves out for frozen weights.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

from bench.models import Shape, apply_variant, build_base, start_mindspore, loss_cell_and_inputs, train_step

# "  %12(name) = PrimFunc_MatMul(..." or "  %3(x) = Load(..." in a MindSpore 2.9 IR file
_KERNEL = re.compile(r"^  %\d+\([^)]*\) = (?:PrimFunc_)?([A-Z][A-Za-z0-9]+)\(", re.MULTILINE)


def count_kernels(ir_text: str) -> dict:
    return dict(collections.Counter(_KERNEL.findall(ir_text)).most_common())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "llama"), required=True)
    parser.add_argument("--variant", required=True)
    args = parser.parse_args(argv)
    shape = Shape(args.model, hidden=64, layers=2, seq=16, batch=2)
    # Dump only the pass read below: the same graph_build_0_*.ir, a third of the time of dumping every pass
    # (about 100 files; the counts are the same either way).
    os.environ.setdefault("MS_DEV_DUMP_IR_PASSES", "graph_build")
    # An inherited MS_DEV_SAVE_GRAPHS=0 overrides save_graphs=1 below and nothing is dumped: MindFormers' Trainer
    # sets it in its process (a test run that trained a Trainer before starting the benchmark passed it on).
    os.environ.pop("MS_DEV_SAVE_GRAPHS", None)
    with tempfile.TemporaryDirectory(prefix="bench-graph-") as out:
        start_mindspore(save_graphs=1, save_graphs_path=out)
        net = apply_variant(build_base(shape), shape, args.variant)
        loss_cell, inputs = loss_cell_and_inputs(net, shape)
        train_step(loss_cell, net.trainable_params(), args.variant)(*inputs).asnumpy()
        files = sorted(glob.glob(os.path.join(out, "graph_build_0_*.ir")))
        if not files:
            raise SystemExit(f"no graph_build_0_*.ir in {sorted(os.listdir(out))[:20]}")
        with open(files[-1], encoding="utf-8", errors="replace") as handle:
            ops = count_kernels(handle.read())
    ops.pop("Load", None)          # parameter reads, not computation
    print(json.dumps({"event": "graph", "model": args.model, "variant": args.variant,
                      "kernels": sum(ops.values()), "ops": ops}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
