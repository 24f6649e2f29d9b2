"""What the hooks themselves cost, and what an adapter weighs on disk.

    python -m bench.hooks_worker apply    --layers 32 --hidden 512 --reps 5
    python -m bench.hooks_worker enable   --hidden 1024 --reps 5
    python -m bench.hooks_worker callback --hidden 256 --steps 12
    python -m bench.hooks_worker size     --hidden 1024
    python -m bench.hooks_worker apply --layers 4 + size --hidden 32      # several in one process

Each prints one JSON line. ``apply`` times ``pet_hooks.apply`` (and ``remove``) on a deep
Llama; ``enable`` builds the same model outside and inside ``pet_hooks.enable()`` in turn;
``callback`` trains through ``Model.train`` with ``PetCallback`` and times what the
callback does on every step against the step itself; ``size`` compares the adapter on disk
with the raw bytes of its deltas and with a full checkpoint.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

from bench.models import (Shape, add_shape_arguments, build_base, count, start_mindspore, loss_cell_and_inputs,
                          pet_config)


def _stats(values):
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def bench_apply(shape: Shape, reps: int) -> dict:
    import pet_hooks
    net = build_base(shape)
    result = {"layers": shape.layers, "hidden": shape.hidden}
    for targets in ("qkvo", "all"):
        cfg = pet_config(shape, "lora_" + targets)
        seconds, remove_seconds = [], []
        for _ in range(reps + 1):               # the first round warms imports and caches
            start = time.perf_counter()
            pet_hooks.apply(net, cfg)
            seconds.append(time.perf_counter() - start)
            cells = len(pet_hooks.delta_parameters(net)) // 2
            start = time.perf_counter()
            pet_hooks.remove(net)
            remove_seconds.append(time.perf_counter() - start)
        result[targets] = {"cells": cells, "apply_s": _stats(seconds[1:]), "remove_s": _stats(remove_seconds[1:])}
    return result


def bench_enable(shape: Shape, reps: int) -> dict:
    import pet_hooks
    cfg = pet_config(shape, "lora_qkvo")
    outside, inside, exits = [], [], []
    for rep in range(reps + 1):                 # round 0 is the warm-up
        for where in (("outside", "inside") if rep % 2 == 0 else ("inside", "outside")):
            gc.collect()
            if where == "outside":
                start = time.perf_counter()
                net = build_base(shape)
                took = time.perf_counter() - start
                if rep:
                    outside.append(took)
            else:
                with pet_hooks.enable(cfg):
                    start = time.perf_counter()
                    net = build_base(shape)
                    took = time.perf_counter() - start
                    leave = time.perf_counter()
                exit_took = time.perf_counter() - leave   # adapting the model built in the block
                if rep:
                    inside.append(took)
                    exits.append(exit_took)
                assert pet_hooks.delta_parameters(net), "enable() did not adapt the model"
            del net
    return {"hidden": shape.hidden, "layers": shape.layers, "outside_s": _stats(outside), "inside_s": _stats(inside),
            "exit_apply_s": _stats(exits)}


def bench_callback(shape: Shape, steps: int) -> dict:
    import mindspore as ms
    import mindspore.dataset as ds
    from mindspore import nn
    from mindspore.train import Callback, Model
    import pet_hooks
    from bench.models import batch

    class StepTimer(Callback):
        def __init__(self):
            super().__init__()
            self.ms, self._start = [], None

        def on_train_step_begin(self, run_context):
            self._start = time.perf_counter()

        def on_train_step_end(self, run_context):
            self.ms.append(1000 * (time.perf_counter() - self._start))

    net = build_base(shape)
    loss_cell, _ = loss_cell_and_inputs(net, shape)
    ids = batch(shape)
    columns = [ids[:, :-1], ids[:, 1:]] if shape.model == "gpt" else [ids]
    names = ["input_ids", "labels"][:len(columns)]
    dataset = ds.GeneratorDataset([tuple(columns)] * steps, names, shuffle=False)
    callback = pet_hooks.PetCallback(pet_config(shape, "lora_qkvo"))
    spent = {"on_train_begin": [], "per_step": []}

    def timed(method, key):
        def run(run_context):
            start = time.perf_counter()
            method(run_context)
            spent[key].append(1000 * (time.perf_counter() - start))
        return run
    # Every method the callback overrides runs once per step or once per run.
    callback.on_train_begin = timed(callback.on_train_begin, "on_train_begin")
    callback.on_train_step_end = timed(callback.on_train_step_end, "per_step")
    timer = StepTimer()
    # The timer runs outermost, so its step time includes the callback's work.
    model = Model(loss_cell, optimizer=nn.AdamWeightDecay(net.trainable_params(), 1e-4))
    model.train(1, dataset, callbacks=[timer, callback], dataset_sink_mode=False)
    assert pet_hooks.delta_parameters(net), "PetCallback did not adapt the model"
    step_ms = timer.ms[2:]                       # the first steps compile
    per_step = spent["per_step"][2:]
    return {"hidden": shape.hidden, "steps": len(step_ms), "step_ms": _stats(step_ms),
            "callback_ms_per_step": _stats(per_step), "train_begin_ms": round(spent["on_train_begin"][0], 2),
            "overhead_fraction": round(statistics.median(per_step) / statistics.median(step_ms), 6),
            "mindspore": ms.__version__}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def bench_size(shape: Shape) -> dict:
    import mindspore as ms
    import pet_hooks
    result = {"hidden": shape.hidden, "layers": shape.layers}
    with tempfile.TemporaryDirectory() as tmp:
        full, base = os.path.join(tmp, "full.ckpt"), build_base(shape)
        ms.save_checkpoint(base, full)
        result["full_checkpoint_bytes"] = os.path.getsize(full)
        result["total_params"] = count(base.get_parameters())
        del base
        for targets in ("qkvo", "all"):
            net = pet_hooks.apply(build_base(shape), pet_config(shape, "lora_" + targets))
            deltas = pet_hooks.delta_parameters(net)
            raw = sum(int(p.asnumpy().nbytes) for p in deltas)
            out = pet_hooks.save_adapter(net, os.path.join(tmp, targets))
            weights = [n for n in os.listdir(out) if n.endswith(".safetensors")]
            result[targets] = {"delta_params": count(deltas), "raw_bytes": raw,
                               "weights_file_bytes": sum(os.path.getsize(os.path.join(out, n)) for n in weights),
                               "adapter_dir_bytes": _dir_bytes(out)}
    return result


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("apply", "enable", "callback", "size"))
    add_shape_arguments(parser, model_default="llama", hidden_default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """One measurement, or several separated by ``+`` (``apply --layers 4 + size --hidden 32``: one process for
    all, what ``bench.run --quick`` does; the full run gives each its own process)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    jobs, current = [], []
    for token in argv + ["+"]:
        if token == "+":
            jobs.append(_parse(current))
            current = []
        else:
            current.append(token)
    start_mindspore()
    for args in jobs:
        shape = Shape(args.model, args.hidden, args.layers, args.seq, args.batch)
        if args.what == "apply":
            result = bench_apply(shape, args.reps)
        elif args.what == "enable":
            result = bench_enable(shape, args.reps)
        elif args.what == "callback":
            result = bench_callback(shape, args.steps)
        else:
            result = bench_size(shape)
        print(json.dumps({"event": args.what, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
