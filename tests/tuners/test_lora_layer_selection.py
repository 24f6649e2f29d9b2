"""LoRA with ``layers_to_transform`` / ``layers_pattern``, ``"all-linear"`` and ``exclude_modules``, end to end.

In graph and PyNative mode, on the sample GPT: exactly the expected cells get deltas, the logits
equal those of the base net with ``W + scaling * B @ A`` written by NumPy into exactly those cells,
merge / unmerge keep them, remove restores every base parameter bit for bit, and the native
adapter files bring the same selection back. Then one test per front door (PetCallback, enable,
the launcher; ``apply`` is the first test), and ``pet-hooks inspect``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore.dataset as ds
import yaml
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.cli.inspection import format_report, inspect_net
from pet_hooks.surgery.core import get_state
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, LMLoss, build
from tests.conftest import ROOT, assert_params_equal, snapshot

GEOMETRY = dict(num_layers=3, hidden_size=16, num_heads=2, seq_length=8)
LINEAR = ["attention.dense1", "attention.dense2", "attention.dense3", "attention.projection", "mlp.mapping",
          "mlp.projection"]
# (config, the cells it must adapt), each written out by hand
CASES = {
    "layers": ({"pet_type": "lora", "lora_rank": 2, "lora_alpha": 6, "target_modules": ["dense1", "mapping"],
                "layers_to_transform": [0, 2]},
               ["blocks.0.attention.dense1", "blocks.0.mlp.mapping", "blocks.2.attention.dense1",
                "blocks.2.mlp.mapping"]),
    "all-linear": ({"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": "all-linear",
                    "layers_to_transform": 1, "layers_pattern": "blocks", "exclude_modules": ["projection"]},
                   ["blocks.1.attention.dense1", "blocks.1.attention.dense2", "blocks.1.attention.dense3",
                    "blocks.1.mlp.mapping"]),
    "exclude-regex": ({"pet_type": "lora", "lora_rank": 2, "lora_alpha": 2, "target_modules": "all-linear",
                       "exclude_modules": ".*attention\\.dense[123]", "exclude_layers": ["blocks\\.0"]},
                      [f"blocks.{i}.{leaf}" for i in (1, 2) for leaf in ("attention.projection", "mlp.mapping",
                                                                         "mlp.projection")]),
}
IDS = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int32)


def logits(net):
    net.set_train(False)
    return net(Tensor(IDS)).asnumpy()


def randomize_deltas(net, seed=1):
    rng = np.random.default_rng(seed)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))


def adapted_paths(net):
    return sorted({p.name.rsplit(".", 1)[0] for p in pet_hooks.delta_parameters(net)})


def merged_by_numpy(net, cfg):
    """A fresh base net with W + (alpha / r) * B @ A written into each adapted cell of ``net``."""
    reference = build(seed=0, **GEOMETRY)
    cells = dict(reference.cells_and_names())
    deltas = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    for path in adapted_paths(net):
        weight = cells[path].weight
        delta = cfg["lora_alpha"] / cfg["lora_rank"] * deltas[f"{path}.lora_B"] @ deltas[f"{path}.lora_A"]
        weight.set_data(Tensor(weight.asnumpy() + delta.astype(np.float32)))
    return reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_selection_computes_merges_removes_and_round_trips(case, mode, tmp_path):
    cfg, expected = CASES[case]
    net = build(seed=0, **GEOMETRY)
    before = snapshot(net)
    base = logits(net)
    pet_hooks.apply(net, pet_hooks.load_config(cfg))
    assert adapted_paths(net) == sorted(expected)
    assert sorted(p.name for p in net.trainable_params()) == sorted(f"{p}.lora_{m}" for p in expected for m in "AB")
    randomize_deltas(net)
    ours = logits(net)
    assert np.abs(ours - base).max() > 1e-2
    np.testing.assert_allclose(ours, logits(merged_by_numpy(net, cfg)), rtol=1e-5, atol=1e-5)

    pet_hooks.save_adapter(net, tmp_path)                    # the native format: the config selects again
    pet_hooks.remove(net)
    assert_params_equal(before, net)
    assert sorted(p.name for p in net.get_parameters()) == sorted(before)
    np.testing.assert_array_equal(logits(net), base)

    fresh = pet_hooks.load_adapter(build(seed=0, **GEOMETRY), tmp_path)
    assert adapted_paths(fresh) == sorted(expected)
    assert get_state(fresh).config == pet_hooks.load_config(cfg)
    np.testing.assert_allclose(logits(fresh), ours, rtol=1e-5, atol=1e-5)
    pet_hooks.merge(fresh)
    np.testing.assert_allclose(logits(fresh), ours, rtol=1e-5, atol=1e-5)
    pet_hooks.unmerge(fresh)
    np.testing.assert_allclose(logits(fresh), ours, rtol=1e-5, atol=1e-5)
    with pet_hooks.disable_adapters(fresh):
        np.testing.assert_allclose(logits(fresh), base, rtol=1e-5, atol=1e-5)


def test_yaml_with_peft_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"model_config": {"pet_config": {
        "pet_type": "lora", "lora_rank": 2, "target_modules": "All-Linear", "layers_to_transform": [2],
        "exclude_modules": ["mapping", "dense2"]}}}}))
    net = pet_hooks.apply(build(seed=0, **GEOMETRY), str(path))
    assert adapted_paths(net) == sorted(f"blocks.2.{leaf}" for leaf in LINEAR
                                        if leaf not in ("mlp.mapping", "attention.dense2"))


# ----------------------------------------------------------------------------- the doors
CFG, EXPECTED = CASES["all-linear"]


def batches(steps):
    source = lm_batches(seq_length=GEOMETRY["seq_length"], batch_size=4, seed=1)
    return [next(source) for _ in range(steps)]


def trained_as_expected(net, before):
    assert adapted_paths(net) == sorted(EXPECTED)
    assert_params_equal(before, net)                                   # the base did not move
    moved = [p.name for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_B") and np.abs(p.asnumpy()).max()]
    assert sorted(moved) == sorted(f"{p}.lora_B" for p in EXPECTED)      # and every selected cell trained


def test_petcallback(mode):
    net = build(seed=0, **GEOMETRY)
    before = snapshot(net)
    model = Model(net, LMLoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9))
    model.train(1, ds.GeneratorDataset(batches(2), ["ids", "labels"], shuffle=False),
                callbacks=[pet_hooks.PetCallback(CFG)])
    trained_as_expected(net, before)


def test_enable(mode):
    with pet_hooks.enable(CFG):
        net = build(seed=0, **GEOMETRY)
        step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.get_parameters(), 1e-2))
        # a linear cell but no numbered layers: not a model for this config, left alone when the block ends
        side = nn.SequentialCell([nn.Dense(3, 3)])
    assert get_state(side) is None
    before = {name: value for name, value in snapshot(net).items() if ".lora_" not in name}
    for ids, labels in batches(2):
        step(Tensor(ids), Tensor(labels))
    trained_as_expected(net, before)


def test_launcher(tmp_path):
    config = tmp_path / "pet.yaml"
    config.write_text(yaml.safe_dump({**CFG, "layers_to_transform": [1]}))
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(config), "--save-dir",
                          str(tmp_path / "adapter"), os.path.join("samples", "legacy_train.py"), "--steps", "2",
                          "--mode", "0"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    net = pet_hooks.load_adapter(build(seed=0), tmp_path / "adapter")     # the script's own geometry
    assert adapted_paths(net) == sorted(EXPECTED)
    assert get_state(net).config.layers_to_transform == [1]


def test_inspect_shows_what_the_config_selects():
    net = build(seed=0, **GEOMETRY)
    report = inspect_net(net, CFG)
    assert [row["path"] for row in report["matched"]] == EXPECTED
    assert report["patterns"] == [{"pattern": "all-linear", "cells": 18, "nearest": [], "under_name_maps": {}}]
    reasons = {row["path"]: row["reason"] for row in report["near_misses"]}
    assert reasons["blocks.0.attention.dense1"] == "outside layers_to_transform"
    assert reasons["blocks.1.mlp.projection"] == "excluded by exclude_modules"
    assert reasons["head"].startswith("the output head, which 'all-linear' leaves out")
    assert reasons["embedding"] == "not a linear layer ('all-linear')"
    text = format_report(report)
    assert "layers_to_transform [1]" in text and "exclude_modules ['projection']" in text
    assert get_state(net) is None


def test_a_weighted_adapter_of_adapters_on_different_layers_covers_them_all():
    first = {"pet_type": "lora", "lora_rank": 2, "target_modules": "all-linear", "layers_to_transform": [0],
             "exclude_modules": ["projection"]}
    second = {"pet_type": "lora", "lora_rank": 2, "target_modules": ["projection"], "layers_to_transform": [2]}
    net = pet_hooks.apply(build(seed=0, **GEOMETRY), first)
    pet_hooks.add_adapter(net, "second", second)
    pet_hooks.add_weighted_adapter(net, ["default", "second"], [1.0, 1.0], "both", combination_type="cat")
    state = get_state(net)
    expected = sorted(set(state.adapters["default"].paths) | set(state.adapters["second"].paths))
    assert len(expected) == 6 and sorted(state.adapters["both"].paths) == expected


def test_ia3_all_linear_and_exclude_modules_adapt_what_the_explicit_list_adapts(mode):
    shorthand = {"pet_type": "ia3", "target_modules": "all-linear", "feedforward_modules": ["mapping"],
                 "exclude_modules": ".*dense[12]"}
    paths = [f"blocks.{i}.{leaf}" for i in range(3) for leaf in LINEAR if leaf not in ("attention.dense1",
                                                                                       "attention.dense2")]
    explicit = {"pet_type": "ia3", "target_modules": paths, "feedforward_modules": ["mapping"]}
    results = []
    for cfg in (shorthand, explicit):
        net = pet_hooks.apply(build(seed=0, **GEOMETRY), cfg)
        assert adapted_paths(net) == sorted(paths)
        randomize_deltas(net, seed=4)
        results.append(logits(net))
    assert np.abs(results[0] - logits(build(seed=0, **GEOMETRY))).max() > 1e-2
    np.testing.assert_array_equal(results[0], results[1])
