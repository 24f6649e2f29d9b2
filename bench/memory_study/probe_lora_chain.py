"""Memory of one LoRA formulation on a chain of N LoRA-adapted layers, graph mode, gradient w.r.t. the deltas.

    .venv/bin/python bench/memory_study/probe_lora_chain.py --impl today --n 16 [--layer linear|dense] [--save-graphs D]
    --impl floor: no LoRA, every weight frozen, one scale at the chain's start trains (backward through every layer)

Prints one RESULT line: RSS after two calls above the RSS before the first call, peak above it, first/later
seconds, the kernels of the final graph by operator (with --save-graphs), and the max |difference| of the
forward output and of the gradients against the reference file written by --impl today (B random, nonzero).
"""
import argparse, glob, json, os, statistics, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from run import status_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", default="today")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--layer", default="linear", choices=("linear", "dense"))
    parser.add_argument("--save-graphs", default="")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--ref", default="/tmp/lora_chain_ref")
    args = parser.parse_args()
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=0, device_target="CPU")
    if args.save_graphs:
        ms.set_context(save_graphs=True, save_graphs_path=args.save_graphs)
    import pet_hooks
    if args.layer == "linear":
        from mindformers.modules.layers import Linear
    from lora_impls import install
    if args.impl != "floor":
        install(args.impl)
    n, d = args.n, args.dim

    class Chain(nn.Cell):  # noqa: D101
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            layers = []
            for _ in range(n):
                if args.layer == "linear":
                    cell = Linear(d, d, has_bias=False, compute_dtype=ms.float32, param_init_type=ms.float32)
                else:
                    cell = nn.Dense(d, d, has_bias=False)
                cell.weight.set_data(ms.Tensor((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)))
                layers.append(cell)
            self.layers = nn.CellList(layers)
            self.g = ms.Parameter(ms.Tensor(np.ones((d,), np.float32)), name="g",
                                  requires_grad=args.impl == "floor")

        def construct(self, x):
            y = x * self.g
            for layer in self.layers:
                y = layer(y)
            return y

    net = Chain()
    if args.impl != "floor":
        pet_hooks.apply(net, pet_hooks.LoraConfig(lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=r"layers\.\d+", seed=0))
        rng = np.random.default_rng(1)
        for p in net.trainable_params():
            if p.name.endswith("lora_B"):
                p.set_data(ms.Tensor((rng.standard_normal(p.shape) * 0.05).astype(np.float32)))
    else:
        for p in net.get_parameters():
            p.requires_grad = p.name == "g"
    for p in net.get_parameters():
        if p.name != "g" and "lora" not in p.name:
            p.requires_grad = False
    params = net.trainable_params()

    class Loss(nn.Cell):  # noqa: D101
        def __init__(self):
            super().__init__()
            self.net = net

        def construct(self, x):
            y = self.net(x)
            return (y * y).mean()

    loss = Loss()
    fn = ms.jit(ms.value_and_grad(loss, None, params))
    x = ms.Tensor(np.random.default_rng(2).standard_normal((args.rows, d)).astype(np.float32))
    base = status_mb("VmRSS")
    times = []
    for _ in range(args.calls):
        started = time.perf_counter()
        value, grads = fn(x)
        value.asnumpy()
        times.append(time.perf_counter() - started)
    out = {"impl": args.impl, "layer": args.layer, "n": n, "rows": args.rows, "dim": d,
           "first_s": round(times[0], 3), "median_s": round(statistics.median(times[1:]), 4),
           "rss_after_mb": round(status_mb("VmRSS") - base, 1), "peak_above_mb": round(status_mb("VmHWM") - base, 1),
           "loss": float(value.asnumpy())}
    y = net(x).asnumpy()
    g = [t.asnumpy() for t in grads]
    if args.impl == "today":
        np.save(args.ref + "_y.npy", y)
        np.savez(args.ref + "_g.npz", *g)
    elif args.impl != "floor" and os.path.exists(args.ref + "_y.npy"):
        ry = np.load(args.ref + "_y.npy")
        rg = np.load(args.ref + "_g.npz")
        out["max_out_diff"] = float(np.abs(y - ry).max())
        out["max_out_rel"] = float(np.abs(y - ry).max() / np.abs(ry).max())
        out["max_grad_rel"] = max(float(np.abs(a - rg[f"arr_{i}"]).max() / (np.abs(rg[f"arr_{i}"]).max() + 1e-30))
                                  for i, a in enumerate(g))
    if args.save_graphs:
        from bench.graph_worker import count_kernels
        files = sorted(glob.glob(os.path.join(args.save_graphs, "graph_build_*.ir")))
        if files:
            with open(max(files, key=os.path.getsize), encoding="utf-8", errors="replace") as handle:
                ops_count = count_kernels(handle.read())
            ops_count.pop("Load", None)
            out["kernels"] = ops_count
            out["ir"] = max(files, key=os.path.getsize)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
