"""``lora_bias`` on MindFormers' mcore projections (graph mode, their only mode), against NumPy.

A ``ColumnParallelLinear`` (bias added) then a ``RowParallelLinear`` with ``skip_bias_add`` (its bias
returned apart and added by the caller), both adapted with a lora bias: the output is
``h = x W1^T + b1 + s (x A1^T B1^T + c1)``, ``y = h W2^T + s (h A2^T B2^T + c2) + b2``; merging writes
``b += s c`` into both base biases (also the one the row-parallel layer returns apart) and gives the
same output; unmerge and remove give the base back.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS
from tests.mcore_cpu import tiny_qwen3

pytestmark = [NEEDS_MINDFORMERS, pytest.mark.usefixtures("mcore_graph_mode")]   # graph mode, use_legacy False


def _two_layers():
    from mindspore.common.initializer import initializer
    from mindformers.parallel_core.training_graph.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = tiny_qwen3().model.decoder.layers[0].self_attention.linear_qkv.config

    def init(shape):
        return initializer("normal", shape, ms.float32)

    class Two(nn.Cell):
        def __init__(self):
            super().__init__()
            self.col = ColumnParallelLinear(8, 6, config=config, bias=True, init_method=init, bias_init=init)
            self.row = RowParallelLinear(6, 5, config=config, bias=True, init_method=init, bias_init=init,
                                         skip_bias_add=True)

        def construct(self, x):
            h, _ = self.col(x)
            y, bias = self.row(h)
            return y + bias
    return Two()


def test_mcore_lora_bias_forward_and_merge():
    net = _two_layers()
    rng = np.random.default_rng(4)
    for param in net.get_parameters():
        param.set_data(Tensor((0.3 * rng.standard_normal(param.shape)).astype(np.float32)))
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": "col|row", "lora_rank": 2, "lora_alpha": 3,
                          "lora_bias": True})
    values = {}
    for param in pet_hooks.delta_parameters(net):
        values[param.name] = (0.5 * rng.standard_normal(param.shape)).astype(np.float32)
        param.set_data(Tensor(values[param.name]))
    assert {"col.lora_B_bias", "row.lora_B_bias"} <= set(values)
    x = rng.standard_normal((4, 2, 8)).astype(np.float32)
    s = 1.5
    h = (x @ base["col.weight"].T + base["col.bias"]
         + s * ((x @ values["col.lora_A"].T) @ values["col.lora_B"].T + values["col.lora_B_bias"]))
    ref = (h @ base["row.weight"].T + base["row.bias"]
           + s * ((h @ values["row.lora_A"].T) @ values["row.lora_B"].T + values["row.lora_B_bias"]))
    out = net(Tensor(x)).asnumpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    pet_hooks.merge(net)
    params = {p.name: p.asnumpy() for p in net.get_parameters()}
    for cell in ("col", "row"):
        np.testing.assert_allclose(params[f"{cell}.bias"], base[f"{cell}.bias"] + s * values[f"{cell}.lora_B_bias"],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), ref, rtol=1e-5, atol=1e-5)
    pet_hooks.unmerge(net)
    pet_hooks.remove(net)
    for param in net.get_parameters():
        np.testing.assert_allclose(param.asnumpy(), base[param.name], rtol=0, atol=1e-6, err_msg=param.name)
