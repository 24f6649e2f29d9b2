"""SmolLM2-135M-Instruct (real weights) training in one process, MindSpore or PyTorch, stepping on command.

    python -m bench.smollm2_worker --framework ms --variant lora_qkvo [--layers 2] [--lr 1e-3]
    python -m bench.smollm2_worker --framework torch --variant lora_qkvo --save-lora-a /tmp/a.npz

The MindSpore side is ``samples.smollm2.load_smollm2`` (MindFormers' ``LlamaForCausalLM``,
graph mode) with a pet_hooks method applied (or nothing frozen: ``full``); the PyTorch side
is ``samples.smollm2.load_reference_transformers`` (transformers' own load of the same GGUF)
with PEFT LoRA, or nothing frozen. Both speak the stepping protocol of :mod:`bench.protocol`
(``step``, ``eval``, ``done``) so :mod:`bench.smollm2` can run them in turn or interleaved.

Two tasks (``--task``): ``lm`` (the default, used for parity and speed) and ``module``, the
README demo's task (:mod:`samples.stdlib_task`: a docstring in SmolLM2's chat format, the
answer its module's name, the loss on the answer's tokens only), whose ``eval`` returns the
held-out exact match and answer loss, scored as the demo scores them.

What makes the two sides comparable step for step:

* **The data.** For ``module``: the demo's rows, in the demo's order for ``--task-steps``
  steps (``stdlib_task.training_order``). For ``lm``: :func:`batches` cuts the repository's ``samples/data/stdlib_docstrings.txt``
  into docstrings (blank-line separated blocks), keeps every 10th for evaluation, tokenizes
  each part with ``smollm2_tokenizer()`` and cuts it into windows of ``seq + 1`` tokens, shuffled
  once with a fixed seed; step ``i`` takes windows ``batch*i ... batch*i + batch - 1``.
* **The loss.** MindFormers' Llama takes the ``seq + 1`` tokens, predicts tokens 1..seq from
  tokens 0..seq-1 and averages the cross-entropy over all ``batch * seq`` predictions (its
  ``pad_token_id`` is ``NO_PAD``, so nothing is masked; with ``module``'s labels, over the
  predictions whose label is not -100). The PyTorch side computes exactly that: the logits of
  tokens 0..seq-1, ``F.cross_entropy`` against tokens (labels) 1..seq, mean.
* **The optimizer.** ``torch.optim.AdamW`` and ``mindspore.experimental.optim.AdamW`` compute
  the same update: decoupled decay ``p *= 1 - lr * wd``, then
  ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. (MindSpore's usual
  ``nn.AdamWeightDecay`` has no bias correction, and ``nn.Adam`` puts eps inside the
  corrected step, so neither matches torch.) Same lr, betas, eps and weight decay on both.
* **LoRA's A.** PEFT initialises A (Kaiming-uniform) and B = 0; ``--save-lora-a`` writes
  PEFT's A under MindFormers' cell names, ``--load-lora-a`` writes them into pet_hooks' A.
  Dropout is 0 everywhere (LoRA dropout 0; neither Llama has dropout in training here).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import numpy as np

from bench.models import ROOT, Shape, peak_rss_mb, rss_mb
from bench.protocol import say, serve_steps

DATA = os.path.join(ROOT, "samples", "data", "stdlib_docstrings.txt")
MS_VARIANTS = ("none", "lora_qkvo", "lora_all", "ptuning2", "prefix", "full",
               "loha_qkvo", "lokr_qkvo", "vera_qkvo", "oft_qkvo", "adalora_qkvo", "prompt_tuning")   # issue 30
TORCH_VARIANTS = ("none", "lora_qkvo", "lora_all", "full")
EVAL_BATCH, MAX_NEW = 8, 8      # the demo's defaults (samples/smollm2_train.py)
# Hugging Face module path -> MindFormers cell path (inside model.layers.<i>.)
HF_TO_MS = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
            "mlp.up_proj": "feed_forward.w3"}
PEFT_TARGETS = {"lora_qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "lora_all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def split_corpus(every: int = 10):
    """(training text, held-out text): docstrings (blank-line separated blocks), every ``every``-th held out."""
    with open(DATA, encoding="utf-8") as handle:
        blocks = [b.strip("\n") for b in handle.read().split("\n\n") if b.strip()]
    held = [b for i, b in enumerate(blocks) if i % every == every - 1]
    train = [b for i, b in enumerate(blocks) if i % every != every - 1]
    return "\n\n".join(train), "\n\n".join(held)


def windows(text: str, seq: int, seed: int) -> np.ndarray:
    """The text's tokens cut into windows of ``seq + 1`` (the rest dropped), shuffled with ``seed``."""
    from samples.smollm2 import smollm2_tokenizer
    ids = np.asarray(smollm2_tokenizer().encode(text), np.int32)
    count = len(ids) // (seq + 1)
    out = ids[:count * (seq + 1)].reshape(count, seq + 1)
    return out[np.random.RandomState(seed).permutation(count)]


def batches(seq: int, batch: int, split: str) -> np.ndarray:
    """[n, batch, seq + 1] int32 token batches of the training or held-out split, in their fixed order."""
    train, held = split_corpus()
    rows = windows(train if split == "train" else held, seq, 0 if split == "train" else 1)
    n = len(rows) // batch
    return rows[:n * batch].reshape(n, batch, seq + 1)


class Task:
    """What a side trains on and how it is evaluated: ``train[i]`` holds step i's inputs
    (``(ids,)`` or ``(ids, labels)``, each ``[batch, seq + 1]``); ``held`` the held-out batches
    (``lm``) or examples (``module``)."""

    def __init__(self, args):
        self.name, self.seq = args.task, args.seq
        if args.task == "lm":
            self.train = [(ids,) for ids in batches(args.seq, args.batch, "train")]
            self.held = batches(args.seq, args.batch, "held")[:args.eval_batches]
            return
        from samples.smollm2 import smollm2_tokenizer
        from samples.stdlib_task import stdlib_examples, train_rows, training_order
        self.tok = smollm2_tokenizer()
        train, held = stdlib_examples(args.seed)
        self.held = held[:args.eval_batches * EVAL_BATCH] if args.eval_batches else held
        ids, labels = train_rows(self.tok, train, args.seq)
        self.train = [(ids[rows], labels[rows]) for rows in training_order(len(train), args.task_steps, args.batch,
                                                                              args.seed)]

    def evaluate(self, loss_of, logits_of) -> dict:
        """``lm``: the mean of ``loss_of(ids)`` over the held-out batches; ``module``: the demo's score."""
        started = time.perf_counter()
        if self.name == "lm":
            losses = [loss_of(ids) for ids in self.held]
            out = {"loss": float(np.mean(losses)), "losses": losses}
        else:
            from samples.stdlib_task import score
            right, loss = score(logits_of, self.tok, self.held, self.seq, MAX_NEW, EVAL_BATCH)
            out = {"loss": loss, "exact_match": right / len(self.held), "right": right, "count": len(self.held)}
        return {**out, "s": round(time.perf_counter() - started, 2)}


# ----------------------------------------------------------------------------- MindSpore
def mindspore_side(args):
    """(step, evaluate, trainable, total) for the MindSpore variant."""
    import mindspore as ms
    from mindspore import nn
    from mindspore.experimental.optim import AdamW
    import pet_hooks
    from bench.models import PROMPT_TOKENS, pet_config
    from samples.smollm2 import batch_logits, load_smollm2
    # prompt tuning: the model runs on PROMPT_TOKENS + seq positions, and in graph mode MindFormers' causal
    # mask is seq_length wide (docs/methods.md): the data keeps its seq, the net is built that much longer
    extra = PROMPT_TOKENS if args.variant == "prompt_tuning" else 0
    net = load_smollm2(args.layers, seq_length=args.seq + extra, batch_size=args.batch)
    if args.variant not in ("none", "full"):
        cfg = pet_config(Shape("llama"), args.variant, total_step=args.task_steps)
        if args.variant == "prompt_tuning":
            cfg = text_init(cfg)
        net = pet_hooks.apply(net, cfg)
    if args.load_lora_a:
        arrays = np.load(args.load_lora_a)
        params = {p.name: p for p in pet_hooks.delta_parameters(net)}
        a_names = sorted(n for n in params if n.endswith(".lora_A"))
        if sorted(arrays.files) != a_names:
            raise ValueError(f"{args.load_lora_a} holds {len(arrays.files)} A matrices, the net {len(a_names)}: "
                             f"{sorted(set(arrays.files) ^ set(a_names))[:4]}")
        for name in a_names:
            if tuple(params[name].shape) != arrays[name].shape:
                raise ValueError(f"{name}: {params[name].shape} vs {arrays[name].shape}")
            params[name].set_data(ms.Tensor(arrays[name], ms.float32))
    trainable = [] if args.variant == "none" else net.trainable_params()
    net.set_train(True)
    step_cell = None
    if trainable:
        optimizer = AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.wd)
        # AdaLoRA: the regulariser's gradient and the allocator's gradients in the optimizer step (a no-op else)
        optimizer = pet_hooks.adalora_optimizer(optimizer, net)
        step_cell = nn.TrainOneStepCell(net, optimizer)
        step_cell.set_train(True)
    task = Task(args)
    state = {"i": 0}

    adalora = args.variant == "adalora_qkvo"

    def step() -> float:
        inputs = task.train[state["i"] % len(task.train)]
        loss = float(step_cell(*[ms.Tensor(x) for x in inputs]).asnumpy())
        if adalora:       # PEFT's update_and_allocate(global_step) after each optimizer step, counted from 0
            pet_hooks.update_and_allocate(net, state["i"])
        state["i"] += 1
        return loss

    def evaluate() -> dict:
        net.set_train(task.name == "lm")     # lm: training mode returns the loss; module: predict mode, logits
        try:
            return task.evaluate(lambda ids: float(net(ms.Tensor(ids)).asnumpy()), lambda ids: batch_logits(net, ids))
        finally:
            net.set_train(True)

    return step, evaluate, trainable, list(net.get_parameters())


def text_init(cfg):
    """Prompt tuning's TEXT init (PEFT's usual choice for causal LMs): the rows of the task's own instruction
    (``stdlib_task.SYSTEM``), SmolLM2's tokenizer written to a temporary tokenizer.json."""
    import dataclasses
    import tempfile
    from samples.smollm2 import smollm2_tokenizer
    from samples.stdlib_task import SYSTEM
    folder = tempfile.mkdtemp(prefix="smollm2-tokenizer-")
    smollm2_tokenizer().backend.save(os.path.join(folder, "tokenizer.json"))
    return dataclasses.replace(cfg, prompt_tuning_init="TEXT", prompt_tuning_init_text=SYSTEM,
                               tokenizer_name_or_path=folder)


# ----------------------------------------------------------------------------- PyTorch
def torch_side(args):
    import torch
    import torch.nn.functional as F
    from samples.smollm2 import load_reference_transformers
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_reference_transformers(args.layers)
    if args.variant.startswith("lora_"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=PEFT_TARGETS[args.variant],
                                                           task_type="CAUSAL_LM"))
    if args.save_lora_a:
        out = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                path = name.split("base_model.model.", 1)[1]       # model.layers.<i>.self_attn.q_proj
                head, tail = path.split(".", 3)[:3], path.split(".", 3)[3]
                out[".".join(head) + "." + HF_TO_MS[tail] + ".lora_A"] = module.lora_A["default"].weight.detach().numpy()
        np.savez(args.save_lora_a, **out)
    if args.variant == "none":
        for param in model.parameters():
            param.requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.wd) if trainable else None
    task = Task(args)
    state = {"i": 0}

    def loss_of(ids: np.ndarray, labels: Optional[np.ndarray] = None):
        ids = torch.as_tensor(ids.astype(np.int64))
        targets = ids if labels is None else torch.as_tensor(labels.astype(np.int64))
        logits = model(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1), ignore_index=-100)

    def step() -> float:
        loss = loss_of(*task.train[state["i"] % len(task.train)])
        state["i"] += 1
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def logits_of(ids: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.as_tensor(ids.astype(np.int64))).logits.float().numpy()

    def evaluate() -> dict:
        model.eval()
        try:
            with torch.no_grad():
                return task.evaluate(lambda ids: float(loss_of(ids)), logits_of)
        finally:
            model.train()

    # every distinct tensor once (the tied embedding is one Parameter on both sides)
    return step, evaluate, trainable, list({id(p): p for p in model.parameters()}.values())


def numel(params) -> int:
    return int(sum(int(np.prod(tuple(p.shape))) for p in params))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("ms", "torch"), required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--layers", type=int, default=None, help="keep the first k blocks (default: all 30)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--wd", type=float, default=0.01)
    parser.add_argument("--eval-batches", type=int, default=8,
                        help="held-out batches evaluated (module: of 8 examples; 0: every held-out example)")
    parser.add_argument("--task", choices=("lm", "module"), default="lm",
                        help="lm: docstring text windows (parity, speed); module: the README demo's task")
    parser.add_argument("--task-steps", type=int, default=60, help="module: the steps the demo's data order is cut for")
    parser.add_argument("--warmup", type=int, default=0, help="steps run (and timed as first_step_s) before 'ready'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-lora-a", default=None, help="torch: write PEFT's initial A matrices here (.npz)")
    parser.add_argument("--load-lora-a", default=None, help="ms: start pet_hooks' A matrices from this .npz")
    parser.add_argument("--wait-for-pid", type=int, default=None, help="start only once this process has ended")
    args = parser.parse_args(argv)
    allowed = MS_VARIANTS if args.framework == "ms" else TORCH_VARIANTS
    if args.variant not in allowed:
        parser.error(f"--variant {args.variant!r}: {args.framework} runs {', '.join(allowed)}")

    while args.wait_for_pid and os.path.exists(f"/proc/{args.wait_for_pid}"):   # one big MindSpore job at a time
        time.sleep(2)
    if args.framework == "ms":
        from bench.models import start_mindspore
        start_mindspore()
        import samples.smollm2  # noqa: F401
        Task(args)     # tokenizer, GGUF reader and the task's imports before the baseline
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
        import samples.smollm2  # noqa: F401
        Task(args)
    baseline = rss_mb()
    started = time.perf_counter()
    side = mindspore_side if args.framework == "ms" else torch_side
    step, evaluate, trainable, params = side(args)
    loaded = rss_mb() - baseline
    setup_s = time.perf_counter() - started
    first = {}
    for index in range(args.warmup):
        began = time.perf_counter()
        loss = step()
        if index == 0:
            first = {"first_step_s": round(time.perf_counter() - began, 2), "first_loss": loss}
    say(event="ready", trainable=numel(trainable), total=numel(params), setup_s=round(setup_s, 2),
        rss_after_load_mb=round(loaded, 1), peak_rss_before_steps_mb=round(peak_rss_mb() - baseline, 1),
        tokens_per_step=args.batch * args.seq, **first)
    return serve_steps(step, baseline, {"eval": evaluate})


if __name__ == "__main__":
    sys.exit(main())
