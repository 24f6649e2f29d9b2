"""Which kind of cell a cell is: the dispatcher list, the one place LoRA asks a cell's type.

PEFT's ``lora/model.py::_create_new_module`` asks each dispatcher in turn (``dispatch_default``,
``dispatch_megatron``, ...; user-registered custom modules first) and the first that recognises the
module builds its layer. Here the list holds :class:`~pet_hooks.tuners.lora.kind.LoraKind` objects,
the kinds registered by users first (the most recent first), then the built-in ones, the most
specific first::

    kind = kind_of(cell)                 # the first kind that recognises the cell, or None
    why = kind.refuse(cell) if kind else unsupported_reason()

    pet_hooks.register_lora_kind(MyProjKind())      # cells of your own (docs/methods.md)
    pet_hooks.unregister_lora_kind(kind)

A kind that recognises a cell answers for it, also when it then refuses it (a ``Dense`` subclass
with its own ``construct`` is refused, not handed on); a kind of your own registered for that
subclass is asked first. :func:`variant_of` picks the LoRA variant a config asks for (DoRA), the
same way, from :data:`VARIANTS`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from mindspore import nn

from . import embedding as lora_embedding, experts as lora_experts, linear as lora_linear, mcore as lora_mcore, \
    mha as lora_mha
from .dora import DORA
from .kind import LoraKind, LoraLayer, LoraVariant

__all__ = ["kind_of", "kinds", "register_lora_kind", "unregister_lora_kind", "unsupported_reason", "variant_of",
           "BUILT_IN", "VARIANTS"]

#: the kinds pet_hooks knows, in the order they are asked (an mcore subclass before its base class)
BUILT_IN: Tuple[LoraKind, ...] = (
    (lora_mha.MULTIHEAD_ATTENTION,) + lora_mcore.KINDS + (lora_experts.GROUPED_EXPERTS,) + lora_embedding.KINDS
    + (lora_linear.DENSE, lora_linear.LINEAR))
#: the LoRA variants, asked in turn which one a config asks for
VARIANTS: Tuple[LoraVariant, ...] = (DORA,)

_REGISTERED: List[LoraKind] = []          # the users' kinds, the most recent first

_BUILT_IN_REASON = ("LoRA adapts mindspore.nn.Dense, mindspore.nn.MultiheadAttention, "
                    "mindformers.modules.layers.Linear, MindFormers' ColumnParallelLinear / RowParallelLinear / "
                    "FFNGroupedGEMM (grouped MoE experts) and the embeddings " + lora_embedding.SUPPORTED)


def kinds() -> Tuple[LoraKind, ...]:
    """Every kind, in the order the dispatcher asks them."""
    return tuple(_REGISTERED) + BUILT_IN


def kind_of(cell: nn.Cell) -> Optional[LoraKind]:
    """The first kind that recognises ``cell`` (adapted or not), or None when none does."""
    return next((kind for kind in kinds() if kind.recognises(cell)), None)


def unsupported_reason() -> str:
    """Why a cell no kind recognises cannot take LoRA: the kinds there are."""
    if not _REGISTERED:
        return _BUILT_IN_REASON
    return _BUILT_IN_REASON + "; and the registered cell kinds " + ", ".join(kind.name or repr(kind)
                                                                             for kind in _REGISTERED)


def variant_of(cfg) -> Optional[LoraVariant]:
    """The variant ``cfg`` asks for (DoRA with ``use_dora``), None for plain LoRA."""
    return next((variant for variant in VARIANTS if variant.applies(cfg)), None)


def register_lora_kind(kind: LoraKind) -> LoraKind:
    """Teach LoRA a kind of cell of your own: ``kind`` is asked before every kind registered earlier and every
    built-in one, so it can also take over a subclass of a built-in class (a ``Dense`` with its own
    ``construct``). Cells already adapted keep their kind. Returns ``kind``.

    ``kind`` is a :class:`~pet_hooks.tuners.lora.kind.LoraKind` with ``recognises`` and a ``mixin`` whose
    ``construct`` is the cell's computation with ``self._lora_branch(x2)`` added (docs/methods.md has an example).

    Raises:
        TypeError: ``kind`` is not a LoraKind, or its ``mixin`` is no LoRA layer class.
        ValueError: it is registered already.
    """
    if not isinstance(kind, LoraKind):
        raise TypeError(f"register_lora_kind: {kind!r} is not a pet_hooks.tuners.lora.LoraKind")
    mixin = kind.mixin
    if not (isinstance(mixin, type) and (issubclass(mixin, LoraLayer) or getattr(mixin, "pet_hooks_lora", False))
            and "construct" in {name for klass in mixin.__mro__ for name in vars(klass)}):
        raise TypeError(f"register_lora_kind: {kind!r} needs a mixin: a pet_hooks.tuners.lora.LoraLayer subclass "
                        f"with a construct (got {mixin!r})")
    if any(kind is known for known in kinds()):
        raise ValueError(f"register_lora_kind: {kind!r} is registered already")
    _REGISTERED.insert(0, kind)
    return kind


def unregister_lora_kind(kind: LoraKind) -> None:
    """Forget a kind :func:`register_lora_kind` taught; cells already adapted stay adapted (and are removed as
    usual). KeyError when it was not registered."""
    for index, known in enumerate(_REGISTERED):
        if known is kind:
            del _REGISTERED[index]
            return
    raise KeyError(f"unregister_lora_kind: {kind!r} was not registered")
