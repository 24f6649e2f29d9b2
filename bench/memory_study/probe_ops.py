"""Per-kernel memory outside MindSpore's pool: a chain of N copies of one small computation from MindFormers' Llama
block on [4, 128, 576] activations, forward + gradient w.r.t. a scale at the start, graph mode; RSS per copy.

    MS_DEV_RUNTIME_CONF=memory_statistics:True .venv/bin/python bench/memory_study/probe_ops.py --op rmsnorm --n 16
"""
import argparse, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import status_mb  # noqa: E402

OPS = ("rmsnorm", "tile", "rope", "transpose", "bmm_softmax", "linear", "cast", "mask")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--op", choices=OPS, required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--jit", default="")
    parser.add_argument("--memopt", default="")
    args = parser.parse_args()
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=0, device_target="CPU")
    if args.jit:
        ms.set_context(jit_config={"jit_level": args.jit})
    if args.memopt:
        ms.set_context(memory_optimize_level=args.memopt)
    op, n = args.op, args.n

    class Net(nn.Cell):  # noqa: D101
        def __init__(self):
            super().__init__()
            self.g = ms.Parameter(ms.Tensor(np.ones((576,), np.float32)), name="g")
            self.w = ms.Parameter(ms.Tensor(np.random.rand(576, 576).astype(np.float32) / 576), name="w",
                                  requires_grad=False)
            self.mm = ops.MatMul(transpose_b=True)
            self.mask = ms.Tensor(np.triu(np.ones((128, 128), np.float32), 1) * -1e4)

        def construct(self, x):
            y = x * self.g
            for _ in range(n):
                if op == "rmsnorm":
                    y = y * ops.rsqrt(ops.mean(ops.pow(y, 2), -1, keep_dims=True) + 1e-5)
                elif op == "tile":       # repeat_kv: [4, 3, 128, 192] -> [4, 9, 128, 192] -> back
                    t = ops.tile(y.reshape(4, 3, 1, 128, 192), (1, 1, 3, 1, 1)).reshape(4, 9, 128, 192)
                    y = t[:, 0:3].reshape(4, 128, 576) + y
                elif op == "rope":
                    z = y.reshape(4, 128, 9, 64)
                    rot = ops.concat((-z[..., 32:], z[..., :32]), -1)
                    y = (z * 0.5 + rot * 0.25).reshape(4, 128, 576)
                elif op == "transpose":
                    y = ops.transpose(y.reshape(4, 128, 9, 64), (0, 2, 1, 3)) * 1.0
                    y = ops.transpose(y, (0, 2, 1, 3)).reshape(4, 128, 576)
                elif op == "bmm_softmax":
                    q = y.reshape(4, 128, 9, 64).transpose(0, 2, 1, 3)
                    s = ops.softmax(ops.matmul(q, q.transpose(0, 1, 3, 2)) * 0.125, -1)
                    y = ops.matmul(s, q).transpose(0, 2, 1, 3).reshape(4, 128, 576)
                elif op == "linear":
                    y = self.mm(y.reshape(512, 576), self.w).reshape(4, 128, 576)
                elif op == "cast":
                    y = ops.cast(ops.cast(y, ms.float16), ms.float32)
                elif op == "mask":
                    q = y.reshape(4, 128, 9, 64).transpose(0, 2, 1, 3)
                    s = ops.matmul(q, q.transpose(0, 1, 3, 2)) + self.mask
                    y = y + s.sum(-1).transpose(0, 2, 1).sum(-1, keepdims=True) * 1e-6
            return y.sum()

    net = Net()
    x = ms.Tensor(np.random.rand(4, 128, 576).astype(np.float32))
    base = status_mb("VmRSS")
    fn = net if args.forward else ms.jit(ms.value_and_grad(net, None, [net.g]))
    started = time.perf_counter()
    fn(x)
    first = time.perf_counter() - started
    fn(x)
    print("RESULT " + json.dumps({"op": op, "n": n, "forward": args.forward, "jit": args.jit, "memopt": args.memopt, "first_s": round(first, 2),
                                  "rss_after_mb": round(status_mb("VmRSS") - base, 1),
                                  "peak_above_mb": round(status_mb("VmHWM") - base, 1)}), flush=True)


if __name__ == "__main__":
    main()
