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
import json
import sys
import time

from bench.models import (Shape, apply_variant, build_base, count, import_everything, loss_cell_and_inputs,
                          peak_rss_mb, rss_mb, train_step)


def _say(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("gpt", "llama"), required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    shape = Shape(args.model, args.hidden, args.layers, args.seq, args.batch, dtype=args.dtype)

    import_everything()
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=0)
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
    _say(event="ready", trainable=count(trainable), total=count(net.get_parameters()),
         setup_s=round(time.perf_counter() - start, 2), first_loss=first_loss,
         rss_before_compile_mb=round(before_compile, 1))

    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            loss = float(step(*inputs).asnumpy())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            _say(event="step", ms=round(1000 * wall, 3), cpu_per_wall=round(cpu / wall, 3), loss=loss)
        elif command == "done":
            _say(event="done", peak_rss_above_baseline_mb=round(peak_rss_mb() - baseline, 1),
                 baseline_rss_mb=round(baseline, 1))
            return 0
        else:
            _say(event="error", message=f"unknown command {command!r}")
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
