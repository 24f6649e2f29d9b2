"""The tuner contract, the error types, and what ``import pet_hooks`` does (and does not) do."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing

import numpy as np
import pytest

import pet_hooks
from pet_hooks import errors
from pet_hooks.config import pet_config
from pet_hooks.config.methods import config_types, method
from pet_hooks.config.pet_config import BitFitConfig, PetConfig
from pet_hooks.tuners import PeftLayout, Tuner, all_tuners, get_tuner, peft_tuner
from pet_hooks.tuners.bitfit import BitFitTuner
from samples.tiny_gpt import build
from tests.conftest import ROOT

SMALL = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, seq_length=8)


# ----------------------------------------------------------------------------- the tuner contract
def test_every_pet_type_has_a_tuner_that_keeps_the_contract():
    # The configs pet_hooks ships, found by walking the module (not a list kept here): each is registered once.
    shipped = {cls.PET_TYPE for cls in vars(pet_config).values()
               if isinstance(cls, type) and issubclass(cls, PetConfig) and cls is not PetConfig}
    assert shipped == set(config_types()) == {t for tuner in all_tuners() for t in tuner.pet_types}
    for pet_type in config_types():
        tuner = get_tuner(pet_type)
        assert isinstance(tuner, Tuner) and not inspect.isabstract(type(tuner))
        assert tuner.label and pet_type in tuner.pet_types and method(pet_type).config_class.PET_TYPE == pet_type
    for tuner in all_tuners():
        if tuner.peft is not None:
            assert isinstance(tuner.peft, PeftLayout) and peft_tuner(tuner.peft.peft_type) is tuner
            # LoKr's tensors are all optional (bare_weights): a module holds one of four sets (issue 30 item 3)
            # prompt tuning's one tensor belongs to no module (whole_weights, issue 30 item 2)
            assert (tuner.peft.weights or tuner.peft.bare_weights or tuner.peft.whole_weights) and tuner.peft.tensor_sets()
    assert get_tuner("ptuning2") is get_tuner("prefixtuning")        # one tuner object per tuner path
    assert peft_tuner("IA3") is get_tuner("ia3") and peft_tuner("BOFT") is None
    with pytest.raises(errors.PetConfigError, match="unknown pet_type 'dora'"):
        get_tuner("dora")


def test_the_tuner_contract_has_no_file_format_members():
    """How files spell a method is its layout objects' (tuner.peft, tuner.mindformers), not the Tuner's."""
    members = [name for name in vars(Tuner) if not name.startswith("_")]
    assert not [name for name in members if "peft" in name and name != "peft"], members
    assert not [name for name in members if "mindformers" in name and name != "mindformers"], members


@dataclasses.dataclass
class _BiasOnlyConfig(BitFitConfig):
    """A user's own method for the registration test: BitFit under another name."""
    PET_TYPE: typing.ClassVar[str] = "bias_only"
    pet_type: str = "bias_only"


class _BiasOnlyTuner(BitFitTuner):
    label = "bias only"
    pet_types = ("bias_only",)


def test_one_call_registers_a_users_method(mode):
    pet_hooks.register_method(_BiasOnlyConfig, _BiasOnlyTuner())
    try:
        cfg = pet_hooks.load_config({"pet_type": "bias_only", "target_modules": ".*dense1"})
        assert isinstance(cfg, _BiasOnlyConfig) and "bias_only" in config_types()
        net = build(seed=0, **SMALL)
        before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
        pet_hooks.apply(net, cfg)
        assert isinstance(pet_hooks.surgery.get_state(net).tuner, _BiasOnlyTuner)
        trained = sorted(p.name for p in net.trainable_params())
        assert trained == sorted(name for name in before if name.endswith("dense1.bias")) and trained
        for param in net.trainable_params():                       # what training would do
            param.set_data(param + 1.0)
        pet_hooks.remove(net)
        assert all(np.array_equal(p.asnumpy(), before[p.name]) for p in net.get_parameters())
    finally:
        pet_hooks.unregister_method("bias_only")
    with pytest.raises(errors.PetConfigError, match="unknown pet_type 'bias_only'"):
        pet_hooks.load_config({"pet_type": "bias_only", "target_modules": ".*dense1"})


def test_a_registration_that_is_not_a_method_is_refused_naming_it():
    with pytest.raises(TypeError, match="not a config dataclass"):
        pet_hooks.register_method(dict, BitFitTuner())
    with pytest.raises(TypeError, match="'no_colon'"):
        pet_hooks.register_method(_BiasOnlyConfig, "no_colon")
    pet_hooks.register_method(_BiasOnlyConfig, BitFitTuner())          # its pet_types lack bias_only
    try:
        with pytest.raises(TypeError, match="register_method\\(_BiasOnlyConfig.*'bias_only'"):
            get_tuner("bias_only")
    finally:
        pet_hooks.unregister_method("bias_only")
    with pytest.raises(errors.PetConfigError, match="unknown pet_type 'nothing'"):
        pet_hooks.unregister_method("nothing")


def test_a_tuner_missing_part_of_the_contract_cannot_be_built():
    class Half(Tuner):
        pet_types = ("half",)

        def can_adapt(self, cell):
            return None
    with pytest.raises(TypeError):
        Half()


def test_switching_lora_writes_each_cells_scale_once(mode, monkeypatch):
    from pet_hooks.tuners.lora import tuner as lora
    net = pet_hooks.apply(build(seed=0, **SMALL), {"pet_type": "lora", "target_modules": ".*dense1|.*dense2|.*dense3"})
    state = pet_hooks.surgery.get_state(net)
    assert len(state.injections) == 6
    scales = [f"{record.path}.pet_lora_scale" for record in state.injections]
    writes = []
    real = lora.write_values
    monkeypatch.setattr(lora, "write_values", lambda param, value: writes.append(param.name) or real(param, value))
    with pet_hooks.disable_adapters(net):
        assert writes == scales
        assert not state.injections[0].cell.pet_lora_scale.asnumpy().any()
    assert writes == scales * 2
    on = state.injections[-1].cell.pet_lora_scale.asnumpy()
    assert on.shape == (8, 1) and np.allclose(on, 2.0)         # one value per rank row: r=8, scaling 16/8
    assert [p.name for p in pet_hooks.surgery.switch_parameters(net)] == scales


# ----------------------------------------------------------------------------- the error types
def test_errors_are_types_exported_and_keep_their_builtin_bases():
    for name in errors.__all__:
        assert getattr(pet_hooks, name) is getattr(errors, name) and name in pet_hooks.__all__
        assert issubclass(getattr(errors, name), errors.PetError)
    assert issubclass(errors.NoMatchError, errors.PetConfigError) and issubclass(errors.NoMatchError, ValueError)
    assert issubclass(errors.PetConfigTypeError, TypeError) and issubclass(errors.PetConfigTypeError, ValueError)
    assert issubclass(errors.AdapterNotFoundError, FileNotFoundError)
    for name in ("PetStateError", "AdapterFileError", "OptimizerRebuildError", "UnsupportedCellError"):
        assert issubclass(getattr(errors, name), ValueError), name


def test_each_error_is_raised_as_its_type(tmp_path):
    cfg = {"pet_type": "lora", "target_modules": ".*dense1"}
    with pytest.raises(errors.NoMatchError, match="'.*nothing' matches no cell"):
        pet_hooks.apply(build(seed=0, **SMALL), {**cfg, "target_modules": ".*nothing"})
    with pytest.raises(errors.UnsupportedCellError, match="which this method cannot adapt"):
        pet_hooks.apply(build(seed=0, **SMALL), {**cfg, "target_modules": ".*ln1"})
    with pytest.raises(errors.PetStateError, match="has no PET applied"):
        pet_hooks.merge(build(seed=0, **SMALL))
    with pytest.raises(errors.AdapterNotFoundError, match="adapter directory not found"):
        pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "none")
    (tmp_path / "adapter_config.json").write_text("{")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(errors.AdapterFileError, match="not a readable JSON file"):
        pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path)


def test_enable_skips_models_no_pattern_matches_but_not_other_errors():
    from mindspore import nn
    with pet_hooks.enable({"pet_type": "lora", "target_modules": ".*dense1"}) as session:
        nn.SequentialCell([nn.ReLU()])                                  # no parameters: not a model
        other = nn.SequentialCell([nn.Dense(2, 2)])                     # .*dense1 matches no cell: skipped
        gpt = build(seed=0, **SMALL)
    assert session.models == [gpt] and not pet_hooks.surgery.has_pet(other)
    kept = []  # enable() holds the models built in it weakly
    with pytest.raises(errors.PetConfigError, match="excludes all of them"):
        with pet_hooks.enable({"pet_type": "lora", "target_modules": ".*dense1", "exclude_layers": ".*blocks.*"}):
            kept.append(build(seed=0, **SMALL))


# ----------------------------------------------------------------------------- import pet_hooks
def test_import_is_lazy_and_patches_nothing_until_a_door_needs_it():
    code = (
        "import sys\n"
        "import pet_hooks\n"
        "assert 'mindspore' not in sys.modules, 'import pet_hooks imported mindspore'\n"
        "from pet_hooks import *\n"
        "assert 'mindspore' in sys.modules and callable(apply) and PetError\n"
        "from mindspore import nn\n"
        "from pet_hooks.training import recorder\n"
        "assert not recorder.is_installed() and '__new__' not in nn.Optimizer.__dict__\n"
        "assert '__init__' not in nn.Optimizer.__dict__ or not hasattr(nn.Optimizer.__init__, '_pet_hooks_patched')\n"
        "callback = PetCallback({'pet_type': 'lora', 'target_modules': '.*'})\n"
        "assert recorder.is_installed()\n"
        "opt = nn.Momentum(nn.Dense(2, 2).trainable_params(), 0.1, momentum=0.7)\n"
        "assert recorder.recorded_arguments(opt)[1] == {'momentum': 0.7}\n"
        "recorder.uninstall()\n"
        "assert '__new__' not in nn.Optimizer.__dict__ and not recorder.is_installed()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        pet_hooks.no_such_name  # pylint: disable=pointless-statement
    assert np.isclose(pet_hooks.LoraConfig(target_modules="x").scaling, 2.0)


def test_docs_layout_names_every_module_of_the_package():
    """docs/layout.md is the tree with one line per module: a module added without its line fails here."""
    import glob
    import os
    with open(os.path.join(ROOT, "docs", "layout.md"), encoding="utf-8") as handle:
        layout = handle.read()
    modules = [path for path in glob.glob(os.path.join(ROOT, "pet_hooks", "**", "*.py"), recursive=True)
               if os.path.basename(path) != "__init__.py"]
    assert len(modules) > 50
    missing = [os.path.relpath(path, ROOT) for path in modules if os.path.basename(path) not in layout]
    assert not missing, missing
