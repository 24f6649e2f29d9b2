"""RSS per CPU MatMul kernel by operand shapes / transpose flags: N independent MatMuls (forward only, graph mode),
each with its own small parameter, all outputs summed. RSS after two calls above the RSS before, divided by N.

    .venv/bin/python bench/memory_study/probe_matmul_cfg.py --cfg x_At --n 16
cfgs (X is the big [512, 576] activation, A [8, 576], B [576, 8], H [512, 8]):
  x_At   MatMul(tb)(X, A)      -> [512, 8]     (LoRA forward 1)
  A_xt   MatMul(tb)(A, X)      -> [8, 512]
  H_Bt   MatMul(tb)(H, B)      -> [512, 576]   (LoRA forward 2)
  X_B    MatMul()(X, B)        -> [512, 8]     (dh = dy @ B)
  Xt_H   MatMul(ta)(X, H)      -> [576, 8]     (dB = dy^T @ h)
  Ht_X   MatMul(ta)(H, X)      -> [8, 576]     (dA = dh^T @ x)
  H_A    MatMul()(H, A)        -> [512, 576]   (dx = dh @ A)
  X_Wt   MatMul(tb)(X, W)      -> [512, 576]   (base, W [576, 576])
  X_W    MatMul()(X, W)
  Xt_Y   MatMul(ta)(X, Y)      -> [576, 576]   (a full weight gradient)
  bmm_x_At BatchMatMul(tb)(X3, A) with X3 [4, 128, 576]
"""
import argparse, json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import status_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=0, device_target="CPU")
    cfg, n = args.cfg, args.n
    rng = np.random.default_rng(0)
    small = {"x_At": (8, 576), "A_xt": (8, 576), "H_Bt": (576, 8), "X_B": (576, 8), "Xt_H": (512, 8),
             "Ht_X": (512, 8), "H_A": (8, 576), "X_Wt": (576, 576), "X_W": (576, 576), "Xt_Y": (512, 576),
             "bmm_x_At": (8, 576), "tiny": (8, 8), "mul_x": (1, 576)}[cfg]

    class Net(nn.Cell):  # noqa: D101
        def __init__(self):
            super().__init__()
            self.ps = ms.ParameterTuple([ms.Parameter(ms.Tensor(rng.standard_normal(small).astype(np.float32)),
                                                      name=f"p{i}", requires_grad=False) for i in range(n)])
            self.tb = ops.MatMul(transpose_b=True)
            self.ta = ops.MatMul(transpose_a=True)
            self.nn = ops.MatMul()
            self.btb = ops.BatchMatMul(transpose_b=True)

        def construct(self, x, h):
            total = 0.0
            for i in range(n):
                p = self.ps[i]
                if cfg == "x_At":
                    y = self.tb(x, p)
                elif cfg == "A_xt":
                    y = self.tb(p, x)
                elif cfg == "H_Bt":
                    y = self.tb(h, p)
                elif cfg == "X_B":
                    y = self.nn(x, p)
                elif cfg == "Xt_H":
                    y = self.ta(x, p)
                elif cfg == "Ht_X":
                    y = self.ta(h, x) * p[0:8, 0:1]
                elif cfg == "H_A":
                    y = self.nn(h, p)
                elif cfg == "X_Wt":
                    y = self.tb(x, p)
                elif cfg == "X_W":
                    y = self.nn(x, p)
                elif cfg == "Xt_Y":
                    y = self.ta(x, p)
                elif cfg == "tiny":
                    y = self.tb(h[0:16], p)
                elif cfg == "mul_x":
                    y = x * p
                else:
                    y = self.btb(x.reshape(4, 128, 576), p)
                total = total + y.sum()
            return total

    net = Net()
    x = ms.Tensor(rng.standard_normal((512, 576)).astype(np.float32))
    h = ms.Tensor(rng.standard_normal((512, 8)).astype(np.float32))
    base = status_mb("VmRSS")
    net(x, h).asnumpy()
    net(x, h).asnumpy()
    rss = status_mb("VmRSS") - base
    print("RESULT " + json.dumps({"cfg": cfg, "n": n, "rss_after_mb": round(rss, 1),
                                  "peak_above_mb": round(status_mb("VmHWM") - base, 1),
                                  "per_kernel_mb": round(rss / n, 2)}), flush=True)


if __name__ == "__main__":
    main()
