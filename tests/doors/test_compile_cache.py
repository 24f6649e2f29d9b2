"""pet-hooks run --compile-cache DIR: MindSpore's compiled graphs kept for the next run of the same script and
config, in a folder keyed by the config and the versions, sealed after a run that ended well, and not used
(one line, compiled again) when it is incomplete or corrupt.

Whether the second run loaded the graphs rather than compiling them is read from the cache itself: a run
that compiles writes the graph file again; one that loads it leaves the sealed file as it was (its inode
and modification time). No timing is asserted (the machines are shared): bench/ and docs/memory_and_speed.md
give the seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pet_hooks.config.pet_config import load_config
from pet_hooks.doors.compile_cache import MANIFEST, cache_folder
from tests.conftest import GPT_LORA

SCRIPT = '''
import sys, numpy as np, mindspore as ms
from mindspore import nn, Tensor
sys.path.insert(0, {root!r})
from samples.tiny_gpt import GPTWithLoss, build
from samples.data import lm_batches
ms.set_context(mode=0)
net = build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.get_parameters(), 1e-2))
ids, labels = next(lm_batches(seq_length=8, batch_size=4, seed=1))
print("losses", [float(step(Tensor(ids), Tensor(labels)).asnumpy()) for _ in range(3)])
'''


def _graphs(folder):
    return {os.path.join(base, name): os.stat(os.path.join(base, name))
            for base, _, names in os.walk(folder) for name in names if name.endswith(".mindir")}


def test_the_second_run_loads_the_graphs_and_a_corrupt_cache_is_compiled_again(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    (tmp_path / "pet.json").write_text(json.dumps({"pet_config": GPT_LORA}))

    def run():
        out = subprocess.run([sys.executable, "-m", "pet_hooks", "run", "--config", str(tmp_path / "pet.json"),
                              "--compile-cache", str(tmp_path / "cache"), str(script)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    first = run()
    folder = cache_folder(str(tmp_path / "cache"), load_config(GPT_LORA))
    assert os.listdir(tmp_path / "cache") == [os.path.basename(folder)]
    graphs = _graphs(folder)
    assert graphs and os.path.isfile(os.path.join(folder, MANIFEST))
    second = run()
    assert second.stdout == first.stdout                              # the same losses
    assert "compile cache" not in second.stderr
    after = _graphs(folder)
    assert sorted(after) == sorted(graphs)
    for path, stat in graphs.items():                                  # loaded, not compiled and written again
        assert (after[path].st_ino, after[path].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), path
    damaged = next(iter(graphs))
    os.chmod(damaged, 0o600)
    with open(damaged, "r+b") as handle:                               # one byte changed
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    third = run()
    warned = [line for line in third.stderr.splitlines() if "compile cache" in line]
    assert warned == [f"pet-hooks: compile cache {folder} not used: "
                      f"{os.path.relpath(damaged, folder)} does not match its recorded hash; compiling again"]
    assert third.stdout == first.stdout
    assert os.path.isfile(os.path.join(folder, MANIFEST)) and _graphs(folder)   # compiled and sealed again


def test_the_folder_is_keyed_by_the_config_and_the_versions(tmp_path, monkeypatch):
    import mindspore
    same = cache_folder(str(tmp_path), load_config(GPT_LORA))
    assert cache_folder(str(tmp_path), load_config(dict(GPT_LORA))) == same
    assert cache_folder(str(tmp_path), load_config({**GPT_LORA, "lora_rank": 8})) != same
    assert cache_folder(str(tmp_path), None) != same
    monkeypatch.setattr(mindspore, "__version__", "0.0.1")
    assert cache_folder(str(tmp_path), load_config(GPT_LORA)) != same


@pytest.mark.parametrize("contents", ["missing", "unsealed"])
def test_an_unsealed_cache_is_not_used(tmp_path, contents, capsys):
    from pet_hooks.doors.compile_cache import use_compile_cache
    folder = cache_folder(str(tmp_path), None)
    os.makedirs(os.path.join(folder, "rank_0"))
    (open(os.path.join(folder, "rank_0", "graph.mindir"), "wb")).close()
    if contents == "unsealed":
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump({"rank_0/other.mindir": "0" * 64}, handle)
    env = {key: os.environ.get(key) for key in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH")}
    try:
        assert use_compile_cache(str(tmp_path), None) == folder
        assert os.environ["MS_COMPILER_CACHE_PATH"] == folder and os.listdir(folder) == []
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert "not used" in capsys.readouterr().err
