"""Checkpoints of a PET run: the adapter, the optimizer's state over the deltas, and where the run stood.

    save_dir/checkpoints/step-<n>/
        adapter_config.json         the adapter, as ``save_adapter`` writes it (``load_adapter`` reads
        adapter_model.safetensors   the folder as it reads any adapter)
        train_state.safetensors     the optimizer's state (moments, step counters and with them the
                                    learning-rate schedule's position) and the train step's own (loss
                                    scale), by parameter name: never a base weight
        trainer_state.json          global step, epoch, step within it, the config, the adapter's name,
                                    the deltas' names and shapes, the optimizer's class, random states
        COMPLETE                    written last: the SHA-256 of each file above

A checkpoint is complete or absent: it is written into a hidden temporary folder, the marker
last, and renamed into place (one ``rename``, atomic on a POSIX file system); older ones beyond
``keep`` are renamed away before they are deleted. Reading checks the marker and every file's
hash: a folder without the marker, with a file missing or truncated, or with one bit flipped
is skipped with a one-line warning naming it, and the newest complete one before it is used.
Loading checks the config, the adapter's name, every delta's name and shape and every state
tensor against the net and the optimizer before writing anything into them.

The doors (``PetCallback``, ``pet-hooks run``) call this at the steps they choose; a hand-written
loop calls :func:`save_checkpoint` and :func:`load_checkpoint` itself (docs/front_doors.md).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from .._version import __version__
from ..config.lora_patterns import PATTERN_FIELDS
from ..config.pet_config import PetConfigError, config_from_dict, config_differences
from ..errors import AdapterFileError, PetStateError
from ..io.adapter_io import save_adapter
from ..multi.adapters import focused
from ..surgery.core import get_state, require_state, saved_parameters
from ..utils.distributed import is_rank_zero
from ..utils.files import CONFIG_NAME, WEIGHTS_NAME, file_sha256, json_text, read_json, read_safetensors, to_numpy

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "restore_checkpoint", "check_compatible",
           "RunCheckpoint", "sweep_temporary", "CHECKPOINTS_DIR", "STATE_NAME", "TRAINER_STATE_NAME", "MARKER_NAME", "check_keep"]

logger = logging.getLogger("pet_hooks")

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "train_state.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
MARKER_NAME = "COMPLETE"
FORMAT = "pet_hooks-run-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class RunCheckpoint:
    """One complete checkpoint found on disk: its folder and what ``trainer_state.json`` says."""
    path: str
    step: int
    meta: Dict[str, Any] = field(repr=False)

    @property
    def epoch(self) -> Optional[int]:
        return self.meta.get("epoch")

    @property
    def step_in_epoch(self) -> Optional[int]:
        return self.meta.get("step_in_epoch")


def check_keep(keep: Any) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive integer (how many checkpoints to keep), got {keep!r}")
    return keep


# ----------------------------------------------------------------------------- what is saved
def _model_ids(net: nn.Cell) -> set:
    return {id(p) for p in net.get_parameters()}


def _state_parameters(net: nn.Cell, holder: Optional[nn.Cell]) -> Dict[str, Parameter]:
    """The parameters of ``holder`` (an optimizer, or a train step holding one) that are not the model's:
    the optimizer's moments and step counters, a loss scale and its update cell's counters."""
    if holder is None:
        return {}
    model_ids = _model_ids(net)
    found: Dict[str, Parameter] = {}
    for _, param in holder.parameters_and_names():
        if id(param) not in model_ids and param.name not in found:
            found[param.name] = param
    return found


def _deltas(net: nn.Cell, adapter_name: Optional[str]) -> Dict[str, tuple]:
    with focused(net, adapter_name or require_state(net, "save a checkpoint").active[0]):
        return {p.name: tuple(p.shape) for p in saved_parameters(net)}


def _random_states() -> Dict[str, Any]:
    """The random states a step may draw from that can be read: MindSpore's default generator (its
    ``get_rng_state``), NumPy's and Python's global ones. (The CPU Dropout kernels keep their own.)"""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: Dict[str, Any] = {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                              "python": _jsonable(random.getstate())}
    try:
        states["mindspore"] = ms.get_rng_state().asnumpy().tolist()
    except (AttributeError, RuntimeError, TypeError):   # a MindSpore without it
        pass
    return states


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _restore_random(states: Dict[str, Any]) -> None:
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in states:
        random.setstate(_tupled(states["python"]))
    if "mindspore" in states and hasattr(ms, "set_rng_state"):
        ms.set_rng_state(Tensor(np.asarray(states["mindspore"], dtype=np.uint8)))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- writing
def save_checkpoint(net: nn.Cell, optimizer: Optional[nn.Cell], step: int, save_dir: str, *, keep: int = 2,
                    epoch: Optional[int] = None, step_in_epoch: Optional[int] = None,
                    steps_per_epoch: Optional[int] = None, adapter_name: Optional[str] = None,
                    all_ranks: bool = False) -> Optional[str]:
    """Write ``save_dir/checkpoints/step-<step>/`` (complete or not at all) and keep the newest ``keep``.

    ``optimizer`` is the optimizer over the deltas, or the train step holding it (then its loss scale is
    saved too); None saves the adapter and the position only. Only rank 0 of a distributed job writes
    (unless ``all_ranks``); the others return None. Returns the checkpoint's folder.
    """
    check_keep(keep)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    state = require_state(net, "save a checkpoint")
    if not all_ranks and not is_rank_zero():
        return None
    name = adapter_name or state.active[0]
    root = os.path.join(os.fspath(save_dir), CHECKPOINTS_DIR)
    os.makedirs(root, exist_ok=True)
    sweep_temporary(root)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".step-{step}.tmp-{os.getpid()}")
    from safetensors.numpy import save  # local: only saving and loading need it

    try:
        save_adapter(net, tmp, adapter_name=name)
        tensors = {key: np.ascontiguousarray(to_numpy(param))
                   for key, param in _state_parameters(net, optimizer).items()}
        _write(os.path.join(tmp, STATE_NAME), save(tensors, metadata={"format": FORMAT}))
        meta = {
            "format": FORMAT, "pet_hooks_version": __version__, "global_step": step, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "steps_per_epoch": steps_per_epoch, "adapter_name": name,
            "pet_config": state.adapters[name].config.to_dict() if name in state.adapters else state.config.to_dict(),
            "model_class": f"{type(net).__module__}.{type(net).__qualname__}",
            "deltas": {key: list(shape) for key, shape in _deltas(net, name).items()},
            "optimizer_class": None if optimizer is None else type(optimizer).__name__,
            "train_state": sorted(tensors), "random_state": _random_states(),
        }
        # rank_pattern / alpha_pattern keep their order (the first key wins; resume compares it)
        _write(os.path.join(tmp, TRAINER_STATE_NAME), json_text(meta, PATTERN_FIELDS, indent=1).encode("utf-8"))
        files = sorted(entry for entry in os.listdir(tmp) if not entry.startswith("."))
        marker = {"files": {entry: file_sha256(os.path.join(tmp, entry)) for entry in files}, "global_step": step}
        _write(os.path.join(tmp, MARKER_NAME), json.dumps(marker, indent=1, sort_keys=True).encode("utf-8"))
        _fsync_dir(tmp)
        if os.path.exists(final):          # the same step saved again (a resumed run): swap it whole
            _discard(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _rotate(root, keep)
    return final


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _discard(path: str) -> None:
    """Delete a folder so that no kill can leave it half deleted under its own name: renamed first."""
    parent, base = os.path.split(path)
    trash = os.path.join(parent, f".{base}.old-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def sweep_temporary(root: str) -> None:
    """Remove what killed saves and deletions left (hidden folders of this layout) under ``root``."""
    if not os.path.isdir(root):
        return
    for entry in os.listdir(root):
        if entry.startswith(".step-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def _step_folders(root: str) -> List[tuple]:
    """(step, path) of the folders named step-<n>, newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        match = _STEP_DIR.match(entry)
        if match and os.path.isdir(os.path.join(root, entry)):
            found.append((int(match.group(1)), os.path.join(root, entry)))
    return sorted(found, reverse=True)


def _rotate(root: str, keep: int) -> None:
    complete = [(step, path) for step, path in _step_folders(root) if _problem(path) is None]
    for _, path in complete[keep:]:
        _discard(path)


# ----------------------------------------------------------------------------- reading
def _problem(path: str) -> Optional[str]:
    """Why the folder is not a complete checkpoint, or None when it is."""
    marker_path = os.path.join(path, MARKER_NAME)
    if not os.path.isfile(marker_path):
        return f"no {MARKER_NAME} marker (the save did not finish)"
    try:
        with open(marker_path, encoding="utf-8") as handle:
            marker = json.load(handle)
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER_NAME} marker is unreadable"
    for required in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, TRAINER_STATE_NAME):
        if required not in files:
            return f"its marker does not list {required}"
    for entry, digest in files.items():
        full = os.path.join(path, entry)
        if not os.path.isfile(full):
            return f"{entry} is missing"
        if file_sha256(full) != digest:
            return f"{entry} does not match its recorded hash (truncated or changed on disk)"
    return None


def latest_checkpoint(save_dir: str, warn: bool = True) -> Optional[RunCheckpoint]:
    """The newest complete checkpoint under ``save_dir/checkpoints``, or None; broken ones are skipped
    with one warning line each, naming the folder and what is wrong with it."""
    for step, path in _step_folders(os.path.join(os.fspath(save_dir), CHECKPOINTS_DIR)):
        problem = _problem(path)
        if problem is None:
            try:
                meta = read_json(os.path.join(path, TRAINER_STATE_NAME))
                if meta.get("format") != FORMAT or meta.get("global_step") != step:
                    raise AdapterFileError("not this format or not this step")
            except AdapterFileError as err:
                problem = f"{TRAINER_STATE_NAME} is not usable ({err})"
            else:
                return RunCheckpoint(path, step, meta)
        if warn:
            logger.warning("pet_hooks: skipping checkpoint %s: %s", path, problem)
    return None


def check_compatible(checkpoint: RunCheckpoint, config=None, adapter_name: Optional[str] = None,
                     net: Optional[nn.Cell] = None, optimizer: Optional[nn.Cell] = None) -> None:
    """Raise PetStateError naming the first mismatch between ``checkpoint`` and what would resume from it:
    the PET config, the adapter's name, the net's deltas (names and shapes), the optimizer's state."""
    meta = checkpoint.meta
    where = checkpoint.path
    if config is not None:
        try:
            saved = config_from_dict(meta["pet_config"])
        except (PetConfigError, KeyError, TypeError) as err:
            raise PetStateError(f"checkpoint {where}: its pet_config is not usable ({err})") from None
        if saved != config:
            raise PetStateError(f"checkpoint {where} was written with another PET config "
                                f"({config_differences(saved, config)}; the checkpoint's first)")
    if adapter_name is not None and meta.get("adapter_name") != adapter_name:
        raise PetStateError(f"checkpoint {where} trains adapter {meta.get('adapter_name')!r}, not {adapter_name!r}")
    if net is not None:
        saved_deltas = {key: tuple(shape) for key, shape in meta.get("deltas", {}).items()}
        ours = _deltas(net, meta.get("adapter_name"))
        _compare(where, "delta", saved_deltas, ours, "the net")
    if optimizer is not None:
        names = set(meta.get("train_state", []))
        ours = set(_state_parameters(net, optimizer)) if net is not None else names
        if names != ours:
            missing, extra = sorted(names - ours)[:3], sorted(ours - names)[:3]
            raise PetStateError(f"checkpoint {where} holds the state of another optimizer "
                                f"({meta.get('optimizer_class')} vs {type(optimizer).__name__}; "
                                f"only in the checkpoint: {missing}, only here: {extra})")


def _compare(where: str, what: str, saved: Dict[str, tuple], ours: Dict[str, tuple], holder: str) -> None:
    if saved == ours:
        return
    missing, extra = sorted(set(saved) - set(ours)), sorted(set(ours) - set(saved))
    if missing or extra:
        raise PetStateError(f"checkpoint {where} is of another model or method: {what}s only in the checkpoint "
                            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, only in {holder} "
                            f"{extra[:3]}{' ...' if len(extra) > 3 else ''}")
    name = next(key for key in saved if saved[key] != ours[key])
    raise PetStateError(f"checkpoint {where} is of another model or method: {what} {name} has shape "
                        f"{list(saved[name])} there and {list(ours[name])} in {holder}")


def restore_checkpoint(net: nn.Cell, optimizer: Optional[nn.Cell], checkpoint: RunCheckpoint,
                       restore_random: bool = True) -> int:
    """Write ``checkpoint``'s adapter into ``net`` and its state into ``optimizer`` (checked first: on a
    mismatch nothing is written); returns its global step."""
    state = require_state(net, "resume from a checkpoint")
    name = checkpoint.meta.get("adapter_name") or state.active[0]
    if name not in state.adapters:
        raise PetStateError(f"checkpoint {checkpoint.path} trains adapter {name!r}, which "
                            f"{type(net).__name__} does not have (it has {sorted(state.adapters)})")
    check_compatible(checkpoint, config=state.adapters[name].config, net=net, optimizer=optimizer)
    weights = read_safetensors(os.path.join(checkpoint.path, WEIGHTS_NAME))
    tensors = read_safetensors(os.path.join(checkpoint.path, STATE_NAME))
    with focused(net, name):
        params = {p.name: p for p in saved_parameters(net)}
        _check_values(checkpoint.path, weights, params)
        targets = _state_parameters(net, optimizer)
        _check_values(checkpoint.path, tensors, targets)
        for key, value in weights.items():
            params[key].set_data(Tensor(value).astype(params[key].dtype))
    for key, value in tensors.items():
        target = targets[key]
        target.set_data(Tensor(value.reshape(target.shape)).astype(target.dtype))
    if restore_random:
        _restore_random(checkpoint.meta.get("random_state", {}))
    logger.info("pet_hooks: resumed from %s (step %d)", checkpoint.path, checkpoint.step)
    return checkpoint.step


def _check_values(where: str, values: Dict[str, np.ndarray], params: Dict[str, Parameter]) -> None:
    if set(values) != set(params):
        missing, extra = sorted(set(params) - set(values))[:3], sorted(set(values) - set(params))[:3]
        raise PetStateError(f"checkpoint {where} does not fit: not in it {missing}, not here {extra}")
    for key, value in values.items():
        # a scalar state may be () or (1,) (Adam's beta1_power after a PyNative step): same value either way
        if tuple(value.shape) != tuple(params[key].shape) and (
                value.size != 1 or int(np.prod(params[key].shape)) != 1):
            raise PetStateError(f"checkpoint {where}: {key} has shape {list(value.shape)} there and "
                                f"{list(params[key].shape)} here")


def load_checkpoint(net: nn.Cell, optimizer: Optional[nn.Cell], save_dir: str,
                    restore_random: bool = True) -> int:
    """Resume a hand-written loop: load the newest complete checkpoint under ``save_dir/checkpoints`` into
    ``net`` (which must have its PET applied) and ``optimizer``; returns its global step, the last step
    done (0 when there is none yet: one line says the run starts fresh)."""
    if get_state(net) is None:
        raise PetStateError(f"cannot resume: {type(net).__name__} has no PET applied (apply the config first)")
    checkpoint = latest_checkpoint(save_dir)
    if checkpoint is None:
        logger.warning("pet_hooks: no complete checkpoint in %s; starting from step 0",
                       os.path.join(os.fspath(save_dir), CHECKPOINTS_DIR))
        return 0
    return restore_checkpoint(net, optimizer, checkpoint, restore_random)
