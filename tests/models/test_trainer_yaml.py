"""MindFormers' Trainer on the CPU from a run YAML (issue 25, item 2), with MindFormers' own PET (no door open).

* ``PetTrainOneStepCell`` (pet_hooks/training/mindformers_trainer.py), the CPU counterpart of MindFormers'
  ``MFTrainOneStepCell``: its loss scale, clipping, overflow skip, learning-rate output and
  per-token loss against NumPy on a one-layer net; its registration; its settings errors.
* The three run YAMLs (samples/configs/run_llama_{lora,ptuning2,prefixtuning}_cpu.yaml) read by
  ``pet_hooks.load_config`` and by MindFormers' ``MindFormerConfig``.
* ``Trainer(args=yaml, task="text_generation", train_dataset=ds).train()`` / ``.finetune(...)`` on each
  YAML in graph and PyNative mode, resume, the strategy-checkpoint settings, and the parity helper
  (tests/trainer_yaml.py) whose first loss must be the base model's with the LoRA merged by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from tests.conftest import NEEDS_MINDFORMERS, ROOT

pytestmark = NEEDS_MINDFORMERS
CONFIGS = os.path.join(ROOT, "samples", "configs")
METHODS = ("lora", "ptuning2", "prefixtuning")


def yaml_of(method: str) -> str:
    return os.path.join(CONFIGS, f"run_llama_{method}_cpu.yaml")


# ----------------------------------------------------------------------------- the train step
class Linear(nn.Cell):
    """y = x W^T + b with a mean squared error: the step's arithmetic is checked against NumPy on it."""

    def __init__(self, per_token: bool = False):
        super().__init__()
        self.dense = nn.Dense(3, 2, weight_init=Tensor(np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], np.float32)),
                              bias_init=Tensor(np.array([0.1, -0.2], np.float32)))
        self.per_token = per_token

    def construct(self, x, y):
        err = (self.dense(x) - y) ** 2
        if self.per_token:       # (sum, count), as MindFormers' calculate_per_token_loss networks return
            return err.sum(), ms.ops.cast(ms.ops.size(err), ms.float32)
        return err.mean()


X = np.array([[1.0, 2.0, -1.0], [0.5, -3.0, 4.0], [2.0, 0.0, 1.0], [-1.0, 1.0, 1.0]], np.float32)
Y = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]], np.float32)


def numpy_step(w, b, x=X, y=Y):
    """Loss, dL/dW, dL/db of mean((x W^T + b - y)^2) and the sum-form numerator/denominator."""
    err = x @ w.T + b - y
    n = err.size
    return float((err ** 2).mean()), 2 * err.T @ x / n, 2 * err.sum(0) / n


def _step(cell, *args):
    outputs = cell(*args)
    return [None if o is None else np.asarray(o.asnumpy()) for o in outputs]


def _weights(net):
    return net.dense.weight.asnumpy().copy(), net.dense.bias.asnumpy().copy()


def test_plain_step_unscales_the_gradient_and_returns_what_mindformers_callbacks_read(mode):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    w0, b0 = _weights(net)
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), scale_sense=1024.0)
    loss, overflow, scale, lr, norm = _step(step, Tensor(X), Tensor(Y))
    ref_loss, gw, gb = numpy_step(w0, b0)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
    assert not overflow and float(scale) == 1024.0 and float(lr) == pytest.approx(0.1) and norm is None
    w1, b1 = _weights(net)          # the 1024 loss scale is divided out again: a plain SGD step
    np.testing.assert_allclose(w1, w0 - 0.1 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b1, b0 - 0.1 * gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1000.0], ids=["clipped", "under_the_norm"])
def test_global_norm_clipping_is_mindformers(mode, max_norm):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    w0, b0 = _weights(net)
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), use_clip_grad=True,
                               max_grad_norm=max_norm, scale_sense=8.0)
    _, overflow, _, _, norm = _step(step, Tensor(X), Tensor(Y))
    _, gw, gb = numpy_step(w0, b0)
    global_norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    assert global_norm > 0.5 and not overflow
    assert float(norm) == pytest.approx(global_norm, rel=1e-5)     # the norm before clipping, unscaled
    # MindFormers' ClipGradNorm: g * min(1, max / (max(norm, max) + 1e-6))
    coefficient = min(1.0, max_norm / (max(global_norm, max_norm) + 1e-6))
    w1, b1 = _weights(net)
    np.testing.assert_allclose(w1, w0 - 0.1 * coefficient * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b1, b0 - 0.1 * coefficient * gb, rtol=1e-5, atol=1e-6)


def test_overflow_skips_the_step_and_the_dynamic_loss_scale_drops(mode):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    w0, b0 = _weights(net)
    manager = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0 ** 127, scale_factor=2.0 ** 120, scale_window=1000)
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), scale_sense=manager)
    loss, overflow, scale, _, _ = _step(step, Tensor(X), Tensor(Y))     # 2^127 * gradient: inf in float32
    assert overflow and float(scale) == 2.0 ** 127                      # the scale this step ran with
    assert float(step.scale_sense.asnumpy()) == 2.0 ** 7                # halved by the factor for the next one
    for before, after in zip((w0, b0), _weights(net)):                  # no optimizer step
        np.testing.assert_array_equal(after, before)
    _, overflow, scale, _, _ = _step(step, Tensor(X), Tensor(Y))
    _, gw, _ = numpy_step(w0, b0)
    assert not overflow and float(scale) == 2.0 ** 7
    np.testing.assert_allclose(_weights(net)[0], w0 - 0.1 * gw, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(loss))


def test_the_learning_rate_output_is_the_rate_of_the_step(mode):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=[0.1, 0.05, 0.02]))
    for rate in (0.1, 0.05, 0.02):           # a dynamic learning rate: each step reports and uses its own
        w0, b0 = _weights(net)
        _, gw, gb = numpy_step(w0, b0)
        assert float(_step(step, Tensor(X), Tensor(Y))[3]) == pytest.approx(rate)
        np.testing.assert_allclose(_weights(net)[0], w0 - rate * gw, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_weights(net)[1], b0 - rate * gb, rtol=1e-5, atol=1e-6)


def test_per_token_loss_divides_by_the_token_count(mode):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear(per_token=True)
    w0, b0 = _weights(net)
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), scale_sense=4.0,
                               calculate_per_token_loss=True)
    loss, overflow, _, _, _ = _step(step, Tensor(X), Tensor(Y))
    ref_loss, gw, gb = numpy_step(w0, b0)           # sum / count is the mean: the same step as the mean loss
    assert float(loss) == pytest.approx(ref_loss, rel=1e-6) and not overflow
    np.testing.assert_allclose(_weights(net)[0], w0 - 0.1 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_weights(net)[1], b0 - 0.1 * gb, rtol=1e-5, atol=1e-6)


def test_a_gradient_norm_spike_skips_the_step(mode):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    w0, _ = _weights(net)
    step = PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), use_clip_grad=True,
                               use_skip_data_by_global_norm=True, global_norm_spike_threshold=0.5)
    _, overflow, _, _, norm = _step(step, Tensor(X), Tensor(Y))
    assert not overflow and float(norm) > 0.5
    np.testing.assert_array_equal(_weights(net)[0], w0)


@pytest.mark.parametrize("kwargs, words", [
    ({"local_norm": True}, "local_norm"),
    ({"grouped_lr_scheduler": [{"lr_scheduler": None}]}, "grouped_lr_scheduler"),
    ({"scale_sense": "1024"}, "scale_sense"),
    ({"scale_sense": 0}, "scale_sense"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"use_skip_data_by_global_norm": True}, "use_clip_grad"),
], ids=["local_norm", "grouped_lr", "scale_type", "scale_zero", "max_norm", "skip_without_clip"])
def test_settings_it_does_not_reproduce_are_one_error_naming_them(kwargs, words):
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    net = Linear()
    with pytest.raises((ValueError, TypeError), match=words):
        PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1), **kwargs)


def test_mcore_models_are_refused(monkeypatch):
    import importlib
    from pet_hooks.training.mindformers_trainer import PetTrainOneStepCell
    # (the package exports a function of the module's name: fetch the module itself)
    mf_context = importlib.import_module("mindformers.core.context.build_context")
    monkeypatch.setattr(mf_context, "is_legacy_model", lambda: False)
    net = Linear()
    with pytest.raises(ValueError, match="use_legacy: False"):
        PetTrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1))


# ----------------------------------------------------------------------------- registration
def test_register_is_idempotent_and_mindformers_builds_it_with_the_trainers_arguments():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from mindformers.wrapper import build_wrapper
    from pet_hooks.training import mindformers_trainer as cpu_step
    assert cpu_step.register() == cpu_step.register() == "PetTrainOneStepCell" == cpu_step.NAME
    assert cpu_step.registered_class() is cpu_step.PetTrainOneStepCell
    assert MindFormerRegister.get_cls(MindFormerModuleType.WRAPPER, "PetTrainOneStepCell") is \
        cpu_step.PetTrainOneStepCell
    net = Linear()
    optimizer = nn.SGD(net.trainable_params(), learning_rate=0.1)
    # What BaseTrainer.create_model_wrapper passes (mindformers/trainer/base_trainer.py), from a YAML block.
    wrapper = build_wrapper({"type": "PetTrainOneStepCell", "scale_sense": 4, "use_clip_grad": True,
                             "max_grad_norm": 2.0},
                            default_args={"network": net, "optimizer": optimizer, "parallel_config": None,
                                          "calculate_per_token_loss": False, "global_norm_spike_threshold": 1.0,
                                          "print_separate_loss": True, "use_skip_data_by_global_norm": False,
                                          "lr_scheduler": None, "grouped_lr_scheduler": None})
    assert isinstance(wrapper, cpu_step.PetTrainOneStepCell)
    assert float(wrapper.scale_sense.asnumpy()) == 4.0 and wrapper.use_clip_grad and wrapper.max_grad_norm == 2.0
    dynamic = build_wrapper({"type": "PetTrainOneStepCell", "scale_sense": {
        "type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024, "scale_factor": 2, "scale_window": 10}},
        default_args={"network": net, "optimizer": optimizer})
    assert isinstance(dynamic.loss_scaling_manager, nn.DynamicLossScaleUpdateCell)


def test_register_refuses_to_replace_someone_elses_wrapper():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    from pet_hooks.training import mindformers_trainer as cpu_step
    cpu_step.register()
    other = type("PetTrainOneStepCell", (nn.TrainOneStepCell,), {"__module__": "somebody.else"})
    MindFormerRegister.register_cls(other, MindFormerModuleType.WRAPPER)
    try:
        with pytest.raises(ValueError, match="somebody.else.PetTrainOneStepCell"):
            cpu_step.register()
    finally:
        MindFormerRegister.register_cls(cpu_step.PetTrainOneStepCell, MindFormerModuleType.WRAPPER)
    assert cpu_step.registered_class() is cpu_step.PetTrainOneStepCell


def test_importing_pet_hooks_or_the_wrapper_module_does_not_import_mindformers():
    code = textwrap.dedent("""
        import sys
        import pet_hooks, pet_hooks.training.mindformers_trainer
        assert 'mindformers' not in sys.modules, 'mindformers imported'
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------- the run YAMLs
EXPECTED = {
    "lora": {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "target_modules": ".*wq|.*wk|.*wv|.*wo"},
    "ptuning2": {"pet_type": "ptuning2", "pre_seq_len": 16, "prefix_projection": False},
    "prefixtuning": {"pet_type": "prefixtuning", "prefix_token_num": 16, "mid_dim": 128},
}
# The sections MindFormers' own legacy fine-tune YAML has (configs/glm4/finetune_glm4_9b.yaml in the wheel).
SECTIONS = ("seed", "run_mode", "output_dir", "load_checkpoint", "auto_trans_ckpt", "resume_training", "context",
            "model", "trainer", "train_dataset", "train_dataset_task", "runner_config", "runner_wrapper",
            "lr_schedule", "optimizer", "use_parallel", "parallel", "parallel_config", "recompute_config",
            "callbacks")


@pytest.mark.parametrize("method", METHODS)
def test_each_run_yaml_loads_in_pet_hooks_and_in_mindformers(method, caplog):
    from mindformers import MindFormerConfig
    from pet_hooks.training.mindformers_trainer import NAME
    cfg = pet_hooks.load_config(yaml_of(method))
    for key, value in EXPECTED[method].items():
        assert getattr(cfg, key) == value, key
    assert cfg.model_hints == {"num_layers": 2, "num_heads": 4, "hidden_size": 64}
    assert not [r for r in caplog.records if "only_trainable_params" in r.getMessage()]   # the rule is kept

    config = MindFormerConfig(yaml_of(method))
    assert all(config.get(section) is not None for section in SECTIONS), \
        [section for section in SECTIONS if config.get(section) is None]
    assert config.trainer.type == "CausalLanguageModelingTrainer" and config.model.arch.type == "LlamaForCausalLM"
    assert config.runner_wrapper.type == NAME and config.runner_config.sink_mode is False
    assert (config.context.mode, config.context.device_target) == (0, "CPU")
    assert config.parallel.strategy_ckpt_config.only_trainable_params is False
    assert [c["type"] for c in config.callbacks] == ["MFLossMonitor", "CheckpointMonitor"]
    model = config.model.model_config
    assert (model.hidden_size, model.num_layers, model.vocab_size, model.seq_length) == (64, 2, 256, 32)
    assert (model.use_flash_attention, model.use_rope_slice, model.fused_rms_norm) == (False, True, False)
    assert model.compute_dtype == model.param_init_type == "float32"
    assert config.runner_config.batch_size == model.batch_size
    assert config.seed, "seed: 0 makes MindFormers' Trainer set no seed"


# ----------------------------------------------------------------------------- the Trainer
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint of the plain tiny Llama (no PET), as ms.save_checkpoint writes it."""
    from tests.trainer_yaml import base_checkpoint
    return base_checkpoint(yaml_of("lora"), str(tmp_path_factory.mktemp("base") / "base.ckpt"))


def _merged_base_loss(base_path, values, batch, mode):
    """The loss of the plain Llama from ``base_path`` with every LoRA pair merged by hand (W + alpha/r B A)."""
    from tests.trainer_yaml import plain_llama, read_yaml
    pet = read_yaml(yaml_of("lora"))["model"]["model_config"]["pet_config"]
    scaling = pet["lora_alpha"] / pet["lora_rank"]
    before = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        net = plain_llama(yaml_of("lora"), seed=7)      # another seed: every value comes from the checkpoint
        not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(base_path))
        assert not not_loaded
        params = {p.name: p for p in net.get_parameters()}
        for key, a in values.items():
            if key.endswith(".lora_A"):
                cell = key[: -len(".lora_A")]
                weight = params[cell + ".weight"]
                weight.set_data(Tensor(weight.asnumpy() + scaling * values[cell + ".lora_B"] @ a))
        net.set_train(True)
        return float(net(batch).asnumpy())
    finally:
        ms.set_context(mode=before)


def test_the_parity_reference_starts_from_the_given_base_and_lora_values(mode, base, tmp_path):
    """run_trainer with a base checkpoint and LoRA values: its first loss is the merged model's, computed
    without MindFormers' PET; the process state the Trainer changes comes back."""
    from tests.trainer_yaml import lora_values, run_trainer, token_dataset
    values = lora_values(yaml_of("lora"), seed=1)
    strategy_before = dict(ms.get_auto_parallel_context("strategy_ckpt_config"))
    env_before = os.environ.get("LOCAL_DEFAULT_PATH")
    run = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=3), str(tmp_path / "out"), mode=mode,
                      initial_values=values, finetune_checkpoint=base)
    assert ms.get_context("mode") == mode
    assert dict(ms.get_auto_parallel_context("strategy_ckpt_config")) == strategy_before
    assert os.environ.get("LOCAL_DEFAULT_PATH") == env_before
    assert len(run.losses) == 3 and not any(run.overflow)
    # MindFormers' own LoRA took the values under its own names
    assert run.written["model.layers.1.attention.wo.lora_B"] == "model.layers.1.attention.wo.mindpet_delta_lora_b"
    batch = next(token_dataset(yaml_of("lora"), steps=3).create_tuple_iterator())[0]
    assert run.losses[0] == pytest.approx(_merged_base_loss(base, values, batch, mode), rel=1e-6)
    assert run.losses[1] != run.losses[0]


def test_initial_values_that_name_no_parameter_or_have_another_shape_are_refused(base, tmp_path):
    from tests.trainer_yaml import lora_values, run_trainer, token_dataset
    values = lora_values(yaml_of("lora"), seed=1)
    with pytest.raises(KeyError, match=r"model.layers.0.attention.q_proj.lora_A.*no parameter"):
        run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "a"),
                    initial_values={"model.layers.0.attention.q_proj.lora_A": values[
                        "model.layers.0.attention.wq.lora_A"]})
    with pytest.raises(ValueError, match=r"wq.lora_A'\] has shape \(4, 64\).*\(8, 64\)"):
        run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "b"),
                    initial_values={"model.layers.0.attention.wq.lora_A": np.zeros((4, 64), np.float32)})


@pytest.mark.parametrize("method", METHODS)
def test_trainer_runs_each_yaml_with_mindformers_pet(method, mode, base, tmp_path):
    """``.finetune(finetune_checkpoint=base)``: the base weights are the checkpoint's and stay so, the
    deltas move, MindFormers' callbacks write their checkpoints into output_dir."""
    from tests.trainer_yaml import run_trainer, token_dataset
    # two steps: the deltas move at the first two (LoRA's A at the second, once B is not zero), and end before
    # the fifth, so the checkpoint written is the end's alone
    run = run_trainer(yaml_of(method), token_dataset(yaml_of(method), steps=2), str(tmp_path / "out"), mode=mode,
                      finetune_checkpoint=base)
    assert len(run.losses) == 2 and all(np.isfinite(run.losses)) and not any(run.overflow)
    saved = {name: value.asnumpy() for name, value in ms.load_checkpoint(base).items()}
    for name, value in saved.items():                  # every base weight loaded and left alone
        np.testing.assert_array_equal(run.parameters[name], value, err_msg=name)
    deltas = sorted(set(run.trainable) - set(saved))
    assert deltas and sorted(run.trainable) == deltas  # only MindFormers' PET parameters train
    assert all("mindpet_delta" in name or "prefix" in name for name in deltas), deltas
    # saved every 5 steps and when training ends: after 2 steps, the end's
    assert sorted(os.listdir(os.path.join(run.output_dir, "checkpoint", "rank_0"))) == [
        f"llama_{method}_rank_0-1_2.ckpt", "meta.json"]
    final = ms.load_checkpoint(os.path.join(run.output_dir, "checkpoint", "rank_0", f"llama_{method}_rank_0-1_2.ckpt"))
    for name in deltas:                                 # the checkpoint holds the trained deltas, by name
        np.testing.assert_array_equal(final[name].asnumpy(), run.trainable[name], err_msg=name)
    if method == "lora":                                # MindFormers' LoRA writes a PEFT-style config there
        assert os.path.isfile(os.path.join(run.output_dir, "adapter_config.json"))


def test_graph_and_pynative_give_the_same_ten_losses(lora_runs):
    """The module's ten-step LoRA runs (the YAML's seeded start, shared with the resume tests instead of three
    runs of its own; a start from given values is checked in both modes by the parity-reference test)."""
    graph, pynative = lora_runs("whole", 0), lora_runs("whole", 1)
    assert len(graph.losses) == 10 and graph.losses[-1] != graph.losses[0]
    np.testing.assert_allclose(pynative.losses, graph.losses, rtol=1e-5)
    again = lora_runs("cut", 0)                          # a second Trainer in the same process: the same run
    assert again.losses == graph.losses[:7]              # (up to where it stops)


def test_train_without_a_checkpoint_is_seeded_by_the_yaml(lora_runs, tmp_path):
    """``.train()`` from scratch twice: MindFormers seeds the model from the YAML's ``seed``. (The two runs
    from scratch with the YAML's seed: the module's uninterrupted and interrupted graph-mode runs.)"""
    from tests.trainer_yaml import run_trainer, token_dataset
    first, second = lora_runs("whole", 0).losses, lora_runs("cut", 0).losses
    other_seed = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "c"),
                             overrides={"seed": 7}).losses
    assert first[:7] == second                         # the same model, the same batches: the same losses
    # another seed, another initial model: another first loss (on the same first batch: token_dataset draws rows
    # in order, so its first batch does not depend on `steps`)
    assert other_seed[0] != first[0]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(kind, mode) -> the YAML's ten-step LoRA run from scratch: "whole" uninterrupted, "cut" the same run
    interrupted after step 7 (CheckpointMonitor saved steps 5 and 7), each trained once per mode and shared
    by the tests that only read them (the resume variants, the load_checkpoint and refused-file tests: each
    trains into an output_dir of its own), so training them again for every test would only repeat the same
    seeded runs."""
    from tests.trainer_yaml import StopAfter, run_trainer, token_dataset
    runs = {}

    def get(kind, mode=0):
        if (kind, mode) not in runs:
            root = tmp_path_factory.mktemp(f"{kind}_mode{mode}")
            callbacks = {"whole": [], "cut": [StopAfter(7)]}[kind]
            runs[kind, mode] = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora")), str(root / kind),
                                           mode=mode, callbacks=callbacks)
        return runs[kind, mode]
    return get


@pytest.fixture(scope="module")
def whole_and_cut(lora_runs):
    """mode -> (the uninterrupted ten-step run, the same run interrupted after step 7)."""
    return lambda mode: (lora_runs("whole", mode), lora_runs("cut", mode))


# The way the checkpoint is named does not depend on the mode (the Trainer reads files before it builds a
# graph): each mode resumes once, graph mode from meta.json's step, PyNative from a named file.
@pytest.mark.parametrize("mode_, how", [(0, "meta_json"), (1, "file_name")], ids=["graph-meta_json", "pynative-file_name"])
def test_resume_training_continues_an_interrupted_run_exactly(mode_, how, whole_and_cut, tmp_path):
    """Interrupted after step 7 (CheckpointMonitor saved steps 5 and 7), resumed from the run's own
    checkpoint folder: the remaining losses and the final model are the uninterrupted run's."""
    from tests.trainer_yaml import run_trainer, token_dataset
    mode = mode_
    whole, cut = whole_and_cut(mode)
    folder = os.path.join(cut.output_dir, "checkpoint")
    assert sorted(os.listdir(os.path.join(folder, "rank_0"))) == [
        "llama_lora_rank_0-1_5.ckpt", "llama_lora_rank_0-1_7.ckpt", "meta.json"]
    # True: the checkpoint meta.json names (step 7); a file name: that checkpoint (step 5)
    resume, start = (True, 7) if how == "meta_json" else ("llama_lora_rank_0-1_5.ckpt", 5)
    resumed = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora")), str(tmp_path / "resumed"), mode=mode,
                          overrides={"resume_training": resume, "load_checkpoint": folder})
    assert cut.losses == whole.losses[:7]
    assert resumed.losses == whole.losses[start:]        # data skipped, deltas and optimizer state reloaded
    for name, value in whole.parameters.items():
        np.testing.assert_array_equal(resumed.parameters[name], value, err_msg=name)


@pytest.mark.parametrize("where", ["file", "folder"])
def test_load_checkpoint_of_a_trained_run_loads_its_deltas_by_name(where, lora_runs, tmp_path):
    """``load_checkpoint`` without resume_training: the run's own checkpoint (file, or the checkpoint
    folder) goes into the new model by parameter name, the deltas included; training starts over.
    (The trained run is the module's interrupted one: its folder holds steps 5 and 7, its meta.json names 7.)"""
    from tests.trainer_yaml import run_trainer, token_dataset
    first = lora_runs("cut")
    folder = os.path.join(first.output_dir, "checkpoint")
    path = os.path.join(folder, "rank_0", "llama_lora_rank_0-1_7.ckpt") if where == "file" else folder
    from tests.trainer_yaml import AtTrainBegin
    seen = AtTrainBegin()
    again = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "again"),
                        overrides={"load_checkpoint": path}, callbacks=[seen])
    assert sorted(seen.values) == sorted(first.parameters)
    for name, value in first.parameters.items():
        np.testing.assert_array_equal(seen.values[name], value, err_msg=name)
    assert again.losses[0] != first.losses[0]


def test_resume_from_a_checkpoint_file_is_refused_by_mindformers(lora_runs, tmp_path):
    """MindFormers 1.9 wants the checkpoint folder: a file fails its Hugging Face check. If this starts
    passing, the note in the report and the YAML comments are stale. (The file: step 5's of the module's
    interrupted run.)"""
    from tests.trainer_yaml import run_trainer, token_dataset
    first = lora_runs("cut")
    ckpt = os.path.join(first.output_dir, "checkpoint", "rank_0", "llama_lora_rank_0-1_5.ckpt")
    assert os.path.isfile(ckpt)
    with pytest.raises(ValueError, match="checkpoint_path is not a directory"):
        run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=5), str(tmp_path / "again"),
                    overrides={"resume_training": True, "load_checkpoint": ckpt})


@pytest.mark.parametrize("wrapper, error, words", [
    ("MFTrainOneStepCell", RuntimeError, "NPUGetFloatStatusV2"),
    ("TrainOneStepCell", TypeError, "unexpected keyword argument 'scale_sense'"),
])
def test_the_wrappers_mindformers_offers_do_not_run_on_the_cpu(wrapper, error, words, tmp_path):
    """Why PetTrainOneStepCell exists: if this starts passing, the YAMLs' comment is stale."""
    from tests.trainer_yaml import run_trainer, token_dataset
    with pytest.raises(error, match=words):
        run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "out"),
                    overrides={"runner_wrapper.type": wrapper})


def test_stand_alone_the_yaml_strategy_settings_do_not_reach_mindspore(tmp_path):
    """use_parallel: False (one CPU process): MindFormers applies no ``parallel`` block; its Trainer only
    points the strategy save_file into output_dir, and no strategy file is written."""
    from tests.trainer_yaml import run_trainer, token_dataset
    before = dict(ms.get_auto_parallel_context("strategy_ckpt_config"))
    seen = {}

    class Look(ms.train.Callback):
        def on_train_begin(self, run_context):
            seen.update(ms.get_auto_parallel_context("strategy_ckpt_config"))

    run = run_trainer(yaml_of("lora"), token_dataset(yaml_of("lora"), steps=1), str(tmp_path / "out"),
                      overrides={"parallel.strategy_ckpt_config.only_trainable_params": True}, callbacks=[Look()])
    assert seen["save_file"] == os.path.join(run.output_dir, "strategy", "ckpt_strategy_rank_0.ckpt")
    assert seen["only_trainable_params"] == before["only_trainable_params"]
    assert os.listdir(os.path.join(run.output_dir, "strategy")) == []


DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mindspore as ms
    from mindformers import MindFormerConfig, Trainer, build_context
    from mindspore.communication import get_rank
    sys.path.insert(0, {root!r})
    import pet_hooks.training.mindformers_trainer as cpu_step
    from tests.trainer_yaml import LossRecorder, token_dataset
    ms.set_device("CPU")
    cpu_step.register()
    build_context(MindFormerConfig(sys.argv[1]))            # use_parallel: True -> init() and the parallel block
    recorder = LossRecorder()
    trainer = Trainer(args=sys.argv[1], task="text_generation", train_dataset=token_dataset(sys.argv[1], 3,
                      seed=get_rank()), callbacks=[recorder])
    trainer.train()
    state = {{"rank": get_rank(), "mode": ms.get_auto_parallel_context("parallel_mode"),
             "strategy": ms.get_auto_parallel_context("strategy_ckpt_config"), "losses": recorder.losses,
             "trainable": sorted(p.name for p in trainer.trainer.network.trainable_params())}}
    print("STATE " + json.dumps(state), flush=True)
""")


def test_data_parallel_under_msrun_applies_the_strategy_settings_mindformers_pet_does_not_enforce(tmp_path):
    """use_parallel: True under msrun (two CPU processes, data parallel): the YAML's strategy_ckpt_config
    reaches MindSpore as written. MindFormers' own PET keeps only_trainable_params: True when the YAML says
    so (the rule pet_hooks enforces at apply is not MindFormers')."""
    import json
    import yaml
    from tests.trainer_yaml import read_yaml
    doc = read_yaml(yaml_of("lora"))
    doc.update(use_parallel=True, output_dir=str(tmp_path / "out"))
    doc["parallel"]["strategy_ckpt_config"]["only_trainable_params"] = True
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    script = tmp_path / "train.py"
    script.write_text(DP_SCRIPT.format(root=ROOT))
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    out = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2", "--master_port=8247", "--join=True",
                          f"--log_dir={tmp_path / 'msrun_log'}", str(script), str(run_yaml)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    states = []
    for rank in (0, 1):
        log = (tmp_path / "msrun_log" / f"worker_{rank}.log").read_text()
        states += [json.loads(line.split("STATE ", 1)[1]) for line in log.splitlines() if "STATE " in line]
    assert out.returncode == 0 and len(states) == 2, out.stdout[-3000:] + out.stderr[-3000:]
    for state in states:
        assert state["mode"] == "data_parallel" and len(state["losses"]) == 3
        assert state["strategy"]["only_trainable_params"] is True
        assert state["strategy"]["save_file"].endswith(f"strategy/ckpt_strategy_rank_{state['rank']}.ckpt")
        assert all("mindpet_delta_lora" in name for name in state["trainable"]) and len(state["trainable"]) == 16
