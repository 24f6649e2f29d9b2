"""File primitives shared by the adapter formats (adapter_io, peft_format, mindformers_io) and progress.

    atomic_write("dir/adapter_model.safetensors", lambda handle: handle.write(blob))
    tensors = read_safetensors("dir/adapter_model.safetensors")     # name -> NumPy array

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then moved
over the target with ``os.replace``: a crash mid-write leaves the previous file readable.
Only NumPy and the standard library at import; ``safetensors`` and MindSpore's dtypes are
imported by the functions that need them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Dict, Sequence

import numpy as np

from ..errors import AdapterFileError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "atomic_write", "file_sha256", "write_bytes", "to_numpy", "read_safetensors", "read_json",
           "json_text"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write(path: str, write: Callable[[Any], Any]) -> None:
    """Write through ``write(handle)`` into a temp file beside ``path``, then os.replace it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in blocks (run checkpoints' and the compile cache's seals)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_text(doc: Any, keep_order: Sequence[str] = (), indent: int = 2) -> str:
    """``json.dumps(doc, indent=indent, sort_keys=True)``, except that the mappings held under a key named in
    ``keep_order`` keep their own order (LoRA's ``rank_pattern`` / ``alpha_pattern``: the first key wins)."""
    def ordered(value: Any, keep: bool = False) -> Any:
        if isinstance(value, dict):
            items = value.items() if keep else sorted(value.items(), key=lambda item: str(item[0]))
            return {key: ordered(item, key in keep_order) for key, item in items}
        if isinstance(value, (list, tuple)):
            return [ordered(item) for item in value]
        return value
    return json.dumps(ordered(doc), indent=indent)


def write_bytes(path: str, data: bytes) -> None:
    """``data`` into ``path``, atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def to_numpy(param) -> np.ndarray:
    """A Parameter's value as NumPy; bfloat16 (which NumPy lacks) as float32, cast back on load."""
    from mindspore.common import dtype as mstype

    if param.dtype == mstype.bfloat16:
        return param.astype(mstype.float32).asnumpy()
    return param.asnumpy()


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a safetensors file as NumPy arrays (the one reader of every format's safetensors
    files); bfloat16 (PEFT's usual dtype, which NumPy lacks) is widened to float32 exactly, by reading
    the file's own layout. AdapterFileError naming the file when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
                raise LookupError
            data = handle.read()
    except (OSError, ValueError, LookupError):
        return _load_file(path)  # no bfloat16: safetensors' own reader (and its error for a broken file)
    tensors = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if entry["dtype"] == "BF16":
                bits = np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16
                tensors[name] = bits.view(np.float32).reshape(entry["shape"])
            else:
                dtype = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[entry["dtype"]]
                tensors[name] = np.frombuffer(data[start:end], dtype).reshape(entry["shape"]).copy()
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors


def _load_file(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # local: only saving and loading need it
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError / OSError
        raise AdapterFileError(f"{path}: not a readable safetensors file ({err})") from None


def read_json(path: str):
    """A JSON document; AdapterFileError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise AdapterFileError(f"{path}: not a readable JSON file ({err})") from None
