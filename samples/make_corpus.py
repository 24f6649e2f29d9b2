"""Rebuild samples/data/stdlib_docstrings.txt from the docstrings of Python's standard library.

    python samples/make_corpus.py         # about 200 kB of English prose about programming
"""
from __future__ import annotations

import importlib
import inspect
import os

MODULES = ["abc", "argparse", "bisect", "collections", "contextlib", "copy", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "inspect",
           "itertools", "json", "logging", "operator", "os", "pathlib", "pickle", "pprint", "queue",
           "random", "re", "shutil", "statistics", "string", "subprocess", "tempfile", "textwrap",
           "threading", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile"]
LIMIT = 200_000


def docstrings():
    for name in MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            yield inspect.cleandoc(module.__doc__)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                yield doc


def main() -> None:
    out, size = [], 0
    for doc in docstrings():
        text = doc.encode("ascii", errors="ignore").decode("ascii")
        out.append(text)
        size += len(text) + 2
        if size >= LIMIT:
            break
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib_docstrings.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(out) + "\n")
    print(f"wrote {path}: {size} characters from {len(out)} docstrings")


if __name__ == "__main__":
    main()
