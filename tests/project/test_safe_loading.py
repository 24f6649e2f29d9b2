"""No code from files: configs and adapters are data, never unpickled or evaluated.

Configs are read with ``yaml.safe_load`` / ``json``; adapters with safetensors or MindSpore's
protobuf checkpoint reader. Three kinds of evidence: YAML tags that build Python objects are
refused (and build nothing), every loader runs with the unsafe readers booby-trapped, and the
package source uses none of them.
"""
from __future__ import annotations

import builtins
import os
import pickle
import re
import sys

import numpy as np
import pytest
import yaml
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import save_file

import pet_hooks
from pet_hooks import PetConfigError
from samples.tiny_gpt import build
from tests.conftest import SMALL

PET_DIR = os.path.dirname(os.path.abspath(pet_hooks.__file__))
CFG = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3"}

TAGS = [
    ("object/apply", "pet_config: !!python/object/apply:builtins.open [{mark!r}, 'w']\n"),
    ("object/new", "pet_config: !!python/object/new:builtins.open [{mark!r}, 'w']\n"),
    ("name", "pet_type: !!python/name:builtins.open ''\nmark: {mark!r}\n"),
    ("module", "pet_type: !!python/module:os ''\nmark: {mark!r}\n"),
    ("object/apply", "model:\n  model_config:\n    pet_config:\n      pet_type: lora\n"
                     "      target_modules: !!python/object/apply:builtins.open [{mark!r}, 'w']\n"),
]


@pytest.mark.parametrize("tag,text", TAGS, ids=["apply", "new", "name", "module", "nested-in-run-yaml"])
def test_yaml_python_tags_are_refused_and_build_nothing(tmp_path, tag, text):
    mark = str(tmp_path / "constructed")
    path = tmp_path / "pet.yaml"
    path.write_text(text.format(mark=mark))
    with pytest.raises(PetConfigError) as info:
        pet_hooks.load_config(str(path))
    assert str(path) in str(info.value) and f"python/{tag}" in str(info.value)
    assert not os.path.exists(mark)
    # The same document through PyYAML's unsafe loader does build the object: the test can fail.
    if tag.startswith("object"):
        yaml.unsafe_load(path.read_text())
        assert os.path.exists(mark)


def _trap(name):
    def trapped(*args, **kwargs):
        raise AssertionError(f"{name} was called while loading")
    return trapped


def _safe_only(real):
    """yaml.load as safe_load calls it (with SafeLoader) passes; any other loader is trapped."""
    def load(stream, Loader=None):  # noqa: N803 (PyYAML's own argument name)
        if Loader not in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            raise AssertionError(f"yaml.load was called with {Loader} while loading")
        return real(stream, Loader)
    return load


#: the standard library's own code generation: ``@dataclass`` and ``namedtuple`` exec the methods they write
#: when a class is defined (a module pet_hooks imports lazily while loading), never text read from a file
_CLASS_BUILDERS = ("dataclasses", "collections")


def _no_text(name, real):
    """eval / exec of text is trapped; of a compiled module (what ``import`` does) passes, and so does the text
    the standard library's class builders write (``_CLASS_BUILDERS``)."""
    def run(source, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__")
        if isinstance(source, (str, bytes)) and caller not in _CLASS_BUILDERS:
            raise AssertionError(f"{name} of text was called while loading: {source[:80]!r}")
        return real(source, *args, **kwargs)
    return run


UNSAFE = [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (yaml, "unsafe_load"), (yaml, "full_load"),
          (yaml, "load_all"), (np, "load")]


def test_every_loader_works_with_the_unsafe_readers_trapped(mode, tmp_path, monkeypatch):
    trained = pet_hooks.apply(build(seed=0, **SMALL), CFG)
    rng = np.random.default_rng(0)
    for param in pet_hooks.delta_parameters(trained):
        param.set_data(Tensor(rng.standard_normal(param.shape).astype(np.float32)))
    expected = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(trained)}
    pet_hooks.save_adapter(trained, tmp_path / "adapter")
    (tmp_path / "pet.yaml").write_text("pet_config:\n  pet_type: lora\n  lora_rank: 4\n"
                                       "  target_modules: '.*dense1|.*dense3'\n")
    theirs = {name.replace(".lora_A", ".mindpet_delta_lora_a").replace(".lora_B", ".mindpet_delta_lora_b"): value
              for name, value in expected.items()}
    ms.save_checkpoint([{"name": n, "data": Tensor(v)} for n, v in theirs.items()], str(tmp_path / "mf.ckpt"))
    save_file(theirs, str(tmp_path / "mf.safetensors"))
    x = Tensor(rng.integers(0, 256, (2, 8)).astype(np.int32))
    want = trained(x).asnumpy()

    for owner, name in UNSAFE:
        monkeypatch.setattr(owner, name, _trap(f"{getattr(owner, '__name__', owner)}.{name}"))
    monkeypatch.setattr(yaml, "load", _safe_only(yaml.load))
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, _no_text(name, getattr(builtins, name)))
    try:
        assert pet_hooks.load_config(str(tmp_path / "pet.yaml")) == pet_hooks.load_config(CFG)
        assert pet_hooks.load_config(str(tmp_path / "adapter" / "adapter_config.json")) == pet_hooks.load_config(CFG)
        nets = [pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "adapter"),
                pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "mf.ckpt", cfg=CFG),
                pet_hooks.load_adapter(build(seed=0, **SMALL), tmp_path / "mf.safetensors", cfg=CFG)]
    finally:
        monkeypatch.undo()
    for net in nets:
        for param in pet_hooks.delta_parameters(net):
            np.testing.assert_array_equal(param.asnumpy(), expected[param.name], err_msg=param.name)
        np.testing.assert_allclose(net(x).asnumpy(), want, atol=1e-6)


UNSAFE_SOURCE = re.compile(r"\bimport (pickle|marshal|shelve|dill|cloudpickle)\b|\bpickle\.|\beval\(|\bexec\("
                           r"|yaml\.(load|unsafe_load|full_load|load_all)\(|Loader=|\b(np|numpy)\.load\("
                           r"|allow_pickle|torch\.load\(")


def test_the_package_source_uses_no_unsafe_reader():
    hits = []
    for folder, _, files in os.walk(PET_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, 1):
                        if UNSAFE_SOURCE.search(line):
                            hits.append(f"{os.path.relpath(path, PET_DIR)}:{number}: {line.strip()}")
    assert not hits, hits
    assert UNSAFE_SOURCE.search("data = pickle.loads(blob)") and UNSAFE_SOURCE.search("yaml.load(text)")
