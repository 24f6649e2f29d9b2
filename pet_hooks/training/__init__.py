"""What training needs beside the net: the optimizer recorder, LoRA+, the gradient guard, MindFormers' CPU step.

Owns ``recorder`` (optimizers' constructor arguments, to rebuild them over the deltas), ``loraplus``
(LoRA+ parameter groups), ``grad_guard`` (warns about adapted cells that got no gradient) and
``mindformers_trainer`` (PetTrainOneStepCell, MindFormers' train step on the CPU).
May import: ``pet_hooks.surgery``, ``pet_hooks.tuners``, ``pet_hooks.config``, ``pet_hooks.utils``.
"""
