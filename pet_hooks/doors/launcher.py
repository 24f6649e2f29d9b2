"""``pet-hooks run``: run an unmodified training script under ``enable(cfg)``.

    pet-hooks run --config pet.yaml --save-dir adapter/ train.py --epochs 2
    pet-hooks run --config pet.yaml --save-dir adapter/ -- msrun --worker_num=2 ... train.py
    pet-hooks run --config pet.yaml --save-dir run/ --save-steps 50 --resume train.py   # killed? run it again

A Python script runs in this process as ``python SCRIPT ARGS`` would (``sys.argv``,
``__name__ == "__main__"``, imports next to the script, its exit code, its own traceback).
Any other command (``msrun``) runs as a child process. Either way, processes started from
here get the hooks too: the launcher puts ``pet_hooks/doors/_bootstrap`` (a ``sitecustomize``) first
on ``PYTHONPATH`` and passes the config in ``PET_HOOKS_CONFIG``; the bootstrap enters
``enable`` for the whole child process, saves the adapter from rank 0 at exit when
``PET_HOOKS_SAVE_DIR`` is set, and then still loads the user's own ``sitecustomize``.
``PET_HOOKS_DISABLE=1`` turns the hooks off in such children; a child in which they cannot
start prints one line naming the cause and runs on without them.

With ``--save-steps N`` every ``Model.train`` of the script (in this process and in its Python
children) writes a run checkpoint every N steps to ``SAVE_DIR/checkpoints/`` (rank 0), and with
``--resume`` continues after the newest complete one (``pet_hooks.doors.resume``; the settings
reach children in ``PET_HOOKS_CHECKPOINTS``). A hand-written loop calls ``pet_hooks.save_checkpoint``
and ``pet_hooks.load_checkpoint`` itself. ``--compile-cache DIR`` keeps MindSpore's compiled graphs for
the next run of the same script and config (``pet_hooks.doors.compile_cache``).
"""
from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import traceback
from typing import Iterator, List, Optional

from . import flow
from ..config.pet_config import PetConfig
from ..utils.files import CONFIG_NAME
from ..utils.ms_compat import set_compile_cache_entry
from .compile_cache import ENABLE_ENV, PATH_ENV, seal_compile_cache, use_compile_cache
from .context import enable
from ..training.run_checkpoint import check_keep
from .resume import RunCheckpointer, check_save_steps, checkpointing

__all__ = ["run_script", "child_environment", "as_main", "run_as_main", "BOOTSTRAP_DIR", "CONFIG_ENV", "SAVE_DIR_ENV",
           "CHECKPOINTS_ENV"]

DOORS_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(DOORS_DIR)              # pet_hooks/: where "raised by pet_hooks" is judged
BOOTSTRAP_DIR = os.path.join(DOORS_DIR, "_bootstrap")
CONFIG_ENV = "PET_HOOKS_CONFIG"        # the config, as JSON
SAVE_DIR_ENV = "PET_HOOKS_SAVE_DIR"
CHECKPOINTS_ENV = "PET_HOOKS_CHECKPOINTS"  # {"save_steps": N, "keep": K, "resume": bool}, as JSON


def child_environment(cfg: Optional[PetConfig], save_dir: Optional[str], base: Optional[dict] = None,
                      adapter_name: Optional[str] = None, checkpoints: Optional[dict] = None) -> dict:
    """The environment that makes Python child processes start under the same hooks."""
    env = dict(os.environ if base is None else base)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR] + paths)
    # This Python first on PATH: msrun starts its workers as plain `python script.py`, and they
    # need the interpreter pet_hooks (and MindSpore) are installed in, venv activated or not.
    bin_dir = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join([bin_dir] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir])
    env[CONFIG_ENV] = json.dumps({"pet_config": None if cfg is None else cfg.to_dict(),
                                  "model_hints": None if cfg is None else cfg.model_hints,
                                  "adapter_name": adapter_name})
    if save_dir:
        env[SAVE_DIR_ENV] = os.path.abspath(save_dir)
    else:
        env.pop(SAVE_DIR_ENV, None)
    if checkpoints:
        env[CHECKPOINTS_ENV] = json.dumps(checkpoints)
    else:
        env.pop(CHECKPOINTS_ENV, None)
    return env


@contextlib.contextmanager
def as_main(script: str, args: List[str]) -> Iterator[str]:
    """The process as ``python SCRIPT ARGS`` would set it up (``sys.argv``, the script's folder first on
    ``sys.path``) while the block runs; both back as they were after it, as if the script had run in a
    process of its own (its own ``sys.path`` edits go with it too). Yields the script's absolute path."""
    script = os.path.abspath(script)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script] + list(args)
    sys.path.insert(0, os.path.dirname(script))
    try:
        yield script
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def run_as_main(script: str) -> None:
    """Run ``script`` (inside :func:`as_main`) as its ``__main__``."""
    runpy.run_path(script, run_name="__main__")


@contextlib.contextmanager
def run_checkpoints(save_dir: Optional[str], checkpoints: Optional[dict], cfg: Optional[PetConfig],
                    adapter_name: Optional[str]) -> Iterator[Optional[RunCheckpointer]]:
    """While the block runs, every ``Model.train`` writes run checkpoints and resumes from them as
    ``checkpoints`` asks (``{"save_steps": N, "keep": K, "resume": bool}``; None: nothing)."""
    if not checkpoints:
        yield None
        return
    checkpointer = RunCheckpointer(save_dir, checkpoints.get("save_steps"), checkpoints.get("keep", 2),
                                   bool(checkpoints.get("resume")), adapter_name, cfg)
    wrap = checkpointing(checkpointer)
    try:
        yield checkpointer
    finally:
        wrap.undo()


def _run_python(script: str, args: List[str], cfg: Optional[PetConfig], save_dir: Optional[str], monitor=None,
                adapter_name: Optional[str] = None, checkpoints: Optional[dict] = None) -> int:
    code = 0
    with as_main(script, args) as script, run_checkpoints(save_dir, checkpoints, cfg, adapter_name):
        with enable(cfg, adapter_name) as session, (monitor.installed() if monitor else contextlib.nullcontext()):
            try:
                run_as_main(script)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
            except BaseException as err:  # pylint: disable=broad-except
                if _raised_by_pet_hooks(err):   # bad input to pet_hooks: one line, as the CLI's own errors
                    print(f"pet-hooks: error: {err}", file=sys.stderr)
                    code = 2
                else:                           # the script's own error, shown as python would show it
                    code = _print_script_error(script)
        if save_dir and session.models:
            if len(session.models) > 1:
                print(f"pet-hooks: {len(session.models)} models were adapted; saving the last one",
                      file=sys.stderr)
            path = flow.save_for_rank(session.models[-1], save_dir, adapter_name)
            if path:
                print(f"pet-hooks: adapter saved to {path}", file=sys.stderr)
        elif save_dir and code != 2 and not os.path.isfile(os.path.join(save_dir, CONFIG_NAME)):
            # (a child process, such as an msrun worker, may have saved it instead)
            print("pet-hooks: no model was adapted, so no adapter was saved"
                  + ("" if cfg is not None else " (no --config was given, and MindFormers built no model from a "
                     "run YAML with pet_config)"), file=sys.stderr)
            code = code or 1
    return code


def _raised_by_pet_hooks(err: BaseException) -> bool:
    """Did pet_hooks itself raise ``err`` (a ValueError, TypeError or FileNotFoundError whose innermost
    frame is in the package)? Then it is bad input to pet_hooks (a config, a pattern, an adapter),
    reported as one line rather than a traceback through the script's frames."""
    if not isinstance(err, (ValueError, TypeError, FileNotFoundError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def _print_script_error(script: str) -> int:
    """Print the exception being handled as python would for the script; the exit code python gives."""
    exc_type, exc, tb = sys.exc_info()
    # Drop the launcher's frames so the traceback starts in the script.
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    traceback.print_exception(exc_type, exc, tb)
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def _is_python_script(path: str) -> bool:
    """A file run in this process as Python: a ``.py`` file, or any file that is not executable (``pet-hooks
    run -- /usr/bin/python3 train.py`` runs the interpreter as a command)."""
    return os.path.isfile(path) and (path.endswith(".py") or not os.access(path, os.X_OK))


def _find_command(name: str) -> Optional[str]:
    """A command on PATH or, failing that, beside this Python (``msrun`` in a venv not activated)."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def run_script(script: str, args: List[str], cfg: Optional[PetConfig], save_dir: Optional[str] = None,
               monitor=None, adapter_name: Optional[str] = None, save_steps: Optional[int] = None,
               keep: int = 2, resume: bool = False, compile_cache: Optional[str] = None) -> int:
    """Run SCRIPT (a .py file in process, or a command as a child) under the hooks; its exit code.

    ``monitor`` (a :class:`pet_hooks.cli.progress.TrainingMonitor`) follows the script's
    ``Model.train`` runs; a command run as a child is not followed. ``save_steps``, ``keep`` and
    ``resume``: the run checkpoints in ``save_dir/checkpoints`` (``pet_hooks.doors.resume``).
    ``compile_cache``: a folder for MindSpore's compiled graphs (``pet_hooks.doors.compile_cache``).
    """
    checkpoints = None
    if save_steps is not None or resume:
        check_save_steps(save_steps, save_dir, resume)       # the arguments' checks, before anything runs
        check_keep(keep)
        checkpoints = {"save_steps": save_steps, "keep": keep, "resume": bool(resume)}
    if not os.path.isfile(script) and _find_command(script) is None:
        raise FileNotFoundError(f"script not found: {script}")
    # Children started by the script (or the command itself) inherit this environment.
    env = child_environment(cfg, save_dir, adapter_name=adapter_name, checkpoints=checkpoints)
    keys = ("PATH", "PYTHONPATH", CONFIG_ENV, SAVE_DIR_ENV, CHECKPOINTS_ENV, ENABLE_ENV, PATH_ENV)
    before = {key: os.environ.get(key) for key in keys}
    try:
        for key in keys:
            if key in env:
                os.environ[key] = env[key]
            elif key not in (ENABLE_ENV, PATH_ENV):
                os.environ.pop(key, None)
        cache = use_compile_cache(compile_cache, cfg) if compile_cache else None
        in_process = _is_python_script(script)
        if cache and in_process:
            set_compile_cache_entry(script)     # the graphs depend on the script, not on the launcher
        if in_process:
            code = _run_python(script, args, cfg, save_dir, monitor, adapter_name, checkpoints)
        else:
            try:
                code = subprocess.call([_find_command(script)] + list(args))
            except KeyboardInterrupt:  # the child was killed by subprocess.call; exit as Python would
                code = 130
        if cache and code == 0:
            seal_compile_cache(cache)
        return code
    finally:
        # Called as a function (not the CLI), the caller's environment must come back as it was.
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
