"""How each known model takes prompt tuning's virtual tokens: the prompt adapters and their registry.

A prompt adapter is a mixin derived from :class:`PromptModel` with the model's own ``construct`` signature:
it puts ``n`` placeholder ids in front of ``input_ids`` (so every length the model derives from the ids, its
causal and pad masks and its rotary or position table, covers ``n + S`` positions), the ignore index in front
of the labels, and cuts the virtual positions off what the model returns. The input embedding it names
(``embedding_path``) moves onto :class:`PromptEmbeddingLayer`, which writes the prompt over the placeholders'
rows of its output (its own table is never written). Graph mode compiles these classes' source (the cells
move onto generated subclasses), which is why each adapter spells the model's signature out.

The placeholder id is never looked up for a value; it must only not be the model's pad id, which MindFormers
masks. Built in (by dotted name, so MindFormers is not imported here): MindFormers' legacy
``LlamaForCausalLM``. Other models register theirs (``pet_hooks.register_prompt_model``; ``samples/tiny_gpt.py``
does for its GPT).
"""
from __future__ import annotations

from typing import Optional, Union

from mindspore import nn, ops

from ..cell_adapters import CellAdapterRegistry

__all__ = ["PromptModel", "LlamaForCausalLMPrompt", "PromptEmbeddingLayer", "register_prompt_model",
           "unregister_prompt_model", "prompt_adapter_for", "known_prompt_models", "PROMPT"]

#: the name of the prompt Parameter (PEFT's key in adapter_model.safetensors is the same)
PROMPT = "prompt_embeddings"


class PromptModel:
    """Base of every prompt adapter (a mixin over the model's class; graph mode compiles its ``construct``).

    A subclass gives ``embedding_path(cell)`` (the path of the input embedding below the model cell), may
    refuse a configuration in ``check_model(cell)``, and writes a ``construct`` with the model's own signature
    from ``with_prompt_ids`` / ``with_prompt_labels`` / ``without_prompt`` and ``self.pet_base_construct``::

        class MyGPTPrompt(pet_hooks.PromptModel):
            @staticmethod
            def embedding_path(cell):
                return "embedding"

            def construct(self, input_ids):
                if self.pet_prompt_active:
                    return self.without_prompt(self.pet_base_construct(self.with_prompt_ids(input_ids)))
                return self.pet_base_construct(input_ids)

        pet_hooks.register_prompt_model(MyGPT, MyGPTPrompt)
    """

    pet_hooks_prompt_model = True  # marker: "this instance was patched by pet_hooks' prompt tuning"

    @staticmethod
    def embedding_path(cell) -> str:
        """The path of ``cell``'s input embedding cell, relative to ``cell``."""
        raise NotImplementedError

    @staticmethod
    def check_model(cell) -> None:
        """Raise ValueError for a configuration of ``cell`` the adapter does not support."""

    @staticmethod
    def placeholder_id(cell) -> int:
        """An id that is not the model's pad id (its rows are replaced; only masks read it)."""
        pad = getattr(cell, "pad_token_id", None)
        return 1 if pad == 0 else 0

    def with_prompt_ids(self, input_ids):
        """``input_ids`` (batch, S) with ``n`` placeholder ids in front: (batch, n + S)."""
        front = ops.ones((input_ids.shape[0], self.pet_prompt_len), input_ids.dtype) * self.pet_prompt_placeholder
        return ops.concat((front, input_ids), 1)

    def with_prompt_labels(self, labels, ignore):
        """``labels`` (batch, S) with ``ignore`` in front (PEFT's -100 labels): (batch, n + S)."""
        front = ops.ones((labels.shape[0], self.pet_prompt_len), labels.dtype) * ignore
        return ops.concat((front, labels), 1)

    def without_prompt(self, x):
        """``x`` (batch, n + S, ...) without the virtual positions."""
        return x[:, self.pet_prompt_len:]


class LlamaForCausalLMPrompt(PromptModel):
    """MindFormers 1.9's legacy ``LlamaForCausalLM``. Training: the labels (``input_ids`` when none are given, as
    the model itself takes them) get the ignore index in front, so the loss is PEFT's: over the real positions
    plus the last virtual one, which predicts the first token. Evaluation: the virtual positions are cut off
    whatever the model returns (2-D logits in predict mode; logits, tokens and mask otherwise)."""

    @staticmethod
    def embedding_path(cell) -> str:
        return "model.tok_embeddings"

    @staticmethod
    def check_model(cell) -> None:
        if cell.use_past:
            raise ValueError("incremental decoding (use_past=True) is not supported by prompt tuning")
        if cell.input_sliced_sig:
            raise ValueError("input_sliced_sig=True (labels already shifted) is not supported by prompt tuning")

    @staticmethod
    def placeholder_id(cell) -> int:
        return 1 if cell.pad_token_id == 0 else 0

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, batch_index=None, zactivate_len=None,
                  block_tables=None, slot_mapping=None, prefix_keys_values=None, llm_boost_inputs=None,
                  q_seq_lens=None, loss_mask=None, gather_index=None, seq_range=None, actual_seq_len=None):
        if not self.pet_prompt_active:
            return self.pet_base_construct(input_ids, labels, input_position, position_ids, attention_mask,
                                           input_embeds, init_reset, batch_valid_length, batch_index, zactivate_len,
                                           block_tables, slot_mapping, prefix_keys_values, llm_boost_inputs,
                                           q_seq_lens, loss_mask, gather_index, seq_range, actual_seq_len)
        if (position_ids is not None or attention_mask is not None or input_embeds is not None
                or loss_mask is not None or batch_valid_length is not None or prefix_keys_values is not None):
            raise ValueError("prompt tuning: position_ids, attention_mask, input_embeds, loss_mask, "
                             "batch_valid_length and prefix_keys_values are not supported")
        if labels is None:
            if self.training:
                labels = self.with_prompt_labels(input_ids, self.ignore_token_id)
        else:
            labels = self.with_prompt_labels(labels, self.ignore_token_id)
        out = self.pet_base_construct(self.with_prompt_ids(input_ids), labels, input_position)
        if self.training:
            return out                                   # the loss: the ignore index masks the virtual positions
        if self.predict_run_mode:                        # (batch * (n + S), vocab)
            logits = ops.reshape(out, (input_ids.shape[0], -1, out.shape[-1]))
            return ops.reshape(self.without_prompt(logits), (-1, out.shape[-1]))
        logits, tokens, input_mask = out
        return self.without_prompt(logits), self.without_prompt(tokens), self.without_prompt(input_mask)


class PromptEmbeddingLayer:
    """Mixin of the input embedding: its first ``n`` output rows (the placeholders') are the prompt."""

    pet_hooks_prompt_embedding = True

    def construct(self, input_ids):
        out = self.pet_base_construct(input_ids)
        if self.pet_prompt_active:
            prompt = ops.expand_dims(ops.cast(self.prompt_embeddings, out.dtype), 0)
            prompt = ops.broadcast_to(prompt, (out.shape[0], self.pet_prompt_len, out.shape[2]))
            out = ops.concat((prompt, out[:, self.pet_prompt_len:]), 1)
        return out


_REGISTRY = CellAdapterRegistry(
    "register_prompt_model", "pkg.mod.Model", PromptModel, "pet_hooks.PromptModel", ("embedding_path", "construct"),
    patched_flag="pet_hooks_prompt_model", builtin={
        "mindformers.models.llama.llama.LlamaForCausalLM": LlamaForCausalLMPrompt})


def register_prompt_model(cls: Union[type, str], adapter: type) -> None:
    """Teach prompt tuning a model class (a Cell class or its dotted name): ``adapter`` is a
    :class:`PromptModel` subclass with ``embedding`` and ``construct``."""
    _REGISTRY.register(cls, adapter)


def unregister_prompt_model(cls: Union[type, str]) -> None:
    """Forget what ``register_prompt_model(cls, ...)`` taught; models already adapted stay adapted."""
    _REGISTRY.unregister(cls)


def prompt_adapter_for(cell: nn.Cell) -> Optional[type]:
    """The prompt adapter registered for the class of ``cell`` (or its nearest registered base)."""
    return _REGISTRY.adapter_for(cell)


def known_prompt_models() -> str:
    """The classes prompt tuning knows, by dotted name, for messages."""
    return ", ".join(_REGISTRY.known())
