"""Started by ``pet-hooks run`` for child processes (msrun workers): the hooks for the whole process.

Python imports this at start-up because the launcher put this folder first on PYTHONPATH.
When ``PET_HOOKS_CONFIG`` is set it enters ``pet_hooks.enable`` for the life of the process
and, when ``PET_HOOKS_SAVE_DIR`` is set, saves the adapter from rank 0 at exit; ``PET_HOOKS_CHECKPOINTS``
(``pet-hooks run --save-steps/--resume``) gives the process's ``Model.train`` calls run checkpoints
in that folder and resumes from them. Then it
loads the user's own ``sitecustomize``, if there is one further down the path.

``PET_HOOKS_DISABLE=1`` turns the hooks off in this process (and in the children it starts).
When the hooks cannot start (an unreadable config, pet_hooks or MindSpore failing to import),
the process prints one line naming the cause on stderr and runs on without them.
"""
import os
import sys

DISABLE_ENV = "PET_HOOKS_DISABLE"
_KEPT = []   # what must live as long as the process (the run checkpoints' context)


class _BadConfig(Exception):
    """PET_HOOKS_CONFIG cannot be used (its message says why)."""


def _start_hooks():
    if not os.environ.get("PET_HOOKS_CONFIG"):
        return
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return
    import atexit
    import json

    from pet_hooks.config.pet_config import config_from_dict

    # The config first (cheap, no MindSpore): a bad one is the likeliest cause of failing here.
    try:
        doc = json.loads(os.environ["PET_HOOKS_CONFIG"])
        # null: the config is the pet_config of the run YAML MindFormers builds from (pet-hooks run, no --config)
        config = None if doc["pet_config"] is None else config_from_dict(doc["pet_config"], doc.get("model_hints"))
    except (ValueError, TypeError, KeyError) as err:
        raise _BadConfig(f"PET_HOOKS_CONFIG is not a usable config: {err}") from None

    from pet_hooks.doors import flow
    from pet_hooks.doors.context import enable

    adapter_name = doc.get("adapter_name")
    save_dir = os.environ.get("PET_HOOKS_SAVE_DIR")
    checkpoints = None
    if os.environ.get("PET_HOOKS_CHECKPOINTS"):
        from pet_hooks.doors.launcher import run_checkpoints
        try:
            settings = json.loads(os.environ["PET_HOOKS_CHECKPOINTS"])
        except ValueError as err:
            raise _BadConfig(f"PET_HOOKS_CHECKPOINTS is not JSON: {err}") from None
        checkpoints = run_checkpoints(save_dir, settings, config, adapter_name)
        checkpoints.__enter__()   # for the life of the process (its wrap of Model.train is never taken off):
        _KEPT.append(checkpoints)  # held here, or collecting the generator would run its exit at once
    block = enable(config, adapter_name)
    session = block.__enter__()

    def _finish():
        try:
            block.__exit__(None, None, None)
        finally:
            if save_dir and session.models:
                path = flow.save_for_rank(session.models[-1], save_dir, adapter_name)
                if path:  # said in the worker's own log, so one can see which rank wrote it
                    print(f"pet-hooks: adapter saved to {path} (rank 0)", file=sys.stderr, flush=True)

    atexit.register(_finish)


def _start_hooks_or_say_why():
    try:
        _start_hooks()
    except Exception as err:  # pylint: disable=broad-except
        cause = str(err) if isinstance(err, _BadConfig) else f"{type(err).__name__}: {err}"
        print(f"pet-hooks: the PET hooks did not start in this process (pid {os.getpid()}): "
              + cause.replace("\n", " "), file=sys.stderr, flush=True)


def _chain_user_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    saved = sys.path[:]
    this = sys.modules.pop("sitecustomize", None)
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        import importlib
        import importlib.util
        if importlib.util.find_spec("sitecustomize") is not None:
            importlib.import_module("sitecustomize")
    finally:
        sys.path[:] = saved
        if this is not None:
            sys.modules["sitecustomize"] = this


_start_hooks_or_say_why()
_chain_user_sitecustomize()
