"""The core flow on a net: apply / remove / merge / unmerge / disable, and the undo record.

``apply`` runs config -> match -> inject -> freeze and leaves a :class:`PetState` on the net;
every other operation reads that record, and ``remove`` undoes it to the identical original
(classes, parameter names, ``requires_grad`` flags, outputs)::

    apply(net, {"pet_type": "lora", "target_modules": ".*dense1|.*dense2"})
    with disable_adapters(net):
        base_out = net(x)
    remove(net)

Every structural change ends with ``force_recompile()``, so a net already compiled in graph
mode picks it up on its next call.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from mindspore import Parameter, nn

from . import chunked_loss, graph_reuse, freeze as optim, modules_to_save, trainable_tokens
from ..config import strategy_ckpt
from ..utils.ms_compat import force_recompile, release_compiled_graphs, warn_unchecked_versions
from ..config.pet_config import PetConfig, check_adapter_name, load_config
from ..errors import PetStateError
from .foreign_pet import refuse_foreign_pet
from ..tuners import Tuner, get_tuner

__all__ = ["PetState", "apply", "remove", "merge", "unmerge", "disable_adapters", "delta_parameters",
           "all_delta_parameters", "saved_parameters", "trainable_summary", "get_state", "has_pet",
           "switch_parameters", "parameter_counts", "refuse_tied", "tied_weights"]

logger = logging.getLogger("pet_hooks")
_STATE_ATTR = "_pet_hooks_state"


DEFAULT_ADAPTER = "default"


@dataclass
class NamedAdapter:
    """One adapter of a net (``pet_hooks.multi.adapters``): its config, the cells it adapts, and its values
    while they are not in those cells' parameters (``stored``: cell path -> {delta attribute: array})."""

    name: str
    config: PetConfig
    paths: List[str]
    stored: Dict[str, Dict[str, object]] = field(default_factory=dict)


@dataclass
class PetState:
    """Everything ``apply`` changed on one net, kept on that net for the other operations.

    ``cells`` holds one Injection per adapted cell; ``injections`` those of the cells that the
    active adapters adapt (all of them with one adapter): what trains, merges and is saved.
    """

    config: PetConfig                   # the first active adapter's
    tuner: Tuner
    injections: list
    requires_grad_before: Dict[str, bool]
    merged: bool = False
    kept: List[Parameter] = field(default_factory=list)
    reuse_marks: List[graph_reuse.ReuseMark] = field(default_factory=list)
    head_loss: Optional[chunked_loss.HeadLossSwap] = None     # config chunked_loss
    cells: list = field(default_factory=list)
    adapters: Dict[str, NamedAdapter] = field(default_factory=dict)
    active: List[str] = field(default_factory=list)
    disabled: bool = False              # inside disable_adapters
    copies: list = field(default_factory=list)     # config modules_to_save: modules_to_save.SavedCopy each
    tokens: list = field(default_factory=list)     # config trainable_token_indices: trainable_tokens.TokenRows each

    def __post_init__(self):
        if not self.cells:
            self.cells = list(self.injections)

    @property
    def enabled(self) -> bool:
        """True when the active adapters' branches compute (not merged, not disabled)."""
        return not (self.merged or self.disabled)

    def activate(self, names: List[str], injections: list) -> None:
        """Record that ``names`` are now the active adapters and ``injections`` the cells they adapt: the one
        writer of ``active``, ``config`` and ``injections`` after ``apply`` (``multi.slots.compose`` calls it
        once the cells hold those adapters' values)."""
        self.active = list(names)
        self.config = self.adapters[self.active[0]].config
        self.injections = list(injections)


def state_owner(net: nn.Cell) -> Optional[nn.Cell]:
    """The cell holding the PET record: ``net`` itself or a sub-cell (net may be a wrapper)."""
    if not isinstance(net, nn.Cell):
        raise TypeError(f"expected a mindspore.nn.Cell, got {type(net).__name__}")
    for _, cell in net.cells_and_names():
        if isinstance(cell.__dict__.get(_STATE_ATTR), PetState):
            return cell
    return None


def get_state(net: nn.Cell) -> Optional[PetState]:
    """The PET record of ``net`` (or of the PET model inside a wrapper such as WithLossCell)."""
    owner = state_owner(net)
    return None if owner is None else owner.__dict__[_STATE_ATTR]


def has_pet(net: nn.Cell) -> bool:
    return get_state(net) is not None


def _mark_blocks(net: nn.Cell, state: PetState) -> bool:
    """(Re)mark the identically adapted repeated blocks for one compiled graph each (graph_reuse);
    run after every change of structure or of ``requires_grad``, which the marks depend on.
    Returns True when the marks changed (then graph mode must recompile)."""
    before = [(id(m.cell), m.cell.__dict__.get("cell_init_args")) for m in state.reuse_marks]
    graph_reuse.unmark(state.reuse_marks)
    state.reuse_marks = graph_reuse.mark_repeated_blocks(net) if state.config.reuse_block_graphs else []
    return before != [(id(m.cell), m.cell.__dict__.get("cell_init_args")) for m in state.reuse_marks]


def after_change(net: nn.Cell, state: PetState, structural: bool) -> None:
    """What follows a change of the adapters: the block marks again, and when the structure or the marks
    changed, the stale compiled graphs freed and graph mode told to recompile."""
    if _mark_blocks(net, state) or structural:
        release_compiled_graphs(net)
        force_recompile()


def require_state(net: nn.Cell, action: str) -> PetState:
    """The PET record of ``net``; PetStateError saying ``action`` needs one when it has none."""
    state = get_state(net)
    if state is None:
        raise PetStateError(f"cannot {action}: {type(net).__name__} has no PET applied (call pet_hooks.apply first)")
    return state


def apply(net: nn.Cell, cfg, adapter_name: str = DEFAULT_ADAPTER) -> nn.Cell:
    """Add PET to ``net`` in place and return it, as the adapter ``adapter_name`` (active).

    Afterwards ``net.trainable_params()`` is exactly the deltas (plus parameters the config
    keeps trainable). Applying the same config again changes nothing; a different config on
    a net that already has PET is an error (``remove`` first).

    Raises:
        ValueError: bad config, a pattern that matches nothing, a cell the method cannot
            adapt. The net is left as it was.
    """
    cfg = load_config(cfg)
    warn_unchecked_versions()                           # once per process: copies of MindSpore code
    existing = get_state(net)
    if existing is not None:
        named = existing.adapters.get(adapter_name)
        if (named is not None and named.config == cfg) or (adapter_name == DEFAULT_ADAPTER and existing.config == cfg):
            logger.info("pet_hooks: %s already has this PET config; nothing to do", type(net).__name__)
            return net
        if existing.config == cfg:
            raise PetStateError(f"{type(net).__name__} already has this PET config as adapter(s) "
                                f"{list(existing.adapters)}; use pet_hooks.add_adapter(net, {adapter_name!r}, cfg) "
                                f"to add another")
        raise PetStateError(f"{type(net).__name__} already has PET ({existing.config.pet_type}) with a different "
                         f"config; call pet_hooks.remove(net) before applying another (or add_adapter for another LoRA)")
    refuse_foreign_pet(net)                             # MindFormers' own PET already there: no second layer
    check_adapter_name(adapter_name)
    tuner = get_tuner(cfg.pet_type)
    targets = tuner.select_targets(net, cfg)            # validates; changes nothing
    copy_targets = (modules_to_save.select(net, cfg.modules_to_save, [path for path, _ in targets])
                    if cfg.modules_to_save else [])
    token_spec = getattr(cfg, "trainable_token_indices", None)
    token_rows = (trainable_tokens.select(net, token_spec, [path for path, _ in targets], [p for p, _ in copy_targets])
                  if token_spec is not None else [])
    injections = tuner.inject(targets, cfg)             # all or nothing
    before: Optional[Dict[str, bool]] = None
    copies: list = []
    tokens: list = []
    try:
        copies = modules_to_save.install(net, copy_targets, adapter_name)   # config modules_to_save
        tokens = trainable_tokens.install(token_rows)                       # config trainable_token_indices
        deltas = {id(p): p for injection in injections for p in tuner.deltas_of(injection)}
        deltas.update((id(p), p) for p in modules_to_save.copy_parameters(copies))
        deltas.update((id(p), p) for p in trainable_tokens.delta_parameters(tokens))
        deltas = deltas.values()
        switches = tuner.switch_parameters(injections)
        switches = switches + tuner.frozen_parameters(injections)     # never trained either (VeRA's projections)
        before = optim.freeze_for_pet(net, deltas, cfg, switches)
        kept = optim.kept_trainable(net, cfg, {id(p) for p in deltas} | {id(p) for p in switches})
        head_loss = chunked_loss.install(net, cfg.chunked_loss) if cfg.chunked_loss else None
    except BaseException:
        if before is not None:                          # the model as it was: flags, then classes
            optim.restore_requires_grad(net, before)
        trainable_tokens.uninstall(tokens)
        modules_to_save.uninstall(copies)
        for injection in reversed(injections):
            tuner.eject(injection)
        raise
    for injection in injections:
        injection.occupants = [adapter_name]               # the values each adapted cell holds (multi.slots)
    state = PetState(cfg, tuner, injections, before, kept=kept, active=[adapter_name], head_loss=head_loss,
                     adapters={adapter_name: NamedAdapter(adapter_name, cfg, [r.path for r in injections])},
                     copies=copies, tokens=tokens)
    setattr(net, _STATE_ATTR, state)
    _mark_blocks(net, state)                            # last: the marks read the adapted, frozen blocks
    strategy_ckpt.enforce(net)                          # the strategy file must keep the base weights
    release_compiled_graphs(net)                        # stale from now on: free them
    force_recompile()
    logger.info("pet_hooks: %s applied to %d cell(s) of %s", cfg.pet_type, len(injections), type(net).__name__)
    return net


def remove(net: nn.Cell) -> nn.Cell:
    """Undo ``apply``: original classes, no delta parameters, the ``requires_grad`` flags from before.

    A merged net is unmerged first (weights back within float tolerance, with a warning).
    """
    owner = state_owner(net)
    if owner is None:
        raise PetStateError(f"cannot remove: {type(net).__name__} has no PET applied")
    state: PetState = owner.__dict__[_STATE_ATTR]
    if state.merged:
        logger.warning("pet_hooks: removing PET from a merged net; unmerging first (base weights are "
                       "restored within float tolerance, not bit for bit)")
        unmerge(net)
    graph_reuse.unmark(state.reuse_marks)
    chunked_loss.uninstall(state.head_loss)
    trainable_tokens.uninstall(state.tokens)            # installed after the injections: undone first
    modules_to_save.uninstall(state.copies)
    for injection in reversed(state.cells):
        state.tuner.eject(injection)
    optim.restore_requires_grad(owner, state.requires_grad_before)
    delattr(owner, _STATE_ATTR)
    strategy_ckpt.release(owner)
    release_compiled_graphs(net)
    force_recompile()
    return net


def _set_active(net: nn.Cell, state: PetState, active: bool) -> None:
    state.tuner.set_active(state.cells, active)        # each switch written once
    if not state.tuner.switch_is_data:                  # a switch of structure: graph mode must recompile
        _mark_blocks(net, state)
        release_compiled_graphs(net)
        force_recompile()


def tied_weights(net: nn.Cell, state: PetState) -> Dict[str, tuple]:
    """adapted cell path -> (its base weight's name, the first other cell computing with that weight), for the
    cells whose delta merging would fold into a weight another cell shares (an embedding tied to the output
    head, ``tie_word_embeddings``: tied Parameters, and what the tuner's ``weight_readers`` name)."""
    model = state_owner(net)                    # injection paths are relative to the adapted model
    owners: Dict[int, List[str]] = {}
    for path, cell in model.cells_and_names():
        for param in cell.get_parameters(expand=False):
            owners.setdefault(id(param), []).append(path)
    tied = {}
    for injection in state.injections:
        readers = state.tuner.weight_readers(model, injection)
        for weight in state.tuner.merge_weights(injection):
            others = [path for path in owners.get(id(weight), []) if path != injection.path] + readers
            if others and injection.path not in tied:
                tied[injection.path] = (weight.name, others[0])
    return tied


def refuse_tied(net: nn.Cell, state: PetState, action: str) -> None:
    """Raise PetStateError, naming the cells, when merging would fold a delta into a weight another cell also
    computes with (:func:`tied_weights`): unmerged, the delta changes its own cell only (as PEFT computes
    it); merged, the other cell too, so the merged model would not be the adapted one. ``action`` is what is
    refused ("merge", "save_merged_checkpoint"). Also any cell the tuner cannot merge (``merge_reason``:
    a ``lora_bias`` on a layer without a base bias), before anything is written."""
    for injection in state.injections:
        reason = state.tuner.merge_reason(injection)
        if reason:
            raise PetStateError(f"cannot {action}: cell '{injection.path}' {reason}")
    for path, (weight, other) in tied_weights(net, state).items():
        raise PetStateError(
            f"cannot {action}: the LoRA of '{path}' would go into its weight '{weight}', which is tied to "
            f"'{other}' (tie_word_embeddings), so '{other}' would change too and the merged model would not be "
            f"the adapted one (unmerged, the delta changes '{path}' only). Keep the adapter separate, or leave "
            f"'{path}' out of target_modules")


def merge(net: nn.Cell) -> nn.Cell:
    """Fold the deltas into the base weights (``W += scaling * B @ A``); outputs stay within tolerance.

    Raises:
        PetStateError: the method does not merge, or a delta would go into a weight another cell shares
            (a tied embedding, :func:`refuse_tied`). The net is left as it was.
    """
    state = require_state(net, "merge")
    if state.merged:
        logger.warning("pet_hooks: the adapter is already merged; merge() did nothing")
        return net
    if not state.tuner.can_merge:
        raise PetStateError(f"pet_type {state.config.pet_type!r} has no weights to merge")
    refuse_tied(net, state, "merge")
    for injection in state.injections:
        state.tuner.merge(injection, +1)
    state.merged = True
    _set_active(net, state, False)
    return net


def unmerge(net: nn.Cell) -> nn.Cell:
    """Take the deltas back out of the base weights and compute the branch again."""
    state = require_state(net, "unmerge")
    if not state.merged:
        logger.warning("pet_hooks: the adapter is not merged; unmerge() did nothing")
        return net
    for injection in state.injections:
        state.tuner.merge(injection, -1)
    state.merged = False
    _set_active(net, state, True)
    return net


@contextlib.contextmanager
def disable_adapters(net: nn.Cell) -> Iterator[nn.Cell]:
    """Inside the block the net computes exactly the base output.

    A merged net is unmerged for the block and merged again after it (float tolerance).
    """
    state = require_state(net, "disable adapters")
    was_merged = state.merged
    if was_merged:
        logger.warning("pet_hooks: disable_adapters on a merged net unmerges it for the block")
        unmerge(net)
    _set_active(net, state, False)
    _set_copies(net, state, False)
    state.disabled = True
    try:
        yield net
    finally:
        state.disabled = False
        _set_active(net, state, True)
        _set_copies(net, state, True)
        if was_merged:
            merge(net)


def _set_copies(net: nn.Cell, state: PetState, active: bool) -> None:
    """modules_to_save: the copies compute, or the originals; trainable_token_indices: the rows replaced or not.
    A structural switch, so graph mode recompiles."""
    if modules_to_save.set_active(state.copies, active) | trainable_tokens.set_active(state.tokens, active):
        release_compiled_graphs(net)
        force_recompile()


def _all_deltas(state: PetState) -> List[Parameter]:
    """Every delta once, in net order (prefix encoders are shared by all their layers), then the parameters of
    the modules_to_save copies (trained and saved like deltas)."""
    unique: Dict[int, Parameter] = {}
    for injection in state.injections:
        for param in state.tuner.deltas_of(injection):
            unique.setdefault(id(param), param)
    for param in modules_to_save.copy_parameters(state.copies) + trainable_tokens.delta_parameters(state.tokens):
        unique.setdefault(id(param), param)
    return list(unique.values())


def all_delta_parameters(net: nn.Cell) -> List[Parameter]:
    """Every delta Parameter, trainable or not (``freeze_include`` can freeze some)."""
    return _all_deltas(require_state(net, "list delta parameters"))


def delta_parameters(net: nn.Cell) -> List[Parameter]:
    """The trainable delta Parameters that ``apply`` added, in net order."""
    return [p for p in _all_deltas(require_state(net, "list delta parameters")) if p.requires_grad]


def saved_parameters(net: nn.Cell) -> List[Parameter]:
    """What an adapter file holds: every delta, plus base parameters kept trainable by the config."""
    state = require_state(net, "list adapter parameters")
    # kept base parameters belong to the adapter whose config keeps them (only the first one may: add_adapter)
    # LoRA's bias all / lora_only keeps base biases trainable, as freeze_exclude keeps what it names
    keeps = state.config.freeze_exclude or getattr(state.config, "bias", "none") != "none"
    return _all_deltas(state) + (list(state.kept) if keeps else [])


def trainable_summary(net: nn.Cell) -> str:
    """``"trainable params: X || all params: Y || trainable%: Z"``, as PEFT prints it."""
    trainable, total = parameter_counts(net)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def switch_parameters(net: nn.Cell) -> List[Parameter]:
    """pet_hooks' switches in ``net`` (LoRA's ``pet_lora_scale``): state, like PEFT's buffers, not
    weights of the model; never trained, counted, merged into or saved."""
    ids = set()
    for _, cell in net.cells_and_names():
        state = cell.__dict__.get(_STATE_ATTR)
        if isinstance(state, PetState):
            ids.update(id(p) for p in state.tuner.switch_parameters(state.cells))
    return [p for p in net.get_parameters() if id(p) in ids]


def parameter_counts(net: nn.Cell) -> tuple:
    """(trainable, all) parameter values of ``net``, its switches and the tuners' frozen deltas left out (VeRA's
    projections: buffers in PEFT, which counts parameters only)."""
    switches = {id(p) for p in switch_parameters(net)}
    for _, cell in net.cells_and_names():
        state = cell.__dict__.get(_STATE_ATTR)
        if isinstance(state, PetState):
            switches.update(id(p) for p in state.tuner.frozen_parameters(state.cells))
    total = trainable = 0
    for param in net.get_parameters():
        if id(param) not in switches:
            total += param.size
            trainable += param.size if param.requires_grad else 0
    return trainable, total
