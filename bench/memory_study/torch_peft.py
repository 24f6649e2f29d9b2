"""The PEFT reference at the same shapes: transformers' SmolLM2 (first K blocks) + PEFT LoRA q/k/v/o r=8, AdamW,
the same data and loss as run.py; one JSON line in the same fields.

    .venv/bin/python bench/memory_study/torch_peft.py --blocks 2 [--variant lora|full] [--threads 2]
"""
import argparse, json, os, statistics, sys, time
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import status_mb  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", default="lora", choices=("lora", "full"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    import peft  # noqa: F401
    from bench.smollm2_worker import batches
    from samples.smollm2 import load_reference_transformers
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = batches(args.seq, args.batch, "train")[:args.steps]
    out = {"framework": "torch", "blocks": args.blocks, "seq": args.seq, "batch": args.batch, "variant": args.variant,
           "base_mb": round(status_mb("VmRSS"), 1)}
    model = load_reference_transformers(args.blocks)
    out["after_load_mb"] = round(status_mb("VmRSS") - out["base_mb"], 1)
    if args.variant == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                           task_type="CAUSAL_LM"))
    model.train()
    try:  # forget the peak of loading the whole GGUF (transformers loads all 30 blocks, then we cut)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        out["peak_reset"] = True
    except OSError:
        out["peak_reset"] = False
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    times, losses = [], []
    for i in range(args.steps):
        ids = torch.as_tensor(data[i]).long()
        started = time.perf_counter()
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(round(time.perf_counter() - started, 3))
    out.update(first_s=times[0], later_median_s=round(statistics.median(times[1:]), 3), times=times,
               losses=losses[:3], rss_after_mb=round(status_mb("VmRSS") - out["base_mb"], 1),
               peak_above_base_mb=round(status_mb("VmHWM") - out["base_mb"], 1))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
