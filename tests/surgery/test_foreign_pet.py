"""A model MindFormers' own PET already adapted is refused with an error that names what was found and
the hand-over, through apply and the doors, and is left exactly as it was (its cells and their classes, its
parameters' names, values and requires_grad flags: tests/unchanged.py).

The hand-over itself (MindFormers' LoRA checkpoint into a plain model with load_adapter) is checked
against MindFormers' logits in tests/models/test_mindformers_parity.py::test_load_a_mindformers_lora_checkpoint.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.config.pet_config import PetConfigError
from pet_hooks.surgery.core import has_pet
from tests.nets import tiny_llama
from tests.unchanged import unchanged

pytest.importorskip("mindformers")
MF_LORA = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "target_modules": ".*wq|.*wv"}


def _mindformers_pet(pet: dict):
    from mindformers.pet import get_pet_model
    return get_pet_model(tiny_llama(), dict(pet))


def _shape_of(net):
    return ([(path, type(cell)) for path, cell in net.cells_and_names()],
            sorted(p.name for p in net.trainable_params()))


@pytest.mark.parametrize("ours", [
    pytest.param({"pet_type": "lora", "target_modules": ".*wq|.*wv"}, id="lora-same-cells"),
    pytest.param({"pet_type": "lora", "target_modules": ".*wk"}, id="lora-other-cells"),
    pytest.param({"pet_type": "ptuning2", "pre_seq_len": 4}, id="ptuning2"),
])
def test_apply_refuses_a_model_with_mindformers_pet(mode, ours):
    theirs = _mindformers_pet(MF_LORA)
    before = _shape_of(theirs)
    with unchanged(theirs):
        with pytest.raises(PetConfigError) as info:
            pet_hooks.apply(theirs, ours)
    message = str(info.value)
    assert "MindFormers' own PET" in message and "does not adapt a model twice" in message
    assert "LoRADense" in message or "mindpet_delta_lora" in message          # what was found
    assert "pet_config" in message and "load_adapter" in message              # the two ways on
    assert not has_pet(theirs) and _shape_of(theirs) == before


def test_the_mindformers_prefix_model_is_recognised_too():
    theirs = _mindformers_pet({"pet_type": "ptuning2", "pre_seq_len": 4})
    with unchanged(theirs):
        with pytest.raises(PetConfigError, match=r"mindformers\.pet\..*PTuning2Model|already carries"):
            pet_hooks.apply(theirs, {"pet_type": "lora", "target_modules": ".*wq"})
    assert not has_pet(theirs)


def test_callback_on_a_mindformers_pet_model_is_the_same_clear_error(mode, tmp_path):
    theirs = _mindformers_pet(MF_LORA)
    seq = theirs.network.network.config.seq_length
    ids = np.random.default_rng(0).integers(1, 64, (2, 2, seq + 1)).astype(np.int32)
    data = ds.GeneratorDataset([(row,) for row in ids], ["input_ids"], shuffle=False)
    model = Model(theirs, optimizer=nn.Adam(theirs.trainable_params(), 1e-2))
    callback = pet_hooks.PetCallback({"pet_type": "lora", "target_modules": ".*wk"}, save_dir=str(tmp_path / "ad"))
    with unchanged(theirs, tmp_path / "ad"):                 # no step taken, no adapter written
        with pytest.raises(PetConfigError, match="already carries MindFormers' own PET"):
            model.train(1, data, callbacks=[callback])
    assert not has_pet(theirs)


def test_a_plain_model_is_not_mistaken_for_one(mode):
    net = tiny_llama()
    pet_hooks.apply(net, MF_LORA)
    assert has_pet(net)
