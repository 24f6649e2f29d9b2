"""The pet-hooks command line: config checking and its one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from tests.conftest import ROOT



def _run(*args):
    return subprocess.run([sys.executable, "-m", "pet_hooks", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_check_config_prints_the_normalised_block():
    out = _run("check-config", "samples/configs/gpt2_lora_mindformers.yaml")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["pet_config"]["target_modules"] == ".*dense1|.*dense2|.*dense3"
    assert doc["model_hints"]["num_layers"] == 2


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pet_type: lora\nlora_rank: 0\ntarget_modules: '.*'\n")
    out = _run("check-config", str(path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["pet-hooks: error: lora_rank must be >= 1, got 0"]
    missing = _run("check-config", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "none.yaml" in missing.stderr and "Traceback" not in missing.stderr


def _modules_imported(*args) -> set:
    """The top-level modules ``python -m pet_hooks ARGS`` imported (``-X importtime`` lists every import)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "pet_hooks", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    return names, out.stdout


def test_check_config_and_version_do_not_import_mindspore():
    for args in (["check-config", "samples/configs/lora.yaml"], ["--version"], ["version"]):
        names, stdout = _modules_imported(*args)
        assert "pet_hooks" in names and "yaml" in names or args[0] != "check-config", names
        assert "mindspore" not in names, args
        assert stdout.strip(), args
    assert _modules_imported("--version")[1].strip() == _modules_imported("version")[1].strip()


def test_check_config_explain_prints_each_field_with_its_help():
    out = _run("check-config", "--explain", "samples/configs/gpt2_lora_mindformers.yaml")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert rows["lora_rank"].split()[1] == "8" and "rank r of A" in rows["lora_rank"]
    assert '".*dense1|.*dense2|.*dense3"' in rows["target_modules"]
    assert "model_config values" in rows["model_hints"] and '"num_layers": 2' in rows["model_hints"]
    assert {"pet_type", "freeze_include", "lora_alpha", "use_rslora"} <= set(rows)


def test_explain_lists_every_field_of_every_method_with_its_help(tmp_path):
    """Every field a user may set, of every registered method, has a help text, and ``--explain`` prints it
    with its value: the issue-29 fields (PEFT's LoraConfig names) set to non-default values included."""
    import dataclasses
    from pet_hooks.config import methods
    for pet_type in methods.registered():
        cls = methods.method(pet_type).config_class
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text for --explain"
    (tmp_path / "peft_names.yaml").write_text(
        "pet_type: lora\ntarget_modules: all-linear\nexclude_modules: [dense3]\nlayers_to_transform: [1]\n"
        "rank_pattern: {dense1: 4}\nalpha_pattern: {dense1: 8}\nlora_bias: true\nbias: lora_only\n"
        "modules_to_save: [head]\ntrainable_token_indices: [3, 5]\n")
    out = _run("check-config", "--explain", str(tmp_path / "peft_names.yaml"))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()}
    expected = {"target_modules": '"all-linear"', "exclude_modules": '["dense3"]', "layers_to_transform": "[1]",
                "rank_pattern": '{"dense1":', "alpha_pattern": '{"dense1":', "lora_bias": "true",
                "bias": '"lora_only"', "modules_to_save": '["head"]', "trainable_token_indices": "[3,"}
    for name, value in expected.items():
        assert rows[name][0] == value and rows[name][1].strip(), (name, rows.get(name))
