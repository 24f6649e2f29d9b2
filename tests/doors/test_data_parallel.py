"""Data parallel with MindSpore's own msrun: 2 CPU processes train the sample GPT with LoRA.

    pet-hooks run --config samples/configs/lora.yaml --save-dir D -- \\
        msrun --worker_num=2 --local_worker_num=2 --master_port=P --join=True --log_dir=L \\
        samples/legacy_train.py --data-parallel ...

The script is the unmodified legacy script (no PET code); the workers get the hooks from the
launcher's bootstrap. The reference is a single process that trains the same LoRA deltas,
from the same start, on the concatenated batch of both ranks (``gradients_mean`` makes the
averaged gradient the gradient of that batch). Momentum SGD is used because its update is
linear in the gradient: a summed instead of averaged gradient would show.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from safetensors.numpy import load_file

import pet_hooks
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, build
from tests.conftest import ROOT

CONFIG = os.path.join(ROOT, "samples", "configs", "lora.yaml")
# Six steps: a summed instead of averaged gradient doubles the very first update, so the per-step losses
# and the final deltas part from the reference at step 2 already; the seeded loss falls from 5.53 to
# about 5.04 over the last three (12 steps took 15 s more per mode, mostly PyNative's, for nothing more).
# Width 32 and 4 rows a rank (the sample's defaults: 64 and 8): what is checked (averaged gradients, the same deltas
# on both ranks, base weights untouched, rank 0 alone saving) does not depend on the shapes, and the seeded loss
# still falls by more than 0.3 (5.56 to about 5.09 over the last three); PyNative's steps cost far less.
STEPS, BATCH, LR, RANKS, HIDDEN = 6, 4, 0.1, 2, 32
LOSS = re.compile(r"epoch: 1 step: (\d+), loss is ([\d.]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list:
    """Every live process below ``pid`` (msrun starts its workers in sessions of their own,
    so killing our process group would not reach them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, msrun, the scheduler and the workers, with their process groups."""
    for pid in descendants(proc.pid) + [proc.pid]:
        for kill in (lambda: os.killpg(os.getpgid(pid), signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def run_msrun(tmp_path, mode: int, timeout: float = 170) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pet_hooks", "run", "--config", CONFIG, "--save-dir", str(tmp_path / "adapter"),
           "--", "msrun", f"--worker_num={RANKS}", f"--local_worker_num={RANKS}", f"--master_port={free_port()}",
           "--join=True", f"--log_dir={tmp_path / 'logs'}",
           os.path.join(ROOT, "samples", "legacy_train.py"), "--data-parallel", "--mode", str(mode),
           "--steps", str(STEPS), "--hidden", str(HIDDEN), "--batch-size", str(BATCH), "--optimizer", "momentum", "--lr", str(LR),
           "--log-every", "1", "--save-init-ckpt", str(tmp_path / "init{rank}.ckpt"),
           "--save-ckpt", str(tmp_path / "end{rank}.ckpt")]
    # Nothing of an outer launcher or cluster may leak in.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PET_HOOKS_") and k not in ("RANK_ID", "RANK", "MS_ROLE", "MS_NODE_ID")}
    if mode == 1:   # the workers' PyNative ops synchronous (MindSpore's launch_blocking): the same values, and
        env["MS_DEV_LAUNCH_BLOCKING"] = "1"   # several times faster a step on 2 busy cores
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:  # a timeout, a failed assertion below or ^C: no worker outlives the test
        if proc.poll() is None or descendants(proc.pid):
            kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def worker_log(tmp_path, rank: int) -> str:
    return (tmp_path / "logs" / f"worker_{rank}.log").read_text(errors="replace")


def losses(log: str) -> list:
    steps = [(int(s), float(v)) for s, v in LOSS.findall(log)]
    assert [s for s, _ in steps] == list(range(1, STEPS + 1)), log[-2000:]
    return [v for _, v in steps]


def numpy_ckpt(path) -> dict:
    return {name: param.asnumpy().copy() for name, param in ms.load_checkpoint(str(path)).items()}


def digest(arrays: dict, names) -> str:
    sha = hashlib.sha256()
    for name in sorted(names):
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(arrays[name]).tobytes())
    return sha.hexdigest()


def reference(init: dict, mode: int):
    """One process, the same start, both ranks' rows as one batch: (losses, final deltas). (PyNative: synchronous,
    as the workers.)"""
    before = ms.get_context("pynative_synchronize")
    ms.set_context(mode=mode, pynative_synchronize=True)
    try:
        return _reference(init)
    finally:
        ms.set_context(pynative_synchronize=before)


def _reference(init: dict):
    net = build(seed=0, hidden_size=HIDDEN)
    pet_hooks.apply(net, pet_hooks.load_config(CONFIG))
    for param in net.get_parameters():
        param.set_data(Tensor(init[param.name]))
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Momentum(net.trainable_params(), LR, 0.9))
    batches = lm_batches(seq_length=net.config.seq_length, batch_size=BATCH * RANKS, seed=0)
    curve = [float(step(Tensor(ids), Tensor(labels)).asnumpy()) for ids, labels in
             (next(batches) for _ in range(STEPS))]
    return curve, {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(net)}


@pytest.mark.parametrize("mode", [pytest.param(0, id="graph"), pytest.param(1, id="pynative")])
def test_msrun_two_ranks_train_lora_like_one_process_on_the_whole_batch(tmp_path, mode):
    out = run_msrun(tmp_path, mode)
    logs = [worker_log(tmp_path, rank) for rank in range(RANKS)] if (tmp_path / "logs").is_dir() else []
    assert out.returncode == 0, out.stdout[-3000:] + "".join(log[-2000:] for log in logs)

    init = [numpy_ckpt(tmp_path / f"init{rank}.ckpt") for rank in range(RANKS)]
    end = [numpy_ckpt(tmp_path / f"end{rank}.ckpt") for rank in range(RANKS)]
    deltas = sorted(name for name in init[0] if ".lora_" in name)
    # (a whole-net checkpoint also holds pet_hooks' on/off switch, which is neither)
    base = sorted(name for name in init[0] if ".lora_" not in name and not name.endswith("pet_lora_scale"))
    assert len(deltas) == 24 and sorted(init[1]) == sorted(init[0])

    # The deltas start identical on both ranks (seeded, nothing is broadcast), B at zero.
    for name in deltas:
        np.testing.assert_array_equal(init[0][name], init[1][name], err_msg=name)
    assert all(not init[0][n].any() for n in deltas if n.endswith("lora_B"))
    assert all(init[0][n].std() > 0 for n in deltas if n.endswith("lora_A"))
    # ... and end identical, having moved.
    for name in deltas:
        np.testing.assert_array_equal(end[0][name], end[1][name], err_msg=name)
    assert any(end[0][n].any() for n in deltas if n.endswith("lora_B"))
    # The base weights: the untrained model's, on both ranks, before and after.
    fresh = {p.name: p.asnumpy() for p in build(seed=0, hidden_size=HIDDEN).get_parameters()}
    assert sorted(fresh) == base
    assert {digest(c, base) for c in init + end} == {digest(fresh, base)}

    # Gradients averaged: each rank's loss is on its own rows, their mean is the whole batch's
    # loss, and the deltas follow the single-process reference step for step.
    rank_losses = [losses(log) for log in logs]
    assert rank_losses[0] != rank_losses[1]                          # different data on each rank
    ref_losses, ref_deltas = reference(init[0], mode)
    np.testing.assert_allclose(np.mean(rank_losses, axis=0), ref_losses, rtol=2e-4)
    for name in deltas:
        np.testing.assert_allclose(end[0][name], ref_deltas[name], atol=2e-5, err_msg=name)
    assert np.mean(ref_losses[-3:]) < ref_losses[0] - 0.3           # the loss falls

    # Only rank 0 wrote the adapter, and it holds the trained deltas.
    assert "adapter saved to" in logs[0] and "(rank 0)" in logs[0]
    assert "adapter saved to" not in logs[1]
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == deltas
    for name in deltas:
        np.testing.assert_array_equal(saved[name], end[0][name], err_msg=name)


def test_kill_tree_reaches_workers_in_their_own_sessions(tmp_path):
    """The clean-up the msrun test relies on: a grandchild in a new session dies too."""
    script = tmp_path / "spawn.py"
    script.write_text("import subprocess, sys, time\n"
                      "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
                      " start_new_session=True)\nprint(p.pid, flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(proc.stdout.readline())
    assert grandchild in descendants(proc.pid)
    kill_tree(proc)
    proc.stdout.close()
    for _ in range(100):
        if not os.path.exists(f"/proc/{grandchild}") or open(f"/proc/{grandchild}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild outlived kill_tree")


@pytest.mark.parametrize("cfg", [{"pet_type": "lora", "target_modules": ".*dense1"},
                                 {"pet_type": "ptuning2", "pre_seq_len": 2}], ids=["lora", "ptuning2"])
def test_unseeded_deltas_start_identical_in_a_distributed_job(monkeypatch, cfg):
    """No seed anywhere: separate processes would draw different deltas, unless they are ranks of one job."""
    from pet_hooks.tuners import common
    monkeypatch.setattr(common.ms, "get_seed", lambda: None)      # as in a script that never seeds

    def initial():
        net = pet_hooks.apply(build(seed=0, num_layers=1, hidden_size=16, num_heads=2, seq_length=8), cfg)
        return [p.asnumpy() for p in pet_hooks.delta_parameters(net)]

    for var in ("MS_WORKER_NUM", "RANK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    alone = [initial(), initial()]
    assert any(not np.array_equal(a, b) for a, b in zip(*alone))   # a single process: random, as asked
    monkeypatch.setenv("MS_WORKER_NUM", "2")                       # what msrun exports to its workers
    ranks = [initial(), initial()]
    assert all(np.array_equal(a, b) for a, b in zip(*ranks))
    assert any(a.std() > 0 for a in ranks[0])
