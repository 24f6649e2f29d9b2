"""What a config will tune, before any training: the report behind ``pet-hooks inspect``.

    report = inspect_net(net, "samples/configs/lora.yaml")     # the net is left as it was
    print(format_report(report))                               # or json.dumps(report)

    net = build_from_factory("samples.tiny_gpt:build")         # --model MODULE:FACTORY
    net = capture_script_model("train.py", ["--steps", "2"])   # SCRIPT [ARGS...], stopped at its first model

The report lists every pattern of ``target_modules`` (a top-level ``|`` alternative of the
regex, or a list entry) with how many cells it selects and, when it selects none, the
nearest names; every matched cell (path, type, input/output size, its delta parameters and
their shapes, and ``tied_to``: the cell that shares its weight, for a tied embedding, whose merge
is refused; with LoRA's ``rank_pattern`` / ``alpha_pattern``, its own ``rank`` and ``lora_alpha``, and
``by_pattern`` when a key set them); the cells that almost matched (the same type as a matched cell, or a type the
method adapts, not selected); and the trainable summary. It is built by running the core flow
(``apply``) on the net and undoing it (``remove``), so what it shows is what training gets.

A matched cell whose parent never calls it but reads its weights (seen in the source of the
parent's class: ``self.<name>.weight`` and no ``self.<name>(``) would train nothing; its row
carries an ``unreached`` note and the table ends with a warning. Parents pet_hooks computes
itself (``nn.MultiheadAttention``'s ``out_proj``) are not flagged.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import re
import runpy
import sys
from typing import Any, Dict, List, Optional, Tuple

from mindspore import nn

from ..doors import flow
from ..config.pet_config import load_config
from ..doors.context import PetSession
from ..doors.launcher import as_main, run_as_main
from ..utils.patching import PatchSet
from ..matching.all_linear import is_all_linear, output_heads
from ..matching.cells import (is_excluded, list_entry_matches, module_excluded, named_cells, nearest_names,
                              split_alternatives, under_name_maps)
from ..matching.layers import layer_filter
from ..surgery.core import apply, get_state, parameter_counts, remove, tied_weights, trainable_summary
from ..tuners import get_tuner

__all__ = ["inspect_net", "format_report", "build_from_factory", "capture_script_model", "split_alternatives"]


def _pattern_rows(targets: Any, cells: List[Tuple[str, nn.Cell]], adaptable: List[str],
                  linear: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    if targets is None:
        return []
    if is_all_linear(targets):      # one row: the linear cells but the output head
        return [{"pattern": targets, "cells": len(linear or []), "nearest": [], "under_name_maps": {}}]
    if isinstance(targets, str):
        entries = [(alt, lambda path, alt=alt: re.fullmatch(alt, path) is not None)
                   for alt in split_alternatives(targets)]
    else:
        entries = [(entry, lambda path, entry=entry: list_entry_matches(entry, path)) for entry in targets]
    leaves = sorted({path.rsplit(".", 1)[-1] for path in adaptable})
    rows = []
    for pattern, hit in entries:
        count = sum(1 for path, _ in cells if hit(path))
        rows.append({"pattern": pattern, "cells": count,
                     "nearest": [] if count else list(dict.fromkeys(
                         nearest_names(pattern, leaves, 3) + nearest_names(pattern, adaptable, 1))),
                     "under_name_maps": {} if count else under_name_maps(hit, adaptable)})
    return rows


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# MindSpore / legacy MindFormers name a projection's sizes in_channels / out_channels, the mcore layers
# input_size / output_size; the embeddings (in: the vocabulary, out: the width) have names of their own.
_SIZE_ALIASES = {"in_channels": ("input_size", "vocab_size", "vocab_table_size", "num_embeddings"),
                 "out_channels": ("output_size", "embedding_size", "embedding_dim")}


def _size(cell: nn.Cell, attr: str) -> Optional[int]:
    for name in (attr,) + _SIZE_ALIASES.get(attr, ()):
        value = getattr(cell, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    return None


def inspect_net(net: nn.Cell, cfg) -> Dict[str, Any]:
    """The report for ``net`` under ``cfg`` (a dict, JSON-ready); the net is left as it was.

    A config that cannot be applied (a pattern that matches nothing, a cell the method cannot
    adapt) gives a report whose ``error`` holds the message, with nearest names per pattern.
    """
    if not isinstance(net, nn.Cell):
        raise TypeError(f"expected a mindspore.nn.Cell, got {type(net).__name__}")
    config = load_config(cfg)
    tuner = get_tuner(config.pet_type)
    can_adapt = tuner.can_adapt
    cells = named_cells(net)
    adaptable = [path for path, cell in cells if can_adapt(cell) is None]
    excludes = getattr(config, "exclude_layers", None)
    skipped = _skip_rules(net, config, tuner, cells)
    report: Dict[str, Any] = {
        "model": _type_name(type(net)), "pet_type": config.pet_type, "config": config.to_dict(),
        "patterns": _pattern_rows(getattr(config, "target_modules", None), cells, adaptable, skipped["linear"]),
        "matched": [], "shared": [], "near_misses": [], "unreached": [], "error": None, "kept": [],
        "copies": [],                                   # config modules_to_save: the copied cells
        "token_rows": [],                               # config trainable_token_indices: the embeddings
    }
    applied_here = get_state(net) is None
    try:
        if applied_here:
            apply(net, config)
        state = get_state(net)
    except ValueError as err:
        report["error"] = str(err)
        state = None
    try:
        if state is not None:
            _fill(report, state, net, cells, adaptable, excludes, skipped)
            _flag_unreached(report, net)
        trainable, total = parameter_counts(net)
        report["summary"] = {"trainable": trainable, "all": total,
                             "percent": round(100.0 * trainable / total, 4) if total else 0.0,
                             "text": trainable_summary(net)}
    finally:
        if state is not None and applied_here:
            remove(net)
    return report


def _skip_rules(net: nn.Cell, config, tuner, cells) -> Dict[str, Any]:
    """What the near-miss reasons need beyond exclude_layers: ``exclude_modules``, the layers
    ``layers_to_transform`` keeps, and for ``"all-linear"`` the linear cells and the output head(s) left out."""
    rules: Dict[str, Any] = {"exclude_modules": getattr(config, "exclude_modules", None), "keep": None,
                             "heads": {}, "linear": None, "is_linear": None}
    layers = getattr(config, "layers_to_transform", None)
    if layers is not None:
        try:
            rules["keep"] = layer_filter([p for p, _ in cells], layers, getattr(config, "layers_pattern", None),
                                         type(net).__name__)
        except ValueError:
            pass                # apply reports it as the error
    is_linear = getattr(tuner, "is_linear", None)
    if is_all_linear(getattr(config, "target_modules", None)) and is_linear is not None:
        rules["is_linear"] = is_linear
        rules["heads"] = output_heads(net, cells, is_linear)
        rules["linear"] = [p for p, c in cells if is_linear(c) and p not in rules["heads"]]
    return rules


def _why_not(path: str, cell: nn.Cell, excludes, skipped: Dict[str, Any]) -> str:
    """Why a cell of an adaptable type was not adapted (the first rule that left it out)."""
    if is_excluded(path, excludes):
        return "excluded by exclude_layers"
    if module_excluded(path, skipped["exclude_modules"]):
        return "excluded by exclude_modules"
    if path in skipped["heads"]:
        return f"the output head, which 'all-linear' leaves out ({skipped['heads'][path]})"
    if skipped["is_linear"] is not None and not skipped["is_linear"](cell):
        return "not a linear layer ('all-linear')"
    if skipped["keep"] is not None and not skipped["keep"](path):
        return "outside layers_to_transform"
    return "not selected by target_modules"


def _fill(report: Dict[str, Any], state, net: nn.Cell, cells, adaptable: List[str], excludes,
          skipped: Dict[str, Any]) -> None:
    shared: Dict[str, List[int]] = {}
    tied = tied_weights(net, state) if state.tuner.can_merge else {}
    matched_paths = set()
    matched_types = set()
    for injection in state.injections:
        own, prefix = [], injection.path + "."
        for param in state.tuner.deltas_of(injection):
            if param.name.startswith(prefix):
                own.append({"name": param.name[len(prefix):], "shape": list(param.shape)})
            else:
                shared.setdefault(param.name, list(param.shape))
        size = state.tuner.io_channels(injection)
        report["matched"].append({"path": injection.path, "type": injection.original_class.__name__,
                                  "in": size[0], "out": size[1], "deltas": own,
                                  "tied_to": tied[injection.path][1] if injection.path in tied else None})
        if getattr(state.config, "has_patterns", False):      # rank_pattern / alpha_pattern: this cell's own
            own_cfg = state.config.for_module(injection.path)
            report["matched"][-1].update(rank=own_cfg.lora_rank, lora_alpha=own_cfg.lora_alpha,
                                         by_pattern=own_cfg is not state.config)
        matched_paths.add(injection.path)
        matched_types.add(injection.original_class)
    report["shared"] = [{"name": name, "shape": shape} for name, shape in shared.items()]
    # base parameters that train with the adapter and are saved with it (freeze_exclude, LoRA's bias)
    report["kept"] = [{"name": param.name, "shape": list(param.shape)} for param in state.kept]
    for saved in state.copies:                          # config modules_to_save
        report["copies"].append({"path": saved.path, "type": saved.original_class.__name__,
                                 "params": [{"name": p.name, "shape": list(p.shape)} for p in saved.params]})
        matched_paths.add(saved.path)
    for rows in state.tokens:                           # config trainable_token_indices
        kind = rows.classes.get(id(rows.cell), type(rows.cell)).__name__
        report["token_rows"].append({"path": rows.path, "type": kind, "indices": list(rows.indices),
                                     "delta": rows.delta.name, "shape": list(rows.delta.shape),
                                     "tied": [head for head, _ in rows.heads]})
        matched_paths.add(rows.path)
    adaptable_set = set(adaptable)
    for path, cell in cells:
        if path in matched_paths or any(path.startswith(p + ".") for p in matched_paths):
            continue
        if type(cell) in matched_types or path in adaptable_set:
            reason = _why_not(path, cell, excludes, skipped)
            report["near_misses"].append({"path": path, "type": type(cell).__name__,
                                          "in": _size(cell, "in_channels"), "out": _size(cell, "out_channels"),
                                          "reason": reason})


@functools.lru_cache(maxsize=None)
def _class_source(cls: type) -> str:
    """The source of ``cls`` and of its bases up to ``nn.Cell`` ('' where it cannot be read)."""
    texts = []
    for klass in cls.__mro__:
        if klass in (nn.Cell, object) or getattr(klass, "pet_hooks_lora", False):
            continue  # pet_hooks' own mixins: their construct is not the parent's code
        try:
            texts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            pass
    return "\n".join(texts)


def unreached_note(parent: nn.Cell, child_name: str) -> Optional[str]:
    """Why ``parent`` never runs its child ``child_name``, when its source shows it; else None.

    The evidence is textual: the parent's class reads ``self.<child>.<attr>`` and nowhere calls
    ``self.<child>(``. A parent pet_hooks computes itself (it reads the weights on purpose and
    adds the delta) is not flagged.
    """
    if getattr(type(parent), "pet_lora_reads_weights", False):
        return None
    source = _class_source(type(parent))
    name = re.escape(child_name)
    if not source or re.search(rf"self\.{name}\s*\(", source):
        return None
    reads = sorted(set(re.findall(rf"self\.{name}\.([A-Za-z_]\w*)\b(?!\s*\()", source)))
    if not reads:
        return None
    return (f"its parent {type(parent).__name__} never calls it, it reads "
            f"{', '.join(f'{child_name}.{attr}' for attr in reads)}: the deltas would get no gradient")


def _flag_unreached(report: Dict[str, Any], net: nn.Cell) -> None:
    by_path = dict(net.cells_and_names())
    for row in report["matched"]:
        parent_path, _, leaf = row["path"].rpartition(".")
        parent = by_path.get(parent_path)
        row["unreached"] = unreached_note(parent, leaf) if parent is not None else None
    report["unreached"] = [row["path"] for row in report["matched"] if row["unreached"]]


# ----------------------------------------------------------------------------- the text table
def _table(rows: List[List[str]], indent: str = "  ") -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _shape(shape: List[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


def format_report(report: Dict[str, Any]) -> str:
    """The report as the table ``pet-hooks inspect`` prints."""
    lines = [f"{report['model']}: {report['pet_type']}"
             + (f", target_modules {report['config'].get('target_modules')!r}"
                if report["config"].get("target_modules") is not None else "")
             # issue 29: the other fields that select cells
             + "".join(f", {key} {report['config'][key]!r}" for key in ("exclude_layers", "exclude_modules",
                                                                        "layers_to_transform", "layers_pattern")
                       if report["config"].get(key) is not None)]
    if report["patterns"]:
        rows = [["pattern", "cells", "nearest names"]]
        for row in report["patterns"]:
            rows.append([row["pattern"], str(row["cells"]), ", ".join(row["nearest"])])
        lines += ["", "patterns"] + _table(rows)
    for row in report["patterns"]:
        for name, paths in row.get("under_name_maps", {}).items():
            ours = sorted({path.rsplit(".", 1)[-1] for path in paths})
            lines.append(f"  {row['pattern']} uses the names of name map {name!r}, where it selects the "
                         f"{len(paths)} cell(s) named {', '.join(ours)} here (e.g. {paths[0]})")
    idle = [row["pattern"] for row in report["patterns"] if not row["cells"]]
    if idle and not report["error"]:
        lines += ["", f"note: {len(idle)} of {len(report['patterns'])} patterns select nothing: {', '.join(idle)}"]
    if report["error"]:
        lines += ["", f"error: {report['error']}"]
    if report["matched"]:
        ranked = any("rank" in cell for cell in report["matched"])       # rank_pattern / alpha_pattern
        rows = [["path", "type", "in", "out", "delta parameters"] + (["r / alpha"] if ranked else [])]
        for cell in report["matched"]:
            rows.append([cell["path"], cell["type"], _num(cell["in"]), _num(cell["out"]),
                         ", ".join(f"{d['name']} {_shape(d['shape'])}" for d in cell["deltas"]) or "-"]
                        + ([f"{cell['rank']} / {cell['lora_alpha']:g}" + (" (pattern)" if cell["by_pattern"] else "")]
                           if ranked else []))
        lines += ["", f"matched ({len(report['matched'])} cells)"] + _table(rows)
        tied = [cell for cell in report["matched"] if cell.get("tied_to")]
        if tied:
            lines += ["", f"note: {len(tied)} matched cell(s) share their weight with another cell (tie_word_embeddings); "
                          f"the adapter changes them alone, and merge / save_merged_checkpoint are refused"]
            lines += [f"  {cell['path']}: tied to {cell['tied_to']}" for cell in tied]
        flagged = [cell for cell in report["matched"] if cell.get("unreached")]
        if flagged:
            lines += ["", f"warning: {len(flagged)} matched cell(s) are never called, so they would train nothing"]
            lines += [f"  {cell['path']}: {cell['unreached']}" for cell in flagged]
    if report.get("copies"):                            # config modules_to_save
        rows = [["path", "type", "trainable copy"]]
        for cell in report["copies"]:
            rows.append([cell["path"], cell["type"], ", ".join(f"{d['name']} {_shape(d['shape'])}" for d in cell["params"])])
        lines += ["", f"modules_to_save ({len(report['copies'])} cell(s): a trainable copy each, the original frozen)"]
        lines += _table(rows)
    if report.get("token_rows"):                        # config trainable_token_indices
        rows = [["path", "type", "token ids", "delta", "tied heads"]]
        for cell in report["token_rows"]:
            rows.append([cell["path"], cell["type"], ", ".join(map(str, cell["indices"])),
                         f"{cell['delta']} {_shape(cell['shape'])}", ", ".join(cell["tied"]) or "-"])
        lines += ["", f"trainable_token_indices ({len(report['token_rows'])} embedding(s): only these rows train, "
                      f"the table stays as it is)"] + _table(rows)
    if report["shared"]:
        lines += ["", "shared delta parameters"] + _table(
            [["name", "shape"]] + [[d["name"], _shape(d["shape"])] for d in report["shared"]])
    if report.get("kept"):
        lines += ["", f"base parameters that train and are saved with the adapter ({len(report['kept'])})"] + _table(
            [["name", "shape"]] + [[d["name"], _shape(d["shape"])] for d in report["kept"]])
    if report["near_misses"]:
        rows = [["path", "type", "in", "out", "why not"]]
        for cell in report["near_misses"]:
            rows.append([cell["path"], cell["type"], _num(cell["in"]), _num(cell["out"]), cell["reason"]])
        n = len(report["near_misses"])
        lines += ["", f"almost matched ({n} cell{'' if n == 1 else 's'} of an adaptable type, not selected)"] + _table(rows)
    lines += ["", report["summary"]["text"] + ("" if report["matched"] else "  (nothing adapted)")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- getting the model
def build_from_factory(spec: str, *args: Any) -> nn.Cell:
    """``MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``) called with ``args``; must return a Cell."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model expects MODULE:FACTORY (for example samples.tiny_gpt:build), got {spec!r}")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"model file not found: {module_name}")
        namespace = runpy.run_path(module_name)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            namespace = vars(importlib.import_module(module_name))
        except ImportError as err:
            raise ValueError(f"cannot import module {module_name!r} for --model: {err}") from None
        finally:
            sys.path.remove(os.getcwd())
    factory = namespace.get(attr)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ValueError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    net = factory(*args)
    if not isinstance(net, nn.Cell):
        raise TypeError(f"factory {spec} returned {type(net).__name__}, not a mindspore.nn.Cell")
    return net


class _ModelBuilt(BaseException):
    """Raised inside the script to stop it once its model exists (BaseException: the script's
    own ``except Exception`` does not swallow it)."""

    def __init__(self, model: nn.Cell):
        super().__init__("model built")
        self.model = model


def _largest_root(session: PetSession) -> Optional[nn.Cell]:
    models = [flow.unwrap_model(root) for root in session.roots()]
    models = [m for m in models if next(iter(m.get_parameters()), None) is not None]
    return max(models, key=lambda m: sum(p.size for p in m.get_parameters()), default=None)


def capture_script_model(script: str, args: List[str], cfg=None) -> nn.Cell:
    """Run ``script`` as ``python SCRIPT ARGS`` would, stop it when its model is complete, return it.

    The model is complete when the script builds its first optimizer over it (or its first
    ``mindspore.train.Model``); a script that does neither gives the largest model it built.
    The script's output goes to stderr (stdout stays for the report); every patch is undone.

    Raises:
        FileNotFoundError: no such script. ValueError: the script failed or built no model.
    """
    if not os.path.isfile(script):
        raise FileNotFoundError(f"script not found: {script}")
    from mindspore.train import Model

    session = PetSession(load_config(cfg) if cfg is not None else None)

    def stop_at_optimizer(wrapped, instance, a, kw):
        params = inspect.signature(nn.Optimizer.__init__).bind(instance, *a, **kw).arguments.get("parameters") or []
        params = list(params) if not isinstance(params, (list, tuple)) else params
        models = session.models_owning(params)
        if models:
            raise _ModelBuilt(models[0])
        return wrapped(*a, **kw)

    def stop_at_model(wrapped, instance, a, kw):
        network = kw.get("network", a[0] if a else None)
        if isinstance(network, nn.Cell):
            raise _ModelBuilt(flow.unwrap_model(network))
        return wrapped(*a, **kw)

    patches = PatchSet()
    try:
        with as_main(script, args) as script:
            patches.wrap(nn.Cell, "__init__", session.note_cell)
            patches.wrap(nn.Optimizer, "__init__", stop_at_optimizer)
            patches.wrap(Model, "__init__", stop_at_model)
            with contextlib.redirect_stdout(sys.stderr):
                run_as_main(script)
    except _ModelBuilt as built:
        return built.model
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise ValueError(f"{script} exited with {stop.code!r} before building a model") from None
    except Exception as err:  # the script's own failure, named
        raise ValueError(f"{script} failed before building a model: {type(err).__name__}: {err}") from None
    finally:
        patches.undo()
    model = _largest_root(session)
    if model is None:
        raise ValueError(f"{script} built no model (no mindspore.nn.Cell with parameters)")
    return model
