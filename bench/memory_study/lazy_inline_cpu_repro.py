"""The minimal reproduction for an upstream report: MindSpore's cell reuse (``@lazy_inline``, default policy)
does not compile on the CPU (docs/memory_and_speed.md, "Real cell reuse on the CPU").

    python bench/memory_study/lazy_inline_cpu_repro.py [-|O0|O1]        # jit_level; POLICY=front to compare

A plain 16-block net (two Dense and a ReLU per block), no pet_hooks, no MindFormers, graph mode, CPU.
MindSpore 2.9.0 and 2.10.0: ``RuntimeError: Input[0] must be a Primitive ValueNode, but get
ValueNode<FuncGraph> ..._Block_construct_...`` (ms_backend/segment_runner.cc, TransformSegmentToAnfGraph) at
the forward call, at every jit_level; ``POLICY=front`` compiles and runs (the parse is shared, the kernels are not).
"""
import os
import sys
import numpy as np
import mindspore as ms
from mindspore import nn, Tensor, lazy_inline
ms.set_context(mode=0, device_target="CPU")
if len(sys.argv) > 1 and sys.argv[1] != "-":
    ms.set_context(jit_config={"jit_level": sys.argv[1]})
POLICY = os.environ.get("POLICY")

class Block(nn.Cell):
    @lazy_inline(policy=POLICY) if POLICY else lazy_inline
    def __init__(self, h):
        super().__init__()
        self.a = nn.Dense(h, h)
        self.b = nn.Dense(h, h)
    def construct(self, x):
        return x + self.b(ops_relu(self.a(x)))

from mindspore import ops
ops_relu = ops.relu

class Net(nn.Cell):
    def __init__(self, n=16, h=32):
        super().__init__()
        self.blocks = nn.CellList([Block(h) for _ in range(n)])
    def construct(self, x):
        for b in self.blocks:
            x = b(x)
        return x.sum()

net = Net()
x = Tensor(np.ones((4, 32), np.float32))
print("forward", float(net(x).asnumpy()))
grad = ms.value_and_grad(net, None, net.trainable_params())
print("grad ok", float(grad(x)[0].asnumpy()))
