"""``chunked_loss: <rows>``: MindFormers Llama's head and loss by row chunks (pet_hooks.surgery.chunked_loss, issue 28).

The reference is MindFormers' own computation: the same LoRA-adapted model without ``chunked_loss``
(its ``lm_head`` and ``CrossEntropyLoss``). The loss and every delta's gradient must equal it, with
ignored labels in the batch and a chunk size that does not divide the rows; evaluation logits must be
MindFormers' unchanged; ``remove`` must give the cells their classes back.
"""
from __future__ import annotations

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import pet_hooks
from pet_hooks.surgery.core import has_pet
from pet_hooks.errors import PetConfigError, PetConfigTypeError, UnsupportedCellError
from tests.conftest import NEEDS_MINDFORMERS, assert_params_equal, snapshot

pytestmark = NEEDS_MINDFORMERS

LORA = {"pet_type": "lora", "lora_rank": 2, "target_modules": ".*wq|.*wv", "seed": 0}
IDS = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
LABELS = np.random.default_rng(1).integers(0, 64, (2, 9)).astype(np.int32)
LABELS[0, :3] = -100                  # ignored positions (MindFormers' ignore_token_id)
LABELS[1, 4] = 64                     # an id outside the vocabulary: MindFormers gives it no loss but a gradient


def _adapted(chunked_loss=None):
    from tests.nets import tiny_llama
    net = pet_hooks.apply(tiny_llama(), {**LORA, "chunked_loss": chunked_loss})
    rng = np.random.default_rng(7)    # B != 0, so the deltas reach the loss
    for param in net.trainable_params():
        param.set_data(Tensor(rng.normal(0, 0.2, param.shape).astype(np.float32)))
    return net


def _loss_and_grads(net):
    net.set_train(True)
    loss, grads = ms.value_and_grad(net, None, net.trainable_params())(Tensor(IDS), Tensor(LABELS))
    return float(loss.asnumpy().reshape(-1)[0]), {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}


def _eval_logits(net):
    net.set_train(False)
    out = net(Tensor(IDS[:, :8]))
    return (out[0] if isinstance(out, tuple) else out).asnumpy()


@pytest.mark.parametrize("rows", [5, 16, 64])
def test_loss_and_gradients_equal_mindformers_own(mode, rows):
    reference = _adapted()
    expected_loss, expected = _loss_and_grads(reference)
    net = _adapted(rows)
    assert type(net.lm_head).__name__ == "PassThroughHead_of_Linear"
    loss, grads = _loss_and_grads(net)
    assert abs(loss - expected_loss) <= 1e-6 * abs(expected_loss), (loss, expected_loss)
    assert set(grads) == set(expected) and len(grads) == 8
    for name, grad in grads.items():
        assert np.abs(expected[name]).max() > 1e-4, name           # each delta's gradient is there to compare
        np.testing.assert_allclose(grad, expected[name], rtol=1e-5, atol=1e-6 * np.abs(expected[name]).max(),
                                   err_msg=name)


def test_training_steps_match_and_evaluation_is_unchanged(mode):
    runs = {}
    for rows in (None, 6):
        net = _adapted(rows)
        base = snapshot(net)
        step = nn.TrainOneStepCell(net, nn.Adam(net.trainable_params(), learning_rate=1e-2))
        step.set_train(True)
        losses = [float(step(Tensor(IDS), Tensor(LABELS)).asnumpy().reshape(-1)[0]) for _ in range(3)]
        runs[rows] = (losses, {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}, _eval_logits(net))
        base_names = [name for name in base if "lora" not in name]
        assert_params_equal(base, net, names=base_names)             # the base weights never moved
    (ref_losses, ref_deltas, ref_logits), (losses, deltas, logits) = runs[None], runs[6]
    assert ref_losses[0] != ref_losses[-1]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for name, value in deltas.items():
        np.testing.assert_allclose(value, ref_deltas[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert logits.shape == ref_logits.shape and logits.shape[-1] == 64      # real logits in evaluation
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)


def test_remove_gives_the_cells_back():
    from tests.nets import tiny_llama
    plain = tiny_llama()
    head_class, loss_class = type(plain.lm_head), type(plain.loss)
    loss_attributes = set(plain.loss.__dict__)
    net = pet_hooks.apply(plain, {**LORA, "chunked_loss": 4})
    assert type(net.loss).__name__ == "ChunkedLoss_of_CrossEntropyLoss"
    pet_hooks.remove(net)
    assert type(net.lm_head) is head_class and type(net.loss) is loss_class
    assert set(net.loss.__dict__) == loss_attributes
    assert [name for name, _ in net.loss.cells_and_names()] == [name for name, _ in tiny_llama().loss.cells_and_names()]


def test_a_model_that_is_not_mindformers_llama_is_refused():
    from samples.tiny_gpt import build
    net = build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
    before = snapshot(net)
    with pytest.raises(UnsupportedCellError, match="chunked_loss: TinyGPT holds 0 MindFormers LlamaForCausalLM"):
        pet_hooks.apply(net, {"pet_type": "lora", "target_modules": ".*dense1", "chunked_loss": 8})
    assert not has_pet(net) and not [p for p in net.get_parameters() if "lora" in p.name]
    assert_params_equal(before, net)


def test_a_trainable_head_weight_is_refused_and_the_model_left_as_it_was():
    from tests.nets import tiny_llama
    net = tiny_llama()
    flags = {p.name: p.requires_grad for p in net.get_parameters()}
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    with pytest.raises(PetConfigError, match="the head weight lm_head.weight trains"):
        pet_hooks.apply(net, {**LORA, "chunked_loss": 8, "freeze_exclude": ["lm_head.*"]})
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert not has_pet(net)


@pytest.mark.parametrize("value, error, words", [(0, PetConfigError, "chunked_loss must be >= 1, got 0"),
                                                 ("8", PetConfigTypeError, "chunked_loss must be an integer"),
                                                 (True, PetConfigTypeError, "chunked_loss must be an integer")])
def test_bad_values_name_the_field(value, error, words):
    with pytest.raises(error, match=words):
        pet_hooks.load_config({**LORA, "chunked_loss": value})
