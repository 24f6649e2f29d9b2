"""Several adapters on one net (issue 18): add / set / delete / list, training only the active ones, per-adapter
files, hot swap, mixed batches, and the front doors' ``adapter_name``; in graph and PyNative mode.

The reference is NumPy: ``TwoDense`` computes ``act(x W1^T + b1 + sum_n s_n x A_n^T B_n^T)`` and so on for the
second layer, with every adapter's A and B the values the test itself wrote into it (``_fill``), never read
back from pet_hooks' store of the inactive adapters (the slots the forward reads), and its scaling from the config.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.surgery.core import get_state
from pet_hooks.utils.ms_compat import hook_version
from tests.conftest import NEEDS_MINDFORMERS, NEEDS_TORCH_PEFT, ROOT
from tests.nets import TwoDense
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are

A = {"pet_type": "lora", "target_modules": "dense1|dense2", "lora_rank": 2, "lora_alpha": 4, "seed": 1}
B = {"pet_type": "lora", "target_modules": "dense2", "lora_rank": 3, "lora_alpha": 12, "seed": 2}
C = {"pet_type": "lora", "target_modules": "dense1|dense2", "lora_rank": 2, "lora_alpha": 2, "seed": 3}
SCALING = {"default": 2.0, "b": 4.0, "c": 1.0}
LAYERS = ("dense1", "dense2")


def _net():
    ms.set_seed(0)
    net = TwoDense(act="tanh", din=6, dh=10, dout=4)
    net.set_train(False)
    return net


def _x(rows=4):
    return Tensor(np.random.default_rng(0).normal(size=(rows, 5, 6)).astype(np.float32))


def _fill(net, seed):
    """Random values into the active adapter's deltas (B too, so that each adapter moves the output); returns
    what it wrote, layer -> (A, B)."""
    rng = np.random.default_rng(seed)
    written = {}
    for param in pet_hooks.delta_parameters(net):
        value = (0.3 * rng.standard_normal(param.shape)).astype(np.float32)
        param.set_data(Tensor(value))
        layer, leaf = param.name.rsplit(".", 1)
        written.setdefault(layer, {})[leaf] = value
    return {layer: (leaves["lora_A"], leaves["lora_B"]) for layer, leaves in written.items()}


def _reference(weights, values, active, x):
    """NumPy: the net's output with the adapters ``active`` summed; ``values[name][layer] = (A, B)``."""
    h = np.asarray(x, np.float32)
    for layer in LAYERS:
        w, b = weights[layer]
        y = h @ w.T + b
        for name in active:
            if layer in values[name]:
                a, bb = values[name][layer]
                y = y + SCALING[name] * (h @ a.T @ bb.T)
        h = np.tanh(y) if layer == "dense1" else y
    return h


def _weights(net):
    return {layer: (getattr(net, layer).weight.asnumpy().copy(), getattr(net, layer).bias.asnumpy().copy())
            for layer in LAYERS}


def _base(net):
    """The base model's parameter values (every parameter pet_hooks did not add)."""
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()
            if ".lora_" not in p.name and ".pet_lora_" not in p.name}


def _assert_base_unchanged(before, net):
    after = _base(net)
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def _live(net):
    """The active adapter's (A, B) per layer, from its trainable Parameters (what an optimizer updates)."""
    leaves = {}
    for param in pet_hooks.delta_parameters(net):
        layer, leaf = param.name.rsplit(".", 1)
        leaves.setdefault(layer, {})[leaf] = param.asnumpy().copy()
    return {layer: (pair["lora_A"], pair["lora_B"]) for layer, pair in leaves.items()}


def _three_adapters():
    """default (dense1+dense2, r2), b (dense2 only, r3), c (like default); each filled with its own values.
    Returns the net and what was written, adapter -> layer -> (A, B)."""
    net = _net()
    pet_hooks.apply(net, A)
    written = {"default": _fill(net, 1)}
    for name, cfg, seed in (("b", B, 2), ("c", C, 3)):
        pet_hooks.add_adapter(net, name, cfg)
        pet_hooks.set_adapter(net, name)
        written[name] = _fill(net, seed)
    pet_hooks.set_adapter(net, "default")
    return net, written


@pytest.fixture
def graph_mode():
    before = ms.get_context("mode")
    ms.set_context(mode=0)
    yield
    ms.set_context(mode=before)


def _each_alone(net, x, names):
    """name -> the net's output with that adapter alone active; "default" is active afterwards."""
    outputs = {}
    for name in names:
        pet_hooks.set_adapter(net, name)
        outputs[name] = net(x).asnumpy()
    pet_hooks.set_adapter(net, "default")
    return outputs


class _NoCompile:
    """Nothing compiled for ``net`` and the graph cache key unmoved in the block."""

    def __init__(self, net):
        self.net = net

    def __enter__(self):
        self.phases, self.version = set(self.net.compile_cache), hook_version()

    def __exit__(self, *exc):
        if exc[0] is None:
            assert hook_version() == self.version, "the hook version moved: every graph recompiles"
            assert set(self.net.compile_cache) == self.phases, "a new graph was compiled"


# ----------------------------------------------------------------------------- add, switch, list, delete
def test_each_adapter_and_their_sum_compute_as_numpy_says(mode):
    net, values = _three_adapters()
    x = _x()
    weights = _weights(net)
    assert pet_hooks.list_adapters(net) == ["default", "b", "c"]
    assert set(values["b"]) == {"dense2"} and values["b"]["dense2"][0].shape == (3, 10)
    for active in (["default"], ["b"], ["c"], ["default", "b"], ["b", "c", "default"]):
        pet_hooks.set_adapter(net, active if len(active) > 1 else active[0])
        assert pet_hooks.active_adapters(net) == active
        np.testing.assert_allclose(net(x).asnumpy(), _reference(weights, values, active, x.asnumpy()),
                                   rtol=1e-5, atol=1e-5)
    with pet_hooks.disable_adapters(net):
        np.testing.assert_allclose(net(x).asnumpy(), _reference(weights, values, [], x.asnumpy()), rtol=1e-5, atol=1e-5)


def test_switching_adapters_of_the_same_ranks_compiles_nothing(mode):
    net, _ = _three_adapters()
    x = _x()
    outputs = _each_alone(net, x, ("default", "c", "b"))
    net(x)
    with _NoCompile(net):
        # default and c have the same ranks and targets; b (dense2 only, rank 3) needs other shapes
        for name in ("c", "default", "c"):
            pet_hooks.set_adapter(net, name)
            np.testing.assert_array_equal(net(x).asnumpy(), outputs[name])
    version = hook_version()
    pet_hooks.set_adapter(net, "b")
    assert hook_version() != version                 # another rank on dense2: a structural change, said so
    np.testing.assert_array_equal(net(x).asnumpy(), outputs["b"])


def test_only_the_active_adapter_trains_and_the_others_keep_their_values(mode):
    net, written = _three_adapters()
    base, weights = _base(net), _weights(net)
    pet_hooks.set_adapter(net, "c")
    deltas = pet_hooks.delta_parameters(net)
    assert [p.name for p in deltas] == ["dense1.lora_A", "dense1.lora_B", "dense2.lora_A", "dense2.lora_B"]
    assert {id(p) for p in net.trainable_params()} == {id(p) for p in deltas}
    before = written["c"]
    for layer, (a, b) in _live(net).items():            # c's Parameters hold what was written into c
        np.testing.assert_array_equal(a, before[layer][0])
        np.testing.assert_array_equal(b, before[layer][1])
    net.set_train(True)
    optimizer = nn.SGD(deltas, 0.1)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), optimizer)
    x, target = _x(), Tensor(np.ones((4, 5, 4), np.float32))
    for _ in range(3):
        step(x, target)
    net.set_train(False)
    _assert_base_unchanged(base, net)                   # the base model, bit for bit
    after = _live(net)
    assert all(not np.array_equal(after[k][1], before[k][1]) for k in after)       # c trained
    x = _x()
    np.testing.assert_allclose(net(x).asnumpy(), _reference(weights, {"c": after}, ["c"], x.asnumpy()),
                               rtol=1e-5, atol=1e-5)
    for name in ("default", "b"):                    # the others exactly as written: their values and their output
        pet_hooks.set_adapter(net, name)
        for layer, (a, b) in _live(net).items():
            np.testing.assert_array_equal(a, written[name][layer][0], err_msg=f"{name} {layer}")
            np.testing.assert_array_equal(b, written[name][layer][1], err_msg=f"{name} {layer}")
        np.testing.assert_allclose(net(x).asnumpy(), _reference(weights, written, [name], x.asnumpy()),
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_cell_only_an_inactive_adapter_adapts_adds_nothing_and_does_not_train(mode):
    net = _net()
    x = _x()
    pet_hooks.apply(net, {**A, "target_modules": "dense1"})
    _fill(net, 1)
    expected = net(x).asnumpy()
    pet_hooks.add_adapter(net, "b", B)               # dense2: adapted now, parked
    pet_hooks.set_adapter(net, "b")
    _fill(net, 2)
    pet_hooks.set_adapter(net, "default")
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    assert [p.name for p in pet_hooks.delta_parameters(net)] == ["dense1.lora_A", "dense1.lora_B"]
    assert not net.dense2.lora_B.requires_grad and not net.dense2.pet_lora_scale.asnumpy().any()


def test_delete_and_remove_restore_the_original_net(mode):
    net = _net()
    x = _x()
    original = net(x).asnumpy()
    names = [(p.name, p.requires_grad) for p in net.get_parameters()]
    pet_hooks.apply(net, {**A, "target_modules": "dense1"})
    _fill(net, 1)
    expected = net(x).asnumpy()
    pet_hooks.add_adapter(net, "b", B)
    pet_hooks.delete_adapter(net, "b")
    assert pet_hooks.list_adapters(net) == ["default"]
    assert type(net.dense2) is nn.Dense and not hasattr(net.dense2, "lora_A")   # only b adapted it
    np.testing.assert_array_equal(net(x).asnumpy(), expected)
    pet_hooks.add_adapter(net, "b", B)
    pet_hooks.set_adapter(net, ["default", "b"])
    pet_hooks.remove(net)
    assert type(net.dense1) is nn.Dense and type(net.dense2) is nn.Dense
    assert [(p.name, p.requires_grad) for p in net.get_parameters()] == names
    np.testing.assert_array_equal(net(x).asnumpy(), original)


def test_merge_folds_every_active_adapter(mode):
    net, _ = _three_adapters()
    x = _x()
    pet_hooks.set_adapter(net, ["default", "b"])
    summed = net(x).asnumpy()
    pet_hooks.merge(net)
    np.testing.assert_allclose(net(x).asnumpy(), summed, rtol=1e-5, atol=1e-5)
    with pytest.raises(pet_hooks.PetStateError, match="unmerge"):
        pet_hooks.set_adapter(net, "c")
    pet_hooks.unmerge(net)
    np.testing.assert_allclose(net(x).asnumpy(), summed, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- files
def test_save_and_load_each_adapter_and_all_of_them(mode, tmp_path):
    net, _ = _three_adapters()
    x = _x()
    outputs = _each_alone(net, x, ("default", "b", "c"))
    optimizer_params = [id(p) for p in pet_hooks.delta_parameters(net)]
    pet_hooks.save_adapter(net, tmp_path / "b", adapter_name="b")
    pet_hooks.save_adapter(net, tmp_path / "all", adapter_name="all")
    # saving an inactive adapter leaves the net as it was: same Parameter objects, same output
    assert [id(p) for p in pet_hooks.delta_parameters(net)] == optimizer_params
    np.testing.assert_array_equal(net(x).asnumpy(), outputs["default"])
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["pet_config"]
    assert saved["lora_rank"] == 3 and saved["target_modules"] == "dense2"
    # PEFT's layout of several adapters: "default" in the folder, every other in a sub-folder of its name
    assert sorted(os.listdir(tmp_path / "all")) == ["adapter_config.json", "adapter_model.safetensors", "b", "c"]

    fresh = _net()
    pet_hooks.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    assert pet_hooks.list_adapters(fresh) == ["b"]
    np.testing.assert_allclose(fresh(x).asnumpy(), outputs["b"], rtol=1e-6, atol=1e-6)

    every = _net()
    pet_hooks.load_adapter(every, tmp_path / "all", adapter_name="all")
    assert pet_hooks.list_adapters(every) == ["default", "b", "c"] and pet_hooks.active_adapters(every) == ["default"]
    for name in ("default", "b", "c"):
        pet_hooks.set_adapter(every, name)
        np.testing.assert_allclose(every(x).asnumpy(), outputs[name], rtol=1e-6, atol=1e-6)


def test_hot_swap_replaces_values_in_place_without_a_compile(mode, tmp_path):
    net, _ = _three_adapters()
    x = _x()
    pet_hooks.set_adapter(net, "c")
    expected_c = net(x).asnumpy()
    pet_hooks.save_adapter(net, tmp_path / "c")
    pet_hooks.set_adapter(net, "default")
    default_out = net(x).asnumpy()
    with _NoCompile(net):
        pet_hooks.load_adapter(net, tmp_path / "c", adapter_name="default", hotswap=True)
        # c's values and config (alpha 2: another scaling) now in "default", which is active
        np.testing.assert_allclose(net(x).asnumpy(), expected_c, rtol=1e-6, atol=1e-6)
    assert pet_hooks.multi.adapters.adapter_config(net, "default").lora_alpha == 2
    # a misfit (b: rank 3 on dense2) is refused naming the adapter, the values kept
    pet_hooks.save_adapter(net, tmp_path / "b", adapter_name="b")
    with pytest.raises(pet_hooks.PetStateError, match="does not fit adapter 'default'"):
        pet_hooks.load_adapter(net, tmp_path / "b", adapter_name="default", hotswap=True)
    np.testing.assert_allclose(net(x).asnumpy(), expected_c, rtol=1e-6, atol=1e-6)
    assert not np.allclose(default_out, expected_c)


# ----------------------------------------------------------------------------- mixed batches
def test_each_row_goes_through_its_own_adapter(mode):
    net, _ = _three_adapters()
    x = _x(5)
    alone = _each_alone(net, x, ("default", "b", "c"))
    with pet_hooks.disable_adapters(net):
        alone["__base__"] = net(x).asnumpy()
    rows = ["b", "__base__", "default", "c", "b"]
    with pet_hooks.adapter_per_row(net, rows) as selection:
        out = net(x).asnumpy()
        for i, name in enumerate(rows):
            np.testing.assert_allclose(out[i], alone[name][i], rtol=1e-5, atol=1e-5, err_msg=name)
        with _NoCompile(net):                        # another composition: values only
            selection.set(["c", "c", "__base__", "default", "b"])
            out = net(x).asnumpy()
        for i, name in enumerate(selection.names):
            np.testing.assert_allclose(out[i], alone[name][i], rtol=1e-5, atol=1e-5, err_msg=name)
    assert pet_hooks.active_adapters(net) == ["default"]
    np.testing.assert_array_equal(net(x).asnumpy(), alone["default"])


# ----------------------------------------------------------------------------- the front doors
def _dataset():
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(4, 5, 6)).astype(np.float32), rng.normal(size=(4, 5, 4)).astype(np.float32))
               for _ in range(3)]
    return ds.GeneratorDataset(batches, ["x", "y"], shuffle=False)


def test_callback_and_enable_train_the_named_adapter_only(mode, tmp_path):
    for door in ("callback", "enable"):
        net = _net()
        pet_hooks.apply(net, A)
        default_values = _fill(net, 1)
        base, weights = _base(net), _weights(net)
        if door == "callback":
            model = Model(net, nn.MSELoss(), nn.Adam(net.trainable_params(), 1e-2))
            model.train(1, _dataset(), callbacks=[pet_hooks.PetCallback(C, save_dir=str(tmp_path / door),
                                                                          adapter_name="task_b")])
        else:
            with pet_hooks.enable(C, adapter_name="task_b"):
                step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.get_parameters(), 1e-2))
                for x, y in _dataset().create_tuple_iterator():
                    step(x, y)
            pet_hooks.save_adapter(net, tmp_path / door)
        assert pet_hooks.list_adapters(net) == ["default", "task_b"], door
        assert pet_hooks.active_adapters(net) == ["task_b"], door
        _assert_base_unchanged(base, net)
        trained = _live(net)                                # task_b, active
        assert set(trained) == {"dense1", "dense2"} and all(np.abs(b).sum() > 0 for _, b in trained.values()), door
        pet_hooks.set_adapter(net, "default")               # the other adapter untouched: as written, and its output
        for layer, (a, b) in _live(net).items():
            np.testing.assert_array_equal(a, default_values[layer][0], err_msg=f"{door} {layer}")
            np.testing.assert_array_equal(b, default_values[layer][1], err_msg=f"{door} {layer}")
        x = _x()
        np.testing.assert_allclose(net(x).asnumpy(), _reference(weights, {"default": default_values}, ["default"],
                                                                x.asnumpy()), rtol=1e-5, atol=1e-5, err_msg=door)
        saved = json.loads((tmp_path / door / "adapter_config.json").read_text())["pet_config"]
        assert saved["lora_alpha"] == 2, door


def test_launcher_takes_an_adapter_name(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np\nimport mindspore as ms\nfrom mindspore import nn, Tensor\n"
        "import sys; sys.path.insert(0, %r)\n"
        "from tests.nets import TwoDense\n"
        "net = TwoDense(act='tanh', din=6, dh=10, dout=4)\n"
        "step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), nn.Adam(net.trainable_params(), 1e-2))\n"
        "x = Tensor(np.ones((2, 6), np.float32)); y = Tensor(np.zeros((2, 4), np.float32))\n"
        "for _ in range(2):\n    step(x, y)\n" % ROOT)
    config = tmp_path / "pet.json"
    config.write_text(json.dumps(C))
    code = pet_hooks.cli.main(["run", "--config", str(config), "--adapter-name", "task_b", "--save-dir",
                               str(tmp_path / "out"), str(script)])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["pet_config"]
    assert saved["lora_alpha"] == 2
    fresh = _net()
    pet_hooks.load_adapter(fresh, tmp_path / "out", adapter_name="task_b")
    assert pet_hooks.list_adapters(fresh) == ["task_b"]
    # the deltas trained: each moved from the values C's seed draws (the same in any process, checked here)
    initial, again = (_live(pet_hooks.apply(_net(), C, adapter_name="task_b")) for _ in range(2))
    trained = _live(fresh)
    assert set(trained) == set(initial) == {"dense1", "dense2"}
    for layer, (a, b) in trained.items():
        np.testing.assert_array_equal(initial[layer][0], again[layer][0])        # the init is the seed's alone
        assert not initial[layer][1].any() and np.abs(b).max() > 1e-4, layer    # B starts at 0 and moved
        assert np.abs(a - initial[layer][0]).max() > 1e-4, layer                # A moved from its draw too


# ----------------------------------------------------------------------------- against PEFT itself
@NEEDS_MINDFORMERS
@NEEDS_TORCH_PEFT
def test_several_adapters_in_peft_layout_both_ways_and_peft_mixed_batches(tmp_path, graph_mode):
    """Ours in PEFT's layout of several adapters read by PEFT (each adapter's logits); PEFT's two adapters
    (saved by ``save_pretrained``) read with ``adapter_name="all"``; and a mixed batch against PEFT's
    ``adapter_names``. Graph mode, the tiny Llama with the same weights on both sides."""
    from tests.io.test_peft_format import llama_ids, llama_logits, llama_with_weights, randomize, write_reference_job
    net = llama_with_weights()
    ids = np.concatenate([llama_ids(2), llama_ids(3)])                  # 4 rows
    write_reference_job(net, ids, tmp_path)
    ours = {}
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*wq|.*wv"})
    randomize(pet_hooks.delta_parameters(net), seed=6, scale=0.2)
    ours["default"] = llama_logits(net, ids)
    pet_hooks.add_adapter(net, "b", {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 6, "target_modules": ".*wk|.*w2"})
    pet_hooks.set_adapter(net, "b")
    randomize(pet_hooks.delta_parameters(net), seed=7, scale=0.2)
    ours["b"] = llama_logits(net, ids)
    pet_hooks.save_adapter(net, tmp_path / "ours", format="peft", name_map="llama", adapter_name="all")
    out = run_reference([os.path.join(HERE, "peft_reference_multi.py"), str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("default", "b"):
        assert np.abs(ours[name] - ours["b" if name == "default" else "default"]).max() > 1e-2
        np.testing.assert_allclose(ours[name], np.load(tmp_path / f"torch_ours_{name}.npy"), rtol=1e-4, atol=1e-5,
                                   err_msg=name)

    fresh = llama_with_weights()
    pet_hooks.load_adapter(fresh, tmp_path / "theirs", adapter_name="all")
    assert pet_hooks.list_adapters(fresh) == ["default", "extra"]
    for name in ("default", "extra"):
        pet_hooks.set_adapter(fresh, name)
        np.testing.assert_allclose(llama_logits(fresh, ids), np.load(tmp_path / f"torch_theirs_{name}.npy"),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    rows = [["default", "extra", "__base__", "extra"][i % 4] for i in range(ids.shape[0])]
    with pet_hooks.adapter_per_row(fresh, rows):
        np.testing.assert_allclose(llama_logits(fresh, ids), np.load(tmp_path / "torch_theirs_mixed.npy"),
                                   rtol=1e-4, atol=1e-5)


def test_other_methods_keep_one_adapter_and_a_wrapper_is_seen_through():
    from samples.tiny_gpt import build
    from tests.conftest import SMALL
    gpt = pet_hooks.apply(build(seed=0, **SMALL), {"pet_type": "ptuning2", "pre_seq_len": 2}, adapter_name="prompt")
    assert pet_hooks.list_adapters(gpt) == ["prompt"] and pet_hooks.active_adapters(gpt) == ["prompt"]
    with pytest.raises(pet_hooks.PetStateError, match="LoRA feature.*ptuning2"):
        pet_hooks.add_adapter(gpt, "b", A)
    # a wrapper (WithLossCell) around a LoRA net: the new adapter's cells are named as apply named them
    net = pet_hooks.apply(_net(), A)
    wrapped = nn.WithLossCell(net, nn.MSELoss())
    pet_hooks.add_adapter(wrapped, "b", B)
    assert get_state(net).adapters["b"].paths == ["dense2"]
    pet_hooks.set_adapter(wrapped, "b")
    assert [p.name for p in pet_hooks.delta_parameters(net)] == ["dense2.lora_A", "dense2.lora_B"]
