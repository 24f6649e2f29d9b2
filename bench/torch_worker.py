"""The PyTorch side (optional): Hugging Face Llama with PEFT LoRA against full fine-tuning.

    python -m bench.torch_worker --hidden 1024 --variant lora_qkvo

The same architecture and sizes as the MindSpore Llama workload (4 layers, 8 heads,
intermediate 2 x hidden, vocabulary 512, AdamW), speaking the stepping protocol of
:mod:`bench.train_worker`, so the LoRA/full ratio of both frameworks can be compared.
Only used when torch, transformers and peft import.
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.models import VOCAB, add_shape_arguments, rss_mb
from bench.protocol import say, serve_steps

TORCH_VARIANTS = ("full", "lora_qkvo", "lora_all")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, model=False)
    parser.add_argument("--variant", choices=TORCH_VARIANTS, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(2)
    torch.manual_seed(0)
    baseline = rss_mb()
    start = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=max(256, args.seq))).float()
    if args.variant != "full":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if args.variant == "lora_qkvo" else "all-linear"
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq))

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    for _ in range(args.warmup):
        first_loss = step()
    say(event="ready", trainable=sum(p.numel() for p in params), total=sum(p.numel() for p in model.parameters()),
         setup_s=round(time.perf_counter() - start, 2), first_loss=first_loss)
    return serve_steps(step, baseline)

if __name__ == "__main__":
    sys.exit(main())
