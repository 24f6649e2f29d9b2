"""VeRA against Hugging Face PEFT's own implementation, in graph and PyNative mode.

The three-layer net of test_ia3.py (``k`` 6 -> 10, ``v`` 10 -> 8, ``down`` 8 -> 4) in PyTorch with PEFT's
``VeraConfig`` and in MindSpore with pet_hooks, on nn.Dense and on MindFormers' Linear with both weight layouts.
pet_hooks' projections and random lambdas are copied to PEFT, which must have made the same shapes (one pair
sized by the largest layer, sliced per layer); the outputs, the gradients of every lambda and the merged weights
must be PEFT's; PEFT must read our PEFT-format adapter and we PEFT's (with PEFT's own projections). Then: the
default init leaves the output the base's, the projections are ONE frozen Parameter pair that training never
changes, disable / merge / unmerge / remove, the native format, dropout, the doors (enable, the launcher;
PetCallback and inspect in test_more_methods.py), and MindFormers' Llama against transformers' in PEFT's names.
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
from pet_hooks.errors import AdapterFileError
from pet_hooks.surgery.core import all_delta_parameters, get_state, parameter_counts
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, ROOT, SMALL, assert_params_equal, snapshot, assert_close
from tests.nets import LAYERS, SIZES, three_layers, three_layers_numpy, weight_out_in, set_values, three_layers_job
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
R = 4
KINDS = [pytest.param("dense", id="dense"),
         pytest.param("linear", id="mf_linear", marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers")),
         pytest.param("linear_in_out", id="mf_linear_in_out",
                      marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers"))]


def config(**changes) -> dict:
    return {"pet_type": "vera", "r": R, "target_modules": list(LAYERS), **changes}


def _job() -> dict:
    return {**three_layers_job(5), "r": np.array(R)}


def _adapter() -> dict:
    """Random values for every adapter tensor (projections from key 9, lambdas from init_weights false)."""
    net = pet_hooks.apply(three_layers(_job()), config(init_weights=False, seed=7, projection_prng_key=9))
    return {p.name: p.asnumpy() * (1.0 if p.name.startswith("vera_") else 1.5)
            for p in all_delta_parameters(net)}


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results, with our PEFT-format adapter read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("vera")
    job = _job()
    values = _adapter()
    job.update(values)
    net = pet_hooks.apply(three_layers(_job()), config())
    set_values(all_delta_parameters(net), values)
    pet_hooks.save_adapter(net, work / "ours", format="peft", task_type=None)
    np.savez(work / "job.npz", **job)
    out = run_reference([os.path.join(HERE, "vera_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, values, dict(np.load(work / "torch.npz"))


@NEEDS_PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_gradients_and_merge_equal_peft(mode, kind, peft_run):
    _, job, values, theirs = peft_run
    net = pet_hooks.apply(three_layers(job, kind), config())
    set_values(all_delta_parameters(net), values)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    params = pet_hooks.delta_parameters(net)                 # the lambdas only: the projections never train
    assert sorted(p.name for p in params) == sorted(f"{layer}.vera_lambda_{v}" for layer in LAYERS for v in "bd")

    def loss(x, g):
        return (net(x) * g).sum()

    value, grads = ms.value_and_grad(loss, None, params)(x, g)
    out = net(x).asnumpy()
    base = three_layers_numpy(job, job["x"])
    assert np.abs(out - base).max() > 0.05                       # the delta shows
    assert_close(out, theirs["out"])
    assert_close(float(value.asnumpy()), float((theirs["out"] * job["g"]).sum()))
    for param, grad in zip(params, grads):
        assert_close(grad.asnumpy(), theirs[f"grad/{param.name}"], err_msg=param.name)

    pet_hooks.merge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), theirs[f"merged/{layer}.weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=layer)
    assert_close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], rtol=1e-5, atol=1e-6)
    assert_close(net(x).asnumpy(), out)
    for name in ("vera_A", "vera_B"):                            # merging never wrote them
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), values[name])


@NEEDS_PEFT
def test_peft_reads_our_adapter_and_we_read_peft_s(mode, peft_run):
    work, job, values, theirs = peft_run
    x = Tensor(job["x"])
    assert_close(theirs["ours"], theirs["out"])                  # PEFT read ours: our projections and lambdas
    ours = pet_hooks.apply(three_layers(job), config())
    assert parameter_counts(ours) == tuple(theirs["counts"])     # the projections are not counted, as PEFT's buffers
    doc = json.loads((work / "ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "VERA" and sorted(doc["target_modules"]) == sorted(LAYERS)
    assert (doc["r"], doc["save_projection"], doc["projection_prng_key"], doc["d_initial"]) == (R, True, 0, 0.1)

    # PEFT's own file: its keys, and its own projections (torch's, key 3) used exactly
    keys = (work / "keys.txt").read_text().split()
    assert keys == sorted(["base_model.vera_A", "base_model.vera_B"] + [f"base_model.model.{layer}.vera_lambda_{v}"
                                                                        for layer in LAYERS for v in "bd"])
    fresh = pet_hooks.load_adapter(three_layers(job), work / "theirs")
    cfg = get_state(fresh).config
    assert (cfg.pet_type, cfg.r, cfg.projection_prng_key, cfg.save_projection) == ("vera", R, 3, True)
    from safetensors.numpy import load_file
    file = load_file(str(work / "theirs" / "adapter_model.safetensors"))
    for name in ("vera_A", "vera_B"):
        np.testing.assert_array_equal(fresh.parameters_dict()[name].asnumpy(), file[f"base_model.{name}"])
    assert_close(fresh(x).asnumpy(), theirs["theirs_out"])


@NEEDS_PEFT
def test_default_init_leaves_the_base_output_as_peft_s(mode, peft_run):
    _, job, _, theirs = peft_run
    x = Tensor(job["x"])
    base = three_layers(job)(x).asnumpy()
    net = pet_hooks.apply(three_layers(job), config(d_initial=0.25))
    np.testing.assert_array_equal(net(x).asnumpy(), base)
    assert_close(theirs["init"], base)
    params = net.parameters_dict()
    for layer, (din, dout) in SIZES.items():
        np.testing.assert_array_equal(params[f"{layer}.vera_lambda_b"].asnumpy(), np.zeros(dout, np.float32))
        np.testing.assert_array_equal(params[f"{layer}.vera_lambda_d"].asnumpy(), np.full(R, 0.25, np.float32))
    # PEFT's shapes and bound: kaiming uniform, +-sqrt(6 / fan_in), over the largest in / out of the targets
    a, b = params["vera_A"].asnumpy(), params["vera_B"].asnumpy()
    assert a.shape == (R, 10) and b.shape == (10, R)
    assert 0.6 * np.sqrt(6 / 10) < np.abs(a).max() <= np.sqrt(6 / 10) and np.abs(b).max() <= np.sqrt(6 / R)
    # the key decides them, the seed does not
    other = pet_hooks.apply(three_layers(job), config(seed=5)).parameters_dict()
    np.testing.assert_array_equal(other["vera_A"].asnumpy(), a)
    moved = pet_hooks.apply(three_layers(job), config(projection_prng_key=1)).parameters_dict()
    assert not np.array_equal(moved["vera_A"].asnumpy(), a)


def test_the_contract_one_frozen_pair_training_disable_native_format_remove(mode, tmp_path):
    job = _job()
    net = three_layers(job)
    net.k.bias.requires_grad = False                    # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = Tensor(job["x"])
    base = net(x).asnumpy()                              # compiled before apply, on purpose
    pet_hooks.apply(net, config(seed=1))
    # ONE pair, the same two objects on every cell, frozen
    pair = {(id(getattr(net, layer).vera_A), id(getattr(net, layer).vera_B)) for layer in LAYERS}
    assert len(pair) == 1
    assert [p.name for p in net.get_parameters()].count("vera_A") == 1
    assert not net.k.vera_A.requires_grad and not net.k.vera_B.requires_grad
    projections = {name: getattr(net.k, name).asnumpy().copy() for name in ("vera_A", "vera_B")}
    assert sorted(p.name for p in net.trainable_params()) == sorted(p.name for p in pet_hooks.delta_parameters(net))
    start = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}

    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 0.05))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)                    # every base parameter bit for bit
    for name, value in projections.items():             # and the projections
        np.testing.assert_array_equal(getattr(net.k, name).asnumpy(), value)
    assert [n for n, v in start.items() if np.array_equal(net.parameters_dict()[n].asnumpy(), v)] == []
    net.set_train(False)
    adapted = net(x).asnumpy()
    assert not np.allclose(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    pet_hooks.save_adapter(net, tmp_path / "native")    # pet_hooks' own format: the projections travel
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "native")
    assert get_state(fresh).config == get_state(net).config
    np.testing.assert_array_equal(fresh.k.vera_B.asnumpy(), projections["vera_B"])
    np.testing.assert_array_equal(fresh(x).asnumpy(), adapted)

    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert not [name for name in net.parameters_dict() if "vera" in name]
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


@NEEDS_PEFT
def test_a_peft_file_saved_without_projections_gets_them_from_torch(peft_run):
    """PEFT's save_projection=False: the file holds the lambdas only; pet_hooks re-derives vera_A / vera_B from
    projection_prng_key with torch (in a child process): exactly PEFT's, and the output is PEFT's."""
    work, job, _, theirs = peft_run
    from safetensors.numpy import load_file
    assert not [k for k in load_file(str(work / "bare" / "adapter_model.safetensors")) if "vera_A" in k]
    fresh = pet_hooks.load_adapter(three_layers(job), work / "bare")
    cfg = get_state(fresh).config
    assert (cfg.projection_prng_key, cfg.save_projection) == (5, True)     # from now on they travel in the file
    for name in ("vera_A", "vera_B"):
        np.testing.assert_array_equal(fresh.parameters_dict()[name].asnumpy(), theirs[f"bare/{name}"])
    assert_close(fresh(Tensor(job["x"])).asnumpy(), theirs["bare_out"])


def test_without_torch_a_peft_file_without_projections_is_refused_naming_why(tmp_path, monkeypatch):
    import pet_hooks.tuners.vera as vera
    job = _job()
    net = pet_hooks.apply(three_layers(job), config())
    pet_hooks.save_adapter(net, tmp_path / "peft", format="peft")
    doc_path = tmp_path / "peft" / "adapter_config.json"
    doc = json.loads(doc_path.read_text())
    doc_path.write_text(json.dumps({**doc, "save_projection": False}))
    monkeypatch.setattr(vera, "torch_available", lambda: False)
    fresh = three_layers(job)
    with pytest.raises(AdapterFileError, match="save_projection=False.*without torch.*cannot re-derive"):
        pet_hooks.load_adapter(fresh, tmp_path / "peft")
    assert get_state(fresh) is None


def test_dropout_drops_inputs_of_the_branch_while_training_only(mode):
    """vera_dropout by its definition: while training the branch sees dropout(x) (entries zeroed with p, the
    rest scaled by 1 / (1 - p)), so its output differs call to call; in eval it is the full delta."""
    rng = np.random.default_rng(0)
    net = nn.SequentialCell([nn.Dense(8, 12)])
    x = Tensor(rng.standard_normal((64, 8)).astype(np.float32))
    base = net(x).asnumpy()
    pet_hooks.apply(net, {"pet_type": "vera", "r": 6, "target_modules": ["0"], "init_weights": False, "seed": 1,
                          "vera_dropout": 0.5})
    net.set_train(False)
    full = net(x).asnumpy() - base
    cell = net[0]
    a, b = cell.vera_A.asnumpy(), cell.vera_B.asnumpy()
    lb, ld = cell.vera_lambda_b.asnumpy(), cell.vera_lambda_d.asnumpy()
    np.testing.assert_allclose(full, lb * ((ld * (x.asnumpy() @ a.T)) @ b.T), rtol=1e-5, atol=1e-5)
    net.set_train(True)
    deltas = [net(x).asnumpy() - base for _ in range(3)]
    assert not np.allclose(deltas[0], deltas[1]) and not np.allclose(deltas[0], full)
    # the branch is linear in its input: the mean over many calls tends to the full delta
    mean = np.mean([net(x).asnumpy() - base for _ in range(30)], axis=0)
    assert np.abs(mean - full).mean() < 0.35 * np.abs(full).mean()
    net.set_train(False)
    np.testing.assert_allclose(net(x).asnumpy() - base, full, atol=1e-6)


# ----------------------------------------------------------------------------- doors
# PetCallback, inspect and the shared-graph training: tests/tuners/test_more_methods.py (METHODS)
GPT_CFG = {"pet_type": "vera", "r": 8, "target_modules": ".*dense1|.*dense3", "vera_dropout": 0.1}


def test_enable():
    """Graph mode only (the door is the same in both modes; the numerics run in both above)."""
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        _enable_and_train(lm_batches, GPTWithLoss, build)
    finally:
        ms.set_context(mode=before)


def _enable_and_train(lm_batches, GPTWithLoss, build):
    with pet_hooks.enable(GPT_CFG):
        net = build(seed=0, **SMALL)
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
    deltas = pet_hooks.delta_parameters(net)
    frozen = {p.name: p.asnumpy().copy() for p in all_delta_parameters(net) if not p.requires_grad}
    assert sorted(frozen) == ["vera_A", "vera_B"]
    base = {name: value for name, value in snapshot(net).items()
            if name not in {p.name for p in all_delta_parameters(net)}}
    assert get_state(net).config.pet_type == "vera" and deltas
    assert {p.name for p in optimizer.parameters} == {p.name for p in deltas}
    start = {p.name: p.asnumpy().copy() for p in deltas}
    batches = lm_batches(8, 4, seed=2)
    for _ in range(3):
        step(*map(Tensor, next(batches)))
    assert_params_equal(base, net)
    assert_params_equal(frozen, net)
    assert [p.name for p in deltas if np.array_equal(p.asnumpy(), start[p.name])] == []


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
    assert state.config.pet_type == "vera" and state.config.r == 8
    assert sorted({i.path.rsplit(".", 1)[-1] for i in state.injections}) == ["dense1", "dense3"]
    moved = [p for p in pet_hooks.delta_parameters(net)
             if p.name.endswith("vera_lambda_b") and np.abs(p.asnumpy()).max()]
    assert len(moved) == len(state.injections)                    # trained: every zero-init lambda_b moved


def test_the_gradient_guard_reports_the_cell_its_parent_never_calls(mode, caplog):
    """The guard's witness is vera_lambda_b, zero at init: weight decay moves lambda_d without any gradient."""
    import logging
    import mindspore.dataset as ds
    from mindspore.train import Model
    from tests.tuners.test_unreached_cells import ReadsWeights, _guard_warnings
    rng = np.random.default_rng(0)
    data = ds.NumpySlicesDataset({"x": rng.standard_normal((4, 4)).astype(np.float32),
                                  "y": rng.standard_normal((4, 2)).astype(np.float32)}, shuffle=False).batch(1)
    net = ReadsWeights()
    # fixed weights, and a bias that keeps relu(h) > 0: head's branch gets a gradient from step 1 in every run
    net.proj.weight.set_data(Tensor((rng.standard_normal((4, 4)) * 0.3).astype(np.float32)))
    net.proj.bias.set_data(Tensor(np.full(4, 5.0, np.float32)))
    model = Model(net, nn.MSELoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9, weight_decay=0.01))
    cfg = {"pet_type": "vera", "r": 2, "seed": 1, "target_modules": ".*proj|.*head"}
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        model.train(1, data, callbacks=[pet_hooks.PetCallback(cfg)], dataset_sink_mode=False)
    warnings = _guard_warnings(caplog)
    assert len(warnings) == 1 and "after 2 steps" in warnings[0] and "proj.vera_lambda_b" in warnings[0], warnings
    assert "head." not in warnings[0] and "vera_A" not in warnings[0]
    assert net.head.vera_lambda_b.asnumpy().any() and not net.proj.vera_lambda_b.asnumpy().any()


def test_merged_checkpoint_is_the_adapted_net_without_pet_hooks(tmp_path):
    from tests.nets import ThreeLayers
    job = _job()
    net = pet_hooks.apply(three_layers(job), config(init_weights=False, seed=2))
    x = Tensor(job["x"])
    adapted = net(x).asnumpy()
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    plain = ThreeLayers()
    ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")), strict_load=True)
    np.testing.assert_allclose(plain(x).asnumpy(), adapted, rtol=1e-5, atol=1e-5)
    assert np.abs(plain(x).asnumpy() - three_layers_numpy(job, job["x"])).max() > 1e-2


@NEEDS_PEFT
@pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
def test_llama_in_hugging_face_names_gives_pytorch_s_logits(tmp_path):
    """MindFormers' Llama with VeRA on wq / wv / w2 (layers of different sizes: the shared pair is sliced), saved
    with the llama name map: PEFT on transformers' Llama with the same weights reads it and gives our logits."""
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
        pet_hooks.apply(net, {"pet_type": "vera", "r": 4, "target_modules": ".*wq|.*wv|.*w2", "init_weights": False,
                              "seed": 3})
        ours = llama_logits(net, ids)
        pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
        doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert doc["target_modules"] == ["down_proj", "q_proj", "v_proj"] and doc["peft_type"] == "VERA"
        out = run_reference([os.path.join(HERE, "peft_reference.py"), str(tmp_path)], timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert np.abs(ours - base).max() > 1e-2
        np.testing.assert_allclose(ours, np.load(tmp_path / "torch_ours.npy"), rtol=1e-4, atol=1e-5)
        fresh = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "ours")    # the llama map is found
        np.testing.assert_allclose(llama_logits(fresh, ids), ours, rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=before)
