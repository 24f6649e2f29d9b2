"""The benchmark workloads: which model, at which size, with which training variant.

Every worker process builds its model through :func:`build`, so all variants of one model
share the exact architecture, initial weights and input batch, and differ only in what
trains. A *variant* is one of :data:`VARIANTS`:

``full``       every weight trains (full fine-tuning)
``floor``      every weight frozen except the first layer's first norm weight, so the
               gradient still flows back through every layer: the cost any PET method can reach
``lora_qkvo``  pet_hooks LoRA r=8 on the attention's q/k/v/o projections
``lora_all``   pet_hooks LoRA r=8 on every linear layer of the blocks
``mflora_qkvo`` / ``mflora_all``  MindFormers' own LoRA (``mindformers.pet.get_pet_model``), same targets
``ptuning2``   pet_hooks P-Tuning v2, 16 prefix positions
``prefix``     pet_hooks Prefix-Tuning, 16 prefix positions, MLP encoder of width 64
``forward``    no training at all: the compiled forward pass of the loss only (where the memory
               of a compiled MindSpore graph starts)

The methods of issue 19, measured by ``python -m bench.methods`` (not part of ``bench.run``):

``ia3``        pet_hooks IA3 on keys, values and the MLP's output projection (its input scaled)
``bitfit``     pet_hooks BitFit: every bias of the model
``adapter``    pet_hooks bottleneck adapter (bottleneck 64) after the attention and MLP output projections
``low_rank_adapter``  the same, low-rank (reduction_factor 4, low_rank_size 8)
``dora_qkvo``  pet_hooks DoRA (``use_dora``) r=8 on the same q/k/v/o projections as ``lora_qkvo``
``pissa_qkvo`` pet_hooks LoRA r=8 q/k/v/o initialised by PiSSA (``init_lora_weights: pissa``)

The methods of issue 30, at LoRA q/k/v/o's targets where they have targets (``bench.smollm2``'s quality
table and its paired step-time groups against ``lora_qkvo``):

``loha_qkvo``  pet_hooks LoHa r=8, alpha 16 (LoRA's scaling alpha / r = 2) on q/k/v/o
``lokr_qkvo``  pet_hooks LoKr r=8, alpha 16 on q/k/v/o (PEFT's factorisation, decompose_factor -1)
``vera_qkvo``  pet_hooks VeRA r=256 (PEFT's default), d_initial 0.1, on q/k/v/o
``oft_qkvo``   pet_hooks OFT, PEFT 0.21's defaults: block size 32, Cayley-Neumann (5 terms), on q/k/v/o
``adalora_qkvo`` pet_hooks AdaLoRA init_r 12 -> target_r 8, lora_alpha 16, on q/k/v/o; the schedule
               (total_step, tinit, tfinal, deltaT) comes from :func:`adalora_schedule`
``prompt_tuning`` pet_hooks prompt tuning, 16 virtual tokens (RANDOM init here; bench.smollm2's worker
               starts them from the task's system prompt, TEXT init)
"""
from __future__ import annotations

import dataclasses
import os
import resource
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VARIANTS = ("full", "floor", "lora_qkvo", "lora_all", "mflora_qkvo", "mflora_all", "ptuning2", "prefix", "forward")
MODELS = ("gpt", "llama")

# Targets per model: the same layers for pet_hooks and for MindFormers' LoRA.
LORA_TARGETS = {
    ("gpt", "qkvo"): r".*dense1|.*dense2|.*dense3|.*attention\.projection",
    ("gpt", "all"): r".*dense1|.*dense2|.*dense3|.*attention\.projection|.*mlp\.mapping|.*mlp\.projection",
    ("llama", "qkvo"): r".*wq|.*wk|.*wv|.*wo",
    ("llama", "all"): r".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3",
}
# MindFormers matches target_modules with re.match on each child's own name, so on the GPT
# "projection" alone cannot tell attention from MLP: qkvo is applied under each block's
# attention cell only (see _mindformers_lora).
MF_LORA_TARGETS = {
    ("gpt", "qkvo"): r"dense1$|dense2$|dense3$|projection$",
    ("gpt", "all"): r"dense1$|dense2$|dense3$|projection$|mapping$",
    ("llama", "qkvo"): r".*wq|.*wk|.*wv|.*wo",
    ("llama", "all"): r".*wq|.*wk|.*wv|.*wo|.*w1|.*w2|.*w3",
}
FLOOR_PARAM = {"gpt": "blocks.0.ln1.gamma", "llama": "model.layers.0.attention_norm.weight"}
# Issue 19's methods: (keys and values, the MLP's output projection), as PEFT's IA3 defaults for
# Llama (k_proj, v_proj, down_proj), and the output projections the adapters follow.
IA3_TARGETS = {"gpt": (r".*dense2|.*dense3|.*mlp\.projection", r".*mlp\.projection"),
               "llama": (r".*wk|.*wv|.*w2", r".*w2")}
ADAPTER_TARGETS = {"gpt": r".*attention\.projection|.*mlp\.projection", "llama": r".*wo|.*w2"}
METHOD_VARIANTS = ("ia3", "bitfit", "adapter", "low_rank_adapter", "dora_qkvo", "pissa_qkvo")
ROUND2_VARIANTS = ("loha_qkvo", "lokr_qkvo", "vera_qkvo", "oft_qkvo", "adalora_qkvo", "prompt_tuning")
PROMPT_TOKENS = 16      # prompt_tuning's num_virtual_tokens (the model sees PROMPT_TOKENS + seq positions)
VOCAB = 512


@dataclass(frozen=True)
class Shape:
    model: str = "llama"
    hidden: int = 256
    layers: int = 4
    seq: int = 128
    batch: int = 4
    heads: int = 8
    dtype: str = "float32"


def add_shape_arguments(parser, model: bool = True, model_default: Optional[str] = None,
                        hidden_default: Optional[int] = None) -> None:
    """The workload options every worker takes: --model, --hidden, --layers, --seq, --batch."""
    if model:
        parser.add_argument("--model", choices=MODELS, default=model_default, required=model_default is None)
    parser.add_argument("--hidden", type=int, default=hidden_default, required=hidden_default is None)
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--seq", type=int, default=Shape.seq)
    parser.add_argument("--batch", type=int, default=Shape.batch)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("?" where /proc has none): context for timings."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "?"


def rss_mb() -> float:
    """The process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_mindspore(**context) -> None:
    """Import the same packages in every variant (so RSS baselines compare), then CPU, graph mode."""
    import mindspore
    import mindformers  # noqa: F401
    import mindformers.pet  # noqa: F401
    import pet_hooks  # noqa: F401
    import samples.tiny_gpt  # noqa: F401
    mindspore.set_device("CPU")
    mindspore.set_context(mode=0, **context)


def build_base(shape: Shape, num_layers: int = 0):
    """The untouched model with seed-0 weights."""
    import mindspore as ms
    layers = num_layers or shape.layers
    ms.set_seed(0)
    if shape.model == "gpt":
        from samples.tiny_gpt import build as build_gpt
        if shape.dtype != "float32":
            raise ValueError("the sample GPT runs in float32 only")
        return build_gpt(0, vocab_size=VOCAB, hidden_size=shape.hidden, num_layers=layers,
                         num_heads=shape.heads, seq_length=shape.seq)
    from mindformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        num_layers=layers, hidden_size=shape.hidden, num_heads=shape.heads, vocab_size=VOCAB,
        seq_length=shape.seq, intermediate_size=2 * shape.hidden, use_flash_attention=False,
        use_past=False, compute_dtype=shape.dtype, param_init_type="float32",
        layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
        use_rope_slice=True, fused_rms_norm=False, batch_size=shape.batch))


def pet_config(shape: Shape, variant: str, total_step: int = 60):
    """The pet_hooks config of a pet_hooks variant (``total_step``: AdaLoRA's schedule length)."""
    import pet_hooks
    if variant.startswith("lora_"):
        return pet_hooks.LoraConfig(lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=LORA_TARGETS[(shape.model, variant[5:])])
    if variant in ("dora_qkvo", "pissa_qkvo"):
        extra = {"use_dora": True} if variant == "dora_qkvo" else {"init_lora_weights": "pissa"}
        return pet_hooks.LoraConfig(lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=LORA_TARGETS[(shape.model, "qkvo")], **extra)
    if variant == "ptuning2":
        return pet_hooks.PTuning2Config(pre_seq_len=16)
    if variant == "prefix":
        return pet_hooks.PrefixTuningConfig(prefix_token_num=16, mid_dim=64)
    if variant == "ia3":
        targets, feedforward = IA3_TARGETS[shape.model]
        return pet_hooks.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    if variant == "bitfit":
        return pet_hooks.BitFitConfig()
    if variant == "adapter":
        return pet_hooks.AdapterConfig(bottleneck_size=64, target_modules=ADAPTER_TARGETS[shape.model])
    if variant == "low_rank_adapter":
        return pet_hooks.LowRankAdapterConfig(reduction_factor=4, low_rank_size=8,
                                              target_modules=ADAPTER_TARGETS[shape.model])
    qkvo = LORA_TARGETS[(shape.model, "qkvo")]
    if variant == "loha_qkvo":
        return pet_hooks.LoHaConfig(r=8, alpha=16, target_modules=qkvo)
    if variant == "lokr_qkvo":
        return pet_hooks.LoKrConfig(r=8, alpha=16, target_modules=qkvo)
    if variant == "vera_qkvo":
        return pet_hooks.VeraConfig(r=256, target_modules=qkvo)
    if variant == "oft_qkvo":
        return pet_hooks.OFTConfig(oft_block_size=32, target_modules=qkvo)
    if variant == "adalora_qkvo":
        return pet_hooks.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=qkvo,
                                       **adalora_schedule(total_step))
    if variant == "prompt_tuning":
        return pet_hooks.PromptTuningConfig(num_virtual_tokens=PROMPT_TOKENS)
    raise ValueError(f"{variant!r} is not a pet_hooks variant")


def adalora_schedule(total_step: int) -> dict:
    """AdaLoRA's budget schedule sized to ``total_step`` training steps: the first sixth without masking
    (tinit), the last sixth with the rank pattern fixed (tfinal), an allocation every twelfth (deltaT);
    60 steps: tinit 10, budget shrinking 12 -> 8 over steps 10-50 every 5 steps, tfinal 10."""
    total_step = max(int(total_step), 2)
    return {"total_step": total_step, "tinit": total_step // 6, "tfinal": total_step // 6,
            "deltaT": max(1, total_step // 12)}


def apply_variant(net, shape: Shape, variant: str):
    """Make ``net`` train as ``variant`` wants; returns the (possibly new) net."""
    if variant in ("full", "forward"):
        return net
    if variant == "floor":
        name = FLOOR_PARAM[shape.model]
        for param in net.get_parameters():
            param.requires_grad = param.name == name
        return net
    if variant.startswith("mflora_"):
        return _mindformers_lora(net, shape, variant[7:])
    import pet_hooks
    if variant == "lora_qkvo_3more":    # LoRA q/k/v/o trained while three more adapters are loaded, inactive
        cfg = pet_config(shape, "lora_qkvo")
        pet_hooks.apply(net, cfg)
        for index in range(3):
            pet_hooks.add_adapter(net, f"other{index}", dataclasses.replace(cfg, seed=index + 1))
        return net
    return pet_hooks.apply(net, pet_config(shape, variant))


def _mindformers_lora(net, shape: Shape, targets: str):
    """MindFormers' own LoRA (mindpet's LoRADense replacing the matched layers), base frozen."""
    config = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
              "target_modules": MF_LORA_TARGETS[(shape.model, targets)]}
    if shape.model == "llama":
        from mindformers.pet import get_pet_model
        return get_pet_model(net, config)
    # get_pet_model wants a MindFormers PreTrainedModel; for the sample GPT call the same
    # replacement and freezing it runs inside.
    from mindformers.pet.constants import PetType
    from mindformers.pet.pet_config import LoraConfig as MindFormersLoraConfig
    from mindformers.pet.tuners.lora_adapter import recursive_replace_dense_cell
    from mindformers.pet.tuners.pet_adapter import PetAdapter
    config.pop("pet_type")
    roots = [block.attention for block in net.blocks] if targets == "qkvo" else [net]
    for root in roots:
        recursive_replace_dense_cell(root, MindFormersLoraConfig(**config))
    net.update_parameters_name()
    PetAdapter.freeze_pretrained_model(net, PetType.LORA)
    return net


def batch(shape: Shape) -> np.ndarray:
    """One fixed batch of token ids, one longer than seq (the language-model shift)."""
    return np.random.RandomState(0).randint(0, VOCAB, (shape.batch, shape.seq + 1)).astype(np.int32)


def loss_cell_and_inputs(net, shape: Shape) -> Tuple[object, List]:
    """A cell computing the training loss, and the tensors to call it with."""
    import mindspore as ms
    ids = batch(shape)
    if shape.model == "gpt":
        from samples.tiny_gpt import GPTWithLoss
        return GPTWithLoss(net), [ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:])]
    return net, [ms.Tensor(ids)]            # LlamaForCausalLM shifts the labels itself


def forward_inputs(shape: Shape) -> List:
    """Inputs of an inference forward pass."""
    import mindspore as ms
    return [ms.Tensor(batch(shape)[:, :-1])]


def train_step(loss_cell, params, variant: str = "full") -> Callable:
    """MindSpore's plain training step: AdamWeightDecay over ``params`` (the bare loss for ``forward``)."""
    from mindspore import nn
    if variant == "forward":
        loss_cell.set_train(True)
        return loss_cell
    step = nn.TrainOneStepCell(loss_cell, nn.AdamWeightDecay(params, learning_rate=1e-4))
    step.set_train(True)
    return step


def count(params) -> int:
    return int(sum(int(np.prod(p.shape)) for p in params))
