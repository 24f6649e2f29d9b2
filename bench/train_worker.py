"""One training variant in its own process, stepping when the orchestrator says so.

    python -m bench.train_worker --model llama --hidden 1024 --variant lora_qkvo

The worker imports everything, records its RSS, builds the model, applies the variant,
compiles the step (graph mode) and runs the warm-up steps, then prints one ``ready`` JSON
line. After that each ``step`` line on stdin runs one timed training step and answers with
one JSON line; ``done`` answers with the peak memory and exits. Because the orchestrator
hands out steps round-robin, the variants' timed steps interleave (A/B/C/A/B/C...) while
each keeps its own process, memory and compiled graph.
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.models import (Shape, add_shape_arguments, apply_variant, build_base, count, start_mindspore,
                          loss_cell_and_inputs, rss_mb, train_step)
from bench.protocol import say, serve_steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    shape = Shape(args.model, args.hidden, args.layers, args.seq, args.batch, dtype=args.dtype)

    start_mindspore()
    baseline = rss_mb()
    start = time.perf_counter()
    net = apply_variant(build_base(shape), shape, args.variant)
    loss_cell, inputs = loss_cell_and_inputs(net, shape)
    trainable = [] if args.variant == "forward" else net.trainable_params()
    step = train_step(loss_cell, trainable, args.variant)
    before_compile = rss_mb() - baseline       # model, deltas and optimizer, before the first step
    first_loss = None
    for _ in range(args.warmup):
        loss = float(step(*inputs).asnumpy())
        first_loss = loss if first_loss is None else first_loss
    say(event="ready", trainable=count(trainable), total=count(net.get_parameters()),
         setup_s=round(time.perf_counter() - start, 2), first_loss=first_loss,
         rss_before_compile_mb=round(before_compile, 1))

    return serve_steps(lambda: float(step(*inputs).asnumpy()), baseline)

if __name__ == "__main__":
    sys.exit(main())
