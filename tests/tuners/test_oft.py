"""OFT against Hugging Face PEFT 0.21's own implementation, in graph and PyNative mode.

The three-layer net of test_ia3.py (``k`` 6 -> 10, ``v`` 10 -> 8, ``down`` 8 -> 4) in PyTorch with PEFT's
``OFTConfig`` and in MindSpore with pet_hooks, on nn.Dense and on MindFormers' Linear with both weight
layouts. Four variants: the Neumann series (PEFT's default, 5 terms) and the exact Cayley transform with
``r: 2`` (blocks of 3, 5, 4); COFT with a radius that projects some blocks and not others; ``block_share``
with ``oft_block_size: 2`` and 3 Neumann terms (PEFT's loop ends with ``2Q^2 + Q^3`` there). ``oft_R`` is
random (``init_weights: false``, scaled up so the rotation shows) and copied to PEFT, which must have made
the same shapes; the outputs, the gradient of ``oft_R``, ``oft_R`` after the forward (COFT writes its
projection back) and the merged weights must be PEFT's; PEFT must read our PEFT-format adapter and we
PEFT's. Then: PEFT's init (the identity rotation) leaves the output the base's, training moves only
``oft_R``, disable / merge / unmerge / remove, the native format, and the doors (enable, the launcher;
PetCallback and inspect in test_more_methods.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, ROOT, SMALL, assert_params_equal, snapshot, assert_close
from tests.nets import LAYERS, three_layers, three_layers_numpy, weight_out_in, set_values, three_layers_job
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
# name -> PEFT's OFTConfig fields (ours: the same fields)
VARIANTS = {
    "neumann": {"r": 2, "oft_block_size": 0},
    "exact": {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False},
    "coft": {"r": 2, "oft_block_size": 0, "coft": True, "eps": 1.2},
    "share": {"oft_block_size": 2, "block_share": True, "num_cayley_neumann_terms": 3},
}
MF = pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers")
# every variant on Dense; MindFormers' Linear in its [in, out] layout (transpose_b false: the weight
# transposed for merging; with transpose_b it is Dense's layout) with the variant that does the most
CASES = [pytest.param("dense", v, id=f"dense-{v}") for v in VARIANTS] + [
    pytest.param("linear_in_out", "coft", id="mf_linear_in_out-coft", marks=MF)]


def config(variant: str, **changes) -> dict:
    return {"pet_type": "oft", "target_modules": list(LAYERS), **VARIANTS[variant], **changes}


def _job() -> dict:
    return three_layers_job(5)


def _rotations(variant: str) -> dict:
    """Random ``oft_R`` (init_weights false, PEFT's std 0.1, times 3 so the rotation shows): name -> array."""
    net = pet_hooks.apply(three_layers(_job()), config(variant, init_weights=False, seed=7))
    return {p.name: p.asnumpy() * 3.0 for p in pet_hooks.delta_parameters(net)}


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for every variant, with our PEFT-format adapters read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("oft")
    job = _job()
    rotations = {variant: _rotations(variant) for variant in VARIANTS}
    for variant, values in rotations.items():
        job.update({f"{variant}/{name}": value for name, value in values.items()})
        net = pet_hooks.apply(three_layers(_job()), config(variant))
        set_values(pet_hooks.delta_parameters(net), values)
        pet_hooks.save_adapter(net, work / f"{variant}_ours", format="peft", task_type=None)
    np.savez(work / "job.npz", **job)
    (work / "variants.json").write_text(json.dumps(VARIANTS))
    out = run_reference([os.path.join(HERE, "oft_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, rotations, dict(np.load(work / "torch.npz"))


@NEEDS_PEFT
@pytest.mark.parametrize("kind, variant", CASES)
def test_outputs_gradients_and_merge_equal_peft(mode, kind, variant, peft_run):
    _, job, rotations, theirs = peft_run
    net = pet_hooks.apply(three_layers(job, kind), config(variant))
    set_values(pet_hooks.delta_parameters(net), rotations[variant])
    x, g = Tensor(job["x"]), Tensor(job["g"])
    params = pet_hooks.delta_parameters(net)
    assert [p.name for p in params] == [f"{layer}.oft_R" for layer in LAYERS]

    def loss(x, g):
        return (net(x) * g).sum()

    value, grads = ms.value_and_grad(loss, None, params)(x, g)
    for param, grad in zip(params, grads):
        assert_close(grad.asnumpy(), theirs[f"{variant}/grad/{param.name}"], err_msg=param.name)
        assert_close(param.asnumpy(), theirs[f"{variant}/after/{param.name}"], err_msg=param.name)
    if variant == "coft":          # the radius projects some blocks and leaves others
        moved = np.concatenate([np.any(p.asnumpy() != rotations[variant][p.name], axis=1) for p in params])
        assert moved.any() and not moved.all(), moved
    out = net(x).asnumpy()
    base = three_layers_numpy(job, job["x"])
    assert np.abs(out - base).max() > 0.05                       # the rotation shows
    assert_close(out, theirs[f"{variant}/out"])
    assert_close(float(value.asnumpy()), float((theirs[f"{variant}/out"] * job["g"]).sum()))

    pet_hooks.merge(net)
    for layer in LAYERS:
        # ours in float64, PEFT's in float32: apart by float32 rounding of W R^T at the weights' scale
        assert_close(weight_out_in(getattr(net, layer)), theirs[f"{variant}/merged/{layer}.weight"], err_msg=layer)
    assert_close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        # W' was rounded to float32 and the inverse of R^T (not orthogonal under Neumann) amplifies it
        assert_close(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], err_msg=layer)
    assert_close(net(x).asnumpy(), out)


@NEEDS_PEFT
@pytest.mark.parametrize("variant, run_mode", [("neumann", 1), ("exact", 0), ("coft", 0), ("share", 1)],
                         ids=["pynative-neumann", "graph-exact", "graph-coft", "pynative-share"])
def test_peft_reads_our_adapter_we_read_peft_s_and_its_init(variant, run_mode, peft_run):
    """Reading files does not depend on the mode: each variant runs in one of them, both modes covered."""
    before = ms.get_context("mode")
    ms.set_context(mode=run_mode)
    try:
        _reads(variant, peft_run)
    finally:
        ms.set_context(mode=before)


def _reads(variant, peft_run):
    work, job, rotations, theirs = peft_run
    x = Tensor(job["x"])
    assert_close(theirs[f"{variant}/ours"], theirs[f"{variant}/out"])    # PEFT's output from our files
    doc = json.loads((work / f"{variant}_ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "OFT" and sorted(doc["target_modules"]) == sorted(LAYERS)
    assert {k: doc[k] for k in VARIANTS[variant]} == VARIANTS[variant]
    from safetensors.numpy import load_file
    keys = sorted(load_file(str(work / f"{variant}_theirs" / "adapter_model.safetensors")))
    assert keys == sorted(f"base_model.model.{layer}.oft_R.weight" for layer in LAYERS)    # PEFT's own names

    fresh = pet_hooks.load_adapter(three_layers(job), work / f"{variant}_theirs")   # PEFT's own files
    cfg = get_state(fresh).config
    assert cfg.pet_type == "oft" and {k: getattr(cfg, k) for k in VARIANTS[variant]} == VARIANTS[variant]
    assert_close(fresh(x).asnumpy(), theirs[f"{variant}/out"])

    # PEFT's init: oft_R zero, the identity rotation, the base output (exactly here)
    base = three_layers(job)(x).asnumpy()
    net = pet_hooks.apply(three_layers(job), config(variant))
    assert not any(np.abs(p.asnumpy()).max() for p in pet_hooks.delta_parameters(net))
    np.testing.assert_array_equal(net(x).asnumpy(), base)
    assert_close(theirs[f"{variant}/init"], base)


@pytest.mark.parametrize("variant", ["coft"])      # Neumann (in COFT too) and exact: the PEFT comparison
def test_the_contract_training_disable_native_format_remove(mode, variant, tmp_path):
    job = _job()
    net = three_layers(job)
    net.k.bias.requires_grad = False                    # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = Tensor(job["x"])
    base = net(x).asnumpy()                              # compiled before apply, on purpose
    pet_hooks.apply(net, config(variant, eps=0.05))      # COFT: a radius training reaches
    assert sorted(p.name for p in net.trainable_params()) == sorted(p.name for p in pet_hooks.delta_parameters(net))

    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 0.05))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)                    # every base parameter bit for bit
    assert all(np.abs(p.asnumpy()).max() > 0 for p in pet_hooks.delta_parameters(net))
    net.set_train(False)
    adapted = net(x).asnumpy()
    if variant == "coft":      # the forward projected every block (the last step moved them out) to eps / sqrt(rows)
        for p in pet_hooks.delta_parameters(net):
            np.testing.assert_allclose(np.sqrt(2 * (p.asnumpy() ** 2).sum(1)), 0.05 / np.sqrt(2), rtol=1e-5)
    assert not np.allclose(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    pet_hooks.save_adapter(net, tmp_path / "native")    # pet_hooks' own format
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "native")
    assert get_state(fresh).config == get_state(net).config
    np.testing.assert_array_equal(fresh(x).asnumpy(), adapted)

    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert not [name for name in net.parameters_dict() if ".oft_" in name]
    from pet_hooks.tuners.oft import _ADDED_ATTRS
    assert not [(layer, attr) for layer in LAYERS for attr in _ADDED_ATTRS if hasattr(getattr(net, layer), attr)]
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def test_merged_checkpoint_is_the_adapted_net_without_pet_hooks(tmp_path):
    from tests.nets import ThreeLayers
    job = _job()
    net = pet_hooks.apply(three_layers(job), config("exact", init_weights=False, seed=2))
    x = Tensor(job["x"])
    adapted = net(x).asnumpy()
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    for name, value in before.items():                            # computed aside: the net is unchanged
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), value, err_msg=name)
    plain = ThreeLayers()
    ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")), strict_load=True)
    np.testing.assert_allclose(plain(x).asnumpy(), adapted, rtol=1e-5, atol=1e-5)
    assert np.abs(plain(x).asnumpy() - three_layers_numpy(job, job["x"])).max() > 1e-2


# ----------------------------------------------------------------------------- doors
# PetCallback, inspect and the shared-graph training: tests/tuners/test_more_methods.py (METHODS)
GPT_CFG = {"pet_type": "oft", "oft_block_size": 4, "target_modules": ".*dense1|.*dense3"}


def test_enable():
    """The enable door, in graph mode (OFT in both modes: the tests above)."""
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        _enable()
    finally:
        ms.set_context(mode=before)


def _enable():
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    with pet_hooks.enable(GPT_CFG):
        net = build(seed=0, **SMALL)
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
    deltas = pet_hooks.delta_parameters(net)
    base = {name: value for name, value in snapshot(net).items() if name not in {p.name for p in deltas}}
    assert get_state(net).config.pet_type == "oft" and deltas
    assert {p.name for p in optimizer.parameters} == {p.name for p in deltas}
    batches = lm_batches(8, 4, seed=2)
    for _ in range(3):
        step(*map(Tensor, next(batches)))
    assert_params_equal(base, net)
    assert [p.name for p in deltas if not np.abs(p.asnumpy()).max()] == []       # every one moved from zero


def test_launcher(tmp_path):
    import yaml
    from samples.tiny_gpt import build
    path = tmp_path / "pet.yaml"
    path.write_text(yaml.safe_dump(GPT_CFG))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(path), "--save-dir",
                          str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"), "--steps", "2",
                          "--mode", "0"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    net = pet_hooks.load_adapter(build(seed=0), tmp_path / "adapter")     # the script's own geometry
    state = get_state(net)
    assert state.config.pet_type == "oft" and state.config.oft_block_size == 4
    assert sorted({i.path.rsplit(".", 1)[-1] for i in state.injections}) == ["dense1", "dense3"]
    assert all(np.abs(p.asnumpy()).max() for p in pet_hooks.delta_parameters(net))    # trained: moved from zero
