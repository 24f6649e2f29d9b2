"""MindFormers' Trainer on a run YAML, on the CPU, with the per-step losses collected: the MindFormers-side
reference that pet_hooks' takeover is compared with (issue 25, parity within 1e-5 relative).

    from tests.trainer_yaml import base_checkpoint, lora_values, run_trainer, token_dataset
    yaml_path = "samples/configs/run_llama_lora_cpu.yaml"
    base = base_checkpoint(yaml_path, str(tmp_path / "base.ckpt"))       # a plain LlamaForCausalLM
    values = lora_values(yaml_path, seed=1)                              # {"<cell>.lora_A": [r, in], ...}
    run = run_trainer(yaml_path, token_dataset(yaml_path, steps=10), tmp_path / "out",
                      initial_values=values, finetune_checkpoint=base)    # MindFormers' own LoRA (no door open)
    with pet_hooks.enable():                                             # the same, pet_hooks' LoRA
        ours = run_trainer(yaml_path, token_dataset(yaml_path, steps=10), tmp_path / "ours",
                           initial_values=values, finetune_checkpoint=base)
    assert ours.losses == pytest.approx(run.losses, rel=1e-5)

The helper does not know which PET the model carries. ``initial_values`` is keyed by parameter
name in pet_hooks' spelling (``<cell path>.lora_A`` / ``.lora_B``, or any base parameter such as
``model.norm_out.weight``); at train begin each value is written into the trained network's
parameter of that name or, for LoRA, of MindFormers' name for it (``<cell>.mindpet_delta_lora_a``
/ ``_lora_b``, same shapes ``[r, in]`` / ``[out, r]``). A key that names no parameter, names two,
or has another shape is an error naming it, before anything is written.

What one pytest process can and cannot do with the Trainer (measured on MindFormers 1.9.0):

* The Trainer does not build MindFormers' context. Its first ``mindformers.core.context`` lookup
  creates the context with MindFormers' defaults, which switches MindSpore to PyNative mode in the
  middle of ``train()`` (a graph-mode run silently trains in PyNative, 100x slower).
  :func:`mindformers_context` builds it once per process (``build_context`` works once: a second
  call is a no-op that ignores its config, and after ``Context.reset_instance()`` it fails with
  "The 'mindspore.runtime.set_cpu_affinity' cannot be set repeatedly"); later runs only set the mode.
* With that, several Trainers run one after the other in one process, graph and PyNative, each
  from the same seed (the YAML's ``seed``, set by every Trainer; ``seed: 0`` sets none).
* The Trainer leaves process-wide state behind: ``LOCAL_DEFAULT_PATH`` (its output root, read by
  its logger and by ``get_output_root_path``), the strategy ``save_file`` in MindSpore's
  auto-parallel context, NumPy's global seed. :func:`run_trainer` puts them back afterwards.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import yaml
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, ops
from mindspore.train import Callback

__all__ = ["TrainerRun", "mindformers_context", "run_trainer", "token_dataset", "base_checkpoint", "lora_values",
           "model_config", "plain_llama", "lora_targets", "read_yaml", "mindformers_name", "LossRecorder",
           "InitialValues", "StopAfter", "AtTrainBegin"]

# pet_hooks' LoRA parameter suffix -> MindFormers' (mindpet) spelling of the same tensor
_MINDFORMERS_SUFFIX = {".lora_A": ".mindpet_delta_lora_a", ".lora_B": ".mindpet_delta_lora_b"}


def mindformers_name(name: str) -> str:
    """MindFormers' name of the LoRA delta pet_hooks calls ``name`` (other names unchanged)."""
    for ours, theirs in _MINDFORMERS_SUFFIX.items():
        if name.endswith(ours):
            return name[: -len(ours)] + theirs
    return name


def read_yaml(yaml_path: str) -> dict:
    with open(yaml_path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def model_config(yaml_path: str) -> dict:
    """``model.model_config`` of a run YAML, as keyword arguments of ``LlamaConfig`` (no type, no pet_config)."""
    config = dict(read_yaml(yaml_path)["model"]["model_config"])
    for key in ("type", "pet_config", "checkpoint_name_or_path"):
        config.pop(key, None)
    return config


# ----------------------------------------------------------------------------- context
def mindformers_context(mode: int, yaml_path: Optional[str] = None) -> None:
    """MindFormers' global context for a legacy-model Trainer on the CPU in ``mode`` (0 graph, 1 PyNative).

    The first call in a process runs ``mindformers.build_context`` (from the YAML's ``context`` block
    when given, mode and device overridden); later calls set ``use_legacy`` back to True (the mcore
    tests switch it off) and the MindSpore mode.
    """
    from mindformers import MindFormerConfig, build_context
    from mindformers.core.context.build_context import MFContextOperator
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (graph) or 1 (PyNative), got {mode!r}")
    if MFContextOperator.get_mf_ctx_instance() is None:
        config = MindFormerConfig(yaml_path) if yaml_path else MindFormerConfig(context={}, parallel={})
        config.context = config.context or MindFormerConfig()
        config.context.mode = mode
        config.context.device_target = "CPU"
        config.use_legacy = True
        config.use_parallel = False       # one process: no communication init
        build_context(config)
    else:
        MFContextOperator.get_mf_ctx_instance().set_context(use_legacy=True)
    ms.set_context(mode=mode)


# ----------------------------------------------------------------------------- inputs
def token_dataset(yaml_path: str, steps: int = 10, seed: int = 0) -> ds.Dataset:
    """``steps`` batches of random tokens as the seed passes them: an ``input_ids`` column of
    ``seq_length + 1`` int32 tokens below the vocabulary size, batched by ``model_config.batch_size``."""
    config = model_config(yaml_path)
    batch, seq, vocab = config["batch_size"], config["seq_length"], config["vocab_size"]
    ids = np.random.default_rng(seed).integers(0, vocab, (steps * batch, seq + 1)).astype(np.int32)
    return ds.GeneratorDataset([(row,) for row in ids], ["input_ids"], shuffle=False).batch(batch)


def plain_llama(yaml_path: str, seed: int = 0):
    """MindFormers' ``LlamaForCausalLM`` of the YAML's ``model_config`` without any PET."""
    from mindformers import LlamaConfig, LlamaForCausalLM
    ms.set_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**model_config(yaml_path)))


def base_checkpoint(yaml_path: str, path: str, seed: int = 0) -> str:
    """Save a plain (un-adapted) Llama of the YAML with ``ms.save_checkpoint``; returns ``path``."""
    ms.save_checkpoint(plain_llama(yaml_path, seed), path)
    return path


def lora_targets(yaml_path: str) -> Dict[str, tuple]:
    """cell path -> (in, out) of every linear layer the YAML's LoRA ``target_modules`` match.

    Both pet_hooks (``re.fullmatch`` on the dotted path) and MindFormers (``re.match`` on the
    child's own name) read patterns such as ``.*wq|.*wk`` alike; the full path is used here.
    """
    pet_config = read_yaml(yaml_path)["model"]["model_config"]["pet_config"]
    if pet_config.get("pet_type") != "lora":
        raise ValueError(f"{yaml_path}: model.model_config.pet_config.pet_type is "
                         f"{pet_config.get('pet_type')!r}, not 'lora'")
    pattern = re.compile(pet_config["target_modules"])
    targets = {}
    for path, cell in plain_llama(yaml_path).cells_and_names():
        if path and pattern.fullmatch(path) and hasattr(cell, "in_channels"):
            targets[path] = (cell.in_channels, cell.out_channels)
    if not targets:
        raise ValueError(f"{yaml_path}: target_modules {pattern.pattern!r} matches no linear layer")
    return targets


def lora_values(yaml_path: str, seed: int = 1, scale: float = 0.1) -> Dict[str, np.ndarray]:
    """Random non-zero LoRA A ``[r, in]`` and B ``[out, r]`` for every target of the YAML, in pet_hooks' names."""
    rank = read_yaml(yaml_path)["model"]["model_config"]["pet_config"]["lora_rank"]
    rng = np.random.default_rng(seed)
    values = {}
    for path, (din, dout) in lora_targets(yaml_path).items():
        values[f"{path}.lora_A"] = (rng.standard_normal((rank, din)) * scale).astype(np.float32)
        values[f"{path}.lora_B"] = (rng.standard_normal((dout, rank)) * scale).astype(np.float32)
    return values


# ----------------------------------------------------------------------------- callbacks
class LossRecorder(Callback):
    """The loss of every step, as MindFormers' ``MFLossMonitor`` reads it: ``cb_params.net_outputs[0]``
    (the train step's first output, averaged), plus the overflow flag (``net_outputs[1]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: List[float] = []
        self.overflow: List[bool] = []

    def on_train_step_end(self, run_context) -> None:
        outputs = run_context.original_args().net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        self.losses.append(float(np.mean(loss.asnumpy())))
        if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
            self.overflow.append(bool(np.asarray(outputs[1].asnumpy()).any()))


def _trained_parameters(train_network) -> Dict[str, Any]:
    """name -> Parameter of the network the train step trains (its own parameters, not the optimizer's)."""
    inner = getattr(train_network, "network", train_network)
    return {param.name: param for param in inner.get_parameters()}


class InitialValues(Callback):
    """At train begin (before the first step runs), write ``values`` into the trained network by name.

    A key is a parameter name in pet_hooks' spelling; a LoRA key also finds MindFormers' name for the
    same delta. Every key is resolved and checked (one parameter, same shape) before any is written.
    Values go in with ``ops.assign``, which a graph compiled earlier also sees.
    """

    def __init__(self, values: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.values = {name: np.asarray(value) for name, value in values.items()}
        self.written: Dict[str, str] = {}       # key -> the parameter name written

    def on_train_begin(self, run_context) -> None:
        params = _trained_parameters(run_context.original_args().train_network)
        targets = {}
        for key, value in self.values.items():
            found = [name for name in dict.fromkeys((key, mindformers_name(key))) if name in params]
            if len(found) != 1:
                near = sorted(name for name in params if name.split(".")[-1] == key.split(".")[-1]
                              or name.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])[:6]
                raise KeyError(f"initial_values[{key!r}]: {'no' if not found else 'more than one'} parameter of the "
                               f"trained network has that name ({found or 'nearest: ' + str(near)})")
            param = params[found[0]]
            if tuple(param.shape) != value.shape:
                raise ValueError(f"initial_values[{key!r}] has shape {value.shape}, the parameter {found[0]} "
                                 f"{tuple(param.shape)}")
            targets[key] = param
        for key, param in targets.items():
            ops.assign(param, Tensor(self.values[key].astype(ms.dtype_to_nptype(param.dtype))))
            self.written[key] = param.name


class AtTrainBegin(Callback):
    """Every parameter of the trained network as training begins (after MindFormers loaded its checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: Dict[str, np.ndarray] = {}

    def on_train_begin(self, run_context) -> None:
        network = run_context.original_args().train_network.network
        self.values = {p.name: p.asnumpy().copy() for p in network.get_parameters()}


class StopAfter(Callback):
    """End training after ``steps`` steps (a run interrupted there, as a killed job leaves it)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def on_train_step_end(self, run_context) -> None:
        if run_context.original_args().cur_step_num >= self.steps:
            run_context.request_stop()


# ----------------------------------------------------------------------------- the run
@dataclass
class TrainerRun:
    """What :func:`run_trainer` hands back."""

    losses: List[float]                        # one per step, in order
    overflow: List[bool]
    output_dir: str                            # the Trainer's output_dir (checkpoint/, log/, strategy/, ...)
    yaml_path: str                             # the run YAML the Trainer read (a copy with the overrides)
    trainable: Dict[str, np.ndarray] = field(default_factory=dict)   # trainable parameters after training
    parameters: Dict[str, np.ndarray] = field(default_factory=dict)  # every parameter after training
    written: Dict[str, str] = field(default_factory=dict)            # initial_values key -> parameter written


def _set(doc: dict, dotted: str, value: Any) -> None:
    node = doc
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def run_trainer(yaml_path: str, dataset: ds.Dataset, output_dir: str, *, mode: int = 0,
                initial_values: Optional[Mapping[str, np.ndarray]] = None,
                finetune_checkpoint: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                callbacks: Sequence[Callback] = (), task: str = "text_generation") -> TrainerRun:
    """Train with MindFormers' Trainer as the seed does and return the per-step losses.

    ``Trainer(args=<yaml>, task=task, train_dataset=dataset).train()``, or ``.finetune(finetune_checkpoint=...)``
    when a checkpoint is given (MindFormers loads it into the model it builds). The YAML is copied
    into ``output_dir`` with ``output_dir`` set there and each ``overrides`` entry (dotted key ->
    value, e.g. ``{"runner_config.epochs": 2, "resume_training": True}``) applied; that copy is what
    the Trainer reads. ``initial_values`` are written at train begin (see :class:`InitialValues`).
    Whichever PET the model gets (MindFormers' own, or pet_hooks' inside a door) is the caller's
    business. Registers pet_hooks' CPU train step; leaves MindSpore's mode and the process state
    the Trainer changes as they were.
    """
    from mindformers import Trainer
    from mindformers.core.context.build_context import MFContextOperator
    import pet_hooks.training.mindformers_trainer as cpu_step

    os.makedirs(output_dir, exist_ok=True)
    doc = read_yaml(yaml_path)
    doc["output_dir"] = os.path.abspath(output_dir)
    for key, value in (overrides or {}).items():
        _set(doc, key, value)
    run_yaml = os.path.join(os.path.abspath(output_dir), "run.yaml")
    with open(run_yaml, "w", encoding="utf-8") as handle:
        yaml.safe_dump(doc, handle, sort_keys=False)

    cpu_step.register()
    before_mode = ms.get_context("mode")
    context = MFContextOperator.get_mf_ctx_instance()
    before_legacy = context.get_context("use_legacy") if context is not None else None
    before_strategy = dict(ms.get_auto_parallel_context("strategy_ckpt_config"))
    before_env = os.environ.get("LOCAL_DEFAULT_PATH")
    before_np = np.random.get_state()
    recorder = LossRecorder()
    writer = InitialValues(initial_values or {})
    try:
        mindformers_context(mode, yaml_path)
        trainer = Trainer(args=run_yaml, task=task, train_dataset=dataset,
                          callbacks=[writer, recorder, *callbacks])
        if finetune_checkpoint is not None:
            trainer.finetune(finetune_checkpoint=finetune_checkpoint)
        else:
            trainer.train()
        network = trainer.trainer.network if getattr(trainer, "trainer", None) is not None else None
    finally:
        ms.set_context(mode=before_mode)
        if before_legacy is not None:
            MFContextOperator.get_mf_ctx_instance().set_context(use_legacy=before_legacy)
        ms.set_auto_parallel_context(strategy_ckpt_config=before_strategy)
        if before_env is None:
            os.environ.pop("LOCAL_DEFAULT_PATH", None)
        else:
            os.environ["LOCAL_DEFAULT_PATH"] = before_env
        np.random.set_state(before_np)
    run = TrainerRun(losses=recorder.losses, overflow=recorder.overflow, output_dir=os.path.abspath(output_dir),
                     yaml_path=run_yaml, written=dict(writer.written))
    if network is not None:
        run.parameters = {p.name: p.asnumpy().copy() for p in network.get_parameters()}
        run.trainable = {p.name: p.asnumpy().copy() for p in network.trainable_params()}
    return run
