"""The strategy-checkpoint rule: with PET, ``strategy_ckpt_config.only_trainable_params`` is False.

Through every front door (apply, PetCallback, enable, pet-hooks run), in both modes; ``remove``
gives the user's value back; a run YAML that sets it true is warned about when it is read.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from pet_hooks import cli
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, LMLoss, build
from tests.conftest import ROOT, SMALL
from tests.nets import TwoDense

CFG = {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*dense1"}
GPT_CFG = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3"}
KEY = "only_trainable_params"


def _strategy() -> dict:
    return ms.get_auto_parallel_context("strategy_ckpt_config")


@pytest.fixture
def user_strategy(tmp_path):
    """The user's context: strategy files set and only_trainable_params True; reset afterwards."""
    files = {"save_file": str(tmp_path / "strategy_out.ckpt"), "load_file": str(tmp_path / "strategy_in.ckpt")}
    ms.set_auto_parallel_context(strategy_ckpt_config={**files, KEY: True})
    yield files
    ms.reset_auto_parallel_context()


def _rule_warnings(caplog) -> list:
    return [r for r in caplog.records if r.levelno == logging.WARNING and KEY in r.getMessage()]


def test_apply_turns_the_flag_off_and_remove_puts_it_back(mode, user_strategy, caplog):
    net = TwoDense()
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.apply(net, CFG)
    assert _strategy() == {**user_strategy, KEY: False}
    warnings = _rule_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "converted" in warnings[0].getMessage() and "merged" in warnings[0].getMessage()  # it says why
    net(Tensor(ms.numpy.ones((2, 6), ms.float32)))
    pet_hooks.remove(net)
    assert _strategy() == {**user_strategy, KEY: True}


def test_each_remove_undoes_its_own_apply(mode, user_strategy):
    first, second = TwoDense(), TwoDense()
    pet_hooks.apply(first, CFG)                      # True -> False
    pet_hooks.apply(second, CFG)                     # already False: changes nothing
    pet_hooks.remove(second)
    assert _strategy()[KEY] is False
    pet_hooks.remove(first)
    assert _strategy()[KEY] is True


def test_a_user_false_is_left_alone(mode, tmp_path, caplog):
    ms.set_auto_parallel_context(strategy_ckpt_config={"save_file": str(tmp_path / "s.ckpt"), KEY: False})
    try:
        net = TwoDense()
        with caplog.at_level(logging.WARNING, logger="pet_hooks"):
            pet_hooks.apply(net, CFG)
            pet_hooks.remove(net)
        assert _strategy()[KEY] is False and not _rule_warnings(caplog)
    finally:
        ms.reset_auto_parallel_context()


def test_callback_fixes_the_context(mode, user_strategy):
    net = build(seed=0, **SMALL)
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    data = ds.GeneratorDataset([next(batches) for _ in range(2)], ["ids", "labels"], shuffle=False)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    assert _strategy()[KEY] is True
    model.train(1, data, callbacks=[pet_hooks.PetCallback(GPT_CFG)])
    assert pet_hooks.delta_parameters(net) and _strategy() == {**user_strategy, KEY: False}


def test_enable_fixes_the_context(mode, user_strategy):
    with pet_hooks.enable(GPT_CFG):
        net = build(seed=0, **SMALL)
        step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
        assert _strategy()[KEY] is False                 # fixed when the optimizer was built
        step(*map(Tensor, next(lm_batches(8, 4, seed=2))))
    assert _strategy() == {**user_strategy, KEY: False}


RUN_YAML = """\
parallel:
  parallel_mode: 0
  strategy_ckpt_config:
    save_file: "{save}"
    only_trainable_params: true
model:
  model_config:
    pet_config:
      pet_type: lora
      lora_rank: 4
      target_modules: ".*dense1|.*dense3"
"""


def _run_yaml(tmp_path) -> str:
    path = tmp_path / "run_gpt_lora.yaml"
    path.write_text(RUN_YAML.format(save=tmp_path / "strategy.ckpt"))
    return str(path)


def test_load_config_and_check_config_warn_naming_key_and_file(tmp_path, caplog, capsys):
    path = _run_yaml(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.load_config(path)
    (message,) = [r.getMessage() for r in _rule_warnings(caplog)]
    assert "parallel.strategy_ckpt_config.only_trainable_params" in message and path in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        assert cli.main(["check-config", path]) == 0
    (message,) = [r.getMessage() for r in _rule_warnings(caplog)]
    assert path in message and "parallel.strategy_ckpt_config.only_trainable_params" in message
    assert '"pet_type": "lora"' in capsys.readouterr().out


def test_a_run_yaml_without_the_flag_is_quiet(tmp_path, caplog):
    path = tmp_path / "quiet.yaml"
    path.write_text(RUN_YAML.replace("only_trainable_params: true", "only_trainable_params: false")
                    .format(save=tmp_path / "s.ckpt"))
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        pet_hooks.load_config(str(path))
    assert not _rule_warnings(caplog)


SCRIPT = """\
import sys, yaml
import mindspore as ms
from mindspore import Tensor, nn
sys.path.insert(0, {root!r})
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, build

ms.set_device("CPU")
ms.set_context(mode={mode})
with open({yaml!r}) as handle:          # what MindFormers' build_context does with the parallel block
    parallel = yaml.safe_load(handle)["parallel"]
ms.set_auto_parallel_context(strategy_ckpt_config=parallel["strategy_ckpt_config"])
net = build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
step(*map(Tensor, next(lm_batches(8, 4, seed=2))))
print("FLAG", ms.get_auto_parallel_context("strategy_ckpt_config"))
"""


@pytest.mark.parametrize("mode", [0, 1], ids=["graph", "pynative"])
def test_launcher_fixes_the_context_at_run_time(tmp_path, mode):
    path = _run_yaml(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=ROOT, mode=mode, yaml=path))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", path, str(script)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    flag_line = [line for line in out.stdout.splitlines() if line.startswith("FLAG")]
    assert flag_line and f"'{KEY}': False" in flag_line[0] and "strategy.ckpt" in flag_line[0], out.stdout
    # Warned when the YAML was read (naming key and file) and again when the flag was turned off.
    assert f"{path} sets parallel.strategy_ckpt_config.{KEY}: true" in out.stderr
    assert f"set strategy_ckpt_config {KEY}=False" in textwrap.dedent(out.stderr)
