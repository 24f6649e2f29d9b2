"""MindSpore's compile cache for ``pet-hooks run --compile-cache DIR``: a second run of the same script skips
the graph compile.

MindSpore keeps compiled graphs when ``MS_COMPILER_CACHE_ENABLE=1`` (in ``MS_COMPILER_CACHE_PATH``) and itself
notices an edited network source (it hashes the Python files the graph came from). What it cannot know is
pet_hooks' part, so the folder used is ``DIR/pet_hooks-<key>``, the key a hash of the PET config, the
pet_hooks, MindSpore and Python versions: another config or version compiles into a folder of its own. After
a run that ended well the folder is sealed with a manifest (every file's SHA-256); a folder found without
its manifest (a run that died) or with a file that does not match it (a corrupt cache) is deleted with one
warning naming it, and the graphs are compiled again. The variables reach child processes (msrun workers)
through the environment.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Optional

from .._version import __version__
from ..config.lora_patterns import PATTERN_FIELDS
from ..config.pet_config import PetConfig
from ..utils.files import file_sha256

__all__ = ["use_compile_cache", "seal_compile_cache", "cache_folder", "MANIFEST"]

logger = logging.getLogger("pet_hooks")
MANIFEST = "pet_hooks_manifest.json"
ENABLE_ENV, PATH_ENV = "MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH"


def cache_folder(root: str, cfg: Optional[PetConfig]) -> str:
    """``root/pet_hooks-<key>``: the key names the config and the versions the compiled graphs depend on."""
    import mindspore
    parts = {"pet_config": None if cfg is None else cfg.to_dict(), "pet_hooks": __version__,
             "mindspore": mindspore.__version__, "python": list(sys.version_info[:2])}
    # rank_pattern / alpha_pattern: the keys' order decides the ranks, and sort_keys would lose it
    order = {name: list(getattr(cfg, name, None) or {}) for name in PATTERN_FIELDS}
    if any(order.values()):
        parts["pattern_order"] = order
    key = json.dumps(parts, sort_keys=True)
    return os.path.join(os.path.abspath(root), "pet_hooks-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def _files(folder: str):
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            if os.path.relpath(path, folder) != MANIFEST:
                yield os.path.relpath(path, folder), path


def _problem(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return "it has no manifest (the run that wrote it did not end)"
    found = dict(_files(folder))
    if set(found) != set(manifest):
        return f"its files are not the ones sealed ({sorted(set(found) ^ set(manifest))[:3]})"
    for name, digest in manifest.items():
        if file_sha256(found[name]) != digest:
            return f"{name} does not match its recorded hash"
    return None


def use_compile_cache(root: str, cfg: Optional[PetConfig]) -> str:
    """Point MindSpore's compile cache at this config's folder under ``root`` (checked first); returns it."""
    folder = cache_folder(root, cfg)
    if os.path.isdir(folder):
        problem = _problem(folder)
        if problem is not None:
            print(f"pet-hooks: compile cache {folder} not used: {problem}; compiling again",
                  file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    os.environ[ENABLE_ENV] = "1"
    os.environ[PATH_ENV] = folder
    return folder


def seal_compile_cache(folder: str) -> None:
    """After a run that ended well: record every file of the cache and its hash."""
    manifest = {name: file_sha256(path) for name, path in _files(folder)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST))
