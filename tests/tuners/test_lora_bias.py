"""LoRA's ``lora_bias`` (a trainable bias on B) and ``bias`` (which base biases train) against PEFT 0.21.2.

tests/peft_reference_bias.py runs PEFT in its own process on a three-layer net (fc1 with relu, fc2,
fc3; LoRA r=2 on fc1 and fc2) with the same base weights, A, B and lora biases, for the four cases
of its ``CASES`` (``lora_bias`` with ``bias`` none / all, ``bias`` lora_only / all without it):

- the output, and the gradient of ``sum(out * g)`` of every parameter that trains, which must be the
  parameters PEFT trains (``fc1.lora_B_bias`` is PEFT's ``fc1.lora_B.bias``, ``fc1.bias`` its
  ``fc1.base_layer.bias``), in graph and PyNative mode;
- merging: the base weights and biases PEFT's ``merge_adapter`` writes, the merged output; unmerge and
  remove give the base back;
- PEFT's format both ways: pet_hooks' adapter (base biases moved as if trained) read by
  ``PeftModel.from_pretrained``, and PEFT's ``save_pretrained`` read by pet_hooks, give the same output;
  the native format round trip too.

The rest needs no torch: which kinds refuse ``lora_bias`` (an embedding, as PEFT), DoRA, a layer without
a base bias (the forward works, merging is refused, as in PEFT), several adapters, inspect.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.errors import PetConfigError, PetStateError, UnsupportedCellError
from pet_hooks.surgery.core import get_state, saved_parameters
from tests.conftest import NEEDS_TORCH_PEFT, ROOT
from tests.torch_runner import run_reference

CASES = {"lb": (True, "none"), "lb_all": (True, "all"), "lora_only": (False, "lora_only"), "all": (False, "all")}
SIZES = {"fc1": (6, 10), "fc2": (10, 4), "fc3": (4, 3)}
ADAPTED = ("fc1", "fc2")
SIZES_NAMES = [f"{cell}.{leaf}" for cell in SIZES for leaf in ("weight", "bias")]
BIAS_STEP = 0.25  # tests/peft_reference_bias.py moves the trained base biases by this before saving
TOL = dict(rtol=1e-5, atol=1e-5)


class Net3(nn.Cell):
    # relu, not tanh: MindSpore's CPU tanh is off by up to 1e-4 for large inputs, which is not what is tested
    def __init__(self, has_bias: bool = True):
        super().__init__()
        self.fc1 = nn.Dense(6, 10, activation="relu", has_bias=has_bias)
        self.fc2 = nn.Dense(10, 4, has_bias=has_bias)
        self.fc3 = nn.Dense(4, 3, has_bias=has_bias)

    def construct(self, x):
        return self.fc3(self.fc2(self.fc1(x)))


def _cfg(case: str) -> dict:
    lora_bias, bias = CASES[case]
    return {"pet_type": "lora", "target_modules": "fc1|fc2", "lora_rank": 2, "lora_alpha": 4,
            "lora_bias": lora_bias, "bias": bias}


@pytest.fixture(scope="module")
def job() -> dict:
    rng = np.random.default_rng(29)
    values = {}
    for name, (fan_in, fan_out) in SIZES.items():
        values[f"{name}.weight"] = (0.4 * rng.standard_normal((fan_out, fan_in))).astype(np.float32)
        values[f"{name}.bias"] = (0.4 * rng.standard_normal(fan_out)).astype(np.float32)
    for name in ADAPTED:
        fan_in, fan_out = SIZES[name]
        values[f"{name}.lora_A"] = (0.5 * rng.standard_normal((2, fan_in))).astype(np.float32)
        values[f"{name}.lora_B"] = (0.5 * rng.standard_normal((fan_out, 2))).astype(np.float32)
        values[f"{name}.lora_B_bias"] = (0.5 * rng.standard_normal(fan_out)).astype(np.float32)
    values["x"] = rng.standard_normal((2, 3, 6)).astype(np.float32)
    values["g"] = rng.standard_normal((2, 3, 3)).astype(np.float32)
    return values


def _net(job: dict, case: str) -> nn.Cell:
    """The base net with the job's weights, LoRA applied with the job's values."""
    net = Net3()
    net.set_train(False)
    for param in net.get_parameters():
        param.set_data(Tensor(job[param.name]))
    pet_hooks.apply(net, _cfg(case))
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(job[param.name]))
    return net


def _step_biases(net: nn.Cell) -> None:
    """Move the base biases the adapter trains, as training would (and as the reference does)."""
    for param in net.trainable_params():
        if param.name.endswith(".bias"):
            param.set_data(Tensor(param.asnumpy() + np.float32(BIAS_STEP)))


@pytest.fixture(scope="module")
def peft_run(job, tmp_path_factory):
    """Write our PEFT-format adapters, run the reference; (its arrays, its trainable names, the work dir)."""
    work = tmp_path_factory.mktemp("lora_bias")
    np.savez(work / "job.npz", **job)
    for case in CASES:
        net = _net(job, case)
        _step_biases(net)
        pet_hooks.save_adapter(net, str(work / f"ours_{case}"), format="peft")
    done = run_reference([os.path.join(ROOT, "tests", "peft_reference_bias.py"), str(work)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(work / "torch.npz") as npz:
        theirs = {key: npz[key] for key in npz.files}
    with open(work / "trainable.json", encoding="utf-8") as handle:
        trainable = json.load(handle)
    return theirs, trainable, work


@NEEDS_TORCH_PEFT
@pytest.mark.parametrize("case", list(CASES))
def test_output_gradients_merge_as_peft(job, peft_run, mode, case):
    theirs, trainable, _ = peft_run
    net = _net(job, case)
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters() if p.name in SIZES_NAMES}
    x, g = Tensor(job["x"]), Tensor(job["g"])
    params = net.trainable_params()
    assert sorted(p.name for p in params) == trainable[case]
    lora_bias, bias = CASES[case]
    assert any(p.name.endswith("lora_B_bias") for p in params) == lora_bias
    assert ("fc3.bias" in trainable[case]) == (bias == "all")

    def loss(inputs, grad_out):
        return (net(inputs) * grad_out).sum()

    value, grads = ms.value_and_grad(loss, None, params)(x, g)
    np.testing.assert_allclose(net(x).asnumpy(), theirs[f"{case}.out"], **TOL)
    for param, grad in zip(params, grads):
        np.testing.assert_allclose(grad.asnumpy(), theirs[f"{case}.grad.{param.name}"], **TOL, err_msg=param.name)
    # the lora bias moves the output (it is not zero, and scaling 2 multiplies it)
    if lora_bias:
        assert np.abs(theirs[f"{case}.grad.fc2.lora_B_bias"]).max() > 0

    pet_hooks.merge(net)
    now = {p.name: p for p in net.get_parameters()}
    for cell in ADAPTED:
        for leaf in ("weight", "bias"):
            np.testing.assert_allclose(now[f"{cell}.{leaf}"].asnumpy(), theirs[f"{case}.merged.{cell}.{leaf}"], **TOL,
                                       err_msg=f"{cell}.{leaf}")
    # the base bias changes on merge exactly when lora_bias is on
    assert (not np.array_equal(now["fc1.bias"].asnumpy(), base["fc1.bias"])) == lora_bias
    np.testing.assert_allclose(net(x).asnumpy(), theirs[f"{case}.merged.out"], **TOL)
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(net(x).asnumpy(), theirs[f"{case}.out"], **TOL)
    pet_hooks.remove(net)
    for param in net.get_parameters():         # merge/unmerge: float tolerance, as for the weights
        np.testing.assert_allclose(param.asnumpy(), base[param.name], rtol=0, atol=1e-6, err_msg=param.name)
    assert sorted(p.name for p in net.get_parameters()) == sorted(base)


@NEEDS_TORCH_PEFT
@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_both_ways(job, peft_run, mode, case):
    """Ours read by PEFT, PEFT's read by us: the same output, with the trained base biases moved."""
    theirs, _, work = peft_run
    net = _net(job, case)
    _step_biases(net)
    mine = net(Tensor(job["x"])).asnumpy()
    np.testing.assert_allclose(theirs[f"{case}.ours.out"], mine, **TOL)
    np.testing.assert_allclose(theirs[f"{case}.theirs.out"], mine, **TOL)
    if CASES[case][1] != "none":            # the moved biases make a difference the files must carry
        assert np.abs(mine - theirs[f"{case}.out"]).max() > 1e-2
    fresh = Net3()
    fresh.set_train(False)
    for param in fresh.get_parameters():
        param.set_data(Tensor(job[param.name]))
    pet_hooks.load_adapter(fresh, str(work / f"theirs_{case}"))
    assert get_state(fresh).config.lora_bias == CASES[case][0]
    assert get_state(fresh).config.bias == CASES[case][1]
    np.testing.assert_allclose(fresh(Tensor(job["x"])).asnumpy(), mine, **TOL)


@pytest.mark.parametrize("case", ["lb_all", "lora_only"])
def test_native_round_trip(job, mode, case, tmp_path):
    net = _net(job, case)
    _step_biases(net)
    mine = net(Tensor(job["x"])).asnumpy()
    pet_hooks.save_adapter(net, str(tmp_path / "native"))
    fresh = Net3()
    fresh.set_train(False)
    for param in fresh.get_parameters():
        param.set_data(Tensor(job[param.name]))
    pet_hooks.load_adapter(fresh, str(tmp_path / "native"))
    np.testing.assert_allclose(fresh(Tensor(job["x"])).asnumpy(), mine, rtol=0, atol=0)
    saved = {p.name for p in saved_parameters(fresh)}
    assert ("fc1.lora_B_bias" in saved) == CASES[case][0] and "fc1.bias" in saved


def test_init_and_off_switch(mode):
    """init_lora_weights true: the bias starts at zero (the output is the base's); false: nn.Linear's
    uniform(-1/sqrt(r), 1/sqrt(r)), as PEFT's lora_B layer; disabled, the bias is off with the branch."""
    net = Net3()
    net.set_train(False)
    x = Tensor(np.ones((2, 6), np.float32))
    base = net(x).asnumpy()
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": "fc1|fc2", "lora_rank": 4, "lora_bias": True})
    bias = dict((p.name, p) for p in net.get_parameters())["fc2.lora_B_bias"]
    assert bias.shape == (4,) and not bias.asnumpy().any() and bias.requires_grad
    np.testing.assert_array_equal(net(x).asnumpy(), base)
    bias.set_data(Tensor(np.ones(4, np.float32)))
    # the branch's output (bias included, as PEFT's lora_B) is scaled: fc2's output + alpha / r, through linear fc3
    shift = get_state(net).config.scaling * net.fc3.weight.asnumpy() @ np.ones(4, np.float32)
    assert np.abs(shift).max() > 20 * TOL["atol"]
    np.testing.assert_allclose(net(x).asnumpy() - base, np.broadcast_to(shift, base.shape), **TOL)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    pet_hooks.remove(net)
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": "fc1|fc2", "lora_rank": 4, "lora_bias": True,
                          "init_lora_weights": False, "seed": 3})
    values = dict((p.name, p) for p in net.get_parameters())["fc1.lora_B_bias"].asnumpy()
    assert values.shape == (10,) and np.abs(values).max() <= 0.5 and np.abs(values).min() > 0
    pet_hooks.remove(net)


def test_refusals():
    """As PEFT: no lora_bias on an embedding or with DoRA or a non-default init; merging needs a base bias;
    lora_bias and bias keep one adapter per net (add_adapter refuses them)."""
    class Emb(nn.Cell):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def construct(self, ids):
            return self.emb(ids)

    emb = Emb()
    with pytest.raises(UnsupportedCellError, match="lora_bias=True is not supported on"):
        pet_hooks.apply(emb, {"pet_type": "lora", "target_modules": "emb", "lora_bias": True})
    assert not hasattr(emb, "pet_hooks_state") and not any("lora" in p.name for p in emb.get_parameters())
    with pytest.raises(PetConfigError, match="lora_bias=True is not supported with DoRA"):
        pet_hooks.apply(Net3(), {"pet_type": "lora", "target_modules": "fc1", "lora_bias": True, "use_dora": True})
    with pytest.raises(PetConfigError, match="init_lora_weights true or false, got init_lora_weights='pissa'"):
        pet_hooks.apply(Net3(), {"pet_type": "lora", "target_modules": "fc1", "lora_bias": True,
                                 "init_lora_weights": "pissa"})
    with pytest.raises(PetConfigError, match=r"bias must be one of \['none', 'all', 'lora_only'\], got 'some'"):
        pet_hooks.apply(Net3(), {"pet_type": "lora", "target_modules": "fc1", "bias": "some"})
    bare = Net3(has_bias=False)
    bare.set_train(False)
    pet_hooks.apply(bare, {"pet_type": "lora", "target_modules": "fc1|fc2", "lora_bias": True})
    before = {p.name: p.asnumpy().copy() for p in bare.get_parameters()}
    with pytest.raises(PetStateError, match="cannot merge: cell 'fc1' has lora_bias but its base layer has no bias"):
        pet_hooks.merge(bare)
    assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in bare.get_parameters())
    with pytest.raises(PetConfigError, match="uses lora_bias=True, which keeps one adapter per net"):
        pet_hooks.add_adapter(bare, "b", {"pet_type": "lora", "target_modules": "fc1"})
    with pytest.raises(PetConfigError, match="adapter_per_row: adapter 'default' uses lora_bias=True"):
        with pet_hooks.adapter_per_row(bare, ["default", "__base__"]):
            pass
    net = Net3()
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": "fc1"})
    with pytest.raises(PetConfigError, match="the new adapter uses lora_bias=True"):
        pet_hooks.add_adapter(net, "b", {"pet_type": "lora", "target_modules": "fc1", "lora_bias": True})
    with pytest.raises(PetConfigError, match="add_adapter: bias 'all' would change which base parameters train"):
        pet_hooks.add_adapter(net, "b", {"pet_type": "lora", "target_modules": "fc1", "bias": "all"})
    assert pet_hooks.list_adapters(net) == ["default"]


def test_callback_trains_the_biases_and_saves_them(mode, tmp_path):
    """A front door (PetCallback; apply / enable / the launcher share doors/flow.py): with lora_bias and
    bias='lora_only' the rebuilt optimizer trains the lora biases and the adapted cells' base biases, every
    other base parameter stays bit for bit, and the adapter saved at the end carries the biases."""
    import mindspore.dataset as ds
    from mindspore.train import Model
    from pet_hooks import PetCallback
    from samples.data import lm_batches
    from samples.tiny_gpt import LMLoss, build
    from tests.conftest import GPT_LORA, SMALL

    net = build(seed=0, **SMALL)
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    data = ds.GeneratorDataset([next(batches) for _ in range(2)], ["ids", "labels"], shuffle=False)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    callback = PetCallback({**GPT_LORA, "lora_bias": True, "bias": "lora_only"}, save_dir=str(tmp_path / "adapter"))
    model.train(1, data, callbacks=[callback])

    state = get_state(net)
    adapted_biases = {f"{i.path}.bias" for i in state.injections}
    assert adapted_biases and adapted_biases <= set(base)
    trained = {p.name for p in model.train_network.optimizer.parameters}
    lora_biases = {f"{i.path}.lora_B_bias" for i in state.injections}
    assert lora_biases | adapted_biases <= trained
    for param in net.get_parameters():
        if param.name in adapted_biases:
            assert not np.array_equal(param.asnumpy(), base[param.name]), param.name
        elif param.name in base:
            assert np.array_equal(param.asnumpy(), base[param.name]), param.name
        elif param.name in lora_biases:
            assert np.abs(param.asnumpy()).max() > 0, param.name
    fresh = build(seed=0, **SMALL)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")
    ids = Tensor(next(lm_batches(8, 2, seed=5))[0])
    np.testing.assert_allclose(fresh(ids).asnumpy(), net(ids).asnumpy(), atol=1e-5)


def test_inspect_shows_the_biases():
    """pet-hooks inspect: the lora bias among each cell's deltas, the base biases bias='lora_only' trains listed."""
    from pet_hooks.cli.inspection import format_report, inspect_net

    net = Net3()
    report = inspect_net(net, {**_cfg("lb"), "bias": "lora_only"})
    rows = {cell["path"]: cell["deltas"] for cell in report["matched"]}
    assert {"name": "lora_B_bias", "shape": [10]} in rows["fc1"]
    assert {"name": "lora_B_bias", "shape": [4]} in rows["fc2"]
    assert [d["name"] for d in report["kept"]] == ["fc1.bias", "fc2.bias"]
    text = format_report(report)
    assert "lora_B_bias [10]" in text and "base parameters that train and are saved with the adapter (2)" in text
    assert get_state(net) is None and not any("lora" in p.name for p in net.get_parameters())


@pytest.mark.parametrize("transpose_b", [True, False])
def test_mindformers_linear_against_numpy(mode, transpose_b):
    """MindFormers' legacy Linear (weight [out, in] or [in, out]): y = x W + b + s (x A^T B^T + c), merged alike."""
    pytest.importorskip("mindformers")
    from tests.nets import TwoLinear

    net = TwoLinear(transpose_b=transpose_b, compute_dtype=ms.float32)
    net.set_train(False)
    rng = np.random.default_rng(6)
    for param in net.get_parameters():
        param.set_data(Tensor((0.3 * rng.standard_normal(param.shape)).astype(np.float32)))
    base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": "linear1|linear2", "lora_rank": 2, "lora_alpha": 2,
                          "lora_bias": True})
    values = {}
    for param in pet_hooks.delta_parameters(net):
        values[param.name] = (0.5 * rng.standard_normal(param.shape)).astype(np.float32)
        param.set_data(Tensor(values[param.name]))
    x = rng.standard_normal((3, 6)).astype(np.float32)
    h = x
    for cell in ("linear1", "linear2"):
        weight = base[f"{cell}.weight"]
        w_in_out = weight.T if transpose_b else weight
        h = (h @ w_in_out + base[f"{cell}.bias"]
             + (h @ values[f"{cell}.lora_A"].T) @ values[f"{cell}.lora_B"].T + values[f"{cell}.lora_B_bias"])
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), h, rtol=1e-5, atol=1e-5)
    pet_hooks.merge(net)
    merged = {p.name: p.asnumpy() for p in net.get_parameters()}
    np.testing.assert_allclose(merged["linear1.bias"], base["linear1.bias"] + values["linear1.lora_B_bias"], atol=1e-6)
    np.testing.assert_allclose(net(Tensor(x)).asnumpy(), h, rtol=1e-5, atol=1e-5)
    pet_hooks.remove(net)


def test_save_merged_checkpoint_folds_the_bias(job, tmp_path):
    """The merged checkpoint holds scaling * lora_B_bias in the base biases: a plain net loading it computes
    what the adapted net computes."""
    net = _net(job, "lb")
    x = Tensor(job["x"])
    adapted = net(x).asnumpy()
    path = pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    plain = Net3()
    plain.set_train(False)
    ms.load_param_into_net(plain, ms.load_checkpoint(path))
    np.testing.assert_allclose(plain(x).asnumpy(), adapted, **TOL)
    assert np.abs(plain.fc1.bias.asnumpy() - job["fc1.bias"]).max() > 0.1


def test_enable_gives_the_optimizer_the_biases(mode):
    """pet_hooks.enable: an optimizer built in the block over all parameters gets the deltas, the lora biases and
    the base biases bias='lora_only' trains; training moves those and leaves every other base parameter."""
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    from tests.conftest import GPT_LORA, SMALL

    with pet_hooks.enable({**GPT_LORA, "lora_bias": True, "bias": "lora_only"}):
        net = build(seed=0, **SMALL)
        base = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
        batches = lm_batches(8, 4, seed=2)
        for _ in range(2):
            step(*map(Tensor, next(batches)))
    state = get_state(net)
    adapted_biases = {f"{i.path}.bias" for i in state.injections}
    expected = {p.name for p in pet_hooks.delta_parameters(net)} | adapted_biases
    assert {f"{i.path}.lora_B_bias" for i in state.injections} <= expected
    assert {p.name for p in optimizer.parameters} == expected
    for param in net.get_parameters():
        if param.name in base:
            assert np.array_equal(param.asnumpy(), base[param.name]) == (param.name not in adapted_biases), param.name
