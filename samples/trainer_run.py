"""MindFormers' own flow with no PET code: a run YAML with pet_config, trained by MindFormers' Trainer.

What the MindFormers docs tell a PET user to run (``run_mindformer.py --config run.yaml``, cut to
what the CPU needs): build MindFormers' context from the YAML, then ``Trainer(args=yaml, ...)``.
Under pet_hooks' launcher the model MindFormers builds gets pet_hooks' PET from that same
``pet_config``, and the adapter is saved into the YAML's ``output_dir``::

    pet-hooks run samples/trainer_run.py --config samples/configs/run_llama_lora_cpu.yaml --steps 20

The data are windows of the sample corpus (byte tokens), ``seq_length + 1`` tokens each, batched by
``model_config.batch_size``: the ``input_ids`` column MindFormers' causal-LM Trainer takes.
Outside pet_hooks' doors the YAML's ``runner_wrapper`` (``PetTrainOneStepCell``, the CPU train step)
must be registered first: ``pet_hooks.register_mindformers_train_step()``.
"""
import argparse
import os
import sys

import mindspore.dataset as ds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.data import lm_batches  # noqa: E402


def corpus_dataset(seq_length: int, batch_size: int, steps: int, seed: int = 0) -> ds.Dataset:
    batches = lm_batches(seq_length=seq_length + 1, batch_size=batch_size, seed=seed)
    rows = [row for _ in range(steps) for row in next(batches)[0]]
    return ds.GeneratorDataset([(row,) for row in rows], ["input_ids"], shuffle=False).batch(batch_size)


def main():
    from mindformers import MindFormerConfig, Trainer, build_context

    parser = argparse.ArgumentParser(description="train with MindFormers' Trainer from a run YAML")
    parser.add_argument("--config", required=True, help="the MindFormers run YAML")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--finetune-checkpoint", default=None, help="a base checkpoint to start from")
    args = parser.parse_args()

    config = MindFormerConfig(args.config)
    build_context(config)       # as run_mindformer.py: without it the Trainer switches to PyNative mid-run
    model_config = config.model.model_config
    dataset = corpus_dataset(model_config.seq_length, model_config.batch_size, args.steps)
    trainer = Trainer(args=args.config, task="text_generation", train_dataset=dataset)
    if args.finetune_checkpoint:
        trainer.finetune(finetune_checkpoint=args.finetune_checkpoint)
    else:
        trainer.train()


if __name__ == "__main__":
    main()
