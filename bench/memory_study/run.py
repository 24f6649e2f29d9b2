"""One measured training run of SmolLM2 (MindFormers Llama, first K blocks) with pet_hooks LoRA and one set of levers.

    .venv/bin/python bench/memory_study/run.py --blocks 2 --lever baseline
    .venv/bin/python bench/memory_study/run.py --blocks 2 --lever lazy_attr,recompute --steps 6

Prints one JSON line: first-step seconds, median later-step seconds, peak RSS above the RSS
before the model was loaded (VmHWM - base), RSS after the last step, the first losses, and
what each lever did. Levers (comma separated, applied in this order where it matters):

  baseline         nothing
  jitO0/jitO1/jitO2  ms.set_context(jit_config={"jit_level": ...})
  memO1            ms.set_context(memory_optimize_level="O1")
  setmemO1         ms.runtime.set_memory(optimize_level="O1")
  dfs              ms.set_context(exec_order="dfs")
  lazy_init        mindspore.lazy_inline wrapped around LLamaDecodeLayer.__init__ before the model is built
  front            with lazy_init/lazy_attr: policy="front" (no_inline=False: reuse in the front end, then inline)
  lazy_attr        the same marker (cell_init_args) written onto the built, LoRA-adapted layers
  lazy_mf          MindFormers' own lazy_inline (on LlamaForCausalLM.__init__) forced on in stand-alone
  recompute        Cell.recompute() on every decoder block
  recompute_attn   Cell.recompute() on every block's attention only
  chunked_loss     lm_head + cross-entropy replaced by a chunked, recomputed computation (same loss)
  nohead           lm_head + cross-entropy replaced by mean(h^2) (memory only; loss differs)
  pynative         mode=1
  pyjit            mode=1 and mindspore.jit on each decoder block's construct
  compile_split    compile the train step (Cell.compile) before the first step, recording its time and RSS
  noreuse          pet_hooks variants: reuse_block_graphs=False (each block compiled on its own, as before issue 14)
Variants (--variant): lora (q/k/v/o r=8; --pet-config FILE applies that file instead), mindformers_lora
(MindFormers' own get_pet_model, the same LoRA), ptuning2 (16 positions), prefix (16 positions, MLP 64), full,
floor (one norm weight trains), forward (no grad). The pet_hooks variants record how many blocks share a graph.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lever", default="baseline")
    parser.add_argument("--variant", default="lora", choices=("lora", "ptuning2", "prefix", "full", "floor", "forward",
                                                              "mindformers_lora"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--pet-config", default="",
                        help="variant lora: apply this config file (relative to the repository), e.g. the demo's")
    parser.add_argument("--chunked-loss", type=int, default=None,
                        help="pet_hooks variants: the config's chunked_loss (rows per chunk of the head and loss)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamwd", "sgd"))
    parser.add_argument("--save-graphs", default="")
    args = parser.parse_args()
    if args.pet_config and args.chunked_loss is not None:
        parser.error("--chunked-loss with --pet-config: the config file's chunked_loss is the one applied")
    levers = [x for x in args.lever.split(",") if x and x != "baseline"]
    out = {"blocks": args.blocks, "seq": args.seq, "batch": args.batch, "variant": args.variant,
           "lever": args.lever, "notes": []}
    try:
        run(args, levers, out)
    except Exception as exc:  # report the failure as a result line
        out["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
        out["traceback"] = traceback.format_exc()[-3000:]
    out["peak_above_base_mb"] = round(status_mb("VmHWM") - out.get("base_mb", 0.0), 1)
    print("RESULT " + json.dumps(out), flush=True)


def run(args, levers, out):
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops

    mode = 1 if ("pynative" in levers or "pyjit" in levers) else 0
    out["mode"] = mode
    ms.set_context(mode=mode, device_target="CPU")
    ms.set_seed(0)          # a config file without a seed (the demo's) inits the deltas from this: runs compare
    if args.save_graphs:
        ms.set_context(save_graphs=True, save_graphs_path=args.save_graphs)
    for level in ("O0", "O1", "O2"):
        if f"jit{level}" in levers:
            ms.set_context(jit_config={"jit_level": level})
    if "memO1" in levers:
        ms.set_context(memory_optimize_level="O1")
    if "setmemO1" in levers:
        ms.runtime.set_memory(optimize_level="O1")
    if "dfs" in levers:
        ms.set_context(exec_order="dfs")

    import mindformers  # noqa: F401  (import cost outside the base)
    from mindformers.models.llama import llama_transformer, llama as mf_llama
    import pet_hooks
    from samples.smollm2 import load_smollm2
    from bench.smollm2_worker import batches

    data = batches(args.seq, args.batch, "train")[:max(args.steps, 3)]
    if "lazy_init" in levers:
        from mindspore import lazy_inline
        cls = llama_transformer.LLamaDecodeLayer
        # the class's __init__ is MindFormers' predict_lazy_inline wrapper (a no-op when not predicting),
        # a function named "decorator", which lazy_inline refuses: give it an __init__ to wrap
        original_init = cls.__init__

        def __init__(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
        cls.__init__ = lazy_inline(__init__, policy="front" if "front" in levers else None)
        out["notes"].append("LLamaDecodeLayer.__init__ wrapped in mindspore.lazy_inline before build")
    if "lazy_mf" in levers:
        import mindformers.version_control as vc
        real = ms.get_auto_parallel_context

        def fake(key):
            return "data_parallel" if key == "parallel_mode" else real(key)
        vc.ms.get_auto_parallel_context = fake  # same module object as ms: restored after build
    out["base_mb"] = round(status_mb("VmRSS"), 1)
    started = time.perf_counter()
    net = load_smollm2(args.blocks, seq_length=args.seq, batch_size=args.batch)
    if "lazy_mf" in levers:
        ms.get_auto_parallel_context = real
        out["notes"].append(f"LlamaForCausalLM cell_init_args set: {hasattr(net, '_cell_init_args')}")
    out["load_s"] = round(time.perf_counter() - started, 2)
    out["after_load_mb"] = round(status_mb("VmRSS") - out["base_mb"], 1)
    layers = list(net.model.layers)

    reuse = "noreuse" not in levers
    if args.variant == "lora" and args.pet_config:     # a config file as the demo applies it (its settings count)
        cfg = pet_hooks.load_config(os.path.join(ROOT, args.pet_config))
        out["config"] = {key: value for key, value in cfg.to_dict().items() if value is not None}
        pet_hooks.apply(net, cfg)
    elif args.variant == "lora":
        cfg = pet_hooks.LoraConfig(lora_rank=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*wq|.*wk|.*wv|.*wo",
                                   seed=0, reuse_block_graphs=reuse, chunked_loss=args.chunked_loss)
        pet_hooks.apply(net, cfg)
    elif args.variant in ("ptuning2", "prefix"):       # bench.smollm2's settings: 16 positions (prefix: MLP 64)
        from bench.models import Shape, pet_config
        cfg = pet_config(Shape("llama"), args.variant)
        cfg.reuse_block_graphs = reuse
        cfg.chunked_loss = args.chunked_loss
        pet_hooks.apply(net, cfg)
    elif args.variant == "mindformers_lora":          # MindFormers' own LoRA (mindpet) on the same model
        from mindformers.pet import get_pet_model
        net = get_pet_model(net, {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                  "target_modules": r".*wq|.*wk|.*wv|.*wo"})
    elif args.variant == "floor":
        for param in net.get_parameters():
            param.requires_grad = param.name == "model.layers.0.attention_norm.weight"
    elif args.variant == "forward":
        for param in net.get_parameters():
            param.requires_grad = False

    out["blocks_sharing_a_graph"] = sum(1 for layer in layers
                                        if str(getattr(layer, "cell_init_args", "")).startswith("lazy_inline_"))
    if "lazy_attr" in levers:
        # what @lazy_inline does after __init__: one identical marker string for every reusable instance
        for layer in layers:
            layer.cell_init_args = "lazy_inline_" + type(layer).__name__ + "_pet"
            if "front" in levers:
                layer.no_inline = False     # lazy_inline(policy="front")
        out["notes"].append(f"cell_init_args set on {len(layers)} layers after apply")
    if "lazy_init" in levers:
        marks = {layer.cell_init_args[:60] for layer in layers}
        out["notes"].append(f"{len(marks)} distinct cell_init_args prefixes; lens "
                            f"{sorted({len(layer.cell_init_args) for layer in layers})[:5]}")
    if "recompute" in levers:
        for layer in layers:
            layer.recompute()
    if "recompute_attn" in levers:
        for layer in layers:
            layer.attention.recompute()
    if "pyjit" in levers:
        for layer in layers:
            layer.construct = ms.jit(layer.construct)

    model = net
    if "chunked_loss" in levers or "nohead" in levers:
        model = HeadReplaced(net, args.chunks, nohead="nohead" in levers)

    trainable = model.trainable_params()
    out["trainable"] = int(sum(int(np.prod(p.shape)) for p in trainable))
    model.set_train(True)
    if args.variant == "forward":
        step_cell = model
    else:
        if args.optimizer == "adamw":
            from mindspore.experimental.optim import AdamW
            opt = AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        elif args.optimizer == "sgd":       # one fused SGD kernel per parameter (isolates the optimizer's kernels)
            opt = nn.SGD(trainable, learning_rate=args.lr)
        else:
            opt = nn.AdamWeightDecay(trainable, learning_rate=args.lr, weight_decay=0.0)
        step_cell = nn.TrainOneStepCell(model, opt)
        step_cell.set_train(True)

    times, losses, rss = [], [], []
    if "compile_split" in levers and args.variant != "forward":
        started = time.perf_counter()
        step_cell.compile(ms.Tensor(data[0]))
        out["compile_s"] = round(time.perf_counter() - started, 3)
        out["rss_after_compile_mb"] = round(status_mb("VmRSS") - out["base_mb"], 1)
        out["peak_after_compile_mb"] = round(status_mb("VmHWM") - out["base_mb"], 1)
    for i in range(args.steps):
        ids = ms.Tensor(data[i % len(data)])
        started = time.perf_counter()
        loss = float(step_cell(ids).asnumpy())
        times.append(round(time.perf_counter() - started, 3))
        losses.append(loss)
        rss.append(round(status_mb("VmRSS") - out["base_mb"], 1))
    out["first_s"] = times[0]
    out["later_median_s"] = round(statistics.median(times[1:]), 3) if len(times) > 1 else None
    out["times"] = times
    out["losses"] = losses[:3]
    out["rss_per_step_mb"] = rss
    out["rss_after_mb"] = rss[-1]
    try:
        out["ms_memory_stats"] = {k: v for k, v in ms.runtime.memory_stats().items() if not isinstance(v, dict)}
        out["ms_max_allocated"] = ms.runtime.max_memory_allocated()
    except Exception as exc:  # noqa: BLE001
        out["ms_memory_stats"] = f"{type(exc).__name__}: {exc}"


def HeadReplaced(net, chunks, nohead=False):
    """The same loss as LlamaForCausalLM in training (mean CE of tokens 1..S from 0..S-1, nothing masked),
    computed from the backbone's hidden states in ``chunks`` row blocks, each a recomputed cell."""
    import mindspore as ms
    from mindspore import nn, ops

    class ChunkCE(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight          # the tied embedding (frozen)
            self.matmul = ops.MatMul(transpose_b=True)

        def construct(self, h, labels):
            logits = self.matmul(h, self.weight)                      # [c, V] (no transposed copy of W)
            m = ops.stop_gradient(logits.max(axis=-1, keepdims=True))
            lse = ops.log(ops.exp(logits - m).sum(-1)) + m.squeeze(-1)
            picked = ops.gather_elements(logits, 1, labels.reshape(-1, 1)).squeeze(-1)
            return (lse - picked).sum()

    class Wrapped(nn.Cell):
        def __init__(self):
            super().__init__(auto_prefix=False)
            self.net = net
            self.ce = ChunkCE(net.model.tok_embeddings.embedding_weight)
            self.ce.recompute()
            self.chunks = chunks
            self.nohead = nohead

        def construct(self, input_ids):
            bsz, seqlen = input_ids.shape
            tokens = input_ids[:, :seqlen - 1]
            labels = input_ids[:, 1:].reshape(-1)
            h = self.net.model(tokens)
            h = h.reshape(-1, h.shape[-1])
            if self.nohead:
                return (h * h).mean()
            n = h.shape[0]
            size = n // self.chunks
            total = self.ce(h[0:size], labels[0:size])
            for i in range(1, self.chunks):
                total = total + self.ce(h[i * size:(i + 1) * size], labels[i * size:(i + 1) * size])
            return total / n

    return Wrapped()


if __name__ == "__main__":
    main()
