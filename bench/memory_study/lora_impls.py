"""Candidate formulations of pet_hooks' LoRA branch, installed by monkeypatching (pet_hooks' files stay unchanged).

    from lora_impls import install; install("today")      # before the net is first compiled

Each variant replaces ``LoraLayer._lora_branch`` and/or ``LoraDense.construct`` / ``LoraLinear.construct``.
All keep the parameters (lora_A [r, in], lora_B [out, r], the shared pet_lora_scale switch that multiplies A),
dropout, and the compute-dtype casts (skipped only when the dtypes already agree, decided at compile time).
"""
from __future__ import annotations

from mindspore import ops

import pet_hooks.tuners.lora.tuner as L

_MATMUL_TB = ops.MatMul(transpose_b=True)
_MATMUL = ops.MatMul()
_MATMUL_TA = ops.MatMul(transpose_a=True)
_BMM_TB = ops.BatchMatMul(transpose_b=True)
_DENSE = ops.Dense() if hasattr(ops, "Dense") else None
_ADD = ops.Add()

ORIGINAL = {"branch": L.LoraLayer._lora_branch, "dense": L.LoraDense.construct, "linear": L.LoraLinear.construct}


# ---------------------------------------------------------------- branches (x2 is 2-D) ---------------------------
def branch_nocast(self, x2):
    """today's branch without the Cast nodes when the dtypes already agree (a compile-time decision)."""
    h = x2
    if ops.dtype(x2) != self.lora_compute_dtype:
        h = ops.cast(x2, self.lora_compute_dtype)
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = self.lora_A * ops.cast(self.pet_lora_scale, ops.dtype(self.lora_A))
    b = self.lora_B
    if ops.dtype(a) != self.lora_compute_dtype:
        a = ops.cast(a, self.lora_compute_dtype)
        b = ops.cast(b, self.lora_compute_dtype)
    h = _MATMUL_TB(h, a)
    return _MATMUL_TB(h, b)


def branch_swap_a(self, x2):
    """h^T = A_s @ x^T  ([r, N]: rank-major), then out = h @ B^T via MatMul(transpose_a, transpose_b)."""
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = self.lora_A * self.pet_lora_scale
    ht = _MATMUL_TB(a, h)                       # [r, N]
    return ops.MatMul(transpose_a=True, transpose_b=True)(ht, self.lora_B)


def branch_matmul_fn(self, x2):
    """ops.matmul with explicit transposes of the (small) A and B."""
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = self.lora_A * self.pet_lora_scale
    h = ops.matmul(h, a.T)
    return ops.matmul(h, self.lora_B.T)


def branch_small_t(self, x2):
    """transpose the small matrices once (Transpose of [r,in] and [out,r]) and use MatMul without transposes."""
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    at = ops.transpose(self.lora_A * self.pet_lora_scale, (1, 0))      # [in, r]
    bt = ops.transpose(self.lora_B, (1, 0))                            # [r, out]
    return _MATMUL(_MATMUL(h, at), bt)


def branch_bmm(self, x2):
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = self.lora_A * self.pet_lora_scale
    return _BMM_TB(_BMM_TB(h, a), self.lora_B)


def branch_scale_out(self, x2):
    """scale on the branch's rank-r intermediate ([N, r]) instead of on A."""
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    h = _MATMUL_TB(h, self.lora_A) * self.pet_lora_scale
    return _MATMUL_TB(h, self.lora_B)


def branch_dense(self, x2):
    h = x2
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = self.lora_A * self.pet_lora_scale
    return ops.dense(ops.dense(h, a), self.lora_B)


def branch_bt(self, x2):
    """today's first MatMul (x @ (s*A)^T); the second with B transposed explicitly (a [r, out] Transpose) and no
    transpose flag, so that the backward computes dB^T = h^T @ dy (the big dy as the right operand) instead of
    dB = dy^T @ h (MatMul(transpose_a) with the big dy as the transposed left operand)."""
    h = x2
    if ops.dtype(x2) != self.lora_compute_dtype:
        h = ops.cast(x2, self.lora_compute_dtype)
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    a = L.scaled_a(self)
    bt = ops.transpose(self.lora_B, (1, 0))
    if ops.dtype(a) != self.lora_compute_dtype:
        a = ops.cast(a, self.lora_compute_dtype)
        bt = ops.cast(bt, self.lora_compute_dtype)
    return _MATMUL(_MATMUL_TB(h, a), bt)


def branch_bt_cast(self, x2):
    """branch_bt with today's unconditional casts (Cast to the same dtype is removed by the compiler)."""
    h = ops.cast(x2, self.lora_compute_dtype)
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    h = _MATMUL_TB(h, ops.cast(L.scaled_a(self), self.lora_compute_dtype))
    return _MATMUL(h, ops.cast(ops.transpose(self.lora_B, (1, 0)), self.lora_compute_dtype))


def linear_merged(self, x, group_list=None):
    """out = x @ (W + B @ (s*A))^T: the delta folded into the weight inside the graph (no dropout possible; Linear
    with transpose_b=True only). Fewer kernels, but a full [out, in] weight-gradient MatMul in the backward."""
    out_shape = self.shape(x)[:-1] + (self.out_channels,)
    x = self.reshape(x, (-1, self.in_channels))
    ori_dtype = ops.dtype(x)
    delta = _MATMUL(self.lora_B, L.scaled_a(self))
    weight = self.cast(self.weight, self.dtype) + self.cast(delta, self.dtype)
    x = self.cast(x, self.dtype)
    out = self.matmul(x, weight)
    if self.has_bias:
        out = self.bias_add(out, self.cast(self.bias, self.dtype))
    if self.activation_flag:
        out = self.activation(out)
    out = ops.cast(out, ori_dtype)
    return self.reshape(out, out_shape)


def branch_noscale(self, x2):
    """NOT a candidate (drops the pet_lora_scale switch; scaling folded nowhere): the bound of what the scale costs."""
    h = _MATMUL_TB(x2, self.lora_A)
    return _MATMUL_TB(h, self.lora_B)


def linear_addmm(self, x, group_list=None):
    """out = addmm(x @ W^T, h, B^T): the branch's second MatMul and the Add in one op."""
    out_shape = self.shape(x)[:-1] + (self.out_channels,)
    x = self.reshape(x, (-1, self.in_channels))
    ori_dtype = ops.dtype(x)
    weight = self.cast(self.weight, self.dtype)
    x = self.cast(x, self.dtype)
    out = self.matmul(x, weight)
    if self.has_bias:
        out = self.bias_add(out, self.cast(self.bias, self.dtype))
    h = x
    if self.lora_dropout is not None:
        h = self.lora_dropout(h)
    h = _MATMUL_TB(h, self.lora_A * self.pet_lora_scale)
    out = ops.addmm(out, h, ops.transpose(self.lora_B, (1, 0)))
    if self.activation_flag:
        out = self.activation(out)
    out = ops.cast(out, ori_dtype)
    return self.reshape(out, out_shape)


# ---------------------------------------------------------------- constructs ------------------------------------
def linear_nocast(self, x, group_list=None):
    """LoraLinear.construct: branch cast/dtype nodes only when needed; otherwise today's."""
    out_shape = self.shape(x)[:-1] + (self.out_channels,)
    x = self.reshape(x, (-1, self.in_channels))
    ori_dtype = ops.dtype(x)
    weight = self.cast(self.weight, self.dtype)
    x = self.cast(x, self.dtype)
    out = self.matmul(x, weight)
    if self.has_bias:
        out = self.bias_add(out, self.cast(self.bias, self.dtype))
    lora = self._lora_branch(x)
    if ops.dtype(lora) != self.dtype:
        lora = self.cast(lora, self.dtype)
    out = out + lora
    if self.activation_flag:
        out = self.activation(out)
    out = ops.cast(out, ori_dtype)
    return self.reshape(out, out_shape)


def linear_lora_first(self, x, group_list=None):
    """the branch computed first, then base matmul + branch."""
    out_shape = self.shape(x)[:-1] + (self.out_channels,)
    x = self.reshape(x, (-1, self.in_channels))
    ori_dtype = ops.dtype(x)
    weight = self.cast(self.weight, self.dtype)
    x = self.cast(x, self.dtype)
    lora = self.cast(self._lora_branch(x), self.dtype)
    out = lora + self.matmul(x, weight)
    if self.has_bias:
        out = self.bias_add(out, self.cast(self.bias, self.dtype))
    if self.activation_flag:
        out = self.activation(out)
    out = ops.cast(out, ori_dtype)
    return self.reshape(out, out_shape)


def linear_3d(self, x, group_list=None):
    """the branch on the 3-D input (no reshape for it), added to the reshaped base output."""
    out_shape = self.shape(x)[:-1] + (self.out_channels,)
    x2 = self.reshape(x, (-1, self.in_channels))
    ori_dtype = ops.dtype(x2)
    weight = self.cast(self.weight, self.dtype)
    x2 = self.cast(x2, self.dtype)
    out = self.matmul(x2, weight)
    if self.has_bias:
        out = self.bias_add(out, self.cast(self.bias, self.dtype))
    out = out + self._lora_branch(x2)
    if self.activation_flag:
        out = self.activation(out)
    out = ops.cast(out, ori_dtype)
    return self.reshape(out, out_shape)


def dense_nocast(self, x):
    x_shape = self.shape_op(x)
    x2 = self.reshape(x, (-1, x_shape[-1]))
    out = self.matmul(x2, self.weight)
    if self.has_bias:
        out = self.bias_add(out, self.bias)
    lora = self._lora_branch(x2)
    if ops.dtype(lora) != ops.dtype(out):
        lora = ops.cast(lora, ops.dtype(out))
    out = out + lora
    if self.activation_flag:
        out = self.activation(out)
    if len(x_shape) != 2:
        out = self.reshape(out, x_shape[:-1] + (ops.shape(out)[-1],))
    return out


BRANCHES = {"today": None, "nocast": branch_nocast, "swap_a": branch_swap_a, "matmul_fn": branch_matmul_fn,
            "small_t": branch_small_t, "bmm": branch_bmm, "scale_out": branch_scale_out, "dense": branch_dense, "noscale": branch_noscale, "bt": branch_bt,
            "bt_cast": branch_bt_cast}
CONSTRUCTS = {"today": (None, None), "nocast": (linear_nocast, dense_nocast), "lora_first": (linear_lora_first, None),
              "addmm": (linear_addmm, None), "merged": (linear_merged, None)}


def install(spec: str) -> str:
    """spec: "<branch>" or "<branch>+<construct>", e.g. "nocast+nocast". Returns the spec."""
    branch, _, construct = spec.partition("+")
    fn = BRANCHES[branch]
    L.LoraLayer._lora_branch = fn if fn is not None else ORIGINAL["branch"]
    lin, den = CONSTRUCTS[construct or "today"]
    L.LoraLinear.construct = lin if lin is not None else ORIGINAL["linear"]
    L.LoraDense.construct = den if den is not None else ORIGINAL["dense"]
    return spec
