"""DoRA (``use_dora``) and LoRA's initialisations (``init_lora_weights``) against Hugging Face PEFT, both modes.

The same three-layer net (``k``, ``v``, ``down``, with biases) in PyTorch with PEFT and in MindSpore with
pet_hooks (nn.Dense, and MindFormers' Linear in both weight layouts), identical weights and input
(``tests/dora_reference.py`` is the PyTorch side, in its own process):

- DoRA: the magnitude PEFT initialises, the outputs, the gradients of A, B and the magnitude, the merged
  weights (PEFT's ``merge_adapter``) and unmerge back; PEFT reads our PEFT-format DoRA adapter and we read PEFT's;
  the same against DoRA written out in NumPy from the paper's definition (tests/numpy_references.py), which
  needs no PyTorch, and that NumPy reference against PEFT;
- PiSSA and OLoRA: the initial ``s B A`` and the residual base weight PEFT computes, the output at init;
  PEFT reads our PiSSA adapter (re-deriving the residual from the original weights, as we do) and our
  conversion of it to a plain rank-2r LoRA (``save_as_lora``);
- ``pissa_niter_N``: the reconstruction ``W_res + s B A = W`` and shapes; gaussian / false: the draws;
- training moves only the deltas (the residual stays as written at init), ``remove`` restores the
  original weights bit for bit, ``disable_adapters`` gives the base output exactly.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, assert_params_equal, snapshot
from tests.nets import LAYERS, SIZES, three_layers, three_layers_job
from tests.numpy_references import DoraLayer, three_layers as numpy_three_layers
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
R, ALPHA = 2, 8
SCALING = ALPHA / R
LORA = {"pet_type": "lora", "lora_rank": R, "lora_alpha": ALPHA, "target_modules": list(LAYERS)}
DORA = {**LORA, "use_dora": True}
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
NEEDS_MF = pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
KINDS = [pytest.param("dense", id="dense"),
         pytest.param("linear", id="mf_linear", marks=NEEDS_MF),
         pytest.param("linear_in_out", id="mf_linear_in_out", marks=NEEDS_MF)]


def _job() -> dict:
    def values(rng, layer, din, dout):
        return {f"dora.{layer}.A": (rng.standard_normal((R, din)) * 0.4).astype(np.float32),
                f"dora.{layer}.B": (rng.standard_normal((dout, R)) * 0.4).astype(np.float32),
                f"dora.{layer}.m": rng.uniform(0.5, 2.0, dout).astype(np.float32),
                f"pissa.{layer}.dA": (rng.standard_normal((R, din)) * 0.2).astype(np.float32),
                f"pissa.{layer}.dB": (rng.standard_normal((dout, R)) * 0.2).astype(np.float32)}
    return three_layers_job(19, per_layer=values)


def _set(net, values: dict) -> None:
    """``values``: layer -> {leaf: array}, written into the deltas."""
    for layer, leaves in values.items():
        for leaf, value in leaves.items():
            getattr(getattr(net, layer), leaf).set_data(Tensor(value))


def _dora_values(job):
    return {layer: {"lora_A": job[f"dora.{layer}.A"], "lora_B": job[f"dora.{layer}.B"],
                    "lora_magnitude_vector": job[f"dora.{layer}.m"]} for layer in LAYERS}


def _trained_pissa(net, job) -> None:
    """A PiSSA net's A, B moved away from their init by the job's offsets (as training would)."""
    _set(net, {layer: {"lora_A": getattr(net, layer).lora_A.asnumpy() + job[f"pissa.{layer}.dA"],
                       "lora_B": getattr(net, layer).lora_B.asnumpy() + job[f"pissa.{layer}.dB"]}
               for layer in LAYERS})


def _out_in(cell) -> np.ndarray:
    weight = cell.weight.asnumpy()
    return weight if getattr(cell, "transpose_b", True) else weight.T


def close(ours, theirs, err_msg="", tol=1e-5):
    """Equal within float32 rounding at the array's scale; returns the max abs difference."""
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, np.abs(theirs).max()), err_msg=err_msg)
    return float(np.abs(np.asarray(ours) - theirs).max())


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for _job() (one torch process), with pet_hooks' adapters of it read by PEFT."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("dora")
    job = _job()
    np.savez(work / "job.npz", **job)
    x = Tensor(job["x"])
    dora = pet_hooks.apply(three_layers(job), DORA)
    _set(dora, _dora_values(job))
    pet_hooks.save_adapter(dora, work / "ours_dora", format="peft", task_type=None)
    pissa = pet_hooks.apply(three_layers(job), {**LORA, "init_lora_weights": "pissa"})
    _trained_pissa(pissa, job)
    pet_hooks.save_adapter(pissa, work / "ours_pissa", format="peft", task_type=None)
    pet_hooks.save_as_lora(pissa, work / "ours_lora", format="peft", task_type=None)
    ours = {"dora": dora(x).asnumpy(), "pissa": pissa(x).asnumpy()}
    out = run_reference([os.path.join(HERE, "dora_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, dict(np.load(work / "torch.npz")), ours


# ----------------------------------------------------------------------------- DoRA
@NEEDS_PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_dora_outputs_gradients_and_merge_equal_peft(mode, kind, peft_run):
    _, job, theirs, _ = peft_run
    net = pet_hooks.apply(three_layers(job, kind), DORA)
    for layer in LAYERS:                                    # PEFT's init: the row norms of W
        close(getattr(net, layer).lora_magnitude_vector.asnumpy(), theirs[f"dora.init_m.{layer}"], layer, 1e-6)
    _set(net, _dora_values(job))
    x, g = Tensor(job["x"]), Tensor(job["g"])
    deltas = pet_hooks.delta_parameters(net)
    assert [p.name for p in deltas] == [f"{layer}.{leaf}" for layer in LAYERS
                                        for leaf in ("lora_A", "lora_B", "lora_magnitude_vector")]

    def loss(x, g):
        return (net(x) * g).sum()

    _, grads = ms.value_and_grad(loss, None, deltas)(x, g)
    diffs = {"out": close(net(x).asnumpy(), theirs["dora.out"])}
    for param, grad in zip(deltas, grads):
        layer, leaf = param.name.split(".")
        key = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "m"}[leaf]
        diffs[f"grad {key}"] = max(diffs.get(f"grad {key}", 0.0),
                                   close(grad.asnumpy(), theirs[f"dora.grad.{layer}.{key}"], param.name))
    out = net(x).asnumpy()
    pet_hooks.merge(net)
    for layer in LAYERS:
        diffs["merged W"] = max(diffs.get("merged W", 0.0),
                                close(_out_in(getattr(net, layer)), theirs[f"dora.merged.{layer}"], layer, 1e-6))
    close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        close(_out_in(getattr(net, layer)), job[f"{layer}.weight"], layer, 1e-6)
        close(_out_in(getattr(net, layer)), theirs[f"dora.unmerged.{layer}"], layer, 1e-6)
    close(net(x).asnumpy(), out)
    print(f"DoRA {kind} mode {mode}: max |ours - PEFT| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def _numpy_dora(job, magnitudes=None, lora_b=None):
    """The job's net with DoRA in NumPy: {layer: DoraLayer} (default the job's A, B and m)."""
    return {layer: DoraLayer(job[f"{layer}.weight"], job[f"{layer}.bias"], job[f"dora.{layer}.A"],
                             job[f"dora.{layer}.B"] if lora_b is None else lora_b[layer],
                             job[f"dora.{layer}.m"] if magnitudes is None else magnitudes[layer], SCALING)
            for layer in LAYERS}


@pytest.mark.parametrize("kind", KINDS)
def test_dora_outputs_gradients_and_merge_equal_numpy(mode, kind):
    """Without PyTorch: DoRA by its definition (tests/numpy_references.py): the magnitude at init, outputs,
    gradients of A, B and m (the norm held constant), merged weights, and unmerge back."""
    job = _job()
    net = pet_hooks.apply(three_layers(job, kind), DORA)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    for layer in LAYERS:                                    # m = ||W|| per output row, so the output is the base's
        close(getattr(net, layer).lora_magnitude_vector.asnumpy(),
              DoraLayer.initial_magnitude(job[f"{layer}.weight"]), layer, 1e-6)
    _set(net, _dora_values(job))
    deltas = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    _, grads = ms.value_and_grad(loss, None, deltas)(x, g)
    reference = _numpy_dora(job)
    expected, expected_grads = numpy_three_layers(reference, job["x"], job["g"])
    base, _ = numpy_three_layers(_numpy_dora(job, {layer: DoraLayer.initial_magnitude(job[f"{layer}.weight"])
                                                   for layer in LAYERS},
                                             {layer: np.zeros_like(job[f"dora.{layer}.B"]) for layer in LAYERS}),
                                 job["x"], job["g"])
    assert np.abs(expected - base).max() > 20 * 1e-5 * max(1.0, np.abs(expected).max())    # the adapter shows
    out = net(x).asnumpy()
    close(out, expected)
    for param, grad in zip(deltas, grads):
        layer, leaf = param.name.split(".")
        close(grad.asnumpy(), expected_grads[layer][leaf], param.name)
    assert len(deltas) == 3 * len(LAYERS)

    pet_hooks.merge(net)
    for layer in LAYERS:
        close(_out_in(getattr(net, layer)), reference[layer].merged_weight(), layer, 1e-6)
    close(net(x).asnumpy(), expected)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        close(_out_in(getattr(net, layer)), job[f"{layer}.weight"], layer, 1e-6)
    close(net(x).asnumpy(), expected)


@NEEDS_PEFT
def test_the_numpy_dora_is_peft_s(peft_run):
    """The NumPy DoRA above gives PEFT's magnitude at init, output, gradients and merged weights."""
    _, job, theirs, _ = peft_run
    reference = _numpy_dora(job)
    out, grads = numpy_three_layers(reference, job["x"], job["g"])
    close(out, theirs["dora.out"])
    for layer in LAYERS:
        close(DoraLayer.initial_magnitude(job[f"{layer}.weight"]), theirs[f"dora.init_m.{layer}"], layer, 1e-6)
        for leaf, key in (("lora_A", "A"), ("lora_B", "B"), ("lora_magnitude_vector", "m")):
            close(grads[layer][leaf], theirs[f"dora.grad.{layer}.{key}"], f"{layer} {leaf}")
        close(reference[layer].merged_weight(), theirs[f"dora.merged.{layer}"], layer, 1e-6)


@NEEDS_PEFT
def test_peft_reads_our_dora_and_pissa_and_we_read_peft_s_dora(mode, peft_run):
    work, job, theirs, ours = peft_run
    diffs = {"dora": close(theirs["ours_dora.out"], ours["dora"]),
             "pissa": close(theirs["ours_pissa.out"], ours["pissa"]),
             "pissa as lora": close(theirs["ours_lora.out"], ours["pissa"])}
    doc = json.loads((work / "ours_lora" / "adapter_config.json").read_text())
    assert (doc["r"], doc["lora_alpha"], doc["init_lora_weights"]) == (2 * R, 2 * ALPHA, True)
    assert json.loads((work / "ours_dora" / "adapter_config.json").read_text())["use_dora"] is True
    fresh = pet_hooks.load_adapter(three_layers(job), work / "theirs_dora")
    assert get_state(fresh).config.use_dora is True
    diffs["theirs dora"] = close(fresh(Tensor(job["x"])).asnumpy(), theirs["dora.out"])
    print("max |ours - PEFT| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def test_dora_trains_only_deltas_disable_and_remove(mode):
    job = _job()
    net = three_layers(job)
    x = Tensor(job["x"])
    base = net(x).asnumpy()
    values, classes = snapshot(net), [type(c) for _, c in net.cells_and_names()]
    pet_hooks.apply(net, {**DORA, "lora_dropout": 0.2})
    np.testing.assert_allclose(net(x).asnumpy(), base, rtol=1e-6, atol=1e-6)     # m = ||W||, B = 0
    net.set_train(True)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), 0.05))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(4)]
    net.set_train(False)
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)
    assert not np.allclose(net.k.lora_magnitude_vector.asnumpy(), values["k.weight"].__pow__(2).sum(1) ** 0.5)
    adapted = net(x).asnumpy()
    assert np.abs(adapted - base).max() > 1e-3
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    pet_hooks.remove(net)
    assert [type(c) for _, c in net.cells_and_names()] == classes
    assert not hasattr(net.k, "lora_magnitude_vector")
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def test_dora_is_refused_on_cells_it_cannot_adapt():
    from tests.project.test_bad_input import assert_same_world, world

    class Attn(nn.Cell):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def construct(self, x):
            return self.attn(x, x, x)[0]

    net = Attn()
    before = world(net)
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'attn'.*MultiheadAttention.*DoRA.*not supported"):
        pet_hooks.apply(net, {**DORA, "target_modules": ["attn"]})
    with pytest.raises(pet_hooks.UnsupportedCellError, match=r"'attn.out_proj'.*read by its parent.*DoRA"):
        pet_hooks.apply(net, {**DORA, "target_modules": ["attn.out_proj"]})
    assert_same_world(before, net)
    pet_hooks.apply(net, {**LORA, "target_modules": ["attn"]})       # plain LoRA takes it


# ----------------------------------------------------------------------------- PiSSA, OLoRA
@NEEDS_PEFT
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_equals_peft_and_remove_restores(mode, init, peft_run):
    _, job, theirs, _ = peft_run
    net = three_layers(job)
    x = Tensor(job["x"])
    base, values = net(x).asnumpy(), snapshot(net)
    pet_hooks.apply(net, {**LORA, "init_lora_weights": init})
    diffs = {}
    for layer in LAYERS:
        cell = getattr(net, layer)
        ba, their_ba = cell.lora_B.asnumpy() @ cell.lora_A.asnumpy(), theirs[f"{init}.B0.{layer}"] @ theirs[f"{init}.A0.{layer}"]
        diffs["s B0 A0"] = max(diffs.get("s B0 A0", 0.0), close(SCALING * ba, SCALING * their_ba, layer, 1e-4))
        diffs["residual"] = max(diffs.get("residual", 0.0), close(_out_in(cell), theirs[f"{init}.res.{layer}"], layer, 1e-4))
        assert cell.lora_A.shape == (R, SIZES[layer][0]) and cell.lora_B.shape == (SIZES[layer][1], R)
    diffs["out at init"] = close(net(x).asnumpy(), theirs[f"{init}.out0"])
    close(net(x).asnumpy(), base)
    print(f"{init} mode {mode}: max |ours - PEFT| " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    residual = snapshot(net)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), 0.01))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert_params_equal(residual, net, [f"{layer}.{p}" for layer in LAYERS for p in ("weight", "bias")])
    pet_hooks.merge(net)
    pet_hooks.remove(net)                                  # unmerges, then writes the originals back
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def test_pissa_niter_reconstructs_the_weight_and_is_seeded():
    job = _job()
    kind = "linear_in_out" if HAS_MINDFORMERS else "dense"      # the [in, out] layout too
    cfg = {**LORA, "init_lora_weights": "pissa_niter_4", "seed": 5}
    net = pet_hooks.apply(three_layers(job, kind), cfg)
    again = pet_hooks.apply(three_layers(job), cfg)
    for layer in LAYERS:
        cell = getattr(net, layer)
        sba = SCALING * cell.lora_B.asnumpy() @ cell.lora_A.asnumpy()
        np.testing.assert_allclose(_out_in(cell) + sba, job[f"{layer}.weight"], rtol=1e-5, atol=1e-5)
        s = np.linalg.svd(job[f"{layer}.weight"], compute_uv=False)
        best = np.sqrt(np.sum(s[R:] ** 2))                  # the error of the best rank-r part (exact PiSSA)
        assert np.linalg.norm(job[f"{layer}.weight"] - sba) <= 1.05 * best
        np.testing.assert_array_equal(cell.lora_A.asnumpy(), getattr(again, layer).lora_A.asnumpy())


def test_pissa_adapter_reloads_and_converts_to_plain_lora_in_our_format(tmp_path):
    job = _job()
    x = Tensor(job["x"])
    net = pet_hooks.apply(three_layers(job), {**LORA, "init_lora_weights": "olora"})
    _trained_pissa(net, job)
    out = net(x).asnumpy()
    pet_hooks.save_adapter(net, tmp_path / "olora")
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "olora")         # the residual derived again
    close(fresh(x).asnumpy(), out, tol=1e-6)
    before = snapshot(net)
    pet_hooks.save_as_lora(net, tmp_path / "plain")
    assert_params_equal(before, net)                                       # A0 / B0 written in and back exactly
    plain = pet_hooks.load_adapter(three_layers(job), tmp_path / "plain")
    cfg = get_state(plain).config
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.init_lora_weights) == (2 * R, 2 * ALPHA, True)
    np.testing.assert_array_equal(plain.k.weight.asnumpy(), job["k.weight"])   # the original W, untouched
    close(plain(x).asnumpy(), out)
    with pytest.raises(pet_hooks.PetStateError, match="pissa.*olora"):
        pet_hooks.save_as_lora(pet_hooks.apply(three_layers(job), LORA), tmp_path / "no")


# ----------------------------------------------------------------------------- gaussian, false, the fields
def test_gaussian_false_and_the_init_fields():
    job = _job()
    net = nn.SequentialCell([nn.Dense(512, 8)])
    pet_hooks.apply(net, {**LORA, "lora_rank": 4, "target_modules": ["0"], "init_lora_weights": "gaussian", "seed": 1})
    a = net[0].lora_A.asnumpy()
    assert abs(a.std() - 1 / 4) < 0.015 and abs(a.mean()) < 0.015                # PEFT: normal(0, 1/r)
    assert not net[0].lora_B.asnumpy().any()
    off = three_layers(job)
    base = off(Tensor(job["x"])).asnumpy()
    pet_hooks.apply(off, {**LORA, "init_lora_weights": False, "seed": 1})
    assert off.k.lora_B.asnumpy().any() and np.abs(off.k.lora_B.asnumpy()).max() <= 1 / np.sqrt(R)
    assert np.abs(off(Tensor(job["x"])).asnumpy() - base).max() > 1e-3          # not an identity at init
    cfg = pet_hooks.load_config({**LORA, "init_lora_weights": "PiSSA_niter_04"})
    assert cfg.init_lora_weights == "pissa_niter_4" and cfg.lora_a_init == "kaiming_uniform"
    assert pet_hooks.load_config({**LORA, "lora_a_init": "normal"}).init_lora_weights is True
    with pytest.raises(ValueError, match="init_lora_weights.*'corda'"):
        pet_hooks.load_config({**LORA, "init_lora_weights": "corda"})


def test_a_peft_adapter_of_another_kind_is_refused_by_an_adapted_net(tmp_path):
    job = _job()
    pet_hooks.save_adapter(pet_hooks.apply(three_layers(job), LORA), tmp_path / "plain", format="peft", task_type=None)
    pet_hooks.save_adapter(pet_hooks.apply(three_layers(job), {**LORA, "init_lora_weights": "olora"}), tmp_path / "olora",
                           format="peft", task_type=None)
    dora = pet_hooks.apply(three_layers(job), DORA)
    with pytest.raises(pet_hooks.PetStateError, match="use_dora=False differs"):
        pet_hooks.load_adapter(dora, tmp_path / "plain")
    plain = pet_hooks.apply(three_layers(job), LORA)
    with pytest.raises(pet_hooks.PetStateError, match="init_lora_weights='olora' differs.*residual"):
        pet_hooks.load_adapter(plain, tmp_path / "olora")
