"""Fine-tune SmolLM2-135M-Instruct to name the standard-library module a docstring comes from.

A training script that knows nothing about PET (like ``samples/legacy_train.py``): it loads
the real pretrained model (all 30 blocks, ``samples/smollm2.py``), scores it on held-out
docstrings, trains it with ``mindspore.train.Model.train`` and an optimizer over
``net.trainable_params()`` (MindFormers' ``AdamW``, torch's update), and scores it again. Alone it
fine-tunes every weight; under the launcher the optimizer it builds holds only LoRA's deltas (and, with
the config's ``fused_optimizer: true``, is pet_hooks' AdamW: the same update, one fused kernel per
tensor)::

    pet-hooks run --config samples/configs/smollm2_lora.yaml --save-dir smollm2_adapter \\
        samples/smollm2_train.py

The task and its score are :mod:`samples.stdlib_task` (docstring in, module name out; the
loss counts the answer's tokens only; held-out docstrings of objects never trained on). The
score is exact match of greedy generation (the module's name, then ``<|im_end|>``) on every
held-out docstring, read off one teacher-forced forward pass per batch (``stdlib_task.score``);
the first ``--show`` answers are also generated token by token (at most ``--max-new``) and
printed before and after. Every call runs at one shape, ``(eval-batch, seq)``: one graph.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np
import mindspore as ms
import mindspore.dataset as ds
from mindspore.train import Callback, Model
from mindformers.core.optim import AdamW

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.smollm2 import EOS_ID, batch_logits, load_smollm2, smollm2_tokenizer  # noqa: E402
from samples.stdlib_task import (MODULES, Example, padded, prompt_ids, score, stdlib_examples,  # noqa: E402
                                 train_rows, training_order)

def forward(net, rows: Sequence[Sequence[int]], batch: int, seq: int) -> np.ndarray:
    """(len(rows), seq, vocab) logits: the rows right-padded to ``seq`` in one ``(batch, seq)`` call (one graph)."""
    return batch_logits(net, padded(rows, batch, seq))[:len(rows)]


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
    net.set_train(False)
    right, loss = score(lambda ids: batch_logits(net, ids), tok, examples, args.seq, args.max_new, args.eval_batch)
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
    parser.add_argument("--eval-batch", type=int, default=4,
                        help="held-out rows per call (the training batch: a smaller graph than 8)")
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

    # The optimizer first, then the score before training: the model the evaluation compiles is then the one that
    # trains (under pet-hooks run, adapted when its optimizer is built; LoRA's B starts at zero, so its outputs are
    # the pretrained model's), and the evaluation after training runs the same compiled graph instead of another.
    optimizer = AdamW(net.trainable_params(), learning_rate=args.lr, weight_decay=0.0)    # MindFormers': torch's update
    before, loss_before, answers_before = evaluate(net, tok, held_out, args, "before")

    ids, labels = train_rows(tok, train, args.seq)
    rows = training_order(len(train), args.steps, args.batch_size, args.seed)
    dataset = ds.GeneratorDataset([(ids[r], labels[r]) for r in rows], ["input_ids", "labels"], shuffle=False)
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
