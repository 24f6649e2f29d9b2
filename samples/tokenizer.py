"""A byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary 256), nothing to download.

    ids = ByteTokenizer().encode("hello")     # [104, 101, 108, 108, 111]
"""
from __future__ import annotations

from typing import List


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
