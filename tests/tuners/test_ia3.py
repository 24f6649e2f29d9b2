"""IA3 against Hugging Face PEFT's own implementation and against NumPy, in graph and PyNative mode.

The same three-layer net (``k``, ``v``, ``down``; ``down`` feed-forward) in PyTorch with PEFT's
``IA3Config`` and in MindSpore with pet_hooks, on nn.Dense and on MindFormers' Linear with both
weight layouts: the outputs, the gradient of every ``ia3_l`` and the merged weights must be
PEFT's; PEFT must read pet_hooks' PEFT-format adapter and pet_hooks PEFT's. The same outputs, gradients
and merged weights against IA3 written out in NumPy from its definition (tests/numpy_references.py), which
needs no PyTorch, and that NumPy reference against PEFT. Then the contract: output unchanged at init, only
the vectors train, disable_adapters, remove.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, assert_params_equal, snapshot, assert_close
from tests.nets import LAYERS, ThreeLayers, three_layers, weight_out_in, three_layers_job
from tests.numpy_references import Ia3Layer, three_layers as numpy_three_layers
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
CFG = {"pet_type": "ia3", "target_modules": ["k", "v", "down"], "feedforward_modules": ["down"]}
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")


KINDS = [pytest.param("dense", id="dense"),
         pytest.param("linear", id="mf_linear", marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers")),
         pytest.param("linear_in_out", id="mf_linear_in_out",
                      marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers"))]


def _job() -> dict:
    """Weights ([out, in], torch's layout), input, upstream gradient and non-trivial IA3 vectors."""
    def vector(rng, layer, din, dout):
        shape = (1, din) if layer == "down" else (dout, 1)       # PEFT's shapes
        return {f"ia3.{layer}": rng.uniform(0.3, 1.7, shape).astype(np.float32)}
    return three_layers_job(5, per_layer=vector)


def _set_vectors(net, job) -> None:
    for layer in LAYERS:
        getattr(net, layer).ia3_l.set_data(Tensor(job[f"ia3.{layer}"]))


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for _job(), with pet_hooks' PEFT-format adapter of it read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("ia3")
    job = _job()
    np.savez(work / "job.npz", **job)
    net = pet_hooks.apply(three_layers(job), CFG)
    _set_vectors(net, job)
    pet_hooks.save_adapter(net, work / "ours", format="peft", task_type=None)
    out = run_reference([os.path.join(HERE, "ia3_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, dict(np.load(work / "torch.npz"))


@NEEDS_PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_gradients_and_merge_equal_peft(mode, kind, peft_run):
    _, job, torch_out = peft_run
    net = pet_hooks.apply(three_layers(job, kind), CFG)
    _set_vectors(net, job)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    vectors = pet_hooks.delta_parameters(net)
    assert [p.name for p in vectors] == [f"{layer}.ia3_l" for layer in LAYERS]

    def loss(x, g):
        return (net(x) * g).sum()

    value, grads = ms.value_and_grad(loss, None, vectors)(x, g)
    out = net(x).asnumpy()
    assert_close(out, torch_out["out"])
    assert_close(float(value.asnumpy()), float((torch_out["out"] * job["g"]).sum()))
    for layer, grad in zip(LAYERS, grads):
        assert_close(grad.asnumpy(), torch_out[f"grad.{layer}"], err_msg=layer)

    pet_hooks.merge(net)
    for layer in LAYERS:
        cell = getattr(net, layer)
        np.testing.assert_allclose(weight_out_in(cell), torch_out[f"merged.{layer}.weight"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cell.bias.asnumpy(), torch_out[f"merged.{layer}.bias"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(net(x).asnumpy(), out, rtol=1e-5, atol=1e-5)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net(x).asnumpy(), out, rtol=1e-5, atol=1e-5)


@NEEDS_PEFT
def test_peft_reads_our_adapter_and_we_read_peft_s(mode, peft_run):
    work, job, torch_out = peft_run
    ours = three_layers(job)
    pet_hooks.apply(ours, CFG)
    _set_vectors(ours, job)
    assert_close(ours(Tensor(job["x"])).asnumpy(), torch_out["ours"])

    import json
    doc = json.loads((work / "ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "IA3" and doc["feedforward_modules"] == ["down"]
    assert sorted(doc["target_modules"]) == ["down", "k", "v"]

    fresh = pet_hooks.load_adapter(three_layers(job), work / "theirs")       # PEFT's own files, config from them
    cfg = get_state(fresh).config
    assert cfg.pet_type == "ia3" and cfg.feedforward_modules == ["down"]
    assert_close(fresh(Tensor(job["x"])).asnumpy(), torch_out["out"])


def _numpy_ia3(job, vectors=None):
    """The job's net with IA3 in NumPy: {layer: Ia3Layer} (``vectors`` layer -> l, default the job's)."""
    return {layer: Ia3Layer(job[f"{layer}.weight"], job[f"{layer}.bias"],
                            job[f"ia3.{layer}"] if vectors is None else vectors[layer], feedforward=layer == "down")
            for layer in LAYERS}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_gradients_and_merge_equal_numpy(mode, kind):
    """Without PyTorch: IA3 by its definition (tests/numpy_references.py), outputs, gradients of every ia3_l,
    merged weights and biases, and unmerge back to the originals."""
    job = _job()
    net = pet_hooks.apply(three_layers(job, kind), CFG)
    _set_vectors(net, job)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    vectors = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    value, grads = ms.value_and_grad(loss, None, vectors)(x, g)
    reference = _numpy_ia3(job)
    expected, expected_grads = numpy_three_layers(reference, job["x"], job["g"])
    base, _ = numpy_three_layers(_numpy_ia3(job, {layer: np.ones(job[f"ia3.{layer}"].shape) for layer in LAYERS}),
                                 job["x"], job["g"])
    assert np.abs(expected - base).max() > 20 * 1e-5 * max(1.0, np.abs(expected).max())    # the vectors show
    out = net(x).asnumpy()
    assert_close(out, expected)
    assert_close(float(value.asnumpy()), float((expected * job["g"]).sum()))
    for layer, param, grad in zip(LAYERS, vectors, grads):
        assert param.name == f"{layer}.ia3_l"
        assert_close(grad.asnumpy(), expected_grads[layer]["ia3_l"], err_msg=layer)

    pet_hooks.merge(net)
    for layer in LAYERS:
        cell = getattr(net, layer)
        weight, bias = reference[layer].merged()
        np.testing.assert_allclose(weight_out_in(cell), weight, rtol=1e-6, atol=1e-6, err_msg=layer)
        np.testing.assert_allclose(cell.bias.asnumpy(), bias, rtol=1e-6, atol=1e-6, err_msg=layer)
    assert_close(net(x).asnumpy(), expected)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], rtol=1e-5, atol=1e-6)
    assert_close(net(x).asnumpy(), expected)


@NEEDS_PEFT
def test_the_numpy_reference_is_peft_s(peft_run):
    """The NumPy IA3 above gives PEFT's output, gradients and merged weights (so either reference checks the same)."""
    _, job, theirs = peft_run
    reference = _numpy_ia3(job)
    out, grads = numpy_three_layers(reference, job["x"], job["g"])
    assert_close(out, theirs["out"])
    for layer in LAYERS:
        assert_close(grads[layer]["ia3_l"], theirs[f"grad.{layer}"], err_msg=layer)
        weight, bias = reference[layer].merged()
        np.testing.assert_allclose(weight, theirs[f"merged.{layer}.weight"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bias, theirs[f"merged.{layer}.bias"], rtol=1e-6, atol=1e-6)


def test_the_contract_init_training_disable_remove(mode):
    job = _job()
    net = three_layers(job)
    net.k.bias.requires_grad = False                    # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = Tensor(job["x"])
    base = net(x).asnumpy()                              # compiled before apply, on purpose
    pet_hooks.apply(net, CFG)
    np.testing.assert_array_equal(net(x).asnumpy(), base)       # vectors start at 1
    assert sorted(p.name for p in net.trainable_params()) == sorted(f"{layer}.ia3_l" for layer in LAYERS)
    assert net.k.ia3_l.shape == (10, 1) and net.down.ia3_l.shape == (1, 8)

    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), 0.5))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)                    # every base parameter bit for bit
    assert all(not np.allclose(getattr(net, layer).ia3_l.asnumpy(), 1.0) for layer in LAYERS)
    adapted = net(x).asnumpy()
    assert not np.allclose(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert not any(hasattr(getattr(net, layer), "ia3_l") for layer in LAYERS)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def test_init_ia3_weights_false_draws_seeded_normal_vectors():
    first = pet_hooks.apply(three_layers(_job()), {**CFG, "init_ia3_weights": False, "seed": 3})
    again = pet_hooks.apply(three_layers(_job()), {**CFG, "init_ia3_weights": False, "seed": 3})
    values = first.v.ia3_l.asnumpy()
    assert not np.allclose(values, 1.0) and abs(values.std() - 1.0) < 0.6
    np.testing.assert_array_equal(values, again.v.ia3_l.asnumpy())


def test_an_activated_layer_is_scaled_only_on_its_input():
    net = nn.SequentialCell([nn.Dense(4, 6, activation="relu"), nn.Dense(6, 2)])
    with pytest.raises(pet_hooks.UnsupportedCellError, match="'0'.*activation ReLU.*feedforward_modules"):
        pet_hooks.apply(net, {"pet_type": "ia3", "target_modules": ["0", "1"]})
    assert not pet_hooks.surgery.has_pet(net)
    pet_hooks.apply(net, {"pet_type": "ia3", "target_modules": ["0", "1"], "feedforward_modules": ["0"]})
    assert net[0].ia3_l.shape == (1, 4)


@NEEDS_PEFT
@pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
def test_llama_ia3_in_hugging_face_names_gives_pytorch_s_logits(tmp_path):
    """MindFormers' Llama with IA3 on wk / wv / w2 (w2 feed-forward), saved with the llama name map: PEFT
    on transformers' Llama with the same weights reads it (k_proj, v_proj, down_proj) and gives our logits."""
    import json
    from tests.io.test_peft_format import hf_name, llama_ids, llama_logits, llama_with_weights
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        net = llama_with_weights()
        ids = llama_ids(2)
        job = {k: getattr(net.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                   "num_heads", "rms_norm_eps", "theta", "seq_length")}
        (tmp_path / "job.json").write_text(json.dumps(job))
        np.savez(tmp_path / "base.npz", **{hf_name(p.name): p.asnumpy() for p in net.get_parameters()})
        np.save(tmp_path / "ids.npy", ids)
        base = llama_logits(net, ids)
        pet_hooks.apply(net, {"pet_type": "ia3", "target_modules": ".*wk|.*wv|.*w2", "feedforward_modules": ".*w2"})
        rng = np.random.default_rng(4)
        for param in pet_hooks.delta_parameters(net):
            param.set_data(Tensor((1.0 + 0.5 * rng.standard_normal(param.shape)).astype(np.float32)))
        ours = llama_logits(net, ids)
        pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
        doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert doc["target_modules"] == ["down_proj", "k_proj", "v_proj"] and doc["feedforward_modules"] == ["down_proj"]
        out = run_reference([os.path.join(HERE, "peft_reference.py"), str(tmp_path)], timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert np.abs(ours - base).max() > 1e-2
        np.testing.assert_allclose(ours, np.load(tmp_path / "torch_ours.npy"), rtol=1e-4, atol=1e-5)
        print(f"max |logits MindSpore - PyTorch| with IA3: {np.abs(ours - np.load(tmp_path / 'torch_ours.npy')).max():.2e}")

        fresh = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "ours")    # the llama map is found
        assert all(p.endswith(".w2") for p in get_state(fresh).config.feedforward_modules)
        np.testing.assert_allclose(llama_logits(fresh, ids), ours, rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=before)


def test_merged_checkpoint_is_the_adapted_net_without_pet_hooks(tmp_path):
    job = _job()
    net = pet_hooks.apply(three_layers(job), CFG)
    _set_vectors(net, job)
    x = Tensor(job["x"])
    adapted = net(x).asnumpy()
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    for name, value in before.items():                            # computed aside: the net is unchanged
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), value, err_msg=name)
    plain = ThreeLayers()
    ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")), strict_load=True)
    np.testing.assert_allclose(plain(x).asnumpy(), adapted, rtol=1e-5, atol=1e-5)
    assert not np.allclose(plain.k.bias.asnumpy(), job["k.bias"])         # output scaling takes the bias along
    np.testing.assert_array_equal(plain.down.bias.asnumpy(), job["down.bias"])   # input scaling leaves it
