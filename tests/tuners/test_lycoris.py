"""LoHa and LoKr against Hugging Face PEFT's own implementation, in graph and PyNative mode.

The three-layer net of test_ia3.py (``k``, ``v``, ``down``) in PyTorch with PEFT's ``LoHaConfig`` /
``LoKrConfig`` and in MindSpore with pet_hooks, on nn.Dense and on MindFormers' Linear with both weight
layouts. Three variants cover every factor layout PEFT builds for linear layers: LoHa; LoKr with a full
``lokr_w1`` and ``lokr_w2`` full (``down``) or a product (``k``, ``v``); LoKr with ``decompose_both`` and
``decompose_factor`` (``lokr_w1_a`` / ``lokr_w1_b``). The factors are random (``init_weights: false``) and
copied to PEFT, which must have made the same factors with the same shapes; the outputs, the gradient of
every factor and the merged weights must be PEFT's; PEFT must read our PEFT-format adapter and we PEFT's.
Then: the default init leaves the output the base's (as PEFT's), training moves only the factors,
disable / merge / unmerge / remove, the native format, rank and module dropout (statistically, by their
definition), and the doors (enable, the launcher; PetCallback and inspect in test_more_methods.py).
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
# name -> PEFT's config fields (our config: the same fields, pet_type the lower-cased peft_type)
VARIANTS = {
    "loha": {"peft_type": "LOHA", "r": 2, "alpha": 3},
    "lokr": {"peft_type": "LOKR", "r": 2, "alpha": 3},
    "lokr_both": {"peft_type": "LOKR", "r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 5},
}
FACTORS = {"loha": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
           "lokr": ["lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"],
           "lokr_both": ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]}   # k: w1 full
KINDS = [pytest.param("dense", id="dense"),
         pytest.param("linear", id="mf_linear", marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers")),
         pytest.param("linear_in_out", id="mf_linear_in_out",
                      marks=pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers"))]


def config(variant: str, **changes) -> dict:
    fields = dict(VARIANTS[variant])
    return {"pet_type": fields.pop("peft_type").lower(), "target_modules": list(LAYERS), **fields, **changes}


def _job() -> dict:
    return three_layers_job(5)


def _factors(variant: str) -> dict:
    """Random factors (init_weights false, scaled up so the delta shows): ``<layer>.<factor>`` -> array."""
    net = pet_hooks.apply(three_layers(_job()), config(variant, init_weights=False, seed=7))
    return {p.name: p.asnumpy() * 2.0 for p in pet_hooks.delta_parameters(net)}


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for every variant, with our PEFT-format adapters read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("lycoris")
    job = _job()
    factors = {variant: _factors(variant) for variant in VARIANTS}
    for variant, values in factors.items():
        job.update({f"{variant}/{name}": value for name, value in values.items()})
        net = pet_hooks.apply(three_layers(_job()), config(variant))
        set_values(pet_hooks.delta_parameters(net), values)
        pet_hooks.save_adapter(net, work / f"{variant}_ours", format="peft", task_type=None)
    np.savez(work / "job.npz", **job)
    (work / "variants.json").write_text(json.dumps(VARIANTS))
    out = run_reference([os.path.join(HERE, "lycoris_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, factors, dict(np.load(work / "torch.npz"))


@NEEDS_PEFT
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_outputs_gradients_and_merge_equal_peft(mode, kind, variant, peft_run):
    _, job, factors, theirs = peft_run
    net = pet_hooks.apply(three_layers(job, kind), config(variant))
    set_values(pet_hooks.delta_parameters(net), factors[variant])
    assert sorted({p.name.split(".", 1)[1] for p in pet_hooks.delta_parameters(net)}) == FACTORS[variant]
    x, g = Tensor(job["x"]), Tensor(job["g"])
    params = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    value, grads = ms.value_and_grad(loss, None, params)(x, g)
    out = net(x).asnumpy()
    base = three_layers_numpy(job, job["x"])
    assert np.abs(out - base).max() > 0.05                       # the delta shows
    assert_close(out, theirs[f"{variant}/out"])
    assert_close(float(value.asnumpy()), float((theirs[f"{variant}/out"] * job["g"]).sum()))
    for param, grad in zip(params, grads):
        assert_close(grad.asnumpy(), theirs[f"{variant}/grad/{param.name}"], err_msg=param.name)

    pet_hooks.merge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), theirs[f"{variant}/merged/{layer}.weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=layer)
    assert_close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], rtol=1e-5, atol=1e-6)
    assert_close(net(x).asnumpy(), out)


@NEEDS_PEFT
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_reads_our_adapter_and_we_read_peft_s(mode, variant, peft_run):
    work, job, factors, theirs = peft_run
    x = Tensor(job["x"])
    ours = pet_hooks.apply(three_layers(job), config(variant))
    set_values(pet_hooks.delta_parameters(ours), factors[variant])
    assert_close(ours(x).asnumpy(), theirs[f"{variant}/ours"])
    assert_close(theirs[f"{variant}/ours"], theirs[f"{variant}/out"])

    doc = json.loads((work / f"{variant}_ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == VARIANTS[variant]["peft_type"] and sorted(doc["target_modules"]) == sorted(LAYERS)
    assert {k: doc[k] for k in VARIANTS[variant] if k != "peft_type"} == \
        {k: v for k, v in VARIANTS[variant].items() if k != "peft_type"}

    fresh = pet_hooks.load_adapter(three_layers(job), work / f"{variant}_theirs")   # PEFT's own files
    cfg = get_state(fresh).config
    assert cfg.pet_type == config(variant)["pet_type"]
    assert {k: getattr(cfg, k) for k in VARIANTS[variant] if k != "peft_type"} == \
        {k: v for k, v in VARIANTS[variant].items() if k != "peft_type"}
    assert_close(fresh(x).asnumpy(), theirs[f"{variant}/out"])


@NEEDS_PEFT
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_default_init_leaves_the_base_output_as_peft_s(mode, variant, peft_run):
    _, job, _, theirs = peft_run
    x = Tensor(job["x"])
    base = three_layers(job)(x).asnumpy()
    net = pet_hooks.apply(three_layers(job), config(variant))
    np.testing.assert_array_equal(net(x).asnumpy(), base)
    assert_close(theirs[f"{variant}/init"], base)
    zero = [p.name for p in pet_hooks.delta_parameters(net) if not np.abs(p.asnumpy()).max()]
    names = {p.name for p in pet_hooks.delta_parameters(net)}
    expected = ["hada_w2_b" if variant == "loha" else "lokr_w1" if f"{layer}.lokr_w1" in names else "lokr_w1_a"
                for layer in LAYERS]
    assert zero == [f"{layer}.{leaf}" for layer, leaf in zip(LAYERS, expected)]


def test_lokr_init_lycoris_zeroes_w2():
    net = pet_hooks.apply(three_layers(_job()), config("lokr", init_weights="lycoris"))
    zero = [p.name for p in pet_hooks.delta_parameters(net) if not np.abs(p.asnumpy()).max()]
    assert zero == ["k.lokr_w2_b", "v.lokr_w2_b", "down.lokr_w2"]


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_the_contract_training_disable_native_format_remove(mode, variant, tmp_path):
    job = _job()
    net = three_layers(job)
    net.k.bias.requires_grad = False                    # a user's own choice, to be kept
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = Tensor(job["x"])
    base = net(x).asnumpy()                              # compiled before apply, on purpose
    pet_hooks.apply(net, config(variant, seed=1))
    assert sorted(p.name for p in net.trainable_params()) == sorted(p.name for p in pet_hooks.delta_parameters(net))
    start = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}

    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 0.05))
    target = Tensor(np.random.default_rng(0).standard_normal(base.shape).astype(np.float32))
    losses = [float(step(x, target).asnumpy()) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert_params_equal(values, net)                    # every base parameter bit for bit
    assert [n for n, v in start.items() if np.array_equal(net.parameters_dict()[n].asnumpy(), v)] == []
    net.set_train(False)
    adapted = net(x).asnumpy()
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
    assert not [name for name in net.parameters_dict() if ".hada_" in name or ".lokr_" in name]
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def _dense_with(cfg, seed=0):
    """One Dense 8 -> 12 with random factors; returns (net, x, base output, full delta x @ dW^T)."""
    rng = np.random.default_rng(seed)
    net = nn.SequentialCell([nn.Dense(8, 12)])
    x = Tensor(rng.standard_normal((4, 8)).astype(np.float32))
    base = net(x).asnumpy()
    pet_hooks.apply(net, {"target_modules": ["0"], "r": 4, "init_weights": False, "seed": seed, **cfg})
    net.set_train(False)
    return net, x, base, net(x).asnumpy() - base


@pytest.mark.parametrize("cfg, scaled", [({"pet_type": "loha"}, True), ({"pet_type": "lokr"}, False),
                                         ({"pet_type": "lokr", "rank_dropout_scale": True}, True)],
                         ids=["loha", "lokr", "lokr_scaled"])
def test_rank_dropout_drops_output_rows_of_the_delta_while_training_only(mode, cfg, scaled):
    """PEFT's rank dropout by its definition: in training each of the 12 output rows of dW is kept with
    probability 1 - p, the kept ones divided by the mask's mean (LoHa; LoKr with rank_dropout_scale)."""
    net, x, base, full = _dense_with({**cfg, "rank_dropout": 0.5})
    np.testing.assert_allclose(net(x).asnumpy() - base, full, atol=1e-6)    # eval: no dropout
    net.set_train(True)
    kept_counts, masks = [], set()
    for _ in range(30):
        ratio = (net(x).asnumpy() - base) / full                  # per column: 0 (dropped) or the scale
        kept = np.abs(ratio[0]) > 1e-3
        if not kept.any():
            continue
        scale = 12 / kept.sum() if scaled else 1.0
        np.testing.assert_allclose(ratio[:, kept], scale, rtol=1e-3)
        np.testing.assert_allclose(ratio[:, ~kept], 0.0, atol=1e-4)
        kept_counts.append(kept.sum())
        masks.add(tuple(kept))
    assert len(masks) > 10                                        # a fresh mask per call
    assert 0.35 < np.mean(kept_counts) / 12 < 0.65                # p = 0.5 (30 x 12 draws: sd ~ 0.03)
    net.set_train(False)
    np.testing.assert_allclose(net(x).asnumpy() - base, full, atol=1e-6)


@pytest.mark.parametrize("pet_type", ["loha", "lokr"])
def test_module_dropout_skips_the_whole_delta_while_training_only(mode, pet_type):
    net, x, base, full = _dense_with({"pet_type": pet_type, "module_dropout": 0.3})
    net.set_train(True)
    skipped = 0
    for _ in range(60):
        delta = net(x).asnumpy() - base
        if np.abs(delta).max() < 1e-7:
            skipped += 1
        else:
            np.testing.assert_allclose(delta, full, atol=1e-5)
    assert 0.1 < skipped / 60 < 0.5                               # p = 0.3 (60 draws: sd ~ 0.06)
    net.set_train(False)
    assert all(np.allclose(net(x).asnumpy() - base, full, atol=1e-6) for _ in range(5))


# ----------------------------------------------------------------------------- doors
# PetCallback, inspect and the shared-graph training: tests/tuners/test_more_methods.py (METHODS)
# rank_dropout on: the doors train with it (graph mode, one compiled graph per repeated block)
GPT_CFG = {"loha": {"pet_type": "loha", "r": 2, "target_modules": ".*dense1|.*dense3", "rank_dropout": 0.25},
           "lokr": {"pet_type": "lokr", "r": 2, "target_modules": ".*dense1|.*dense3", "rank_dropout": 0.25,
                    "rank_dropout_scale": True}}


@pytest.mark.parametrize("pet_type", sorted(GPT_CFG))
def test_enable(mode, pet_type):
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    with pet_hooks.enable(GPT_CFG[pet_type]):
        net = build(seed=0, **SMALL)
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
    deltas = pet_hooks.delta_parameters(net)
    base = {name: value for name, value in snapshot(net).items() if name not in {p.name for p in deltas}}
    assert get_state(net).config.pet_type == pet_type and deltas
    assert {p.name for p in optimizer.parameters} == {p.name for p in deltas}
    start = {p.name: p.asnumpy().copy() for p in deltas}
    batches = lm_batches(8, 4, seed=2)
    for _ in range(3):
        step(*map(Tensor, next(batches)))
    assert_params_equal(base, net)
    assert [p.name for p in deltas if np.array_equal(p.asnumpy(), start[p.name])] == []


@pytest.mark.parametrize("pet_type", sorted(GPT_CFG))
def test_launcher(tmp_path, pet_type):
    import yaml
    from samples.tiny_gpt import build
    path = tmp_path / "pet.yaml"
    path.write_text(yaml.safe_dump(GPT_CFG[pet_type]))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(path), "--save-dir",
                          str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"), "--steps", "2",
                          "--mode", "0"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    net = pet_hooks.load_adapter(build(seed=0), tmp_path / "adapter")     # the script's own geometry
    state = get_state(net)
    assert state.config.pet_type == pet_type and state.config.r == 2
    assert sorted({i.path.rsplit(".", 1)[-1] for i in state.injections}) == ["dense1", "dense3"]
    zero_init = "hada_w2_b" if pet_type == "loha" else "lokr_w1"
    moved = [p for p in pet_hooks.delta_parameters(net) if p.name.endswith(zero_init) and np.abs(p.asnumpy()).max()]
    assert len(moved) == len(state.injections)                    # trained: the zero-init factor moved


@pytest.mark.parametrize("pet_type, witness", [("loha", "hada_w2_b"), ("lokr", "lokr_w1")])
def test_the_gradient_guard_reports_the_cell_its_parent_never_calls(mode, caplog, pet_type, witness):
    """The guard's witness is the factor zero at init: weight decay moves the others without any gradient."""
    import logging
    import mindspore.dataset as ds
    from mindspore.train import Model
    from tests.tuners.test_unreached_cells import ReadsWeights, _guard_warnings
    rng = np.random.default_rng(0)
    data = ds.NumpySlicesDataset({"x": rng.standard_normal((4, 4)).astype(np.float32),
                                  "y": rng.standard_normal((4, 2)).astype(np.float32)}, shuffle=False).batch(1)
    net = ReadsWeights()
    # fixed weights, a positive bias: the relu passes, so head's delta gets a gradient from step 1 whatever
    # MindSpore's random init (which depends on the tests run before)
    net.proj.weight.set_data(Tensor(rng.standard_normal((4, 4)).astype(np.float32) * 0.1))
    net.proj.bias.set_data(Tensor(np.ones(4, np.float32)))
    model = Model(net, nn.MSELoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9, weight_decay=0.01))
    cfg = {"pet_type": pet_type, "r": 2, "seed": 1, "target_modules": ".*proj|.*head"}
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        model.train(1, data, callbacks=[pet_hooks.PetCallback(cfg)], dataset_sink_mode=False)
    warnings = _guard_warnings(caplog)
    assert len(warnings) == 1 and "after 2 steps" in warnings[0] and f"proj.{witness}" in warnings[0], warnings
    assert "head." not in warnings[0]
    assert getattr(net.head, witness).asnumpy().any() and not getattr(net.proj, witness).asnumpy().any()


# one torch process runs tests/peft_reference.py's main for both methods
_PEFT_REFERENCE_FOR_EACH = "import sys; sys.path.insert(0, sys.argv[1]); import peft_reference; " \
    "[peft_reference.main(work) for work in sys.argv[2:]]"


@NEEDS_PEFT
@pytest.mark.skipif(not HAS_MINDFORMERS, reason="mindformers is not installed")
def test_llama_in_hugging_face_names_gives_pytorch_s_logits(tmp_path):
    """MindFormers' Llama with LoHa / LoKr on wq / wv / w2 (random factors), saved with the llama name map: PEFT on
    transformers' Llama with the same weights reads it (q_proj, v_proj, down_proj) and gives our logits."""
    from tests.io.test_peft_format import hf_name, llama_ids, llama_logits, llama_with_weights
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    try:
        ids = llama_ids(2)
        base, ours = None, {}
        for pet_type in ("loha", "lokr"):
            work = tmp_path / pet_type
            work.mkdir()
            net = llama_with_weights()                    # seeded: the same base weights for both
            job = {k: getattr(net.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_layers", "num_heads", "rms_norm_eps", "theta",
                                                       "seq_length")}
            (work / "job.json").write_text(json.dumps(job))
            np.savez(work / "base.npz", **{hf_name(p.name): p.asnumpy() for p in net.get_parameters()})
            np.save(work / "ids.npy", ids)
            if base is None:
                base = llama_logits(net, ids)
            pet_hooks.apply(net, {"pet_type": pet_type, "r": 2, "alpha": 4, "target_modules": ".*wq|.*wv|.*w2",
                                  "init_weights": False, "seed": 3})
            ours[pet_type] = llama_logits(net, ids)
            pet_hooks.save_adapter(net, work / "ours", format="peft", name_map="llama")
            doc = json.loads((work / "ours" / "adapter_config.json").read_text())
            assert doc["target_modules"] == ["down_proj", "q_proj", "v_proj"], pet_type
            assert doc["peft_type"] == pet_type.upper()
        out = run_reference(["-c", _PEFT_REFERENCE_FOR_EACH, HERE] + [str(tmp_path / pet_type) for pet_type in ours],
                            timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        for pet_type, logits in ours.items():
            assert np.abs(logits - base).max() > 1e-2, pet_type
            np.testing.assert_allclose(logits, np.load(tmp_path / pet_type / "torch_ours.npy"), rtol=1e-4, atol=1e-5,
                                       err_msg=pet_type)
            fresh = pet_hooks.load_adapter(llama_with_weights(), tmp_path / pet_type / "ours")  # the llama map is found
            np.testing.assert_allclose(llama_logits(fresh, ids), logits, rtol=1e-5, atol=1e-5, err_msg=pet_type)
    finally:
        ms.set_context(mode=before)


@pytest.mark.parametrize("pet_type", ["loha", "lokr"])
def test_merged_checkpoint_is_the_adapted_net_without_pet_hooks(tmp_path, pet_type):
    from tests.nets import ThreeLayers
    job = _job()
    net = pet_hooks.apply(three_layers(job), config(pet_type, init_weights=False, seed=2))
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


@pytest.mark.parametrize("pet_type", ["loha", "lokr"])
def test_peft_s_layer_selection_selects_what_it_selects_for_lora(pet_type):
    """all-linear, exclude_modules, layers_to_transform: the shared selection, the cells LoRA gets (activated
    layers left out, as LoHa / LoKr cannot take them)."""
    from samples.tiny_gpt import build
    fields = {"target_modules": "all-linear", "exclude_modules": ["projection"], "layers_to_transform": [1]}
    ours = pet_hooks.apply(build(seed=0, **SMALL), {"pet_type": pet_type, "r": 2, **fields})
    lora = pet_hooks.apply(build(seed=0, **SMALL), {"pet_type": "lora", "lora_rank": 2, **fields})
    paths = [i.path for i in get_state(ours).injections]
    activated = [i.path for i in get_state(lora).injections if getattr(i.cell, "activation_flag", False)]
    assert activated and paths and all(p.startswith("blocks.1.") for p in paths)
    assert paths == [i.path for i in get_state(lora).injections if i.path not in activated]
