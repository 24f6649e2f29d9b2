"""Tiny nets for the tests, each with a NumPy reference of its forward pass.

Every case names the cells LoRA targets and computes, independently of pet_hooks,
``act(x @ W^T + b + scaling * x @ A^T @ B^T)`` for those cells from the parameter values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

ACTIVATIONS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "": lambda v: v,
    "relu": lambda v: np.maximum(v, 0.0),
    "tanh": np.tanh,
}


class TwoDense(nn.Cell):
    """dense1 (with an activation) -> dense2, on inputs of any rank."""

    def __init__(self, act: str = "relu", has_bias: bool = True, dtype=ms.float32, din=6, dh=10, dout=4):
        super().__init__()
        self.dense1 = nn.Dense(din, dh, activation=act or None, has_bias=has_bias, dtype=dtype)
        self.dense2 = nn.Dense(dh, dout, has_bias=has_bias, dtype=dtype)
        self.act = act

    def construct(self, x):
        return self.dense2(self.dense1(x))


class TwoLinear(nn.Cell):
    """MindFormers' Linear twice: transpose_b as given, compute dtype as given."""

    def __init__(self, transpose_b=True, compute_dtype=ms.float32, act="", din=6, dh=10, dout=4):
        super().__init__()
        from mindformers.modules.layers import Linear
        self.linear1 = Linear(din, dh, transpose_b=transpose_b, compute_dtype=compute_dtype,
                              activation=act or None, weight_init="normal", bias_init="normal")
        self.linear2 = Linear(dh, dout, transpose_b=transpose_b, compute_dtype=compute_dtype)
        self.act = act

    def construct(self, x):
        return self.linear2(self.linear1(x))


def _get(net, path):
    cell = net
    for part in path.split("."):
        cell = getattr(cell, part)
    return cell


def np_layer(cell, x: np.ndarray, act: str = "", with_lora: bool = True) -> np.ndarray:
    """NumPy forward of one (possibly LoRA-patched) Dense/Linear, float32."""
    w = cell.weight.astype(ms.float32).asnumpy()
    if getattr(cell, "transpose_b", True) is False:
        w = w.T                                    # stored [in, out]
    y = x @ w.T
    if cell.has_bias:
        y = y + cell.bias.astype(ms.float32).asnumpy()
    if with_lora and hasattr(cell, "lora_A"):
        a = cell.lora_A.astype(ms.float32).asnumpy()
        b = cell.lora_B.astype(ms.float32).asnumpy()
        y = y + cell.lora_scaling * (x @ a.T @ b.T)
    return ACTIVATIONS[act](y)


@dataclass
class Case:
    """One row of the LoRA table: how to build the net, its input and the reference."""

    name: str
    build: Callable[[], nn.Cell]
    layers: Tuple[str, str]               # the two cells, in order
    in_shape: Tuple[int, ...]
    dtype: object = ms.float32
    tol: float = 5e-5   # float32: the CPU kernels differ from NumPy by up to ~1.6e-5 (seen), run to run
    needs_mindformers: bool = False

    def pattern(self) -> str:
        return "|".join(f".*{layer}" for layer in self.layers)

    def reference(self, net, x: np.ndarray, with_lora: bool = True) -> np.ndarray:
        h = x.astype(np.float32).reshape(-1, x.shape[-1])
        first, second = (_get(net, p) for p in self.layers)
        h = np_layer(first, h, net.act, with_lora)
        h = np_layer(second, h, "", with_lora)
        return h.reshape(x.shape[:-1] + (h.shape[-1],))

    def input(self, rng) -> Tensor:
        return Tensor(rng.standard_normal(self.in_shape).astype(np.float32)).astype(self.dtype)


CASES = [
    Case("dense_relu_3d", lambda: TwoDense("relu"), ("dense1", "dense2"), (2, 3, 6)),
    Case("dense_tanh_2d", lambda: TwoDense("tanh"), ("dense1", "dense2"), (5, 6)),
    Case("dense_nobias", lambda: TwoDense("", has_bias=False), ("dense1", "dense2"), (2, 3, 6)),
    Case("dense_fp16", lambda: TwoDense("relu", dtype=ms.float16), ("dense1", "dense2"), (4, 6),
         dtype=ms.float16, tol=2e-2),
    Case("mf_linear", lambda: TwoLinear(True), ("linear1", "linear2"), (2, 3, 6), needs_mindformers=True),
    Case("mf_linear_untransposed_tanh", lambda: TwoLinear(False, act="tanh"), ("linear1", "linear2"),
         (2, 3, 6), needs_mindformers=True),
    Case("mf_linear_fp16_compute", lambda: TwoLinear(True, compute_dtype=ms.float16), ("linear1", "linear2"),
         (2, 3, 6), tol=2e-2, needs_mindformers=True),
]


def tiny_llama():
    """MindFormers' LlamaForCausalLM, 2 layers, hidden 32, with the settings it needs on the CPU."""
    from mindformers import LlamaConfig, LlamaForCausalLM
    ms.set_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_layers=2, hidden_size=32, num_heads=4, vocab_size=64, seq_length=8, intermediate_size=64,
        use_flash_attention=False, use_past=False, compute_dtype="float32", param_init_type="float32",
        layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
        use_rope_slice=True, fused_rms_norm=False, batch_size=2))


#: the layers of ThreeLayers, (in, out)
SIZES = {"k": (6, 10), "v": (10, 8), "down": (8, 4)}
LAYERS = tuple(SIZES)


class ThreeLayers(nn.Cell):
    """down(relu(v(relu(k(x))))): nn.Dense, or MindFormers' Linear with the given transpose_b (the IA3 and DoRA
    comparisons with PEFT).

    relu, not tanh, between the layers: MindSpore's CPU tanh is an approximation (6e-6 off in
    float32, measured), which would hide IA3's own differences from PEFT's under its error."""

    def __init__(self, kind: str = "dense"):
        super().__init__()
        for layer, (din, dout) in SIZES.items():
            if kind == "dense":
                cell = nn.Dense(din, dout)
            else:
                from mindformers.modules.layers import Linear
                cell = Linear(din, dout, transpose_b=(kind == "linear"), compute_dtype=ms.float32)
            setattr(self, layer, cell)

    def construct(self, x):
        return self.down(ops.relu(self.v(ops.relu(self.k(x)))))


def three_layers_numpy(job: dict, x) -> np.ndarray:
    """ThreeLayers without an adapter, in NumPy, from ``job``'s weights: down(relu(v(relu(k(x))))) (the base of
    "the delta shows" checks, which need no bit-for-bit base: no base net to build and compile)."""
    h = np.asarray(x)
    for index, layer in enumerate(LAYERS):
        h = h @ job[f"{layer}.weight"].T + job[f"{layer}.bias"]
        h = np.maximum(h, 0.0) if index < len(LAYERS) - 1 else h
    return h


def three_layers_job(seed: int, before_weights=None, per_layer=None) -> dict:
    """The random "job" of a method's comparison on ThreeLayers: ``x`` (3, 5, 6), the upstream gradient ``g``
    (3, 5, 4), then each layer's ``<layer>.weight`` [out, in] and ``<layer>.bias`` (scale 0.5), all from
    ``default_rng(seed)`` in that order. ``before_weights(rng)`` adds arrays drawn after ``g``,
    ``per_layer(rng, layer, din, dout)`` arrays drawn after each layer's bias (the method's own values)."""
    rng = np.random.default_rng(seed)
    job = {"x": rng.standard_normal((3, 5, 6)).astype(np.float32),
           "g": rng.standard_normal((3, 5, 4)).astype(np.float32)}
    if before_weights is not None:
        job.update(before_weights(rng))
    for layer, (din, dout) in SIZES.items():
        job[f"{layer}.weight"] = (rng.standard_normal((dout, din)) * 0.5).astype(np.float32)
        job[f"{layer}.bias"] = (rng.standard_normal(dout) * 0.5).astype(np.float32)
        if per_layer is not None:
            job.update(per_layer(rng, layer, din, dout))
    return job


def weight_out_in(cell) -> np.ndarray:
    """A Dense / MindFormers Linear weight in PyTorch's [out, in] layout (Linear without transpose_b: [in, out])."""
    weight = cell.weight.asnumpy()
    return weight if getattr(cell, "transpose_b", True) else weight.T


def set_values(params, values: dict) -> None:
    """Write ``values`` (name -> array) into ``params``, which must be exactly those names."""
    params = {p.name: p for p in params}
    assert sorted(params) == sorted(values)
    for name, value in values.items():
        params[name].set_data(Tensor(value))


def three_layers(job: dict, kind: str = "dense") -> ThreeLayers:
    """ThreeLayers with the weights and biases of ``job`` (``<layer>.weight`` [out, in], ``<layer>.bias``)."""
    net = ThreeLayers(kind)
    for layer in LAYERS:
        cell = getattr(net, layer)
        weight = job[f"{layer}.weight"] if kind != "linear_in_out" else job[f"{layer}.weight"].T
        cell.weight.set_data(Tensor(np.ascontiguousarray(weight)))
        cell.bias.set_data(Tensor(job[f"{layer}.bias"]))
    return net
