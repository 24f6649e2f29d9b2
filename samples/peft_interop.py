"""A pet_hooks LoRA adapter of the MindFormers Llama, handed to Hugging Face PEFT and back.

    pet-hooks run --config samples/configs/llama_lora.yaml --save-dir llama_adapter \\
        samples/llama_train.py --yaml samples/configs/llama_lora.yaml --steps 20
    python samples/peft_interop.py --yaml samples/configs/llama_lora.yaml --adapter llama_adapter --out hf_adapter

It loads the trained adapter into the tiny Llama, writes it in PEFT's format with the
built-in ``llama`` name map, reads that back into a fresh MindSpore model, and, where torch,
transformers and peft are installed, builds ``transformers.LlamaForCausalLM`` with the same
base weights, loads the adapter with ``peft.PeftModel.from_pretrained`` and compares logits.
"""
import argparse
import json
import os
import sys

import numpy as np
import mindspore as ms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pet_hooks  # noqa: E402
from pet_hooks.matching.name_maps import resolve_name_map  # noqa: E402
from samples.llama_train import build_llama  # noqa: E402


def hf_weights(net) -> dict:
    """The base weights under Hugging Face's names (cell paths through the 'llama' name map)."""
    _, to_hf = resolve_name_map("llama")
    weights = {}
    switches = {id(p) for p in pet_hooks.surgery.switch_parameters(net)}
    for param in net.get_parameters():
        if ".lora_" in param.name or id(param) in switches:   # deltas and pet_hooks' on/off switch
            continue
        path, attr = param.name.rsplit(".", 1)
        weights[f"{to_hf(path) or path}.{'weight' if attr == 'embedding_weight' else attr}"] = param.asnumpy()
    return weights


def torch_logits(net, adapter_dir, ids):
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = net.config
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.num_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.theta,
        max_position_embeddings=cfg.seq_length, tie_word_embeddings=False))
    model.load_state_dict({k: torch.tensor(v) for k, v in hf_weights(net).items()}, strict=True)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids.astype(np.int64))).logits.numpy()


def main():
    parser = argparse.ArgumentParser(description="move a Llama LoRA adapter to PEFT and back")
    parser.add_argument("--yaml", required=True)
    parser.add_argument("--adapter", required=True, help="a pet_hooks adapter directory")
    parser.add_argument("--out", required=True, help="where to write the PEFT-format adapter")
    args = parser.parse_args()
    ms.set_device("CPU")

    net = pet_hooks.load_adapter(build_llama(args.yaml), args.adapter)
    net.set_train(False)
    # Token 0 is MindFormers' pad_token_id, which its Llama masks out of attention (transformers
    # would need an attention_mask for that): leave it out so both see the same sequence.
    ids = np.random.default_rng(0).integers(1, net.config.vocab_size, (2, net.config.seq_length)).astype(np.int32)
    ours = net(ms.Tensor(ids))[0].asnumpy()

    pet_hooks.save_adapter(net, args.out, format="peft", name_map="llama")
    doc = json.load(open(os.path.join(args.out, "adapter_config.json"), encoding="utf-8"))
    print(f"PEFT adapter written to {args.out}: " + ", ".join(
        f"{k}={doc[k]!r}" for k in ("peft_type", "r", "lora_alpha", "target_modules", "task_type")))
    from safetensors.numpy import load_file
    keys = sorted(load_file(os.path.join(args.out, "adapter_model.safetensors")))
    print(f"{len(keys)} tensors, e.g. {keys[0]}")

    back = pet_hooks.load_adapter(build_llama(args.yaml), args.out)     # the llama map is found
    back.set_train(False)
    print(f"read back into MindSpore: max |logits difference| {np.abs(back(ms.Tensor(ids))[0].asnumpy() - ours).max():.1e}")
    try:
        theirs = torch_logits(net, args.out, ids)
    except ImportError as err:
        print(f"PyTorch comparison skipped ({err})")
        return
    diff = np.abs(theirs - ours)
    print(f"PyTorch (transformers + peft) vs MindSpore: |logits difference| max {diff.max():.1e}, "
          f"median {np.median(diff):.1e} (logits up to {np.abs(ours).max():.2f})")


if __name__ == "__main__":
    main()
