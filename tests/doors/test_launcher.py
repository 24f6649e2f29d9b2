"""pet-hooks run on the unmodified legacy scripts, in subprocesses, in graph and PyNative mode."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

import pet_hooks
from samples.tiny_gpt import build
from tests.conftest import ROOT

CONFIG = os.path.join(ROOT, "samples", "configs", "lora.yaml")


def _launch(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "pet_hooks", "run", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600, env=env)


@pytest.mark.parametrize("script,mode", [("legacy_train.py", 0), ("legacy_train.py", 1),
                                         ("legacy_loop.py", 0), ("legacy_loop.py", 1)])
def test_legacy_scripts_train_only_the_deltas(tmp_path, script, mode):
    ckpt = tmp_path / "after.ckpt"
    # three steps: lora_B moves at the first one (A starts non-zero), and a base weight that trained would
    # have moved there too; twelve only cost time (PyNative's mostly)
    out = _launch("--config", CONFIG, "--save-dir", str(tmp_path / "adapter"),
                  os.path.join("samples", script), "--steps", "3", "--mode", str(mode), "--save-ckpt", str(ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "adapter saved to" in out.stderr
    # The checkpoint the script wrote holds base weights identical to the untrained model's.
    saved = ms.load_checkpoint(str(ckpt))
    base = build(seed=0)
    for param in base.get_parameters():
        np.testing.assert_array_equal(saved[param.name].asnumpy(), param.asnumpy(), err_msg=param.name)
    deltas = {k: v for k, v in saved.items() if ".lora_" in k}
    assert len(deltas) == 24 and any(np.abs(v.asnumpy()).sum() > 0 for k, v in deltas.items() if "lora_B" in k)
    # The adapter reproduces the trained deltas.
    pet_hooks.load_adapter(base, tmp_path / "adapter")
    for param in pet_hooks.delta_parameters(base):
        np.testing.assert_array_equal(param.asnumpy(), deltas[param.name].asnumpy())


def test_lora_bias_and_trained_base_biases_through_the_launcher(tmp_path):
    """lora_bias / bias (issue 29 item 6) through pet-hooks run: the lora biases and the adapted cells' base
    biases train (bias: lora_only), every other base weight stays, and the adapter holds the biases."""
    config = tmp_path / "lora_bias.yaml"
    config.write_text("pet_config:\n  pet_type: lora\n  lora_rank: 4\n  lora_alpha: 8\n"
                      "  target_modules: \".*dense1|.*dense3\"\n  lora_bias: true\n  bias: lora_only\n")
    ckpt = tmp_path / "after.ckpt"
    out = _launch("--config", str(config), "--save-dir", str(tmp_path / "adapter"),
                  os.path.join("samples", "legacy_train.py"), "--steps", "3", "--mode", "0", "--save-ckpt", str(ckpt))
    assert out.returncode == 0, out.stderr[-3000:]
    saved = ms.load_checkpoint(str(ckpt))
    base = build(seed=0)
    trained = {name for name in saved if name.endswith((".dense1.bias", ".dense3.bias"))}
    assert len(trained) == 4
    for param in base.get_parameters():
        same = np.array_equal(saved[param.name].asnumpy(), param.asnumpy())
        assert same == (param.name not in trained), param.name
    lora_biases = {k: v for k, v in saved.items() if k.endswith(".lora_B_bias")}
    assert len(lora_biases) == 4 and all(np.abs(v.asnumpy()).max() > 0 for v in lora_biases.values())
    pet_hooks.load_adapter(base, tmp_path / "adapter")
    for param in base.trainable_params():
        np.testing.assert_array_equal(param.asnumpy(), saved[param.name].asnumpy(), err_msg=param.name)


def test_script_semantics_exit_code_argv_and_traceback(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "script.py").write_text(
        "import sys\nfrom helper import VALUE\n"
        "print('main' if __name__ == '__main__' else 'imported', sys.argv[1:], VALUE + 1)\n"
        "if sys.argv[1] == 'fail':\n    raise RuntimeError('the script broke')\n"
        "sys.exit(int(sys.argv[1]))\n")
    out = _launch("--config", CONFIG, str(tmp_path / "script.py"), "3", cwd=str(tmp_path))
    assert out.returncode == 3 and "main ['3'] 42" in out.stdout
    out = _launch("--config", CONFIG, str(tmp_path / "script.py"), "fail", cwd=str(tmp_path))
    assert out.returncode == 1
    assert "RuntimeError: the script broke" in out.stderr and 'script.py", line 5' in out.stderr
    assert "runpy" not in out.stderr and "launcher.py" not in out.stderr


def test_child_processes_get_the_hooks(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(
        "import mindspore as ms\nfrom mindspore import nn\nimport sys\nsys.path.insert(0, %r)\n"
        "from samples.tiny_gpt import build\nms.set_device('CPU')\n"
        "net = build(0)\nopt = nn.Adam(net.get_parameters(), 1e-3)\n"
        "print('child optimizer holds', len(opt.parameters))\n" % ROOT)
    (tmp_path / "sitecustomize.py").write_text("print('user sitecustomize loaded')\n")
    parent = tmp_path / "parent.py"
    parent.write_text("import subprocess, sys\nsys.exit(subprocess.call([sys.executable, %r]))\n" % str(child))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = _launch("--config", CONFIG, "--save-dir", str(tmp_path / "ad"), str(parent), cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "child optimizer holds 24" in out.stdout          # 6 LoRA cells x 2 layers x (A, B)
    assert "user sitecustomize loaded" in out.stdout
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]


# Bad command lines (missing config file, script not found, no script, a misspelt flag) are the cli
# rows of tests/project/test_bad_input.py (through cli.main, in process; tests/cli/test_cli.py checks the exit
# code of a real process); a pattern that matches nothing in a script run by the launcher is in
# tests/doors/test_launcher_errors.py.


@pytest.mark.parametrize("config,script,extra", [
    ("ptuning2.yaml", "legacy_train.py", ["--mode", "1"]),
    ("llama_prefixtuning.yaml", "llama_train.py", ["--yaml", "samples/configs/llama_prefixtuning.yaml",
                                                    "--mode", "0"]),
    ("llama_lora.yaml", "llama_train.py", ["--yaml", "samples/configs/llama_lora.yaml", "--mode", "1"]),
])
def test_prefix_methods_and_llama_through_the_launcher(tmp_path, config, script, extra):
    ckpt = tmp_path / "after.ckpt"
    # three steps: every delta must move below; LoRA's B moves at the first, A (no gradient while B is zero)
    # at the second, a prefix encoder at the first
    out = _launch("--config", os.path.join("samples", "configs", config), "--save-dir", str(tmp_path / "ad"),
                  os.path.join("samples", script), "--steps", "3", "--save-ckpt", str(ckpt), *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = ms.load_checkpoint(str(ckpt))
    deltas = {k: v.asnumpy() for k, v in saved.items() if k.startswith("pet_prefix_encoder.") or ".lora_" in k}
    assert deltas
    from safetensors.numpy import load_file
    adapter = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(deltas)
    for name, value in adapter.items():
        np.testing.assert_array_equal(value, deltas[name])
    # the deltas trained: each moved from its initial value, which is the seed's alone (the script seeds
    # MindSpore with 0 when it builds the model, and pet_hooks draws the deltas from that seed): drawn here twice
    untrained = {}                 # the base weights of the first model built here, before pet_hooks adapts it
    initial, again = _initial_deltas(config, script, untrained), _initial_deltas(config, script)
    assert sorted(initial) == sorted(deltas)
    for name, value in deltas.items():
        np.testing.assert_array_equal(initial[name], again[name], err_msg=name)
        assert np.abs(value - initial[name]).max() > 1e-5, f"{name} did not move from its initial value"
    if script == "llama_train.py":  # the base weights the script saved are the untrained ones
        assert untrained
        for name, value in untrained.items():
            np.testing.assert_array_equal(saved[name].asnumpy(), value, err_msg=name)


def _initial_deltas(config: str, script: str, base: dict = None) -> dict:
    """The deltas of the model ``script`` builds, as pet_hooks adapts it before the first step (and, into
    ``base`` if given, every weight of that model as built, before it is adapted: one model build less)."""
    path = os.path.join(ROOT, "samples", "configs", config)
    if script == "llama_train.py":
        from samples.llama_train import build_llama
        net = build_llama(path)
    else:
        net = build(seed=0)
    if base is not None:
        base.update({p.name: p.asnumpy().copy() for p in net.get_parameters()})
    pet_hooks.apply(net, pet_hooks.load_config(path))
    return {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(net)}
