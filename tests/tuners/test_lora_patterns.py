"""LoRA's ``rank_pattern`` / ``alpha_pattern`` (a rank and alpha per cell) against Hugging Face PEFT 0.21.2, both modes.

The three-layer net of tests/nets.py (``k``, ``v``, ``down``) in PyTorch with PEFT and in MindSpore with
pet_hooks, identical weights, input and delta values (``tests/peft_reference_patterns.py`` is the PyTorch
side, in its own process):

- the rank PEFT gives each layer and its scaling, the outputs, the gradients of A and B, the merged weights
  (plain scaling, rsLoRA, and DoRA with its magnitude's gradient); unmerge gives the original weights back
  and ``remove`` gives them bit for bit;
- the key matching itself: PEFT's ``get_pattern_key`` on a table of keys and paths;
- PEFT reads our PEFT-format adapter (the patterns under PEFT's module names) and we read PEFT's;
- PiSSA with patterns: the initial A, B and residual per layer, and our ``save_as_lora`` read by PEFT;
- the native format both ways; several named adapters, each with its own patterns, active together, one per
  row, hot-swapped; the weighted merge refused; ``inspect``; a key that selects no adapted cell refused.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import pet_hooks
from pet_hooks.config.lora_patterns import pattern_key
from pet_hooks.errors import NoMatchError, PetConfigError, PetStateError
from pet_hooks.multi.adapters import focused
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_TORCH_PEFT, NEEDS_MINDFORMERS, assert_params_equal, snapshot
from tests.nets import LAYERS, SIZES, three_layers
from tests.unchanged import unchanged
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
NEEDS_PEFT = pytest.mark.skipif(not HAS_TORCH_PEFT, reason="torch, transformers and peft are not all installed")

#: PEFT's spelling; ours is the same fields under lora_rank (see _ours)
CONFIGS = {
    "plain": {"r": 2, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {"v": 4, "down": 3},
              "alpha_pattern": {"k": 3, "down": 12}},
    "rslora": {"r": 3, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"k|v": 5}, "alpha_pattern": {"v": 2.5}},
    "dora": {"r": 2, "lora_alpha": 8, "use_rslora": False, "use_dora": True, "rank_pattern": {"v": 3},
             "alpha_pattern": {"down": 4}},
}
#: (keys, path): which key PEFT's get_pattern_key picks (None: none matches)
KEY_CASES = [(["v"], "v"), (["v"], "k"), (["layers.0.v"], "model.layers.0.v"), (["layers.0.v"], "model.layers.10.v"),
             (["v_proj"], "model.layers.0.self_attn.v_proj"), (["proj"], "a.v_proj"), (["attn.*"], "a.self_attn.q"),
             (["^a.*q_proj"], "a.self_attn.q_proj"), (["k", ".*"], "k"), ([".*", "k"], "k"), (["0\\.v"], "layers.0.v"),
             (["q_proj$"], "x.q_proj"), (["k|v"], "down"), (["self_attn"], "a.self_attn.q_proj")]


def _ours(spec: dict, **extra) -> dict:
    return {"pet_type": "lora", "lora_rank": spec["r"], "lora_alpha": spec["lora_alpha"],
            "use_rslora": spec["use_rslora"], "use_dora": spec.get("use_dora", False), "target_modules": list(LAYERS),
            "rank_pattern": spec["rank_pattern"], "alpha_pattern": spec["alpha_pattern"], **extra}


def _own(spec: dict, layer: str):
    """(rank, alpha, scaling) of ``layer`` written out from PEFT's rule (for the NumPy checks)."""
    r = next((v for k, v in spec["rank_pattern"].items() if pattern_key([k], layer)), spec["r"])
    alpha = next((v for k, v in spec["alpha_pattern"].items() if pattern_key([k], layer)), spec["lora_alpha"])
    return r, alpha, alpha / (math.sqrt(r) if spec["use_rslora"] else r)


def _job() -> dict:
    rng = np.random.default_rng(29)
    job = {"x": rng.standard_normal((3, 5, 6)).astype(np.float32),
           "g": rng.standard_normal((3, 5, 4)).astype(np.float32)}
    for layer, (din, dout) in SIZES.items():
        job[f"{layer}.weight"] = (rng.standard_normal((dout, din)) * 0.5).astype(np.float32)
        job[f"{layer}.bias"] = (rng.standard_normal(dout) * 0.5).astype(np.float32)
        for name, spec in CONFIGS.items():
            r = _own(spec, layer)[0]
            job[f"{name}.{layer}.A"] = (rng.standard_normal((r, din)) * 0.4).astype(np.float32)
            job[f"{name}.{layer}.B"] = (rng.standard_normal((dout, r)) * 0.4).astype(np.float32)
        r = _own(CONFIGS["plain"], layer)[0]
        job[f"pissa.{layer}.dA"] = (rng.standard_normal((r, din)) * 0.2).astype(np.float32)
        job[f"pissa.{layer}.dB"] = (rng.standard_normal((dout, r)) * 0.2).astype(np.float32)
    return job


def _set(net, job, name: str) -> None:
    for layer in LAYERS:
        cell = getattr(net, layer)
        cell.lora_A.set_data(Tensor(job[f"{name}.{layer}.A"]))
        cell.lora_B.set_data(Tensor(job[f"{name}.{layer}.B"]))


def close(ours, theirs, err_msg="", tol=1e-5):
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, np.abs(theirs).max()), err_msg=err_msg)
    return float(np.abs(np.asarray(ours) - theirs).max())


def _numpy_out(job, deltas, x=None):
    """The three layers with LoRA in NumPy: ``deltas`` is layer -> [(scaling, A, B), ...] (summed)."""
    h = job["x"] if x is None else x
    for index, layer in enumerate(LAYERS):
        y = h @ job[f"{layer}.weight"].T + job[f"{layer}.bias"]
        for scaling, a, b in deltas.get(layer, []):
            y = y + scaling * (h @ a.T @ b.T)
        h = np.maximum(y, 0.0) if index < len(LAYERS) - 1 else y
    return h


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for _job() (one torch process), with pet_hooks' adapters of it read by PEFT."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("patterns")
    job = _job()
    np.savez(work / "job.npz", **job)
    (work / "job.json").write_text(json.dumps({"configs": CONFIGS, "key_cases": KEY_CASES}))
    x = Tensor(job["x"])
    ours = {}
    for name, spec in CONFIGS.items():
        net = pet_hooks.apply(three_layers(job), _ours(spec))
        _set(net, job, name)
        ours[name] = net(x).asnumpy()
        pet_hooks.save_adapter(net, work / f"ours_{name}", format="peft", task_type=None)
    pissa = pet_hooks.apply(three_layers(job), _ours(CONFIGS["plain"], init_lora_weights="pissa"))
    ours["pissa.A0"] = {layer: getattr(pissa, layer).lora_A.asnumpy().copy() for layer in LAYERS}
    ours["pissa.B0"] = {layer: getattr(pissa, layer).lora_B.asnumpy().copy() for layer in LAYERS}
    ours["pissa.res"] = {layer: getattr(pissa, layer).weight.asnumpy().copy() for layer in LAYERS}
    for layer in LAYERS:                                       # "trained": A and B moved off their init
        cell = getattr(pissa, layer)
        cell.lora_A.set_data(Tensor(cell.lora_A.asnumpy() + job[f"pissa.{layer}.dA"]))
        cell.lora_B.set_data(Tensor(cell.lora_B.asnumpy() + job[f"pissa.{layer}.dB"]))
    ours["pissa.out"] = pissa(x).asnumpy()
    pet_hooks.save_as_lora(pissa, work / "ours_pissa_lora", format="peft", task_type=None)
    out = run_reference([os.path.join(HERE, "peft_reference_patterns.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = json.loads((work / "keys.json").read_text())
    return work, job, dict(np.load(work / "torch.npz")), ours, keys


# ----------------------------------------------------------------------------- against PEFT
@NEEDS_PEFT
def test_keys_select_cells_as_peft_s_get_pattern_key(peft_run):
    *_, keys = peft_run
    ours = [pattern_key(pattern_keys, path) for pattern_keys, path in KEY_CASES]
    assert ours == keys
    assert ours.count(None) >= 4                 # the table holds misses too


@NEEDS_PEFT
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_outputs_gradients_and_merge_equal_peft(mode, name, peft_run):
    _, job, theirs, _, _ = peft_run
    net = pet_hooks.apply(three_layers(job), _ours(CONFIGS[name]))
    for layer in LAYERS:
        cell = getattr(net, layer)
        r = int(theirs[f"{name}.shape.{layer}"][0])
        assert tuple(cell.lora_A.shape) == (r, SIZES[layer][0]) and tuple(cell.lora_B.shape) == (SIZES[layer][1], r)
        assert math.isclose(cell.lora_scaling, float(theirs[f"{name}.scaling.{layer}"]), rel_tol=1e-7), layer
        assert r == _own(CONFIGS[name], layer)[0]
    assert len({tuple(getattr(net, layer).lora_A.shape)[0] for layer in LAYERS}) > 1     # the ranks do differ
    _set(net, job, name)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    deltas = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    _, grads = ms.value_and_grad(loss, None, deltas)(x, g)
    out = net(x).asnumpy()
    diffs = {"out": close(out, theirs[f"{name}.out"])}
    for param, grad in zip(deltas, grads):
        layer, leaf = param.name.split(".")
        key = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "m"}[leaf]
        diffs[param.name] = close(grad.asnumpy(), theirs[f"{name}.grad.{layer}.{key}"], param.name)
    assert len(deltas) == len(LAYERS) * (3 if CONFIGS[name].get("use_dora") else 2)
    pet_hooks.merge(net)
    for layer in LAYERS:
        close(getattr(net, layer).weight.asnumpy(), theirs[f"{name}.merged.{layer}"], layer, 1e-6)
    close(net(x).asnumpy(), out)
    pet_hooks.unmerge(net)
    close(net(x).asnumpy(), out)
    for layer in LAYERS:
        close(getattr(net, layer).weight.asnumpy(), job[f"{layer}.weight"], layer, 1e-6)
    print(f"{name} mode {mode}: max |ours - PEFT| out {diffs['out']:.1e}, grads {max(diffs.values()):.1e}")


@NEEDS_PEFT
@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_reads_ours_and_we_read_peft_s(mode, name, peft_run):
    work, job, theirs, ours, _ = peft_run
    close(theirs[f"{name}.ours.out"], ours[name])              # PEFT ran our file: our output
    doc = json.loads((work / f"ours_{name}" / "adapter_config.json").read_text())
    spec = CONFIGS[name]
    assert doc["r"] == spec["r"] and doc["lora_alpha"] == spec["lora_alpha"]
    assert doc["rank_pattern"] == {layer: _own(spec, layer)[0] for layer in LAYERS if _own(spec, layer)[0] != spec["r"]}
    assert doc["alpha_pattern"] == {layer: _own(spec, layer)[1] for layer in LAYERS
                                    if _own(spec, layer)[1] != spec["lora_alpha"]}
    x = Tensor(job["x"])
    fresh = pet_hooks.load_adapter(three_layers(job), work / f"theirs_{name}")
    close(fresh(x).asnumpy(), theirs[f"{name}.out"])
    cfg = get_state(fresh).config
    for layer in LAYERS:
        assert cfg.for_module(layer).lora_rank == _own(spec, layer)[0]
        assert math.isclose(cfg.for_module(layer).scaling, _own(spec, layer)[2])
    already = pet_hooks.apply(three_layers(job), _ours(spec))        # into a net that has the same LoRA
    pet_hooks.load_adapter(already, work / f"theirs_{name}")
    close(already(x).asnumpy(), theirs[f"{name}.out"])
    other = pet_hooks.apply(three_layers(job), _ours({**spec, "alpha_pattern": {}}))
    with unchanged(other):
        with pytest.raises(PetStateError, match="module '(k|v|down)' has LoRA scaling"):
            pet_hooks.load_adapter(other, work / f"theirs_{name}")


@NEEDS_PEFT
def test_pissa_with_patterns_equals_peft_and_converts_to_a_lora_peft_reads(peft_run):
    _, _, theirs, ours, _ = peft_run
    for layer in LAYERS:          # singular vectors have a free sign: compare B0 @ A0 (and its shapes)
        assert ours["pissa.A0"][layer].shape == theirs[f"pissa.A0.{layer}"].shape
        close(ours["pissa.B0"][layer] @ ours["pissa.A0"][layer],
              theirs[f"pissa.B0.{layer}"] @ theirs[f"pissa.A0.{layer}"], layer, 1e-4)
        close(ours["pissa.res"][layer], theirs[f"pissa.res.{layer}"], layer, 1e-4)
        assert ours["pissa.A0"][layer].shape[0] == _own(CONFIGS["plain"], layer)[0]
    close(theirs["pissa_lora.out"], ours["pissa.out"], "save_as_lora read by PEFT", 1e-4)


# ----------------------------------------------------------------------------- pet_hooks alone
def test_native_save_load_round_trip(mode, tmp_path):
    job = _job()
    spec = CONFIGS["plain"]
    net = three_layers(job)
    before = snapshot(net)
    pet_hooks.apply(net, _ours(spec))
    _set(net, job, "plain")
    x = Tensor(job["x"])
    expected = _numpy_out(job, {layer: [(_own(spec, layer)[2], job[f"plain.{layer}.A"], job[f"plain.{layer}.B"])]
                                for layer in LAYERS})
    close(net(x).asnumpy(), expected)
    pet_hooks.save_adapter(net, tmp_path / "ad")
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert doc["pet_config"]["rank_pattern"] == spec["rank_pattern"]
    assert doc["pet_config"]["alpha_pattern"] == spec["alpha_pattern"]
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "ad")
    close(fresh(x).asnumpy(), expected)
    assert get_state(fresh).config == get_state(net).config
    other = pet_hooks.apply(three_layers(job), _ours({**spec, "rank_pattern": {"v": 4}}))
    with unchanged(other, tmp_path / "ad"):
        with pytest.raises(PetStateError, match="rank_pattern"):
            pet_hooks.load_adapter(other, tmp_path / "ad")
    pet_hooks.remove(net)
    assert_params_equal(before, net)                              # every base weight bit for bit
    close(net(x).asnumpy(), _numpy_out(job, {}))


def test_save_as_lora_doubles_each_cells_rank_in_our_format(tmp_path):
    job = _job()
    x = Tensor(job["x"])
    spec = CONFIGS["rslora"]
    pissa = pet_hooks.apply(three_layers(job), _ours(spec, init_lora_weights="olora"))
    for layer in LAYERS:
        cell = getattr(pissa, layer)
        cell.lora_B.set_data(Tensor(cell.lora_B.asnumpy() + 0.3))
    pet_hooks.save_as_lora(pissa, tmp_path / "plain")
    doc = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["pet_config"]
    assert doc["rank_pattern"] == {"k|v": 10} and doc["lora_rank"] == 6
    assert math.isclose(doc["alpha_pattern"]["v"], 2.5 * math.sqrt(2)) and doc["init_lora_weights"] is True
    plain = pet_hooks.load_adapter(three_layers(job), tmp_path / "plain")      # on the original weights
    assert [tuple(getattr(plain, layer).lora_A.shape)[0] for layer in LAYERS] == [10, 10, 6]
    close(plain(x).asnumpy(), pissa(x).asnumpy(), tol=1e-4)


def test_the_key_order_survives_our_files(tmp_path):
    """The first key selecting a cell wins, so the files keep the mapping's order (JSON is written sorted)."""
    job = _job()
    cfg = {"pet_type": "lora", "lora_rank": 2, "target_modules": list(LAYERS), "rank_pattern": {"v": 7, ".*": 3}}
    net = pet_hooks.apply(three_layers(job), cfg)
    assert [tuple(getattr(net, layer).lora_A.shape)[0] for layer in LAYERS] == [3, 7, 3]
    pet_hooks.save_adapter(net, tmp_path / "ad")
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "ad")
    assert list(get_state(fresh).config.rank_pattern) == ["v", ".*"]
    assert [tuple(getattr(fresh, layer).lora_A.shape)[0] for layer in LAYERS] == [3, 7, 3]
    swapped = {**cfg, "rank_pattern": {".*": 3, "v": 7}}                  # the same items: another adapter
    assert pet_hooks.load_config(swapped) != pet_hooks.load_config(cfg)
    other = pet_hooks.apply(three_layers(job), swapped)
    with unchanged(other, tmp_path / "ad"):
        with pytest.raises(PetStateError, match="different PET config"):
            pet_hooks.load_adapter(other, tmp_path / "ad")


def test_first_key_wins_and_yaml_fields(tmp_path):
    (tmp_path / "pet.yaml").write_text("pet_config:\n  pet_type: lora\n  lora_rank: 2\n  target_modules: [k, v, down]\n"
                                       "  rank_pattern:\n    '.*': 3\n    v: 7\n  alpha_pattern:\n    down: 1.5\n")
    cfg = pet_hooks.load_config(str(tmp_path / "pet.yaml"))
    assert cfg.rank_pattern == {".*": 3, "v": 7} and cfg.alpha_pattern == {"down": 1.5}
    assert [cfg.for_module(layer).lora_rank for layer in LAYERS] == [3, 3, 3]      # ".*" comes first, as in PEFT
    assert cfg.for_module("down").lora_alpha == 1.5 and cfg.for_module("k").lora_alpha == cfg.lora_alpha
    swapped = pet_hooks.load_config({**cfg.to_dict(), "rank_pattern": {"v": 7, ".*": 3}})
    assert [swapped.for_module(layer).lora_rank for layer in LAYERS] == [3, 7, 3]
    assert "rank_pattern" in pet_hooks.config.pet_config.explain(cfg)


def test_a_key_selecting_no_adapted_cell_is_an_error_naming_it():
    job = _job()
    net = three_layers(job)
    cfg = _ours(CONFIGS["plain"])
    for field, key in (("rank_pattern", "vv"), ("alpha_pattern", "down_proj"), ("rank_pattern", "k.v")):
        with unchanged(net):
            with pytest.raises(NoMatchError, match=rf"{field} key '{key}' selects none.*nearest adapted cells: \["):
                pet_hooks.apply(net, {**cfg, field: {**cfg[field], key: 2}})
    with unchanged(net):                                  # a key for a cell that is there, but not targeted
        with pytest.raises(NoMatchError, match="rank_pattern key 'down'"):
            pet_hooks.apply(net, {**cfg, "target_modules": ["k", "v"]})


def test_named_adapters_each_with_own_patterns(mode):
    job = _job()
    x = Tensor(job["x"])
    plain, rs = CONFIGS["plain"], CONFIGS["rslora"]
    net = pet_hooks.apply(three_layers(job), _ours(plain))
    _set(net, job, "plain")
    pet_hooks.add_adapter(net, "b", _ours(rs))
    with focused(net, "b"):
        _set(net, job, "rslora")
    values = {name: {layer: [(_own(spec, layer)[2], job[f"{name}.{layer}.A"], job[f"{name}.{layer}.B"])]
                     for layer in LAYERS} for name, spec in CONFIGS.items()}
    pet_hooks.set_adapter(net, "b")
    close(net(x).asnumpy(), _numpy_out(job, values["rslora"]))
    pet_hooks.set_adapter(net, ["default", "b"])                # summed per cell, each its own rank and scaling
    both = {layer: values["plain"][layer] + values["rslora"][layer] for layer in LAYERS}
    close(net(x).asnumpy(), _numpy_out(job, both))
    pet_hooks.set_adapter(net, "default")
    close(net(x).asnumpy(), _numpy_out(job, values["plain"]))
    net.set_train(False)
    rows = ["b", "default", "__base__"]
    with pet_hooks.adapter_per_row(net, rows):
        out = net(x).asnumpy()
    for row, name in enumerate(rows):
        ref = _numpy_out(job, values.get({"default": "plain", "b": "rslora"}.get(name), {}), job["x"][row:row + 1])
        close(out[row:row + 1], ref, name)
    with unchanged(net):
        with pytest.raises(PetConfigError, match="adapter 'default' has rank_pattern.*not supported"):
            pet_hooks.add_weighted_adapter(net, ["default", "b"], [0.5, 0.5], "mix", combination_type="cat")


def test_hot_swap_may_change_alpha_pattern_not_ranks(tmp_path):
    job = _job()
    x = Tensor(job["x"])
    spec = CONFIGS["plain"]
    other = {**spec, "alpha_pattern": {"v": 5}}
    source = pet_hooks.apply(three_layers(job), _ours(other))
    _set(source, job, "plain")
    pet_hooks.save_adapter(source, tmp_path / "other")
    net = pet_hooks.apply(three_layers(job), _ours(spec), adapter_name="a")
    pet_hooks.load_adapter(net, tmp_path / "other", adapter_name="a", hotswap=True)
    close(net(x).asnumpy(), source(x).asnumpy())
    assert math.isclose(net.v.lora_scaling, 5 / 4) and math.isclose(net.down.lora_scaling, 8 / 3)
    wider = pet_hooks.apply(three_layers(job), _ours({**spec, "rank_pattern": {"v": 4}}))
    pet_hooks.save_adapter(wider, tmp_path / "wider")
    with unchanged(net):
        with pytest.raises(PetStateError, match="hot swap"):
            pet_hooks.load_adapter(net, tmp_path / "wider", adapter_name="a", hotswap=True)


def test_inspect_shows_each_cells_rank():
    from pet_hooks.cli.inspection import format_report, inspect_net
    job = _job()
    report = inspect_net(three_layers(job), _ours(CONFIGS["plain"]))
    rows = {row["path"]: (row["rank"], row["lora_alpha"], row["by_pattern"]) for row in report["matched"]}
    assert rows == {"k": (2, 3, True), "v": (4, 8, True), "down": (3, 12, True)}
    assert {d["name"]: d["shape"] for d in report["matched"][1]["deltas"]} == {"lora_A": [4, 10], "lora_B": [8, 4]}
    text = format_report(report)
    assert "r / alpha" in text and "4 / 8 (pattern)" in text
    plain = format_report(inspect_net(three_layers(job), _ours({**CONFIGS["plain"], "rank_pattern": {},
                                                                "alpha_pattern": {}})))
    assert "r / alpha" not in plain


# ----------------------------------------------------------------------------- the doors (one flow: doors/flow.py)
GPT_PATTERNS = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*dense1|.*dense3",
                "rank_pattern": {r"blocks\.1\.attention\.dense1": 2}, "alpha_pattern": {"dense3": 2}}


def _gpt_ranks(net) -> dict:
    return {p.name: tuple(p.shape)[0] for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_A")}


GPT_RANKS = {"blocks.0.attention.dense1.lora_A": 4, "blocks.1.attention.dense1.lora_A": 2,
             "blocks.0.attention.dense3.lora_A": 4, "blocks.1.attention.dense3.lora_A": 4}


def test_alpha_pattern_equals_scaling_b_by_hand_in_repeated_blocks(mode):
    """Graph mode may compile identically shaped blocks once (surgery/graph_reuse.py): an alpha that differs
    between them is data (each cell's switch), as a B scaled by hand shows."""
    from samples.tiny_gpt import build
    from tests.conftest import SMALL
    cfg = {**GPT_PATTERNS, "rank_pattern": {}, "alpha_pattern": {r"blocks\.1\.attention\.dense1": 32}}
    ids = Tensor(np.random.default_rng(3).integers(0, 64, (2, 8)).astype(np.int32))
    patterned = pet_hooks.apply(build(seed=0, **SMALL), cfg)
    by_hand = pet_hooks.apply(build(seed=0, **SMALL), {**cfg, "alpha_pattern": {}})
    for net in (patterned, by_hand):
        for param in pet_hooks.delta_parameters(net):
            param.set_data(Tensor(np.random.default_rng(len(param.name)).standard_normal(param.shape)
                                  .astype(np.float32) * 0.2))
    marks = {block.cell_init_args for block in patterned.blocks}      # one graph for both blocks
    assert len(marks) == 1 and marks.pop().startswith("lazy_inline_Block_pet_hooks_")
    b = by_hand.blocks[1].attention.dense1.lora_B
    b.set_data(Tensor(b.asnumpy() * 4))                    # alpha 32 instead of 8: scaling x4
    assert patterned.blocks[1].attention.dense1.lora_scaling == 4 * by_hand.blocks[1].attention.dense1.lora_scaling
    close(patterned(ids).asnumpy(), by_hand(ids).asnumpy(), tol=1e-5)
    with pet_hooks.disable_adapters(patterned):
        assert np.abs(patterned(ids).asnumpy() - by_hand(ids).asnumpy()).max() > 1e-3


def test_pet_callback_trains_patterned_cells(mode, tmp_path):
    import mindspore.dataset as ds
    from mindspore import nn
    from mindspore.train import Model
    from samples.data import lm_batches
    from samples.tiny_gpt import LMLoss, build
    from tests.conftest import SMALL
    net = build(seed=0, **SMALL)
    base = snapshot(net)
    batches = lm_batches(seq_length=8, batch_size=4, seed=1)
    data = ds.GeneratorDataset([next(batches) for _ in range(2)], ["ids", "labels"], shuffle=False)
    model = Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2))
    model.train(1, data, callbacks=[pet_hooks.PetCallback(GPT_PATTERNS, save_dir=str(tmp_path / "ad"))])
    assert _gpt_ranks(net) == GPT_RANKS
    assert {p.name for p in model.train_network.optimizer.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}
    assert all(np.abs(p.asnumpy()).sum() > 0 for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_B"))
    assert_params_equal(base, net)
    fresh = pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "ad")
    assert get_state(fresh).config.rank_pattern == GPT_PATTERNS["rank_pattern"]
    ids = Tensor(next(lm_batches(8, 2, seed=5))[0])
    close(fresh(ids).asnumpy(), net(ids).asnumpy())


def test_enable_adapts_with_patterns(mode):
    from mindspore import nn
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    from tests.conftest import SMALL
    with pet_hooks.enable(GPT_PATTERNS):
        net = build(seed=0, **SMALL)
        optimizer = nn.Adam(net.get_parameters(), 1e-2)
        step = nn.TrainOneStepCell(GPTWithLoss(net), optimizer)
        step(*map(Tensor, next(lm_batches(8, 4, seed=2))))
    assert _gpt_ranks(net) == GPT_RANKS
    assert {p.name for p in optimizer.parameters} == {p.name for p in pet_hooks.delta_parameters(net)}


# Graph mode only: what is checked (the yaml's patterns reach the run and its saved adapter) does not depend on
# the mode (a subprocess costs 5-10 s). PyNative training with patterns: test_pet_callback_trains_patterned_cells
# and test_enable_adapts_with_patterns ([pynative]); the launcher in both modes: tests/doors/test_launcher.py.
@pytest.mark.parametrize("run_mode", [0])
def test_the_launcher_reads_patterns_from_yaml(tmp_path, run_mode):
    from safetensors.numpy import load_file
    from tests.conftest import ROOT
    (tmp_path / "pet.yaml").write_text(
        "pet_config:\n  pet_type: lora\n  lora_rank: 4\n  lora_alpha: 8\n  target_modules: '.*dense1|.*dense3'\n"
        "  rank_pattern:\n    'blocks\\.1\\.attention\\.dense1': 2\n  alpha_pattern:\n    dense3: 2\n")
    out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(tmp_path / "pet.yaml"),
                          "--save-dir", str(tmp_path / "ad"), os.path.join("samples", "legacy_train.py"),
                          "--steps", "2", "--mode", str(run_mode)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert doc["pet_config"]["rank_pattern"] == GPT_PATTERNS["rank_pattern"]
    assert doc["pet_config"]["alpha_pattern"] == GPT_PATTERNS["alpha_pattern"]
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {k: v.shape[0] for k, v in saved.items() if k.endswith("lora_A") and ".dense" in k} == {
        f"blocks.{i}.attention.{d}.lora_A": (2 if (i, d) == (1, "dense1") else 4)
        for i in range(len({k.split(".")[1] for k in saved})) for d in ("dense1", "dense3")}


def test_an_embedding_takes_its_own_rank_and_scaling(mode):
    """The embedding kind draws and scales with the cell's own config too: merge (W += s (B A)^T) equals
    the branch, whose delta is checked by hand."""
    from samples.tiny_gpt import build
    from tests.conftest import SMALL
    cfg = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": r"embedding|.*dense1",
           "rank_pattern": {"embedding": 2}, "alpha_pattern": {"embedding": 6}}
    net = pet_hooks.apply(build(seed=0, **SMALL), cfg)
    ids = Tensor(np.random.default_rng(4).integers(0, 64, (2, 8)).astype(np.int32))
    cell = net.embedding
    a, b = cell.lora_A, cell.lora_B               # named <path>.lora_embedding_A / _B, PEFT's leaves
    assert (a.name, b.name) == ("embedding.lora_embedding_A", "embedding.lora_embedding_B")
    assert tuple(a.shape)[0] == 2 and tuple(b.shape)[1] == 2 and cell.lora_scaling == 3.0
    assert tuple(net.blocks[0].attention.dense1.lora_A.shape)[0] == 4
    for param in (a, b):
        param.set_data(Tensor(np.random.default_rng(7).standard_normal(param.shape).astype(np.float32) * 0.3))
    weight = cell.embedding_table
    before = weight.asnumpy().copy()
    out = net(ids).asnumpy()
    pet_hooks.merge(net)
    close(weight.asnumpy() - before, 3.0 * (b.asnumpy() @ a.asnumpy()).T, "embedding merge", 1e-5)
    close(net(ids).asnumpy(), out, tol=1e-4)
    pet_hooks.unmerge(net)
    close(weight.asnumpy(), before, "embedding unmerge", 1e-5)


@NEEDS_MINDFORMERS
def test_a_mindformers_run_yaml_with_patterns_under_enable(tmp_path):
    """MindFormers' own flow (build_network from a run YAML) inside enable(): the YAML's pet_config brings
    the patterns; MindFormers' LoRA, which has no such fields, never sees them."""
    from tests.models.test_mindformers_flow import build_from_yaml, write_run_yaml
    block = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*wq|.*wv",
             "rank_pattern": {r"layers\.1\.attention\.wq": 2}, "alpha_pattern": {"wv": 2}}
    path = write_run_yaml(tmp_path, block)
    with pet_hooks.enable():
        net = build_from_yaml(path)
    assert get_state(net).config == pet_hooks.load_config(block)
    ranks = {p.name: tuple(p.shape)[0] for p in pet_hooks.delta_parameters(net) if p.name.endswith("lora_A")}
    assert ranks == {f"model.layers.{i}.attention.{c}.lora_A": 2 if (i, c) == (1, "wq") else 4
                     for i in range(2) for c in ("wq", "wv")}
    assert net.model.layers[0].attention.wv.lora_scaling == 0.5


def test_the_compile_cache_folder_tells_the_key_orders_apart(tmp_path):
    from pet_hooks.doors.compile_cache import cache_folder
    first = {"pet_type": "lora", "lora_rank": 2, "target_modules": list(LAYERS), "rank_pattern": {"v": 7, ".*": 3}}
    second = {**first, "rank_pattern": {".*": 3, "v": 7}}
    assert cache_folder(str(tmp_path), pet_hooks.load_config(first)) != cache_folder(str(tmp_path),
                                                                                    pet_hooks.load_config(second))
    assert cache_folder(str(tmp_path), pet_hooks.load_config(first)) == cache_folder(str(tmp_path),
                                                                                    pet_hooks.load_config(dict(first)))


def test_multihead_attention_and_its_out_proj_each_take_their_own_rank(mode):
    """nn.MultiheadAttention computes with its packed in-projection and its out_proj's weights (the parent
    reads the child): each weight gets its own cell's rank and scaling, against the NumPy attention."""
    from tests.tuners.test_unreached_cells import BATCH, E, SEQ, SelfAttention, _np_attention
    rng = np.random.default_rng(5)
    net = SelfAttention()
    cfg = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 4, "target_modules": "attn",
           "rank_pattern": {"out_proj": 2}, "alpha_pattern": {"out_proj": 3}}
    pet_hooks.apply(net, cfg)
    attn, out_proj = net.attn, net.attn.out_proj
    assert tuple(attn.lora_A.shape) == (4, E) and tuple(out_proj.lora_A.shape) == (2, E)
    for param in pet_hooks.delta_parameters(net):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))
    x = Tensor(rng.standard_normal((SEQ, BATCH, E)).astype(np.float32))
    w_in = attn.in_proj_weight.asnumpy() + 1.0 * attn.lora_B.asnumpy() @ attn.lora_A.asnumpy()
    w_out = out_proj.weight.asnumpy() + 1.5 * out_proj.lora_B.asnumpy() @ out_proj.lora_A.asnumpy()
    expected = _np_attention(x.asnumpy(), x.asnumpy(), w_in, attn.in_proj_bias.asnumpy(), w_out,
                             out_proj.bias.asnumpy())
    close(net(x, x).asnumpy(), expected, tol=1e-5)


@NEEDS_MINDFORMERS
@pytest.mark.usefixtures("mcore_graph")
def test_grouped_experts_take_their_layers_rank_and_scaling():
    """mcore Qwen3-MoE's grouped experts (one A/B pair per expert, graph mode only): a pattern per layer,
    against the unadapted model with each expert's ``s (B_e A_e)^T`` merged by hand in NumPy."""
    from tests.models.test_mcore_moe import E, EXPERTS, V, logits, random_deltas, tiny_qwen3_moe
    cfg = {**EXPERTS, "rank_pattern": {r"layers\.1\.mlp\.experts": 2}, "alpha_pattern": {r"layers\.0\.mlp\.experts": 3}}
    own = {0: (EXPERTS["lora_rank"], 3 / EXPERTS["lora_rank"]), 1: (2, EXPERTS["lora_alpha"] / 2)}
    ids = np.random.default_rng(1).integers(0, V, (2, 8)).astype(np.int32)
    net, reference = pet_hooks.apply(tiny_qwen3_moe(), cfg), tiny_qwen3_moe()
    base = logits(reference, ids)
    random_deltas(net)
    deltas = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}
    params = {p.name: p for p in reference.get_parameters()}
    for layer, (rank, scaling) in own.items():
        for weight in ("weight1", "weight2"):
            prefix = f"model.decoder.layers.{layer}.mlp.experts.{weight}"
            a, b = deltas[prefix + ".lora_A"], deltas[prefix + ".lora_B"]
            assert a.shape[1] == rank and b.shape[2] == rank
            stored = params[f"decoder.layers.{layer}.mlp.experts.{weight}"]
            per_expert = stored.asnumpy().reshape(E, -1, stored.shape[1])
            merged = per_expert + scaling * np.stack([(b[e] @ a[e]).T for e in range(E)])
            stored.set_data(Tensor(merged.reshape(stored.shape).astype(np.float32)))
    expected = logits(reference, ids)
    assert np.abs(expected - base).max() > 1e-2
    # float32 sums in another order: 6e-6 seen; a wrong rank or scaling in one layer is off by ~1e-2
    np.testing.assert_allclose(logits(net, ids), expected, rtol=1e-5, atol=3e-5 * np.abs(expected).max())


def test_a_run_checkpoint_keeps_the_key_order_and_resumes(tmp_path):
    """Resuming compares the checkpoint's pet_config with the run's, order of the keys included."""
    from pet_hooks.training.run_checkpoint import check_compatible, latest_checkpoint
    job = _job()
    cfg = {"pet_type": "lora", "lora_rank": 2, "target_modules": list(LAYERS), "rank_pattern": {"v": 7, ".*": 3}}
    net = pet_hooks.apply(three_layers(job), cfg)
    pet_hooks.save_checkpoint(net, None, 3, str(tmp_path))
    checkpoint = latest_checkpoint(str(tmp_path))
    assert list(checkpoint.meta["pet_config"]["rank_pattern"]) == ["v", ".*"]
    check_compatible(checkpoint, config=pet_hooks.load_config(cfg), net=net)
    with pytest.raises(PetStateError, match="rank_pattern"):
        check_compatible(checkpoint, config=pet_hooks.load_config({**cfg, "rank_pattern": {".*": 3, "v": 7}}))
