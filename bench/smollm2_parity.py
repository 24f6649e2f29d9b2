"""Step-for-step parity of pet_hooks LoRA (MindSpore, graph mode) with PEFT LoRA (PyTorch) on SmolLM2-135M-Instruct.

    .venv/bin/python bench/smollm2_parity.py [--quick] [--json bench/smollm2_last_run.json]

The same weights (the GGUF, loaded by samples/smollm2.py and by transformers), the same
batches in the same order, AdamW with the same formula and hyperparameters on both sides,
dropout 0, PEFT's initial LoRA A matrices copied into pet_hooks (B zero on both). The two
sides run one after the other in their own processes (bench/smollm2_worker.py); this is
``python -m bench.smollm2 --only parity`` and writes the per-step losses and the largest
relative difference to the JSON file and to BENCHMARKS.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.smollm2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--only", "parity", *sys.argv[1:]]))
