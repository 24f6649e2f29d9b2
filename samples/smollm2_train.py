"""Fine-tune SmolLM2-135M-Instruct to name the standard-library module a docstring comes from.

A training script that knows nothing about PET (like ``samples/legacy_train.py``): it loads
the real pretrained model (all 30 blocks, ``samples/smollm2.py``), scores it on held-out
docstrings, trains it with ``mindspore.train.Model.train`` and an optimizer over
``net.trainable_params()``, and scores it again. Alone it fine-tunes every weight; under the
launcher the optimizer it builds holds only LoRA's deltas::

    pet-hooks run --config samples/configs/smollm2_lora.yaml --save-dir smollm2_adapter \\
        samples/smollm2_train.py

The task, built at run time from the Python running it (deterministic: a fixed list of
modules, names sorted, a fixed seed): the first sentence of the docstring of a public
function or class of one of :data:`MODULES`, and the answer, the module's name (``json``,
``urllib.parse``). The prompt is SmolLM2's own chat format; the loss counts the answer's
tokens only. The held-out docstrings belong to functions and classes never trained on, from
the same modules (a module seen only at evaluation could not be learned, only guessed). The
score is exact match of greedy generation (the module's name, then ``<|im_end|>``) on every
held-out docstring, read off one teacher-forced forward pass per batch (see :func:`score`);
the first ``--show`` answers are also generated token by token (at most ``--max-new``) and
printed before and after. Every call runs at one shape, ``(eval-batch, seq)``: one graph.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import time
import warnings
from typing import List, Sequence, Tuple

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Callback, Model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.smollm2 import EOS_ID, FILL_ID, IGNORE, load_smollm2, smollm2_tokenizer  # noqa: E402

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


def stdlib_examples(seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """(train, held_out): docstrings of the public functions and classes of MODULES, split per module."""
    found: List[Example] = []
    with warnings.catch_warnings():   # typing.io, typing.re: deprecated on any access
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
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


def forward(net, rows: Sequence[Sequence[int]], batch: int, seq: int) -> np.ndarray:
    """(len(rows), seq, vocab) logits: the rows right-padded to ``seq`` in one ``(batch, seq)`` call (one graph)."""
    ids = np.full((batch, seq), FILL_ID, np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
    out = net(Tensor(ids))
    return (out[0] if isinstance(out, tuple) else out).asnumpy().reshape(batch, seq, -1)[:len(rows)]


def score(net, tok, examples: Sequence[Example], args) -> Tuple[int, float]:
    """(exact matches, mean loss per answer token): one forward per ``eval_batch`` prompts.

    Greedy generation answers exactly ``module<|im_end|>`` if and only if, fed that answer,
    the model's arg-max at every answer position is the answer's next token: so exact match of
    greedy generation is read off a single forward over prompt + answer (teacher forcing),
    instead of one forward per generated token.
    """
    net.set_train(False)
    right, losses = 0, []
    for start in range(0, len(examples), args.eval_batch):
        part = examples[start:start + args.eval_batch]
        prompts = [prompt_ids(tok, doc, args.seq - args.max_new) for _, _, doc in part]
        answers = [tok.encode(module) + [EOS_ID] for module, _, _ in part]
        logits = forward(net, [p + a for p, a in zip(prompts, answers)], args.eval_batch, args.seq)
        for row, prompt, answer in zip(logits, prompts, answers):
            at = row[len(prompt) - 1:len(prompt) - 1 + len(answer)]           # the logits predicting the answer
            right += bool((at.argmax(-1) == answer).all())
            top = at.max(-1, keepdims=True)
            logz = (top + np.log(np.exp(at - top).sum(-1, keepdims=True)))[:, 0]
            losses += list(logz - at[np.arange(len(answer)), answer])
    return right, float(np.mean(losses))


def greedy_answers(net, tok, docs: Sequence[str], args) -> List[str]:
    """Greedy generation (at most ``max_new`` tokens, stopped at <|im_end|>) for ``eval_batch`` prompts at a time."""
    answers: List[str] = []
    net.set_train(False)
    for start in range(0, len(docs), args.eval_batch):
        rows = [prompt_ids(tok, d, args.seq - args.max_new) for d in docs[start:start + args.eval_batch]]
        new: List[List[int]] = [[] for _ in rows]
        for _ in range(args.max_new):
            logits = forward(net, rows, args.eval_batch, args.seq)
            for r, row in enumerate(rows):
                if not (new[r] and new[r][-1] == EOS_ID):
                    token = int(np.argmax(logits[r, len(row) - 1]))
                    new[r].append(token)
                    row.append(token)
            if all(n[-1] == EOS_ID for n in new):
                break
        answers += [tok.decode([t for t in n if t != EOS_ID]).strip() for n in new]
    return answers


def evaluate(net, tok, examples: Sequence[Example], args, label: str) -> Tuple[float, float, List[str]]:
    """Score every held-out docstring, and generate the answers to the first ``show`` of them."""
    started = time.perf_counter()
    right, loss = score(net, tok, examples, args)
    answers = greedy_answers(net, tok, [doc for _, _, doc in examples[:args.show]], args)
    print(f"{label}: exact match {right}/{len(examples)} = {100.0 * right / len(examples):.1f}% on held-out "
          f"docstrings, answer loss {loss:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return right / len(examples), loss, answers


def mentions(answer: str, module: str) -> bool:
    """Does the answer name the module as a word (``The `json` module``)? Looser than exact match."""
    return re.search(r"(?<![\w.])" + re.escape(module) + r"(?![\w])", answer) is not None


def shown(answer: str, width: int) -> str:
    answer = answer.replace("\n", "\\n")
    return answer if len(answer) <= width else answer[:width - 3] + "..."


class Every(Callback):
    """The mean training loss every N steps (and of the last step), with the time."""

    def __init__(self, every: int, total: int):
        self.every, self.total, self.losses, self.started = every, total, [], time.perf_counter()

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        loss = cb.net_outputs[0] if isinstance(cb.net_outputs, (tuple, list)) else cb.net_outputs
        self.losses.append(float(np.asarray(loss.asnumpy()).reshape(-1)[0]))
        step = cb.cur_step_num
        if step % self.every == 0 or step == self.total:
            recent = self.losses[-self.every:]
            print(f"step {step:4d}/{self.total}  loss {np.mean(recent):.4f}  "
                  f"({time.perf_counter() - self.started:.0f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per training row and per generation window")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval", type=int, default=0, help="held-out docstrings to score (0: all)")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=8, help="tokens generated per shown answer at most")
    parser.add_argument("--show", type=int, default=8, help="held-out answers shown before and after")
    parser.add_argument("--num-layers", type=int, default=None, help="keep the first N blocks (tests)")
    parser.add_argument("--mode", type=int, default=0, help="0 graph (default), 1 PyNative")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-ckpt", default=None, help="write the whole network here after training")
    args = parser.parse_args()
    started = time.perf_counter()

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    ms.set_seed(args.seed)
    train, held_out = stdlib_examples(args.seed)
    held_out = held_out[:args.eval] if args.eval else held_out
    print(f"task: name the module of a docstring; {len(train)} training and {len(held_out)} held-out docstrings "
          f"of {len(MODULES)} modules of Python {sys.version.split()[0]}", flush=True)
    tok = smollm2_tokenizer()
    net = load_smollm2(args.num_layers, seq_length=args.seq, batch_size=args.batch_size)
    print(f"SmolLM2-135M-Instruct loaded ({net.config.num_layers} blocks) in {time.perf_counter() - started:.0f} s",
          flush=True)

    before, loss_before, answers_before = evaluate(net, tok, held_out, args, "before")

    ids, labels = train_rows(tok, train, args.seq)
    order = np.random.default_rng(args.seed).permutation(np.resize(np.arange(len(train)), args.steps * args.batch_size))
    rows = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps)]
    dataset = ds.GeneratorDataset([(ids[r], labels[r]) for r in rows], ["input_ids", "labels"], shuffle=False)
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=args.lr, weight_decay=0.0)
    tuned = sum(int(np.prod(p.shape)) for p in optimizer.parameters)
    total = sum(int(np.prod(p.shape)) for p in net.get_parameters())
    print(f"training {args.steps} steps of {args.batch_size} x {args.seq} tokens; the optimizer holds "
          f"{len(optimizer.parameters)} tensors, {tuned:,} of {total:,} values", flush=True)
    log = Every(args.log_every, args.steps)
    Model(net, optimizer=optimizer).train(1, dataset, callbacks=[log], dataset_sink_mode=False)

    after, loss_after, answers_after = evaluate(net, tok, held_out, args, "after")
    print(f"\n{'held-out docstring':50} {'module':13} {'before':24} after")
    shown_examples = held_out[:args.show]
    for (module, _, doc), old, new in zip(shown_examples, answers_before, answers_after):
        print(f"{shown(doc, 50):50} {module:13} {shown(old, 24):24} {shown(new, 20)}")
    named = sum(mentions(a, e[0]) for a, e in zip(answers_before, shown_examples))
    print(f"(before tuning, {named} of these {len(shown_examples)} answers name the right module somewhere)")
    print(f"\nheld-out exact match {100 * before:.1f}% -> {100 * after:.1f}% (answer loss {loss_before:.2f} -> "
          f"{loss_after:.2f}) after {args.steps} steps; total {time.perf_counter() - started:.0f} s", flush=True)
    if args.save_ckpt:
        ms.save_checkpoint(net, args.save_ckpt)
        print(f"checkpoint saved to {args.save_ckpt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
