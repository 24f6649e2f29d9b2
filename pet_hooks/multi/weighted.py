"""The math of PEFT's ``LoraModel.add_weighted_adapter``, as pure NumPy: several LoRA adapters and their
weights in, the A and B matrices of one new LoRA adapter out.

``pet_hooks.add_weighted_adapter(net, ...)`` gathers the adapters of a net as :class:`AdapterWeights`,
calls :func:`combine` and installs the :class:`CombinedAdapter` it returns; nothing here touches
MindSpore, so the math is checked against PEFT 0.21.2 itself (tests/multi/test_weighted_math.py) in a
process that never imports a net.

What PEFT does, and so what :func:`combine` does (``w_i`` the weights, ``s_i`` each adapter's scaling,
per cell only the adapters that target that cell take part):

- ``linear`` (equal ranks): ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i`` and
  ``B = sum_i sqrt|w_i s_i| B_i``; a rough approximation (cross terms ``B_i A_j``), as PEFT warns;
- ``cat``: ``A = concat_rows(w_i s_i A_i)``, ``B = concat_cols(B_i)``, rank ``sum r_i``: exact;
- ``svd``: the truncated SVD of ``sum_i w_i s_i B_i A_i`` at ``svd_rank`` (default: the largest
  rank), ``B = U S``, ``A = Vh``, optionally clamped at the ``svd_clamp`` quantile;
- ``ties`` / ``magnitude_prune`` (and their ``_svd`` forms): as ``linear`` (resp. ``svd``) with the
  TIES / magnitude pruning of PEFT's ``merge_utils`` applied to the A's and B's (resp. to the deltas);
- ``dare_linear`` / ``dare_ties`` (and their ``_svd`` forms): as ``linear`` / ``ties`` (resp. ``svd`` /
  ``ties_svd``) with PEFT's DARE instead of the magnitude pruning: every A and B (resp. delta) is
  multiplied by its own random 0/1 mask, each entry kept with probability ``density``, and divided
  by ``density`` (no magnitude pruning before the TIES sign election).

The new adapter's ``lora_alpha`` is its rank, and it inherits ``use_rslora`` from the *first*
adapter, so its scaling is 1, or ``sqrt(rank)`` when the first adapter used rsLoRA (PEFT does not
correct A and B for that; neither do we, so the deltas stay PEFT's).

DARE's masks: PEFT draws them with ``torch.bernoulli`` from torch's global generator, which NumPy
cannot replay. Here they come from the ``seed`` the caller gives (required for the DARE types):
:func:`dare_masks` draws, per cell, from a NumPy generator seeded by ``(seed, crc32(cell path))``,
so the same seed gives the same adapter, whatever the other cells, and the masks are *not*
those PEFT would draw after ``torch.manual_seed(seed)``. Given the same masks, the result is PEFT's
(tests/multi/test_weighted_math.py feeds them to PEFT in place of ``torch.bernoulli``). On
average over seeds ``dare_linear`` is ``linear`` (each kept entry is divided by ``density``); the
average of ``dare_ties`` is not ``ties``: an entry kept with fewer others is averaged over fewer.

Everything is in the orientation of a ``Dense``/``nn.Linear`` LoRA: ``A [r, in]``, ``B [out, r]``,
delta ``scaling * B @ A`` of shape ``[out, in]`` (PEFT transposes embedding and ``fan_in_fan_out``
deltas back to that orientation before its SVD, so the caller maps those layouts itself).

Left to the caller, as PEFT does them outside the math: the adapter names (:func:`select_adapters`
gives PEFT's "Adapter X does not exist"); a new name that already exists (PEFT then returns without
doing anything); ``modules_to_save`` clashes; installing A, B, ``rank``, ``alpha`` and ``use_rslora``
of the :class:`CombinedAdapter` on every cell of its ``target_paths``.
"""
from __future__ import annotations

import math
import numbers
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ..errors import PetConfigError, PetConfigTypeError

__all__ = ["AdapterWeights", "CombinedAdapter", "combine", "select_adapters", "COMBINATION_TYPES",
           "SUPPORTED_COMBINATION_TYPES", "DARE_TYPES", "dare_masks"]

#: every combination_type PEFT 0.21.2 accepts
COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
#: the ones reproduced here: all (DARE with masks of its own, drawn from the caller's ``seed``)
SUPPORTED_COMBINATION_TYPES = COMBINATION_TYPES
#: the types whose masks are random, which need ``seed``
DARE_TYPES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
# the types PEFT combines on A and B separately, which need one rank for all adapters
_SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
#: those types, whose sum of A's and of B's means something only for adapters of the same cells
#: (``pet_hooks.add_weighted_adapter`` asks for that; PEFT does not)
SAME_TARGET_TYPES = _SAME_RANK_TYPES
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_DENSITY_TYPES = ("ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
# cuSOLVER algorithms torch.linalg.svd can be asked for (CUDA only); NumPy always runs LAPACK gesdd
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")
_SIGN_METHODS = ("total", "frequency")


@dataclass
class AdapterWeights:
    """One existing LoRA adapter, as :func:`combine` reads it.

    ``scaling`` is the factor on ``B @ A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with
    ``use_rslora`` (checked against each other, so a forgotten ``use_rslora`` is caught). ``tensors``
    maps each path of ``target_paths`` to ``(A [rank, in], B [out, rank])``.
    """
    name: str
    rank: int
    alpha: float
    scaling: float
    target_paths: list[str]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    # not in PEFT's per-layer data but in its config: the combined adapter inherits the first one's
    use_rslora: bool = False


@dataclass
class CombinedAdapter:
    """The new adapter: a LoRA of ``rank`` with ``lora_alpha = alpha`` (= rank, as PEFT sets it) and
    ``use_rslora`` inherited from the first adapter; ``scaling * B @ A`` is, per cell, PEFT's delta.

    ``combination_type`` is the one applied: PEFT (and so :func:`combine`) uses ``linear`` whenever a
    single adapter is given. ``target_paths`` is the sorted union of the adapters' paths.
    """
    combination_type: str
    rank: int
    alpha: float
    use_rslora: bool
    target_paths: list[str]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def scaling(self) -> float:
        """The factor on ``B @ A``, as PEFT computes it for the new adapter."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def select_adapters(available: Mapping[str, AdapterWeights], names: Sequence[str]) -> list[AdapterWeights]:
    """The adapters called ``names`` (in that order), with PEFT's error for a name that is not there."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise PetConfigTypeError(f"adapters must be a list of adapter names, got {names!r}")
    for name in names:
        if name not in available:
            raise PetConfigError(f"Adapter {name} does not exist (adapters of this net: {sorted(available)})")
    return [available[name] for name in names]


def combine(adapters: list[AdapterWeights], weights: list[float], combination_type: str = "svd",
            svd_rank: Optional[int] = None,
            svd_clamp: Optional[float] = None, svd_full_matrices: bool = True, density: Optional[float] = None,
            majority_sign_method: str = "total", svd_driver: Optional[str] = None,
            seed: Optional[int] = None) -> CombinedAdapter:
    """Combine ``adapters`` with ``weights`` the way PEFT's ``add_weighted_adapter`` does.

    The arguments are PEFT's (``svd_driver`` is checked and otherwise ignored: it only picks the
    cuSOLVER algorithm, and PEFT refuses it on CPU), plus ``seed``: the DARE types' masks are drawn
    from it (:func:`dare_masks`), it is required for them and ignored by the others. Raises
    :class:`~pet_hooks.errors.PetConfigError` (a ``ValueError``) naming the adapter, weight or argument at fault, also where PEFT would
    silently go on: ``weights`` shorter or longer than ``adapters`` (PEFT zips them and drops the
    rest), an unknown ``combination_type`` with one adapter (PEFT then runs ``linear``), an SVD of a
    rank the full-matrices SVD cannot give (PEFT fails or writes A and B that do not multiply).
    """
    adapters = _check_adapters(adapters)
    weights = _check_weights(weights, adapters)
    if not isinstance(combination_type, str) or combination_type not in COMBINATION_TYPES:
        raise PetConfigError(f"Invalid combination_type: {combination_type!r}; "
                             f"expected one of {list(COMBINATION_TYPES)}")
    # PEFT: "if there is only one adapter, we can only use linear merging"
    if len(adapters) == 1:
        combination_type = "linear"
    _check_seed(seed, combination_type)
    _check_svd_args(svd_rank, svd_clamp, svd_full_matrices, svd_driver)
    if majority_sign_method not in _SIGN_METHODS:
        raise PetConfigError(f"majority_sign_method must be one of {list(_SIGN_METHODS)}, "
                             f"got {majority_sign_method!r}")

    ranks = [adapter.rank for adapter in adapters]
    if combination_type in _SAME_RANK_TYPES:
        if len(set(ranks)) != 1:
            listed = ", ".join(f"{a.name!r}: r={a.rank}" for a in adapters)
            raise PetConfigError(f"All adapters must have the same r value when using combination_type "
                                 f"{combination_type!r} (got {listed}); use 'cat' or 'svd' for different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)  # may grow large with many adapters, as PEFT warns
    else:
        new_rank = svd_rank if svd_rank is not None else max(ranks)
    if combination_type in _DENSITY_TYPES:  # after the ranks, as in PEFT (its merge_utils meet density last)
        density = _check_density(density, combination_type)
    elif combination_type in DARE_TYPES:
        density = _check_dare_density(density, combination_type)

    # PEFT's new target_modules is the union of the adapters' (a set union, or regexes joined by '|')
    target_paths = sorted({path for adapter in adapters for path in adapter.target_paths})
    tensors = {}
    for path in target_paths:
        # per cell only the adapters that target it take part (PEFT skips the others)
        present = [(adapter, weight) for adapter, weight in zip(adapters, weights) if path in adapter.tensors]
        if combination_type == "cat":
            tensors[path] = _cat(path, present, new_rank)
        elif combination_type in _SVD_TYPES:
            tensors[path] = _svd(path, present, combination_type, new_rank, svd_clamp, svd_full_matrices,
                                 density, majority_sign_method, seed)
        else:
            tensors[path] = _on_a_and_b(path, present, combination_type, density, majority_sign_method, seed)
    # the new config is a copy of the first adapter's with r = lora_alpha = new_rank
    return CombinedAdapter(combination_type=combination_type, rank=int(new_rank), alpha=float(new_rank),
                           use_rslora=bool(adapters[0].use_rslora), target_paths=target_paths, tensors=tensors)


# ----------------------------------------------------------------------------- the argument checks
def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_adapters(adapters: Sequence[AdapterWeights]) -> list[AdapterWeights]:
    if isinstance(adapters, (str, AdapterWeights)) or not isinstance(adapters, Sequence):
        raise PetConfigTypeError(f"adapters must be a list of AdapterWeights, got {type(adapters).__name__}")
    if not adapters:
        raise PetConfigError("adapters is empty: add_weighted_adapter needs at least one adapter to combine")
    shapes = {}  # path -> (in, out, adapter name): every adapter of a cell must fit the same cell
    for index, adapter in enumerate(adapters):
        if not isinstance(adapter, AdapterWeights):
            raise PetConfigTypeError(f"adapters[{index}] must be an AdapterWeights, got {type(adapter).__name__}")
        name = adapter.name
        if not isinstance(adapter.rank, numbers.Integral) or isinstance(adapter.rank, bool) or adapter.rank < 1:
            raise PetConfigError(f"adapter {name!r}: rank must be a positive int, got {adapter.rank!r}")
        for key in ("alpha", "scaling"):
            value = getattr(adapter, key)
            if not _is_number(value) or not math.isfinite(value):
                raise PetConfigError(f"adapter {name!r}: {key} must be a finite number, got {value!r}")
        expected = adapter.alpha / (math.sqrt(adapter.rank) if adapter.use_rslora else adapter.rank)
        if not math.isclose(adapter.scaling, expected, rel_tol=1e-6, abs_tol=1e-12):
            formula = "alpha / sqrt(rank)" if adapter.use_rslora else "alpha / rank"
            raise PetConfigError(f"adapter {name!r}: scaling {adapter.scaling!r} is not {formula} = {expected!r} "
                                 f"(use_rslora={adapter.use_rslora}); the combined adapter's scaling depends on it")
        paths = adapter.target_paths
        if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
            raise PetConfigError(f"adapter {name!r}: target_paths must be a non-empty list of cell paths, "
                                 f"got {paths!r}")
        if len(set(paths)) != len(paths) or set(paths) != set(adapter.tensors):
            raise PetConfigError(f"adapter {name!r}: target_paths {sorted(set(paths))} and the paths of its tensors "
                                 f"{sorted(adapter.tensors)} must be the same, each once")
        for path in paths:
            a, b = (np.asarray(t) for t in adapter.tensors[path])
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != adapter.rank or b.shape[1] != adapter.rank:
                raise PetConfigError(f"adapter {name!r}, cell {path!r}: expected A [rank={adapter.rank}, in] and "
                                     f"B [out, rank={adapter.rank}], got A {a.shape} and B {b.shape}")
            seen = shapes.setdefault(path, (a.shape[1], b.shape[0], name))
            if seen[:2] != (a.shape[1], b.shape[0]):
                raise PetConfigError(f"cell {path!r}: adapter {name!r} maps {a.shape[1]} -> {b.shape[0]} features "
                                     f"but adapter {seen[2]!r} maps {seen[0]} -> {seen[1]}")
    return list(adapters)


def _check_weights(weights: Sequence[float], adapters: list[AdapterWeights]) -> list[float]:
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise PetConfigTypeError(f"weights must be a list of numbers, got {type(weights).__name__}")
    if len(weights) != len(adapters):
        # PEFT zips the two lists and silently drops what has no partner
        raise PetConfigError(f"got {len(weights)} weights for {len(adapters)} adapters "
                             f"{[a.name for a in adapters]}: give one weight per adapter")
    for adapter, weight in zip(adapters, weights):
        if not _is_number(weight) or not math.isfinite(weight):
            raise PetConfigError(f"weight of adapter {adapter.name!r} must be a finite number, got {weight!r}")
    return [float(weight) for weight in weights]


def _check_svd_args(svd_rank: Optional[int], svd_clamp: Optional[float], svd_full_matrices: bool,
                    svd_driver: Optional[str]) -> None:
    # checked whatever the combination_type (PEFT ignores them outside svd): a bad value is a typo either way
    if svd_rank is not None and (not isinstance(svd_rank, numbers.Integral) or isinstance(svd_rank, bool)
                                 or svd_rank < 1):
        # PEFT's `svd_rank or max(ranks)` would take 0 for "the largest rank"; None says that plainly
        raise PetConfigError(f"svd_rank must be a positive int or None (the largest rank), got {svd_rank!r}")
    if svd_clamp is not None and (not _is_number(svd_clamp) or not 0.0 <= svd_clamp <= 1.0):
        raise PetConfigError(f"svd_clamp is a quantile in [0, 1] (or None: no clamping), got {svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise PetConfigTypeError(f"svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if svd_driver not in _SVD_DRIVERS:
        raise PetConfigError(f"svd_driver must be one of {list(_SVD_DRIVERS)}, got {svd_driver!r}")


def _check_density(density: Optional[float], combination_type: str) -> float:
    if density is None:
        raise PetConfigError(f"combination_type {combination_type!r} needs density (the fraction of values kept, "
                             f"in [0, 1])")
    if not _is_number(density) or not math.isfinite(density):
        raise PetConfigError(f"density must be a number in [0, 1], got {density!r}")
    if density < 0:
        raise PetConfigError(f"Density should be >= 0, got {density}")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
    return float(density)


def _check_seed(seed: Optional[int], combination_type: str) -> None:
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
        raise PetConfigError(f"seed must be a non-negative int (or None outside the DARE types), got {seed!r}")
    if seed is None and combination_type in DARE_TYPES:
        # PEFT draws DARE's masks from torch's global generator; there is no such hidden state here
        raise PetConfigError(f"combination_type {combination_type!r} draws random masks: pass seed=<int> (the "
                             f"masks are pet_hooks' own, not those of PEFT's torch generator)")


def _check_dare_density(density: Optional[float], combination_type: str) -> float:
    # PEFT: density < 0 raises, 0 divides by zero (NaN everywhere), >= 1 warns and prunes nothing
    if density is None:
        raise PetConfigError(f"combination_type {combination_type!r} needs density (the probability of keeping "
                             f"each value, in (0, 1])")
    if not _is_number(density) or not math.isfinite(density) or not 0 < density <= 1:
        raise PetConfigError(f"density of {combination_type!r} is the probability of keeping each value, in "
                             f"(0, 1], got {density!r}")
    if density == 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
    return float(density)


# ----------------------------------------------------------------------------- the math
# Everything in float32, in PEFT's order of operations, so the results agree to float32 rounding.
def _f32(array: object) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _cat(path: str, present: list, new_rank: int) -> tuple:
    """cat: the adapters side by side, rank sum(r_i); weight and scaling go into A, B is taken as it is."""
    a = np.concatenate([_f32(adapter.tensors[path][0]) * np.float32(weight) * np.float32(adapter.scaling)
                        for adapter, weight in present], axis=0)
    b = np.concatenate([_f32(adapter.tensors[path][1]) for adapter, _ in present], axis=1)
    # a cell that not every adapter targets fills only the first rows of A (columns of B): PEFT writes
    # the concatenation into the zeroed [new_rank, ...] weights, the rest stays zero
    a = np.pad(a, ((0, new_rank - a.shape[0]), (0, 0)))
    b = np.pad(b, ((0, 0), (0, new_rank - b.shape[1])))
    return a, b


def _magnitude_prune(tensor: np.ndarray, density: float) -> np.ndarray:
    """PEFT's ``prune(..., method="magnitude")``: keep the ``int(density * size)`` largest |values|."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    mask = np.zeros_like(flat)
    if k > 0:
        # stable sort on -|x|: equal magnitudes keep the first ones (torch.topk's choice there is unspecified)
        mask[np.argsort(-np.abs(flat), kind="stable")[:k]] = 1
    return (flat * mask).reshape(tensor.shape)


def dare_masks(seed: int, path: str, shapes: Sequence[tuple], density: float) -> list:
    """DARE's random masks of one cell: one float32 0/1 array per shape, each entry 1 with probability
    ``density``, drawn in order from a generator seeded by ``(seed, crc32(path))`` (so a cell's masks do
    not depend on the other cells). :func:`combine` draws, per cell, the masks of the A's then of the
    B's of the adapters there (in the adapters' order), or of their deltas for the ``_svd`` forms: the
    order PEFT calls ``torch.bernoulli`` in. None drawn for ``density >= 1`` (PEFT does not prune then)."""
    if density >= 1:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(path.encode("utf-8"))]))
    # uniform in [0, 1) below density: probability density, as torch.bernoulli(full_like(t, density))
    return [(rng.random(tuple(shape)) < density).astype(np.float32) for shape in shapes]


def _dare_prune(tensor: np.ndarray, mask: np.ndarray, density: float) -> np.ndarray:
    """PEFT's ``prune(..., method="random", rescale=True)`` with the mask given: ``tensor * mask / density``."""
    if density >= 1:
        return tensor
    return (tensor * mask / np.float32(density)).astype(np.float32)


def _merge(tensors: list, weights: np.ndarray, how: str, density: Optional[float], sign_method: str,
           masks: Optional[list] = None) -> np.ndarray:
    """PEFT's ``task_arithmetic`` / ``ties`` / ``magnitude_prune`` / ``dare_linear`` / ``dare_ties`` of
    ``merge_utils`` over stacked tensors (``masks``: DARE's, one per tensor)."""
    if how in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties") and density < 1:
        tensors = [_dare_prune(t, m, density) for t, m in zip(tensors, masks, strict=True)]
    stacked = np.stack(tensors, axis=0)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if how not in ("ties", "dare_ties"):
        return weighted.sum(axis=0)
    # TIES: elect a sign per entry (from the unweighted, pruned tensors), then average the entries that agree
    sign = np.sign(stacked)
    magnitude = stacked.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
    majority = np.where(magnitude >= 0, 1, -1).astype(np.float32)
    agree = (sign == majority).astype(np.float32)
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), np.float32(1.0))


def _on_a_and_b(path: str, present: list, combination_type: str, density: Optional[float],
                sign_method: str, seed: Optional[int]) -> tuple:
    """linear / ties / magnitude_prune / dare_*: the A's and the B's merged separately, at the common rank."""
    weights_a, weights_b = [], []
    for adapter, weight in present:
        # the factor w * s is split as sqrt on both sides, its sign on A only (on both it would cancel)
        factor = weight * adapter.scaling
        root = math.sqrt(abs(factor))
        weights_a.append(root if factor >= 0 else -root)
        weights_b.append(root)
    a_list = [_f32(adapter.tensors[path][0]) for adapter, _ in present]
    b_list = [_f32(adapter.tensors[path][1]) for adapter, _ in present]
    masks_a = masks_b = None
    if combination_type in DARE_TYPES and density < 1:
        # PEFT merges all A's (one bernoulli each), then all B's
        masks = dare_masks(seed, path, [t.shape for t in a_list + b_list], density)
        masks_a, masks_b = masks[:len(a_list)], masks[len(a_list):]
    a = _merge(a_list, _f32(weights_a), combination_type, density, sign_method, masks_a)
    b = _merge(b_list, _f32(weights_b), combination_type, density, sign_method, masks_b)
    return a.astype(np.float32), b.astype(np.float32)


def _svd(path: str, present: list, combination_type: str, new_rank: int, clamp: Optional[float],
         full_matrices: bool, density: Optional[float], sign_method: str, seed: Optional[int]) -> tuple:
    """svd family: merge the full deltas, then the best rank-``new_rank`` factorisation of the sum."""
    deltas = [(_f32(adapter.tensors[path][1]) @ _f32(adapter.tensors[path][0])) * np.float32(adapter.scaling)
              for adapter, _ in present]
    how = combination_type.rpartition("_")[0] if combination_type != "svd" else "linear"    # "ties_svd" -> "ties"
    masks = None
    if combination_type in DARE_TYPES and density < 1:
        masks = dare_masks(seed, path, [d.shape for d in deltas], density)
    delta = _merge(deltas, _f32([weight for _, weight in present]), how, density, sign_method,
                   masks).astype(np.float32)
    out_dim, in_dim = delta.shape
    if full_matrices and new_rank > min(out_dim, in_dim) and out_dim != in_dim:
        # PEFT's U[:, :r] @ diag(S[:r]) then fails (out > in) or gives A and B that do not multiply (in > out)
        raise PetConfigError(f"svd_rank {new_rank} exceeds the rank {min(out_dim, in_dim)} of cell {path!r} "
                             f"({in_dim} -> {out_dim} features), which the full-matrices SVD cannot give: "
                             f"pass svd_full_matrices=False or svd_rank <= {min(out_dim, in_dim)}")
    u, s, vh = np.linalg.svd(delta, full_matrices=full_matrices)  # LAPACK gesdd, as torch on CPU
    k = min(new_rank, s.shape[0])
    u = u[:, :k] * s[:k]  # U @ diag(S)
    vh = vh[:k, :]
    if clamp is not None:
        # one symmetric bound for both factors: the clamp-quantile of all their entries
        high = np.float32(np.quantile(np.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp))
        u = np.clip(u, -high, high)
        vh = np.clip(vh, -high, high)
    if k < new_rank:
        # a cell of rank below new_rank: PEFT leaves the adapter smaller there; zero rows and columns keep
        # the delta and give every cell the adapter's rank
        u = np.pad(u, ((0, 0), (0, new_rank - k)))
        vh = np.pad(vh, ((0, new_rank - k), (0, 0)))
    return vh.astype(np.float32), u.astype(np.float32)
