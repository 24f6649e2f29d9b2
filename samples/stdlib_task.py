"""The demo's task: name the standard-library module a docstring comes from (data and scoring).

Built at run time from the Python running it, deterministically (a fixed list of modules,
names sorted, a fixed seed): the first sentence of the docstring of a public function or
class of one of :data:`MODULES`, and the answer, the module's name (``json``,
``urllib.parse``). The prompt is SmolLM2's own chat format; the training labels are the
answer's tokens only. The held-out docstrings belong to functions and classes never trained
on, from the same modules (a module seen only at evaluation could not be learned, only
guessed).

Framework-free (NumPy and the tokenizer only), so the MindSpore demo
(``samples/smollm2_train.py``) and the PyTorch side of the benchmark (``bench/``) build the
same rows in the same order and score them the same way.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
import warnings
from typing import Callable, List, Sequence, Tuple

import numpy as np

from samples.smollm2 import EOS_ID, FILL_ID, IGNORE

MODULES = ["abc", "argparse", "bisect", "collections", "contextlib", "copy", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "inspect",
           "itertools", "json", "logging", "operator", "os", "pathlib", "pickle", "pprint", "queue",
           "random", "re", "shutil", "statistics", "string", "subprocess", "tempfile", "textwrap",
           "threading", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile"]
SYSTEM = "Name the Python standard-library module this docstring is from."
MAX_CHARS = 100      # of a docstring's first sentence
PER_MODULE = 16      # at most this many docstrings of one module (typing alone has over 100)
HELD_OUT = 0.25      # of each module's docstrings (at least one when it has two or more)


Example = Tuple[str, str, str]   # (module, object name, docstring)


def first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s+[A-Z]|$)", text)
    text = match.group(1) if match else text
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."


def collect(modules: Sequence[str]) -> List[Example]:
    """Every (module, name, first sentence) of the public functions and classes defined in ``modules``."""
    found: List[Example] = []
    with warnings.catch_warnings():   # typing.io, typing.re: deprecated on any access
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            module = importlib.import_module(name)
            for attr in sorted(vars(module)):
                obj = getattr(module, attr)
                if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)
                                                or inspect.isbuiltin(obj)):
                    continue
                if getattr(obj, "__module__", None) != module.__name__ or not isinstance(obj.__doc__, str):
                    continue   # (obj.__doc__: its own docstring; inspect.getdoc would inherit a base class's)
                text = first_sentence(obj.__doc__)
                if len(text) >= 24 and not text.startswith(attr + "("):   # not a bare signature
                    found.append((name, attr, text))
    return found


@functools.lru_cache(maxsize=None)
def clean_collect() -> Tuple[Example, ...]:
    """:func:`collect` over MODULES in a fresh interpreter that has imported nothing else.

    In this process, libraries may have replaced stdlib functions (MindSpore replaces
    ``warnings.showwarning``; MindSpore and PyTorch both change what ``inspect`` holds), so the
    same Python would build a different task in the demo, under the launcher, and in the
    MindSpore and PyTorch sides of the benchmark. ``-I -S``: no site-packages, no
    ``sitecustomize``, no environment variables, only the standard library.
    """
    code = "\n".join(["import importlib, inspect, json, re, sys, warnings",
                      "from typing import List, Sequence, Tuple",
                      "Example = Tuple[str, str, str]", f"MAX_CHARS = {MAX_CHARS}",
                      textwrap.dedent(inspect.getsource(first_sentence)), textwrap.dedent(inspect.getsource(collect)),
                      f"json.dump(collect({list(MODULES)!r}), sys.stdout)"])
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"collecting the stdlib docstrings failed:\n{done.stderr[-2000:]}")
    return tuple(tuple(row) for row in json.loads(done.stdout))


def stdlib_examples(seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """(train, held_out): docstrings of the public functions and classes of MODULES, split per module.

    The same for every process on one Python build, whatever it has imported (:func:`clean_collect`).
    """
    found = list(clean_collect())
    counts = {}
    for _, _, text in found:
        counts[text] = counts.get(text, 0) + 1
    rng = np.random.default_rng(seed)
    train: List[Example] = []
    held_out: List[Example] = []
    for name in MODULES:
        mine = [e for e in found if e[0] == name and counts[e[2]] == 1]   # a text twice is ambiguous
        mine = [mine[i] for i in rng.permutation(len(mine))][:PER_MODULE]
        cut = int(round(len(mine) * HELD_OUT)) if len(mine) >= 4 else min(1, len(mine) - 1)
        held_out += mine[:cut]
        train += mine[cut:]
    train = [train[i] for i in rng.permutation(len(train))]
    held_out = [held_out[i] for i in rng.permutation(len(held_out))]
    return train, held_out


def prompt_ids(tok, doc: str, limit: int = 10 ** 9) -> List[int]:
    """The chat prompt (system, user: the docstring, then the assistant's turn), the docstring cut to fit ``limit``."""
    words = doc.split(" ")
    while True:
        ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": doc}])
        if len(ids) <= limit or len(words) <= 1:
            return ids
        words = words[:-1]
        doc = " ".join(words) + " ..."


def train_rows(tok, examples: Sequence[Example], seq: int) -> Tuple[np.ndarray, np.ndarray]:
    """input_ids and labels, (n, seq + 1) int32 each: labels are -100 except on the answer and <|im_end|>."""
    ids = np.full((len(examples), seq + 1), FILL_ID, np.int32)
    labels = np.full((len(examples), seq + 1), IGNORE, np.int32)
    for row, (module, _, doc) in enumerate(examples):
        prompt = prompt_ids(tok, doc, seq - len(tok.encode(module)))
        answer = tok.encode(module) + [EOS_ID]
        full = (prompt + answer)[:seq + 1]
        ids[row, :len(full)] = full
        labels[row, len(prompt):len(full)] = full[len(prompt):]
    return ids, labels


def training_order(count: int, steps: int, batch: int, seed: int = 0) -> List[np.ndarray]:
    """The training rows of each step: the ``count`` examples repeated to ``steps * batch``, shuffled once."""
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(count), steps * batch))
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def padded(rows: Sequence[Sequence[int]], batch: int, seq: int) -> np.ndarray:
    """``(batch, seq)`` int32: the rows right-padded with ``FILL_ID`` (one shape, so one graph)."""
    ids = np.full((batch, seq), FILL_ID, np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    return ids


def score(logits_of: Callable[[np.ndarray], np.ndarray], tok, examples: Sequence[Example], seq: int,
          max_new: int, eval_batch: int) -> Tuple[int, float]:
    """(exact matches, mean loss per answer token): one forward per ``eval_batch`` prompts.

    ``logits_of(ids)`` maps ``(eval_batch, seq)`` token ids to ``(eval_batch, seq, vocab)`` logits.
    Greedy generation answers exactly ``module<|im_end|>`` if and only if, fed that answer,
    the model's arg-max at every answer position is the answer's next token: so exact match of
    greedy generation is read off a single forward over prompt + answer (teacher forcing),
    instead of one forward per generated token.
    """
    right, losses = 0, []
    for start in range(0, len(examples), eval_batch):
        part = examples[start:start + eval_batch]
        prompts = [prompt_ids(tok, doc, seq - max_new) for _, _, doc in part]
        answers = [tok.encode(module) + [EOS_ID] for module, _, _ in part]
        logits = logits_of(padded([p + a for p, a in zip(prompts, answers)], eval_batch, seq))[:len(part)]
        for row, prompt, answer in zip(logits, prompts, answers):
            at = row[len(prompt) - 1:len(prompt) - 1 + len(answer)]           # the logits predicting the answer
            right += bool((at.argmax(-1) == answer).all())
            top = at.max(-1, keepdims=True)
            logz = (top + np.log(np.exp(at - top).sum(-1, keepdims=True)))[:, 0]
            losses += list(logz - at[np.arange(len(answer)), answer])
    return right, float(np.mean(losses))
