"""Config ``modules_to_save`` against Hugging Face PEFT's ``ModulesToSaveWrapper``, in graph and PyNative mode.

The three-layer net of tests/nets.py (``k``, ``v``, ``down``) with LoRA on k and v and ``down`` in
``modules_to_save``, in PyTorch with PEFT 0.21 (tests/peft_reference_modules_to_save.py, its own process) and
in MindSpore with pet_hooks, on the same weights, LoRA values and copy values: the outputs, the gradients of
every trainable parameter (the copy's included), the disabled and merged outputs must be PEFT's; PEFT must read
pet_hooks' PEFT-format adapter and pet_hooks PEFT's. Then the contract: the original ``down`` is never
written (training through PetCallback, merge), remove gives it back bit for bit, the native format round
trip, ``inspect``, and the errors.
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
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks.cli.inspection import format_report, inspect_net
from pet_hooks.errors import NoMatchError, PetConfigError
from pet_hooks.surgery.core import get_state
from tests.conftest import HAS_TORCH_PEFT, assert_params_equal, snapshot, assert_close
from tests.nets import ThreeLayers, three_layers, three_layers_job
from tests.torch_runner import run_reference

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/, where the reference scripts are
CFG = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ["k", "v"], "modules_to_save": ["down"]}
COPY = "down.modules_to_save.default."
TRAINABLE = ["k.lora_A", "k.lora_B", "v.lora_A", "v.lora_B", COPY + "weight", COPY + "bias"]
NAMES = ["A.k", "B.k", "A.v", "B.v", "copy.weight", "copy.bias"]     # the same, in the reference's names


def _job() -> dict:
    """Weights ([out, in]), input, upstream gradient, LoRA values and copy values all different from the base."""
    def values(rng, layer, din, dout):
        if layer == "down":                           # the last layer: the copy of down, drawn after it
            return {"copy.weight": (rng.standard_normal((4, 8)) * 0.5).astype(np.float32),
                    "copy.bias": (rng.standard_normal(4) * 0.5).astype(np.float32)}
        return {f"A.{layer}": (rng.standard_normal((2, din)) * 0.5).astype(np.float32),
                f"B.{layer}": (rng.standard_normal((dout, 2)) * 0.5).astype(np.float32)}
    return three_layers_job(7, per_layer=values)


def _set_values(net, job) -> None:
    params = {p.name: p for p in pet_hooks.delta_parameters(net)}
    for ours, theirs in zip(TRAINABLE, NAMES):
        params[ours].set_data(Tensor(job[theirs]))


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    """PEFT's results for _job(), with pet_hooks' PEFT-format adapter of it read by PEFT (one torch process)."""
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    work = tmp_path_factory.mktemp("mts")
    job = _job()
    np.savez(work / "job.npz", **job)
    net = pet_hooks.apply(three_layers(job), CFG)
    _set_values(net, job)
    pet_hooks.save_adapter(net, work / "ours", format="peft", task_type=None)
    out = run_reference([os.path.join(HERE, "peft_reference_modules_to_save.py"), str(work)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, job, dict(np.load(work / "torch.npz"))


def test_outputs_gradients_disable_and_merge_equal_peft(mode, peft_run):
    _, job, torch_out = peft_run
    net = pet_hooks.apply(three_layers(job), CFG)
    base = snapshot(net)
    assert [p.name for p in net.trainable_params()] == TRAINABLE      # the original down is frozen
    _set_values(net, job)
    x, g = Tensor(job["x"]), Tensor(job["g"])
    params = pet_hooks.delta_parameters(net)

    def loss(x, g):
        return (net(x) * g).sum()

    _, grads = ms.value_and_grad(loss, None, params)(x, g)
    assert_close(net(x).asnumpy(), torch_out["out"])
    for name, grad in zip(NAMES, grads):
        assert_close(grad.asnumpy(), torch_out[f"grad.{name}"], err_msg=name)
    with pet_hooks.disable_adapters(net):               # the original down, LoRA off: the base output
        assert_close(net(x).asnumpy(), torch_out["disabled"])
    assert_close(net(x).asnumpy(), torch_out["out"])
    pet_hooks.merge(net)                                # LoRA folds into k and v; the copy still computes
    assert_close(net(x).asnumpy(), torch_out["merged"])
    assert_params_equal(base, net, ["down.weight", "down.bias"])  # the copy is not merged into the original
    pet_hooks.unmerge(net)
    assert_close(net(x).asnumpy(), torch_out["out"])


def test_peft_reads_ours_and_we_read_peft(mode, peft_run):
    work, job, torch_out = peft_run
    assert_close(torch_out["ours"], torch_out["out"])   # PEFT with pet_hooks' file gives PEFT's own output
    # PEFT's keys: the copy without its modules_to_save.<adapter> prefix
    assert {"base_model.model.down.weight", "base_model.model.down.bias"} <= set(torch_out["keys"].tolist())
    assert set(load_file(work / "ours" / "adapter_model.safetensors")) == set(torch_out["keys"].tolist())
    net = three_layers(job)
    base = snapshot(net)
    pet_hooks.load_adapter(net, work / "theirs")
    assert get_state(net).config.modules_to_save == ["down"]
    assert_close(net(Tensor(job["x"])).asnumpy(), torch_out["out"])
    assert_params_equal(base, net)
    pet_hooks.remove(net)
    assert_params_equal(base, net)


def test_native_round_trip_and_remove_bit_for_bit(mode, tmp_path):
    job = _job()
    net = three_layers(job)
    x = Tensor(job["x"])
    base, base_out = snapshot(net), net(x).asnumpy()
    pet_hooks.apply(net, CFG)
    np.testing.assert_array_equal(net(x).asnumpy(), base_out)   # the copy starts as the original
    _set_values(net, job)
    out = net(x).asnumpy()
    pet_hooks.save_adapter(net, tmp_path / "a")
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == set(TRAINABLE)
    fresh = pet_hooks.load_adapter(three_layers(job), tmp_path / "a")
    np.testing.assert_array_equal(fresh(x).asnumpy(), out)
    pet_hooks.remove(net)
    assert type(net.down) is nn.Dense and not hasattr(net.down, "pet_mts_copy")
    assert [name for name, _ in net.cells_and_names()] == ["", "k", "v", "down"]
    assert_params_equal(base, net)
    assert sorted(p.name for p in net.get_parameters()) == sorted(base)
    np.testing.assert_array_equal(net(x).asnumpy(), base_out)


def test_petcallback_trains_the_copy_only(mode):
    job = _job()
    net = three_layers(job)
    base = snapshot(net)
    data = ds.NumpySlicesDataset({"x": job["x"], "y": job["g"]}, shuffle=False).batch(3)
    model = Model(net, nn.MSELoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9))
    model.train(2, data, callbacks=[pet_hooks.PetCallback(CFG)])
    assert_params_equal(base, net)                      # every base weight bit for bit, down's too
    copy = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net) if p.name.startswith(COPY)}
    assert np.abs(copy[COPY + "weight"] - job["down.weight"]).max() > 1e-4   # the copy trained
    assert {p.name for p in model.train_network.optimizer.parameters} == set(TRAINABLE)


def test_inspect_lists_the_copies():
    report = inspect_net(ThreeLayers(), CFG)
    assert [row["path"] for row in report["copies"]] == ["down"]
    assert [p["name"] for p in report["copies"][0]["params"]] == [COPY + "weight", COPY + "bias"]
    assert "modules_to_save (1 cell(s)" in format_report(report)


@pytest.mark.parametrize("entries, error, words", [
    (["dwn"], NoMatchError, ["'dwn'", "down"]),                       # matches nothing: the nearest names
    (["k"], PetConfigError, ["'k'", "also a target"]),                # adapted and copied at once
])
def test_bad_entries_leave_the_net_as_it_was(entries, error, words):
    net = ThreeLayers()
    base = snapshot(net)
    with pytest.raises(error) as info:
        pet_hooks.apply(net, {**CFG, "modules_to_save": entries})
    for word in words:
        assert word in str(info.value)
    assert get_state(net) is None and type(net.down) is nn.Dense and not hasattr(net.down, "pet_mts_copy")
    assert_params_equal(base, net)


def test_merged_checkpoint_is_peft_merge_and_unload(mode, peft_run, tmp_path):
    _, job, torch_out = peft_run
    net = pet_hooks.apply(three_layers(job), CFG)
    _set_values(net, job)
    pet_hooks.save_merged_checkpoint(net, str(tmp_path / "merged.ckpt"))
    plain = ThreeLayers()
    assert not ms.load_param_into_net(plain, ms.load_checkpoint(str(tmp_path / "merged.ckpt")))[0]
    np.testing.assert_array_equal(plain.down.weight.asnumpy(), torch_out["unloaded.down.weight"])  # the copy
    assert_close(plain(Tensor(job["x"])).asnumpy(), torch_out["unloaded"])


def test_a_native_file_loads_under_another_adapter_name(tmp_path):
    job = _job()
    net = pet_hooks.apply(three_layers(job), CFG)
    _set_values(net, job)
    x = Tensor(job["x"])
    pet_hooks.save_adapter(net, tmp_path / "a")
    other = pet_hooks.load_adapter(three_layers(job), tmp_path / "a", adapter_name="b")
    copy = {p.name: p for p in pet_hooks.delta_parameters(other)}["down.modules_to_save.b.weight"]
    np.testing.assert_array_equal(copy.asnumpy(), job["copy.weight"])
    np.testing.assert_array_equal(other(x).asnumpy(), net(x).asnumpy())


@pytest.mark.slow
def test_llama_norm_copy_through_the_llama_name_map_both_ways(tmp_path):
    """A copy of MindFormers Llama's ``model.norm_out`` is PEFT's copy of ``model.norm`` (name map ``llama``):
    PEFT reads pet_hooks' file and pet_hooks PEFT's, the same logits as transformers + PEFT."""
    pytest.importorskip("mindformers")
    if not HAS_TORCH_PEFT:
        pytest.skip("torch, transformers and peft are not all installed")
    from tests.io.test_peft_format import hf_name
    from tests.tuners.test_lora_embedding import _llama, _llama_ids
    net = _llama(False)
    config = net.config
    spec = {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                            "num_heads", "rms_norm_eps", "theta", "seq_length")}
    copy = (1 + np.random.default_rng(3).standard_normal(32) * 0.3).astype(np.float32)
    (tmp_path / "llama.json").write_text(json.dumps({**spec, "tied": False}))
    np.savez(tmp_path / "llama.npz", ids=_llama_ids(), copy=copy,
             **{f"w.{hf_name(p.name)}": p.asnumpy() for p in net.get_parameters()})
    pet_hooks.apply(net, {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ".*wq",
                          "modules_to_save": ["norm_out"]})
    {p.name: p for p in pet_hooks.delta_parameters(net)}["model.norm_out.modules_to_save.default.weight"].set_data(
        Tensor(copy))
    pet_hooks.save_adapter(net, tmp_path / "llama_ours", format="peft", name_map="llama")
    doc = json.loads((tmp_path / "llama_ours" / "adapter_config.json").read_text())
    assert doc["modules_to_save"] == ["model.norm"]
    assert "base_model.model.model.norm.weight" in load_file(tmp_path / "llama_ours" / "adapter_model.safetensors")
    out = run_reference([os.path.join(HERE, "peft_reference_modules_to_save.py"), str(tmp_path),
                          "llama"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = dict(np.load(tmp_path / "llama_torch.npz"))
    net.set_train(False)
    ours = net(Tensor(_llama_ids()))[0].asnumpy()
    assert np.abs(ours - theirs["base"].reshape(ours.shape)).max() > 1e-2      # the copy changed the logits
    assert_close(ours, theirs["ours"].reshape(ours.shape))
    fresh = pet_hooks.load_adapter(_llama(False), tmp_path / "llama_theirs")
    # PEFT's "norm" ends every norm's name (input_layernorm, ...): PEFT copied all five, and so does pet_hooks
    assert get_state(fresh).config.modules_to_save == ["model.layers.0.attention_norm", "model.layers.0.ffn_norm",
                                                       "model.layers.1.attention_norm", "model.layers.1.ffn_norm",
                                                       "model.norm_out"]
    fresh.set_train(False)
    assert_close(fresh(Tensor(_llama_ids()))[0].asnumpy(), theirs["theirs"].reshape(ours.shape))


class _Scaled(nn.Cell):
    def __init__(self):
        super().__init__()
        self.d = nn.Dense(3, 3)

    def construct(self, x, scale=None):
        y = self.d(x)
        if scale is not None:
            y = y * scale
        return y


class _CallsWithKeywords(nn.Cell):
    """A parent calling the copied cell with a keyword argument, and without."""

    def __init__(self):
        super().__init__()
        self.inner = _Scaled()
        self.other = nn.Dense(3, 3)

    def construct(self, x):
        return self.other(self.inner(x, scale=2.0) + self.inner(x))


def test_a_copy_called_with_keywords_computes_as_the_cell_with_its_values(mode):
    ms.set_seed(1)
    net, reference = _CallsWithKeywords(), _CallsWithKeywords()
    for mine, theirs in zip(net.get_parameters(), reference.get_parameters()):
        theirs.set_data(mine.value())
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))
    pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ["other"], "modules_to_save": ["inner"]})
    values = (np.random.default_rng(1).standard_normal((3, 3))).astype(np.float32)
    {p.name: p for p in pet_hooks.delta_parameters(net)}["inner.modules_to_save.default.d.weight"].set_data(
        Tensor(values))
    reference.inner.d.weight.set_data(Tensor(values))
    np.testing.assert_array_equal(net(x).asnumpy(), reference(x).asnumpy())


def test_every_method_takes_it_and_ia3_files_hold_it(tmp_path):
    """On the base config: every registered method copies ``ln_f`` of the sample GPT, trains the copy, keeps the
    original frozen, and remove gives the net back bit for bit; IA3's PEFT files (PEFT's IA3Config has the
    field too) hold the copy and read back to the same output. Prompt tuning refuses the field (its model cell
    is moved onto the prompt adapter): one error naming it, the net unchanged."""
    from samples.tiny_gpt import build
    from tests.conftest import SMALL
    from tests.project.test_bad_input import VALID
    ids = Tensor(np.arange(8, dtype=np.int32).reshape(1, 8))
    for method, block in sorted(VALID.items()):
        net = build(seed=1, **SMALL)
        base, base_out = snapshot(net), net(ids).asnumpy()
        if method == "prompt_tuning":
            with pytest.raises(pet_hooks.PetConfigError, match=r"modules_to_save=\['ln_f'\] is not supported"):
                pet_hooks.apply(net, {**block, "modules_to_save": ["ln_f"]})
            assert_params_equal(base, net)
            continue
        pet_hooks.apply(net, {**block, "modules_to_save": ["ln_f"]})
        trainable = {p.name for p in net.trainable_params()}
        assert {"ln_f.modules_to_save.default.gamma", "ln_f.modules_to_save.default.beta"} <= trainable, method
        assert not {"ln_f.gamma", "ln_f.beta"} & trainable, method
        if method == "ia3":
            copy = {p.name: p for p in pet_hooks.delta_parameters(net)}["ln_f.modules_to_save.default.gamma"]
            copy.set_data(copy * 1.5)
            out = net(ids).asnumpy()
            pet_hooks.save_adapter(net, tmp_path / "ia3", format="peft")
            assert json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())["modules_to_save"] == ["ln_f"]
            fresh = pet_hooks.load_adapter(build(seed=1, **SMALL), tmp_path / "ia3")
            np.testing.assert_array_equal(fresh(ids).asnumpy(), out)
        pet_hooks.remove(net)
        assert_params_equal(base, net)
        np.testing.assert_array_equal(net(ids).asnumpy(), base_out, err_msg=method)
