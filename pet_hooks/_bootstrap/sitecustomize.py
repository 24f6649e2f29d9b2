"""Started by ``pet-hooks run`` for child processes (msrun workers): the hooks for the whole process.

Python imports this at start-up because the launcher put this folder first on PYTHONPATH.
When ``PET_HOOKS_CONFIG`` is set it enters ``pet_hooks.enable`` for the life of the process
and, when ``PET_HOOKS_SAVE_DIR`` is set, saves the adapter from rank 0 at exit. Then it
loads the user's own ``sitecustomize``, if there is one further down the path.
"""
import os
import sys


def _start_hooks():
    if not os.environ.get("PET_HOOKS_CONFIG"):
        return
    import atexit
    import json

    from pet_hooks import flow
    from pet_hooks.config import config_from_dict
    from pet_hooks.hooks.context import enable

    doc = json.loads(os.environ["PET_HOOKS_CONFIG"])
    block = enable(config_from_dict(doc["pet_config"], doc.get("model_hints")))
    session = block.__enter__()
    save_dir = os.environ.get("PET_HOOKS_SAVE_DIR")

    def _finish():
        try:
            block.__exit__(None, None, None)
        finally:
            if save_dir and session.models:
                path = flow.save_for_rank(session.models[-1], save_dir)
                if path:  # said in the worker's own log, so one can see which rank wrote it
                    print(f"pet-hooks: adapter saved to {path} (rank 0)", file=sys.stderr, flush=True)

    atexit.register(_finish)


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


_start_hooks()
_chain_user_sitecustomize()
