"""``pet-hooks inspect`` and the report behind it: what a config will tune, checked against the net itself.

The expected cells come from ``re.fullmatch`` over ``cells_and_names()`` and the expected
delta shapes and counts from the cells' own sizes, not from pet_hooks.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from mindspore import nn

import pet_hooks
from pet_hooks.cli.inspection import capture_script_model, format_report, inspect_net, split_alternatives
from pet_hooks.surgery.core import has_pet
from samples.tiny_gpt import build
from tests.conftest import NEEDS_MINDFORMERS, ROOT

GPT_CFG = os.path.join(ROOT, "samples", "configs", "lora.yaml")
LLAMA_CFG = os.path.join(ROOT, "samples", "configs", "llama_lora.yaml")


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "pet_hooks", "inspect", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def expected_lora(net, pattern, rank):
    """(matched paths, near-miss paths, trainable count), from the net alone."""
    dense = [(p, c) for p, c in net.cells_and_names() if p and isinstance(c, nn.Dense)]
    matched = [(p, c) for p, c in dense if re.fullmatch(pattern, p)]
    misses = [p for p, c in net.cells_and_names()           # LoRA adapts embeddings too
              if p and isinstance(c, (nn.Dense, nn.Embedding)) and not re.fullmatch(pattern, p)]
    return matched, misses, sum(rank * (c.in_channels + c.out_channels) for _, c in matched)


def test_report_on_the_sample_gpt_matches_the_net_and_leaves_it_as_it_was():
    net = build(seed=0)
    classes = {p: type(c) for p, c in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    cfg = pet_hooks.load_config(GPT_CFG)
    report = inspect_net(net, cfg)

    matched, misses, trainable = expected_lora(net, cfg.target_modules, 8)
    assert [m["path"] for m in report["matched"]] == [p for p, _ in matched] and len(matched) == 12
    for row, (_, cell) in zip(report["matched"], matched):
        assert row["type"] == "Dense" and (row["in"], row["out"]) == (cell.in_channels, cell.out_channels)
        assert row["deltas"] == [{"name": "lora_A", "shape": [8, cell.in_channels]},
                                 {"name": "lora_B", "shape": [cell.out_channels, 8]}]
    assert [m["path"] for m in report["near_misses"]] == misses == ["embedding", "position_embedding", "head"]
    base = sum(p.size for p in net.get_parameters())
    assert report["summary"]["trainable"] == trainable
    assert report["summary"]["all"] == base + trainable
    assert report["summary"]["text"] == (f"trainable params: {trainable:,d} || all params: {base + trainable:,d} || "
                                         f"trainable%: {100 * trainable / (base + trainable):.4f}")
    assert [r["cells"] for r in report["patterns"]] == [2] * 6 and report["error"] is None
    # untouched: no PET, the same classes and flags
    assert not has_pet(net)
    assert {p: type(c) for p, c in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    text = format_report(report)
    assert re.search(r"blocks\.1\.mlp\.projection +Dense +256 +64 +lora_A \[8, 256\], lora_B \[64, 8\]", text)
    assert report["summary"]["text"] in text and json.loads(json.dumps(report)) == report


def test_exclude_layers_and_prefix_methods():
    report = inspect_net(build(seed=0), {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 2,
                                         "target_modules": ".*dense1", "exclude_layers": [r"blocks\.0"]})
    assert [m["path"] for m in report["matched"]] == ["blocks.1.attention.dense1"]
    reasons = {m["path"]: m["reason"] for m in report["near_misses"]}
    assert reasons["blocks.0.attention.dense1"] == "excluded by exclude_layers"
    assert reasons["blocks.1.attention.dense2"] == "not selected by target_modules"

    report = inspect_net(build(seed=0), os.path.join(ROOT, "samples", "configs", "ptuning2.yaml"))
    assert [m["type"] for m in report["matched"]] == ["CoreAttention", "CoreAttention"]
    net = build(seed=0)
    layers, hidden = net.config.num_layers, net.config.hidden_size
    assert report["shared"] == [{"name": "pet_prefix_encoder.embedding", "shape": [16, layers * 2 * hidden]}]
    assert report["summary"]["trainable"] == 16 * layers * 2 * hidden


def test_a_pattern_that_matches_nothing_shows_the_nearest_names():
    report = inspect_net(build(seed=0), {"pet_type": "lora", "target_modules": ".*q_proj|.*dense9"})
    assert report["matched"] == [] and "matches no cell" in report["error"]
    rows = {r["pattern"]: r for r in report["patterns"]}
    assert rows[".*dense9"]["cells"] == 0 and rows[".*dense9"]["nearest"][0].startswith("dense")
    assert "nothing adapted" in format_report(report)
    partial = inspect_net(build(seed=0), {"pet_type": "lora", "target_modules": ".*dense1|.*q_proj"})
    assert partial["error"] is None and [r["cells"] for r in partial["patterns"]] == [2, 0]
    assert "1 of 2 patterns select nothing: .*q_proj" in format_report(partial)


def test_split_alternatives_keeps_groups_classes_and_escapes():
    assert split_alternatives(r".*(wq|wk)|.*w[1|2]|a\|b|c") == [".*(wq|wk)", ".*w[1|2]", r"a\|b", "c"]


def test_capture_stops_the_script_at_its_first_optimizer_and_undoes_the_patches(tmp_path):
    marker = tmp_path / "trained"
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom mindspore import nn\nfrom samples.tiny_gpt import build\n"
        "print('building', sys.argv[1:])\nnet = build(0, hidden_size=32)\n"
        "try:\n    opt = nn.Adam(net.trainable_params(), 1e-3)\nexcept Exception:\n    pass\n"
        "open(%r, 'w').write('x')\n" % (ROOT, str(marker)))
    cell_init, opt_init = nn.Cell.__dict__["__init__"], nn.Optimizer.__dict__["__init__"]
    net = capture_script_model(str(script), ["--flag"])
    assert type(net).__name__ == "TinyGPT" and net.config.hidden_size == 32
    assert not marker.exists()                                    # stopped before going on
    assert nn.Cell.__dict__["__init__"] is cell_init and nn.Optimizer.__dict__["__init__"] is opt_init

    (tmp_path / "nothing.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="built no model"):
        capture_script_model(str(tmp_path / "nothing.py"), [])
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="failed before building a model: RuntimeError: boom"):
        capture_script_model(str(tmp_path / "broken.py"), [])
    assert nn.Cell.__dict__["__init__"] is cell_init


# ----------------------------------------------------------------------------- the command
def test_cli_factory_table_and_json():
    out = _inspect("--config", GPT_CFG, "--model", "samples.tiny_gpt:build")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matched (12 cells)" in out.stdout and re.search(r"head +Dense +64 +256 +not selected", out.stdout)
    out = _inspect("--config", GPT_CFG, "--model", "samples.tiny_gpt:build", "--json")
    assert out.returncode == 0 and len(json.loads(out.stdout)["matched"]) == 12


@NEEDS_MINDFORMERS
def test_cli_on_the_mindformers_llama_script_and_factory():
    out = _inspect("--config", LLAMA_CFG, "--json", "samples/llama_train.py", "--yaml", LLAMA_CFG)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)                             # the script's own prints went to stderr
    assert report["model"].endswith("LlamaForCausalLM")
    assert [m["path"] for m in report["matched"]] == [f"model.layers.{i}.attention.{w}"
                                                      for i in range(2) for w in ("wq", "wk", "wv", "wo")]
    assert {m["path"].rsplit(".", 1)[-1] for m in report["near_misses"]} == {"w1", "w2", "w3", "lm_head",
                                                                             "tok_embeddings"}
    assert report["summary"]["trainable"] == 8 * 8 * (64 + 64)
    out = _inspect("--config", LLAMA_CFG, "--model", "tests.nets:tiny_llama")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"model\.layers\.1\.attention\.wo +Linear +32 +32 +lora_A \[8, 32\]", out.stdout)


@NEEDS_MINDFORMERS
def test_cli_no_match_on_llama_names_the_nearest_and_exits_2(tmp_path):
    cfg = tmp_path / "hf.yaml"
    cfg.write_text("pet_type: lora\ntarget_modules: '.*q_proj|.*v_proj'\n")
    out = _inspect("--config", str(cfg), "--model", "tests.nets:tiny_llama")
    assert out.returncode == 2
    assert "'.*q_proj|.*v_proj' matches no cell" in out.stdout
    assert re.search(r"\.\*q_proj\s+0\s+wq", out.stdout), out.stdout
    assert (".*v_proj uses the names of name map 'llama', where it selects the 2 cell(s) named wv here "
            "(e.g. model.layers.0.attention.wv)") in out.stdout
    lines = [l for l in out.stderr.splitlines() if l.startswith("pet-hooks:")]
    assert len(lines) == 1 and "matches no cell" in lines[0]


@pytest.mark.parametrize("model,words", [
    ("samples.tiny_gpt:GPTConfig", ["returned GPTConfig, not a mindspore.nn.Cell"]),
    ("samples.tiny_gpt", ["MODULE:FACTORY"]),
    ("samples.no_such_module:build", ["cannot import module 'samples.no_such_module'"]),
    ("samples.tiny_gpt:nope", ["has no attribute 'nope'"]),
])
def test_cli_bad_factory_is_one_line(model, words):
    out = _inspect("--config", GPT_CFG, "--model", model)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("pet-hooks:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), out.stderr
    assert "Traceback" not in out.stderr
