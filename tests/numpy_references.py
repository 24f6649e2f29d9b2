"""NumPy forward and backward passes of DoRA and IA3 on the three-layer net of the PEFT comparisons (test code).

``tests/nets.py``'s ``ThreeLayers`` computes ``down(relu(v(relu(k(x)))))``. Here each layer is written out
from the method's definition (the papers, and PEFT 0.21's ``lora/dora.py`` and ``ia3/layer.py``), in float64,
with its gradient by hand, so that DoRA and IA3 are checked where PyTorch and PEFT are not installed. Nothing
here calls pet_hooks.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), weight ``W [out, in]``, bias ``b``,
``A [r, in]``, ``B [out, r]``, scaling ``s``, magnitude ``m [out]``::

    V = W + s B A                      the directional part; ||V|| is each output row's L2 norm over the input
    y = (m / ||V||) * (x W^T + s x A^T B^T) + b
                                       ||V|| is a constant for the gradient (the paper's section 4.3; PEFT
                                       detaches it), so only m, A and B receive gradient through the scale
    merged W' = (m / ||V||)[:, None] * V;  at init B = 0 and m = ||W||, so y = x W^T + b

IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"), a learned vector ``l``::

    attention-style layer:  y = (x W^T + b) * l      l [out, 1]; merged W' = l * W (rows), b' = l * b
    feed-forward layer:     y = (x * l) W^T + b      l [1, in];  merged W' = W * l (columns), b' = b
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import numpy as np

Grads = Dict[str, np.ndarray]


class DoraLayer:
    """One DoRA-adapted linear layer (float64)."""

    def __init__(self, weight, bias, lora_a, lora_b, magnitude, scaling: float):
        self.w, self.b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.a, self.bb = np.asarray(lora_a, np.float64), np.asarray(lora_b, np.float64)
        self.m, self.s = np.asarray(magnitude, np.float64), float(scaling)
        self.v = self.w + self.s * self.bb @ self.a
        self.norm = np.linalg.norm(self.v, axis=1)
        self.scale = self.m / self.norm

    def forward(self, h):
        return (h @ self.v.T) * self.scale + self.b

    def backward(self, h, grad_y) -> Tuple[np.ndarray, Grads]:
        scaled = grad_y * self.scale                                   # dL/d(h V^T), the norm held constant
        grads = {"lora_magnitude_vector": np.sum(grad_y * (h @ self.v.T), axis=0) / self.norm,
                 "lora_B": self.s * scaled.T @ (h @ self.a.T),
                 "lora_A": self.s * (scaled @ self.bb).T @ h}
        return scaled @ self.v, grads

    def merged_weight(self):
        return self.scale[:, None] * self.v

    @staticmethod
    def initial_magnitude(weight):
        return np.linalg.norm(np.asarray(weight, np.float64), axis=1)


class Ia3Layer:
    """One IA3-adapted linear layer (float64); ``feedforward`` scales its input, otherwise its output."""

    def __init__(self, weight, bias, vector, feedforward: bool):
        self.w, self.b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.shape = np.shape(vector)
        self.l = np.asarray(vector, np.float64).reshape(-1)
        self.feedforward = feedforward

    def forward(self, h):
        if self.feedforward:
            return (h * self.l) @ self.w.T + self.b
        return (h @ self.w.T + self.b) * self.l

    def backward(self, h, grad_y) -> Tuple[np.ndarray, Grads]:
        if self.feedforward:
            grad_in = grad_y @ self.w                                  # dL/d(h * l)
            return grad_in * self.l, {"ia3_l": np.sum(grad_in * h, axis=0).reshape(self.shape)}
        grad_l = np.sum(grad_y * (h @ self.w.T + self.b), axis=0).reshape(self.shape)
        return (grad_y * self.l) @ self.w, {"ia3_l": grad_l}

    def merged(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.feedforward:
            return self.w * self.l[None, :], self.b
        return self.w * self.l[:, None], self.b * self.l


def three_layers(layers: Dict[str, object], x: np.ndarray, grad_out: np.ndarray,
                 act: Callable = lambda v: np.maximum(v, 0.0)) -> Tuple[np.ndarray, Dict[str, Grads]]:
    """``down(relu(v(relu(k(x)))))`` and the gradients of ``sum(out * grad_out)`` for each layer's deltas.

    ``layers``: ``{"k": ..., "v": ..., "down": ...}`` with ``forward(h)`` / ``backward(h, dL/dy)``; ``x`` of any
    leading shape. Returns the output (x's leading shape) and layer -> {delta name: gradient}.
    """
    lead = x.shape[:-1]
    h0 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    y_k = layers["k"].forward(h0)
    h1 = act(y_k)
    y_v = layers["v"].forward(h1)
    h2 = act(y_v)
    out = layers["down"].forward(h2)
    grads = {}
    grad = np.asarray(grad_out, np.float64).reshape(out.shape)
    grad_h2, grads["down"] = layers["down"].backward(h2, grad)
    grad_h1, grads["v"] = layers["v"].backward(h1, grad_h2 * (y_v > 0))
    _, grads["k"] = layers["k"].backward(h0, grad_h1 * (y_k > 0))
    return out.reshape(lead + (out.shape[-1],)), grads
