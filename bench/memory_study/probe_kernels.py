"""Which CPU kernels hold memory outside MindSpore's memory pool? A graph of N ops of one kind on [R, C] float32
tensors, each op with its own weight; RSS after two calls vs N. Run with MS_DEV_RUNTIME_CONF=memory_statistics:True
to get the pool's peak printed at exit.

    .venv/bin/python bench/memory_study/probe_kernels.py --op matmul --n 8 [--grad] [--mode 0]
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import status_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", default="matmul", choices=("matmul", "matmul_tb", "add", "softmax", "silu", "bmm"))
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--mode", type=int, default=0)
    args = parser.parse_args()
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=args.mode, device_target="CPU")
    r, c, n, op = args.rows, args.cols, args.n, args.op

    class Net(nn.Cell):  # noqa: D101
        def __init__(self):
            super().__init__()
            self.ws = ms.ParameterTuple([ms.Parameter(ms.Tensor(np.random.rand(c, c).astype(np.float32) / c),
                                                      name=f"w{i}", requires_grad=False) for i in range(n)]) \
                if op.startswith("matmul") else None
            self.mm = ops.MatMul(transpose_b=op == "matmul_tb")
            self.g = ms.Parameter(ms.Tensor(np.ones((1, c), np.float32)), name="g")

        def construct(self, x):
            y = x * self.g
            for i in range(n):
                if op.startswith("matmul"):
                    y = self.mm(y, self.ws[i])
                elif op == "add":
                    y = y + 1.0
                elif op == "softmax":
                    y = ops.softmax(y, -1)
                elif op == "silu":
                    y = ops.silu(y)
            return y.sum()

    net = Net()
    x = ms.Tensor(np.random.rand(r, c).astype(np.float32))
    base = status_mb("VmRSS")
    fn = net
    if args.grad:
        fn = ms.value_and_grad(net, None, [net.g])
        if args.mode == 0:
            fn = ms.jit(fn)
    started = time.perf_counter()
    fn(x)
    first = time.perf_counter() - started
    fn(x)
    print("RESULT " + json.dumps({"op": op, "n": n, "rows": r, "cols": c, "grad": args.grad, "mode": args.mode,
                                  "tensor_mb": round(r * c * 4 / 2**20, 2), "first_s": round(first, 2),
                                  "rss_after_mb": round(status_mb("VmRSS") - base, 1),
                                  "peak_above_mb": round(status_mb("VmHWM") - base, 1)}), flush=True)


if __name__ == "__main__":
    main()
