"""pet_hooks.multi.weighted.combine against PEFT 0.21.2's LoraModel.add_weighted_adapter.

tests/weighted_reference.py runs PEFT in its own process (torch and MindSpore apart) on a tiny
three-layer model with four LoRA adapters (different ranks and alphas, two with rsLoRA, each on a
different set of cells) and writes their A and B, and what every ``add_weighted_adapter`` case of
its ``CASES`` gave. Here each case is replayed with ``combine`` and compared per cell: the delta
``scaling * B @ A`` always; A and B themselves where PEFT's result is unique (linear, cat, ties,
magnitude_prune; an SVD's factors are unique only up to signs). The error cases compare with what
PEFT raises, or document where PEFT goes on and ``combine`` refuses.

DARE: the masks ``combine`` draws from a case's ``seed`` (``dare_masks``) are fed to PEFT in place
of ``torch.bernoulli``, so PEFT's own DARE runs on them and A and B must agree as for ``ties``.

The last tests need no torch: ``combine``'s own argument checks, and exactness facts (cat and a
full-rank svd reproduce the weighted sum of the deltas) that hold whatever PEFT does.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from tests.conftest import NEEDS_TORCH_PEFT, ROOT
from tests.weighted_reference import ADAPTERS, CASES, CELLS
from tests.torch_runner import run_reference
from pet_hooks.errors import PetConfigError
from pet_hooks.multi.weighted import AdapterWeights, CombinedAdapter, combine, dare_masks, select_adapters

# float32 all through on both sides: deltas of order 1, so 1e-5 is a few float32 ulps of headroom
DELTA_TOL = dict(rtol=1e-5, atol=1e-5)
FACTOR_TOL = dict(rtol=1e-6, atol=1e-6)
# the cases whose A and B PEFT computes without an SVD, hence uniquely
EXACT_FACTORS = ("linear", "cat", "ties", "magnitude_prune", "dare_linear", "dare_ties")
ARGS = ("combination_type", "svd_rank", "svd_clamp", "svd_full_matrices", "density", "majority_sign_method", "seed")


def _peft_mask_order(case: dict) -> list:
    """The masks of a DARE case as PEFT asks torch.bernoulli for them: per cell in module order (fc1, fc2,
    head.0), the adapters there in the case's order, their A's then their B's (their deltas for _svd)."""
    masks = []
    for path, (fan_in, fan_out) in CELLS.items():
        present = [name for name in case["adapters"] if path in ADAPTERS[name]["target_modules"]]
        if case["combination_type"].endswith("_svd"):
            shapes = [(fan_out, fan_in)] * len(present)
        else:
            shapes = ([(ADAPTERS[name]["r"], fan_in) for name in present]
                      + [(fan_out, ADAPTERS[name]["r"]) for name in present])
        masks += dare_masks(case["seed"], path, shapes, case["density"])
    return masks


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's adapters and results: (meta, arrays) as tests/weighted_reference.py wrote them."""
    out = tmp_path_factory.mktemp("weighted_reference")
    masks = {f"{case_id}/{index:03d}": mask for case_id, case in CASES.items() if "seed" in case
             for index, mask in enumerate(_peft_mask_order(case))}
    np.savez(os.path.join(out, "masks.npz"), **masks)
    done = run_reference([os.path.join(ROOT, "tests", "weighted_reference.py"), str(out),
                           os.path.join(out, "masks.npz")], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "meta.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    with np.load(os.path.join(out, "tensors.npz")) as npz:
        arrays = {key: npz[key] for key in npz.files}
    return meta, arrays


@pytest.fixture(scope="module")
def available(peft_run) -> dict:
    """PEFT's four adapters as AdapterWeights (the scaling PEFT's layers use, one per adapter)."""
    meta, arrays = peft_run
    adapters = {}
    for name, info in meta["adapters"].items():
        paths = sorted(info["scaling"])
        assert paths == sorted(info["target_modules"])
        assert len(set(info["scaling"].values())) == 1, info["scaling"]
        adapters[name] = AdapterWeights(
            name=name, rank=info["r"], alpha=info["lora_alpha"], scaling=info["scaling"][paths[0]],
            target_paths=paths, use_rslora=info["use_rslora"],
            tensors={path: (arrays[f"adapter/{name}/{path}/A"], arrays[f"adapter/{name}/{path}/B"])
                     for path in paths})
        assert float(np.abs(arrays[f"adapter/{name}/{paths[0]}/B"]).max()) > 0.1  # B is not PEFT's zero init
    return adapters


def replay(available: dict, case_id: str, **changes) -> CombinedAdapter:
    """``combine`` on the adapters and arguments of a case of tests/weighted_reference.py."""
    kwargs = dict(CASES[case_id], **changes)
    adapters = select_adapters(available, kwargs.pop("adapters"))
    return combine(adapters, kwargs.pop("weights"), **{key: kwargs[key] for key in ARGS if key in kwargs})


def peft_delta(meta: dict, arrays: dict, case_id: str, path: str) -> np.ndarray:
    a, b = arrays[f"case/{case_id}/{path}/A"], arrays[f"case/{case_id}/{path}/B"]
    return meta["cases"][case_id]["scaling"][path] * (b.astype(np.float64) @ a.astype(np.float64))


def our_delta(combined: CombinedAdapter, path: str) -> np.ndarray:
    a, b = combined.tensors[path]
    return combined.scaling * (b.astype(np.float64) @ a.astype(np.float64))


SAME_AS_PEFT = [case_id for case_id in CASES if not case_id.startswith("err_")
                and case_id not in ("weights_short", "svd_r9_full")]


@NEEDS_TORCH_PEFT
@pytest.mark.parametrize("case_id", SAME_AS_PEFT)
def test_combine_gives_peft_delta(peft_run, available, case_id):
    """Per cell, our A and B with our scaling give PEFT's delta (and PEFT's A and B where unique)."""
    meta, arrays = peft_run
    theirs = meta["cases"][case_id]
    ours = replay(available, case_id)
    assert (ours.rank, ours.alpha, ours.use_rslora) == (theirs["r"], theirs["lora_alpha"], theirs["use_rslora"])
    assert ours.target_paths == sorted(theirs["scaling"]) == sorted(CELLS)
    for path in ours.target_paths:
        assert math.isclose(ours.scaling, theirs["scaling"][path], rel_tol=1e-12), path
        a, b = ours.tensors[path]
        assert a.dtype == b.dtype == np.float32
        assert a.shape == (ours.rank, CELLS[path][0]) and b.shape == (CELLS[path][1], ours.rank), path
        np.testing.assert_allclose(our_delta(ours, path), peft_delta(meta, arrays, case_id, path), **DELTA_TOL,
                                   err_msg=f"{case_id} {path}")
        if ours.combination_type in EXACT_FACTORS:
            for mine, key in ((a, "A"), (b, "B")):
                np.testing.assert_allclose(mine, arrays[f"case/{case_id}/{path}/{key}"], **FACTOR_TOL,
                                           err_msg=f"{case_id} {path} {key}")


@NEEDS_TORCH_PEFT
def test_peft_facts_the_cases_rely_on(peft_run, available):
    """The cases exercise what they claim: rsLoRA inherited from the first adapter, linear with one adapter,
    PEFT's svd rank smaller than svd_rank on a cell with svd_full_matrices=False (we pad with zeros)."""
    meta, arrays = peft_run
    assert meta["cases"]["cat_21"]["use_rslora"]
    assert math.isclose(meta["cases"]["cat_21"]["scaling"]["fc1"], math.sqrt(8), rel_tol=1e-12)
    assert replay(available, "single_3").combination_type == "linear"
    assert arrays["case/svd_1234_r9_reduced/head.0/A"].shape == (8, 10)  # head.0 is 10 -> 8
    a, b = replay(available, "svd_1234_r9_reduced").tensors["head.0"]
    assert a.shape == (9, 10) and not a[8].any() and not b[:, 8].any()


@NEEDS_TORCH_PEFT
def test_weights_shorter_than_adapters(peft_run, available):
    """PEFT zips adapters with weights and drops the adapter without a weight (its rank still counted in
    cat); combine refuses the mismatch, naming the counts."""
    meta, arrays = peft_run
    with pytest.raises(PetConfigError, match="2 weights for 3 adapters"):
        replay(available, "weights_short")
    with pytest.raises(PetConfigError, match="3 weights for 2 adapters"):
        combine(select_adapters(available, ["one", "two"]), [1.0, 0.5, 0.2], "cat")
    dropped = combine(select_adapters(available, ["one", "two"]), [1.0, 0.5], "cat")
    assert meta["cases"]["weights_short"]["r"] == 10 and dropped.rank == 8
    for path in CELLS:
        np.testing.assert_allclose(our_delta(dropped, path), peft_delta(meta, arrays, "weights_short", path),
                                   **DELTA_TOL)


@NEEDS_TORCH_PEFT
def test_svd_rank_beyond_a_cell_with_full_matrices(peft_run, available):
    """svd_rank above min(in, out) of a non-square cell with full matrices: PEFT fails (out > in) or writes
    an A and a B that do not multiply (in > out); combine says which cell and what to pass instead."""
    meta, arrays = peft_run
    assert arrays["case/svd_r9_full/head.0/A"].shape[0] != arrays["case/svd_r9_full/head.0/B"].shape[1]
    with pytest.raises(PetConfigError, match=r"svd_rank 9 exceeds the rank 8 of cell 'head.0'.*svd_full_matrices"):
        replay(available, "svd_r9_full")
    assert meta["cases"]["err_svd_r13_full"]["error_type"] == "RuntimeError"
    with pytest.raises(PetConfigError, match="svd_rank 13 exceeds the rank 12 of cell 'fc1'"):
        replay(available, "err_svd_r13_full")


@NEEDS_TORCH_PEFT
@pytest.mark.parametrize("case_id, match", [
    ("err_linear_ranks", r"same r value .*'linear'.*'one': r=4, 'three': r=2"),
    ("err_type", "Invalid combination_type: 'average'"),
    ("err_unknown", "Adapter zzz does not exist"),
])
def test_errors_where_peft_raises(peft_run, available, case_id, match):
    meta, _ = peft_run
    assert meta["cases"][case_id]["error_type"] == "ValueError"
    with pytest.raises(ValueError, match=match):
        replay(available, case_id)


# ----------------------------------------------------------------------------- no torch needed
def _random_adapter(rng, name: str, rank: int, alpha: float, paths, rslora: bool = False) -> AdapterWeights:
    tensors = {path: (rng.standard_normal((rank, CELLS[path][0])).astype(np.float32),
                      rng.standard_normal((CELLS[path][1], rank)).astype(np.float32)) for path in paths}
    return AdapterWeights(name=name, rank=rank, alpha=alpha, scaling=alpha / (math.sqrt(rank) if rslora else rank),
                          target_paths=list(paths), tensors=tensors, use_rslora=rslora)


@pytest.fixture()
def pair():
    rng = np.random.default_rng(3)
    return [_random_adapter(rng, "p", 4, 8.0, ["fc1", "fc2"]), _random_adapter(rng, "q", 2, 3.0, ["fc2"], True)]


def test_cat_and_full_rank_svd_are_exact(pair):
    """cat, and svd at a rank holding the whole sum, give exactly sum_i w_i s_i B_i A_i on every cell."""
    weights = [0.7, -1.5]
    for combined in (combine(pair, weights, "cat"), combine(pair, weights, "svd", svd_rank=6)):
        for path in ("fc1", "fc2"):
            expected = sum(w * ad.scaling * (ad.tensors[path][1].astype(np.float64) @ ad.tensors[path][0])
                           for ad, w in zip(pair, weights) if path in ad.tensors)
            np.testing.assert_allclose(our_delta(combined, path), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(adapters=[]), "adapters is empty"),
    (dict(weights=[1.0, float("nan")]), "weight of adapter 'q' must be a finite number"),
    (dict(weights=[1.0, True]), "weight of adapter 'q'"),
    (dict(combination_type="dare_linear_svd", density=0.5), "'dare_linear_svd' draws random masks: pass seed"),
    (dict(combination_type="dare_ties_svd", seed=1), "'dare_ties_svd' needs density"),
    (dict(combination_type="dare_linear_svd", seed=1, density=0.0),
     r"density of 'dare_linear_svd' .* \(0, 1\], got 0.0"),
    (dict(combination_type="dare_ties_svd", seed=1, density=1.5), r"\(0, 1\], got 1.5"),
    (dict(combination_type="dare_ties_svd", seed=1, density=float("nan")), r"\(0, 1\], got nan"),
    (dict(combination_type="dare_linear_svd", seed=-1, density=0.5), "seed must be a non-negative int"),
    (dict(combination_type="dare_linear_svd", seed=1.5, density=0.5), "seed must be a non-negative int"),
    (dict(seed="7"), "seed must be a non-negative int"),
    (dict(combination_type="ties"), "same r value"),
    (dict(combination_type="ties_svd"), "'ties_svd' needs density"),
    (dict(combination_type="magnitude_prune_svd", density=-0.1), "Density should be >= 0"),
    (dict(svd_rank=0), "svd_rank must be a positive int"),
    (dict(svd_clamp=1.5), "svd_clamp is a quantile in"),
    (dict(svd_driver="gesvdx"), "svd_driver must be one of"),
    (dict(majority_sign_method="mean"), "majority_sign_method must be one of"),
])
def test_argument_checks(pair, change, match):
    kwargs = dict(adapters=pair, weights=[1.0, 0.5], combination_type="svd")
    kwargs.update(change)
    with pytest.raises(PetConfigError, match=match):
        combine(**kwargs)


def test_adapter_checks(pair):
    p, q = pair
    # one adapter: PEFT quietly runs linear whatever the type; a misspelt type is still refused here
    assert combine([p], [2.0], "svd").combination_type == "linear"
    with pytest.raises(PetConfigError, match="Invalid combination_type: 'sdv'"):
        combine([p], [2.0], "sdv")
    q.scaling = q.alpha / q.rank  # as if use_rslora had been forgotten
    with pytest.raises(PetConfigError, match=r"adapter 'q': scaling .* alpha / sqrt\(rank\)"):
        combine(pair, [1.0, 1.0], "cat")
    q.scaling = q.alpha / math.sqrt(q.rank)
    q.tensors["fc2"] = (q.tensors["fc2"][0][:, :5], q.tensors["fc2"][1])
    with pytest.raises(PetConfigError, match="cell 'fc2': adapter 'q' maps 5 -> 10 features but adapter 'p' maps"):
        combine(pair, [1.0, 1.0], "cat")
    q.target_paths = ["fc1"]
    with pytest.raises(PetConfigError, match="adapter 'q': target_paths"):
        combine(pair, [1.0, 1.0], "cat")
    wrong_rank = AdapterWeights(**dict(vars(p), name="p3", rank=3, scaling=p.alpha / 3))  # p's tensors are r=4
    with pytest.raises(PetConfigError, match=r"adapter 'p3', cell 'fc1': expected A \[rank=3, in\].*A \(4, 12\)"):
        combine([p, wrong_rank], [1.0, 1.0], "cat")


# ----------------------------------------------------------------------------- end to end, on a MindSpore net
class _ThreeLayers:
    """Built lazily: a MindSpore net whose cells are named as the torch model's (fc1, fc2, head.0)."""

    @staticmethod
    def build():
        from mindspore import nn

        class Net(nn.Cell):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Dense(*CELLS["fc1"])
                self.fc2 = nn.Dense(*CELLS["fc2"])
                self.head = nn.SequentialCell([nn.Dense(*CELLS["head.0"])])

            def construct(self, x):
                return self.head(self.fc2(self.fc1(x)))
        return Net()


@NEEDS_TORCH_PEFT
@pytest.mark.parametrize("case_id", ["cat_123", "svd_123_r3", "svd_42_r5", "dare_linear_svd_123"])
def test_add_weighted_adapter_on_a_net_gives_peft_deltas(peft_run, case_id):
    """pet_hooks.add_weighted_adapter on a MindSpore net holding PEFT's adapters (their A and B loaded into it)
    makes the adapter whose per-cell deltas PEFT's add_weighted_adapter made."""
    import mindspore as ms
    import pet_hooks
    from pet_hooks.surgery.core import get_state
    from pet_hooks.multi import slots as lora_slots
    from pet_hooks.multi.adapters import focused  # (pet_hooks.multi.adapters is not loaded before add_adapter)

    meta, arrays = peft_run
    case = CASES[case_id]
    net = _ThreeLayers.build()
    for index, name in enumerate(case["adapters"]):
        spec = ADAPTERS[name]
        cfg = {"pet_type": "lora", "lora_rank": spec["r"], "lora_alpha": spec["lora_alpha"],
               "use_rslora": spec["use_rslora"], "target_modules": "|".join(re.escape(t) for t in spec["target_modules"])}
        if index == 0:
            pet_hooks.apply(net, cfg, adapter_name=name)
        else:
            pet_hooks.add_adapter(net, name, cfg)
        with focused(net, name):
            for path in spec["target_modules"]:
                cell = dict(net.cells_and_names())[path]
                cell.lora_A.set_data(ms.Tensor(arrays[f"adapter/{name}/{path}/A"]))
                cell.lora_B.set_data(ms.Tensor(arrays[f"adapter/{name}/{path}/B"]))
    args = {k: v for k, v in case.items() if k not in ("adapters", "weights", "combination_type")}
    pet_hooks.add_weighted_adapter(net, case["adapters"], case["weights"], "mixed",
                                   combination_type=case["combination_type"], **args)
    state = get_state(net)
    scaling = state.adapters["mixed"].config.scaling
    ours = lora_slots.adapter_arrays(state, "mixed")
    assert sorted(ours) == sorted(meta["cases"][case_id]["scaling"])
    for path, pair in ours.items():
        delta = scaling * pair["lora_B"] @ pair["lora_A"]
        np.testing.assert_allclose(delta, peft_delta(meta, arrays, case_id, path), rtol=1e-5, atol=2e-5,
                                   err_msg=f"{case_id} {path}")
