"""Does MindSpore's CPU graph mode reuse the memory of intermediate tensors? A chain of N elementwise ops on a
[512, 49152] float32 tensor (100.7 MB), compiled as one graph; RSS after the call vs N.

    .venv/bin/python bench/memory_study/probe_reuse.py --n 8 [--mode 0|1] [--grad]
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import status_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--mode", type=int, default=0)
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--lever", default="")
    parser.add_argument("--op", default="sin", choices=("sin", "add"))
    args = parser.parse_args()
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=args.mode, device_target="CPU")
    if "memO1" in args.lever:
        ms.set_context(memory_optimize_level="O1")
    for level in ("O0", "O1", "O2"):
        if f"jit{level}" in args.lever:
            ms.set_context(jit_config={"jit_level": level})

    class Chain(nn.Cell):  # noqa: D101
        def __init__(self, n):
            super().__init__()
            self.n = n
            self.op = args.op
            self.w = ms.Parameter(ms.Tensor(np.ones((1, 49152), np.float32)), name="w")

        def construct(self, x):
            y = x * self.w
            for _ in range(self.n):
                y = ops.sin(y) if self.op == "sin" else y + 1.0   # a new [512, 49152] tensor per op
            return y.sum()

    net = Chain(args.n)
    x = ms.Tensor(np.random.rand(512, 49152).astype(np.float32))
    base = status_mb("VmRSS")
    fn = ms.value_and_grad(net, None, net.trainable_params()) if args.grad else net
    if args.grad and args.mode == 0:
        fn = ms.jit(fn)
    started = time.perf_counter()
    out = fn(x)
    first = time.perf_counter() - started
    out = fn(x)
    print("RESULT " + json.dumps({"n": args.n, "mode": args.mode, "grad": args.grad, "lever": args.lever, "op": args.op,
                                  "first_s": round(first, 2), "rss_after_mb": round(status_mb("VmRSS") - base, 1),
                                  "peak_above_mb": round(status_mb("VmHWM") - base, 1)}), flush=True)


if __name__ == "__main__":
    main()
