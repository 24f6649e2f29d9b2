"""The sample corpus (docstrings of Python's standard library) cut into language-model batches.

    ids, labels = next(lm_batches(seq_length=64, batch_size=8))     # int32 (8, 64) each
"""
from __future__ import annotations

import os
from typing import Iterator, Tuple

import numpy as np

from .tokenizer import ByteTokenizer

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib_docstrings.txt")


def corpus_ids(path: str = CORPUS) -> np.ndarray:
    with open(path, encoding="utf-8") as handle:
        return np.asarray(ByteTokenizer().encode(handle.read()), dtype=np.int32)


def lm_batches(seq_length: int = 64, batch_size: int = 8, seed: int = 0,
               path: str = CORPUS) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Endless random windows: inputs are tokens [t, t+seq), labels the tokens one further."""
    ids = corpus_ids(path)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq_length - 1, size=batch_size)
        window = np.stack([ids[s:s + seq_length + 1] for s in starts])
        yield window[:, :-1].copy(), window[:, 1:].copy()
