"""Inference cost of an adapter: the base model, the adapter active, and the adapter merged.

    python -m bench.inference_worker --model llama --hidden 1024 --reps 7

Three copies of the same seed-0 model live in this one process: untouched, with pet_hooks
LoRA (r=8 on q/k/v/o) active, and with that LoRA merged into the weights. Each forward is
compiled (graph mode) and warmed up, then the three are timed in turn, alternating the
order every round (after a few rounds not kept). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.models import Shape, add_shape_arguments, build_base, forward_inputs, start_mindspore, pet_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warm-reps", type=int, default=3)
    args = parser.parse_args(argv)
    shape = Shape(args.model, args.hidden, args.layers, args.seq, args.batch)

    start_mindspore()
    import pet_hooks
    cfg = pet_config(shape, "lora_qkvo")
    nets = {"base": build_base(shape), "adapter": pet_hooks.apply(build_base(shape), cfg),
            "merged": pet_hooks.merge(pet_hooks.apply(build_base(shape), cfg))}
    inputs = forward_inputs(shape)
    for net in nets.values():
        net.set_train(False)
        for _ in range(2):                      # compile, then one warm call
            net(*inputs)
    times = {name: [] for name in nets}
    names = list(nets)
    for rep in range(-args.warm_reps, args.reps):   # negative reps warm up and are not kept
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            out = nets[name](*inputs)
            (out[0] if isinstance(out, tuple) else out).asnumpy()
            if rep >= 0:
                times[name].append(1000 * (time.perf_counter() - start))
    print(json.dumps({"event": "inference", "model": args.model, "hidden": args.hidden,
                      "ms": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
                      "median_ms": {name: round(statistics.median(ts), 3) for name, ts in times.items()}}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
