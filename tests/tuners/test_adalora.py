"""AdaLoRA against Hugging Face PEFT's own implementation, in graph and PyNative mode.

The three-layer net of test_vera.py (``k`` 6 -> 10, ``v`` 10 -> 8, ``down`` 8 -> 4) in PyTorch with PEFT's
``AdaLoraConfig`` and in MindSpore with pet_hooks (nn.Dense, MindFormers' Linear in both weight layouts), one
torch process per module (tests/adalora_reference.py). pet_hooks' random factors are copied to PEFT; then:

- the output, the loss with PEFT's orthogonality regulariser, the gradients of ``lora_A`` / ``lora_E`` /
  ``lora_B`` (those of the model's loss plus the regulariser's, as the optimizer step gets them), merging;
- a training run of SGD steps, each followed by ``update_and_allocate``: ``lora_E`` and the rank pattern after
  every step equal PEFT's (warm-up, the cubic budget every deltaT steps, the final mask, the fixed pattern);
- PEFT reads our PEFT-format adapter saved with a rank pattern (only the kept ranks) and we read PEFT's trained one;
- the contract: the base output at init, base weights unchanged by training, disable, the native format with the
  rank pattern, remove bit for bit. PetCallback, inspect, switching and block reuse: test_more_methods.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.errors import PetStateError
from pet_hooks.surgery.core import all_delta_parameters, get_state
from pet_hooks.training.adalora import captured_gradients, orth_reg_value
from tests.conftest import HAS_MINDFORMERS, HAS_TORCH_PEFT, assert_params_equal, snapshot, assert_close
from tests.nets import LAYERS, three_layers, weight_out_in, set_values, three_layers_job
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")
R, TARGET, STEPS, LR = 4, 2, 9, 0.05
SCHEDULE = {"tinit": 1, "tfinal": 3, "deltaT": 2, "total_step": 9}     # warm-up 0-1, budget 2-5, final 6, fixed 7-8
_NEEDS_MF = pytest.mark.skipif(not HAS_MINDFORMERS, reason="no mindformers")
# nn.Dense in both modes; MindFormers' Linear (both weight layouts) in PyNative: the layouts do not depend on the mode
MODE_KINDS = [pytest.param(0, "dense", id="graph-dense"), pytest.param(1, "dense", id="pynative-dense"),
              pytest.param(1, "linear", id="pynative-mf_linear", marks=_NEEDS_MF),
              pytest.param(1, "linear_in_out", id="pynative-mf_linear_in_out", marks=_NEEDS_MF)]
FACTORS = ("lora_A", "lora_E", "lora_B")


def config(**changes) -> dict:
    return {"pet_type": "adalora", "init_r": R, "target_r": TARGET, "lora_alpha": 6, "orth_reg_weight": 0.3,
            "target_modules": list(LAYERS), **SCHEDULE, **changes}


def _job() -> dict:
    job = three_layers_job(5, before_weights=lambda rng: {                 # the training run's inputs
        "xs": rng.standard_normal((STEPS, 3, 6)).astype(np.float32),
        "gs": rng.standard_normal((STEPS, 3, 4)).astype(np.float32)})
    return {**job, "init_r": np.array(R), "target_r": np.array(TARGET), "alpha": np.array(6.0),
            "orth": np.array(0.3), "lr": np.array(LR), "steps": np.array(STEPS),
            **{k: np.array(v) for k, v in SCHEDULE.items()}}


def _adapter() -> dict:
    """Random values for every factor (init_weights false: E not zero), scaled to a moderate size."""
    net = pet_hooks.apply(three_layers(_job()), config(init_weights=False, seed=7))
    return {p.name: p.asnumpy() * 0.3 for p in all_delta_parameters(net)}


#: the rank pattern our PEFT-format adapter is saved with (PEFT must read only the kept ranks' rows)
PATTERN = {"k": [True, False, True, True], "v": [False, False, True, True], "down": [True, True, True, True]}


class SumLoss(nn.Cell):
    """``sum(net(x) * g)``: the reference's loss (PEFT's adds the regulariser to it)."""

    def __init__(self, net):
        super().__init__(auto_prefix=False)             # the net's parameter names kept (as WithLossCell)
        self.net = net

    def construct(self, x, g):
        return (self.net(x) * g).sum()


def _train_step(net, lr):
    optimizer = pet_hooks.adalora_optimizer(nn.SGD(net.trainable_params(), learning_rate=lr), net)
    return nn.TrainOneStepCell(SumLoss(net), optimizer)


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results, with our PEFT-format adapter (saved with PATTERN) read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("adalora")
    job = _job()
    values = _adapter()
    job.update(values)
    net = pet_hooks.apply(three_layers(_job()), config())
    set_values(all_delta_parameters(net), values)
    get_state(net).config.rank_pattern = PATTERN
    pet_hooks.save_adapter(net, work / "ours", format="peft", task_type=None)
    np.savez(work / "job.npz", **job)
    out = run_reference([os.path.join(HERE, "adalora_reference.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, values, dict(np.load(work / "torch.npz"))


@NEEDS_PEFT
@pytest.mark.parametrize("mode, kind", MODE_KINDS, indirect=["mode"])
def test_outputs_regulariser_gradients_and_merge_equal_peft(mode, kind, peft_run):
    _, job, values, theirs = peft_run
    net = pet_hooks.apply(three_layers(job, kind), config())
    set_values(all_delta_parameters(net), values)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    out = net(x).asnumpy()
    assert np.abs(out - three_layers(job, kind)(x).asnumpy()).max() > 0.05     # the delta shows
    assert_close(out, theirs["out"])
    assert_close(orth_reg_value(net), float(theirs["reg"]))
    assert_close(float((out * job["g"]).sum()) + orth_reg_value(net), float(theirs["loss"]))
    # one step at learning rate 0: the optimizer step's gradients (the loss's plus the regulariser's) are PEFT's
    step = _train_step(net, 0.0)
    step(x, g)
    grads = captured_gradients(net)
    assert sorted(grads) == sorted(f"{layer}.{f}" for layer in LAYERS for f in FACTORS)
    for name, grad in grads.items():
        assert_close(grad, theirs[f"grad/{name}"], err_msg=name)

    pet_hooks.merge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), theirs[f"merged/{layer}.weight"],
                                   rtol=1e-5, atol=1e-6, err_msg=layer)
    assert_close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    for layer in LAYERS:
        np.testing.assert_allclose(weight_out_in(getattr(net, layer)), job[f"{layer}.weight"], rtol=1e-5, atol=1e-6)
    assert_close(net(x).asnumpy(), out)


@NEEDS_PEFT
def test_the_rank_allocator_over_a_run_equals_peft_s(mode, peft_run):
    """SGD steps each followed by update_and_allocate: lora_E and the rank pattern after every step are PEFT's."""
    _, job, values, theirs = peft_run
    net = pet_hooks.apply(three_layers(job), config())
    set_values(all_delta_parameters(net), values)
    step = _train_step(net, LR)
    patterns = []
    for i in range(STEPS):
        step(Tensor(job["xs"][i]), Tensor(job["gs"][i]))
        patterns.append(pet_hooks.update_and_allocate(net, i))
        for layer in LAYERS:
            assert_close(getattr(net, layer).lora_E.asnumpy(), theirs[f"train/E{i}/{layer}"], err_msg=f"{i} {layer}")
            if f"train/pattern{i}/{layer}" in theirs:        # PEFT's config holds the newest pattern
                assert get_state(net).config.rank_pattern[layer] == theirs[f"train/pattern{i}/{layer}"].tolist()
    # masks at steps 2 and 4 (deltaT), the final one at 6, none in the warm-up or once it is fixed
    assert [i for i, p in enumerate(patterns) if p] == [2, 4, 6]
    final = get_state(net).config.rank_pattern
    assert sum(sum(mask) for mask in final.values()) == TARGET * len(LAYERS)
    for layer in LAYERS:                                     # the dropped ranks stay zero while training goes on
        e = getattr(net, layer).lora_E.asnumpy().ravel()
        assert (e[~np.array(final[layer])] == 0).all() and (e[np.array(final[layer])] != 0).all()


@NEEDS_PEFT
def test_peft_reads_our_rank_pattern_adapter_and_we_read_peft_s_trained_one(peft_run, tmp_path):
    work, job, values, theirs = peft_run
    x = Tensor(job["x"])
    doc = json.loads((work / "ours" / "adapter_config.json").read_text())
    assert doc["peft_type"] == "ADALORA" and (doc["init_r"], doc["target_r"], doc["total_step"]) == (R, TARGET, 9)
    assert doc["rank_pattern"] == {f"{layer}.lora_E": mask for layer, mask in PATTERN.items()}
    from safetensors.numpy import load_file
    file = load_file(str(work / "ours" / "adapter_model.safetensors"))
    assert file["base_model.model.v.lora_A"].shape == (2, 10) and file["base_model.model.v.lora_B"].shape == (8, 2)
    # PEFT kept the rows of the kept ranks: our net with the dropped ranks' E zeroed gives its output
    net = pet_hooks.apply(three_layers(job), config())
    set_values(all_delta_parameters(net), values)
    for layer, mask in PATTERN.items():
        cell = getattr(net, layer)
        cell.lora_E.set_data(Tensor(cell.lora_E.asnumpy() * np.array(mask, np.float32)[:, None]))
    assert_close(net(x).asnumpy(), theirs["ours"])

    # PEFT's trained adapter, saved with its final rank pattern: its output, and the pattern in our config
    fresh = pet_hooks.load_adapter(three_layers(job), work / "theirs")
    cfg = get_state(fresh).config
    assert (cfg.pet_type, cfg.init_r, cfg.target_r, cfg.tinit, cfg.tfinal, cfg.deltaT) == ("adalora", R, TARGET, 1, 3, 2)
    assert cfg.rank_pattern == {layer: theirs[f"train/pattern6/{layer}"].tolist() for layer in LAYERS}
    assert_close(fresh(x).asnumpy(), theirs["theirs_out"])
    # and back out to PEFT's format: the same kept rows as PEFT's file
    pet_hooks.save_adapter(fresh, tmp_path / "again", format="peft", task_type=None)
    again, original = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "again", work / "theirs"))
    assert sorted(again) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_the_contract_init_training_disable_native_format_remove(mode, tmp_path):
    job = _job()
    net = three_layers(job)
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    values = snapshot(net)
    x = Tensor(job["x"])
    base = net(x).asnumpy()                              # compiled before apply, on purpose
    pet_hooks.apply(net, config(seed=1, total_step=4, tinit=0, tfinal=1, deltaT=1))
    np.testing.assert_array_equal(net(x).asnumpy(), base)               # PEFT's init: E = 0
    assert all(np.array_equal(getattr(net, layer).lora_E.asnumpy(), np.zeros((R, 1), np.float32)) for layer in LAYERS)
    a = net.k.lora_A.asnumpy()
    assert 0.005 < a.std() < 0.05                                       # normal(0, 0.02)
    with pytest.raises(PetStateError, match="adalora_optimizer"):
        pet_hooks.update_and_allocate(net, 0)
    step = _train_step(net, 0.05)
    for i in range(5):
        step(Tensor(job["xs"][i]), Tensor(job["gs"][i]))
        pet_hooks.update_and_allocate(net, i)
    assert_params_equal(values, net)                    # every base parameter bit for bit
    pattern = get_state(net).config.rank_pattern
    assert sum(sum(m) for m in pattern.values()) == TARGET * len(LAYERS)
    net.set_train(False)
    adapted = net(x).asnumpy()
    assert not np.allclose(adapted, base)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_array_equal(net(x).asnumpy(), base)
    np.testing.assert_array_equal(net(x).asnumpy(), adapted)

    pet_hooks.save_adapter(net, tmp_path / "native")    # pet_hooks' own format: the rank pattern travels
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "native")
    assert get_state(fresh).config == get_state(net).config and get_state(fresh).config.rank_pattern == pattern
    np.testing.assert_array_equal(fresh(x).asnumpy(), adapted)

    pet_hooks.remove(net)
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert not [name for name in net.parameters_dict() if "lora" in name]
    assert_params_equal(values, net)
    np.testing.assert_array_equal(net(x).asnumpy(), base)


def _dataset(job, steps):
    import mindspore.dataset as ds
    return ds.GeneratorDataset([(job["xs"][i], job["gs"][i]) for i in range(steps)], ["x", "g"], shuffle=False)


class _SumLossFn(nn.LossBase):
    def construct(self, logits, g):
        return (logits * g).sum()


@pytest.mark.parametrize("mode", [pytest.param(1, id="pynative")], indirect=True)
def test_the_doors_run_the_schedule_from_the_training_step(mode):
    """PetCallback and enable() run update_and_allocate(step) at each Model.train step (counted from 0): the
    rank pattern and every lora_E as a hand-written loop calling pet_hooks.update_and_allocate(net, i). (PyNative
    only: the optimizer step in graph mode is test_the_rank_allocator_over_a_run_equals_peft_s[graph].)"""
    from mindspore.train import Model
    job, steps, lr = _job(), 6, 1e-3
    # masks at steps 1-4, fixed after; E standard normal at init, so that each mask's timing shows in the values
    cfg = config(seed=3, total_step=6, tinit=0, tfinal=2, deltaT=1, init_weights=False)
    by_hand = pet_hooks.apply(three_layers(job), cfg)
    step = _train_step(by_hand, lr)
    for i in range(steps):
        step(Tensor(job["xs"][i]), Tensor(job["gs"][i]))
        pet_hooks.update_and_allocate(by_hand, i)
    expected = get_state(by_hand).config.rank_pattern
    assert sum(sum(m) for m in expected.values()) == TARGET * len(LAYERS)

    through_callback = three_layers(job)
    model = Model(through_callback, _SumLossFn(), nn.SGD(through_callback.trainable_params(), learning_rate=lr))
    model.train(1, _dataset(job, steps), callbacks=[pet_hooks.PetCallback(cfg)], dataset_sink_mode=False)
    with pet_hooks.enable(cfg):
        in_block = three_layers(job)
        model = Model(in_block, _SumLossFn(), nn.SGD(in_block.trainable_params(), learning_rate=lr))
        model.train(1, _dataset(job, steps), dataset_sink_mode=False)
    for net in (through_callback, in_block):
        assert get_state(net).config.rank_pattern == expected
        for layer in LAYERS:
            assert_close(getattr(net, layer).lora_E.asnumpy(), getattr(by_hand, layer).lora_E.asnumpy())


def test_llama_in_hugging_face_names_gives_pytorch_s_logits(tmp_path):
    """MindFormers' Llama with AdaLoRA on wq / wv / w2 and a rank pattern, saved with the llama name map (the
    pattern's keys in transformers' module names): PEFT on transformers' Llama reads it and gives our logits."""
    if not HAS_TORCH_PEFT or not HAS_MINDFORMERS:
        pytest.skip("needs torch, transformers, peft and mindformers")
    import mindspore as ms
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
        pet_hooks.apply(net, config(target_modules=".*wq|.*wv|.*w2", init_weights=False, seed=3))
        state = get_state(net)
        state.config.rank_pattern = {i.path: [k % 2 == 0 for k in range(R)] for i in state.injections}
        for injection in state.injections:          # what the allocator's mask leaves: the dropped ranks' E zero
            cell = injection.cell
            cell.lora_E.set_data(Tensor(cell.lora_E.asnumpy() * np.array([1, 0] * (R // 2), np.float32)[:, None]))
        ours = llama_logits(net, ids)
        pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama")
        doc = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert doc["target_modules"] == ["down_proj", "q_proj", "v_proj"] and doc["peft_type"] == "ADALORA"
        assert "model.layers.0.self_attn.q_proj.lora_E" in doc["rank_pattern"]
        out = run_reference([os.path.join(HERE, "peft_reference.py"), str(tmp_path)], timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert np.abs(ours - base).max() > 1e-2
        np.testing.assert_allclose(ours, np.load(tmp_path / "torch_ours.npy"), rtol=1e-4, atol=1e-5)
        fresh = pet_hooks.load_adapter(llama_with_weights(), tmp_path / "ours")    # the llama map is found
        assert get_state(fresh).config.rank_pattern == state.config.rank_pattern
        np.testing.assert_allclose(llama_logits(fresh, ids), ours, rtol=1e-5, atol=1e-5)
    finally:
        ms.set_context(mode=before)


def test_launcher_runs_the_schedule(tmp_path):
    """pet-hooks run on a Model.train script that knows nothing of AdaLoRA: the saved adapter holds the final rank
    pattern (target_r ranks per layer on average) and its dropped ranks' lora_E are zero."""
    import yaml
    from samples.tiny_gpt import build
    from tests.conftest import ROOT
    cfg = {"pet_type": "adalora", "init_r": 4, "target_r": 2, "total_step": 4, "tinit": 0, "tfinal": 1,
           "target_modules": ".*dense1|.*dense3"}
    (tmp_path / "pet.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(tmp_path / "pet.yaml"),
                          "--save-dir", str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"),
                          "--steps", "4", "--mode", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    net = pet_hooks.load_adapter(build(seed=0), tmp_path / "adapter")     # the script's own geometry
    state = get_state(net)
    pattern = state.config.rank_pattern
    assert sorted(pattern) == sorted(i.path for i in state.injections)
    assert sum(sum(mask) for mask in pattern.values()) == 2 * len(state.injections)
    for injection in state.injections:
        e, kept = injection.cell.lora_E.asnumpy().ravel(), np.array(pattern[injection.path])
        assert (e[~kept] == 0).all() and (e[kept] != 0).all()      # (a layer may keep no rank at all)


def test_the_optimizer_step_compiles_for_hundreds_of_gradients():
    """The real model's count of AdaLoRA gradients (SmolLM2: 30 blocks x q/k/v/o x A, E, B = 360) once exceeded
    MindSpore's call depth limit in graph mode (the step was a Python loop with a branch per gradient, unrolled
    into nested graphs). Here 40 layers' 120 gradients under a limit of 250: the old step needed about 2.6 levels
    a gradient (failed here at 120 x 2.6 > 250), the step now the same depth for any count. The step's values:
    the gradients kept equal the optimizer's (SGD: lr x gradient = the deltas' change)."""
    import mindspore as ms

    class Deep(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layers = nn.CellList([nn.Dense(4, 4) for _ in range(40)])

        def construct(self, x):
            for layer in self.layers:
                x = layer(x)
            return (x * x).sum()

    before = ms.get_context("mode")
    ms.set_context(mode=0)
    ms.set_recursion_limit(250)
    try:
        net = pet_hooks.apply(Deep(), {"pet_type": "adalora", "init_r": 2, "target_r": 1, "total_step": 10,
                                       "tinit": 1, "tfinal": 2, "init_weights": False,
                                       "target_modules": r"layers\.\d+"})
        deltas = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
        opt = pet_hooks.adalora_optimizer(nn.SGD(net.trainable_params(), 0.5), net)
        nn.TrainOneStepCell(net, opt)(Tensor(np.ones((2, 4), np.float32)))
    finally:
        ms.set_recursion_limit(1000)
        ms.set_context(mode=before)
    grads = captured_gradients(net)
    assert len(grads) == 120
    for param in net.trainable_params():
        np.testing.assert_allclose(deltas[param.name] - param.asnumpy(), 0.5 * grads[param.name],
                                   rtol=1e-5, atol=1e-7, err_msg=param.name)
