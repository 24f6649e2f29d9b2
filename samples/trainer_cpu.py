"""MindFormers' Trainer on the CPU with a model instance and ``TrainingArguments``, PET from ``PetCallback``.

The Trainer's default train step (``MFTrainOneStepCell``, a loss-scale cell) checks for
overflow with ``NPUGetFloatStatusV2``, an Ascend-only operator, so on the CPU it fails with
"Unsupported op [NPUGetFloatStatusV2] on CPU". MindSpore's plain ``TrainOneStepCell`` is
registered too, but the Trainer passes it ``scale_sense`` and it refuses the keyword. pet_hooks
ships the CPU counterpart, ``PetTrainOneStepCell`` (``pet_hooks.training.mindformers_trainer``), registered
with MindFormers by ``register_mindformers_train_step()`` (and by pet_hooks' doors) and named in
``TrainingArguments(wrapper_type=...)``::

    args = TrainingArguments(..., wrapper_type="PetTrainOneStepCell")
    Trainer(model=llama, args=args, train_dataset=data, callbacks=[pet_hooks.PetCallback(cfg)]).train()

    python samples/trainer_cpu.py --yaml samples/configs/llama_lora.yaml
"""
import argparse
import os
import sys

import numpy as np
import mindspore as ms
import mindspore.dataset as ds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from samples.llama_train import build_llama  # noqa: E402


def register_cpu_wrapper():
    """Register pet_hooks' CPU train step with MindFormers (idempotent; pet_hooks' doors do it too); its name."""
    import pet_hooks
    return pet_hooks.register_mindformers_train_step()


def training_arguments(output_dir: str, **overrides):
    """TrainingArguments that run on the CPU (plain train step, no sink mode, no checkpoints)."""
    from mindformers import TrainingArguments
    settings = dict(output_dir=output_dir, num_train_epochs=1, per_device_train_batch_size=2, learning_rate=1e-3,
                    sink_mode=False, save_steps=100000, wrapper_type=register_cpu_wrapper())
    settings.update(overrides)
    return TrainingArguments(**settings)


def token_dataset(rows: int, seq_plus_one: int, batch: int, seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, 256, (rows, seq_plus_one)).astype(np.int32)
    return ds.GeneratorDataset([(r,) for r in ids], ["input_ids"], shuffle=False).batch(batch)


def main():
    import pet_hooks
    from mindformers import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yaml", required=True)
    parser.add_argument("--output-dir", default="trainer_output")
    args = parser.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=0)
    net = build_llama(args.yaml)
    trainer = Trainer(model=net, args=training_arguments(args.output_dir),
                      train_dataset=token_dataset(8, net.config.seq_length + 1, 2),
                      callbacks=[pet_hooks.PetCallback(args.yaml, save_dir=os.path.join(args.output_dir, "adapter"))])
    trainer.train()
    print(pet_hooks.trainable_summary(net))


if __name__ == "__main__":
    main()
