"""Run checkpoints under faults (issue 27 item 4): SIGKILL at 20 moments of a run, and checkpoints corrupted on disk.

The run: ``tests/resume_train.py``, the sample GPT (``SMALL``) with ``GPT_LORA`` through ``PetCallback``,
``Model.train`` over 40 batches of ``lm_batches``, Adam with a learning rate that changes every step,
a run checkpoint every 3 steps, the newest 2 kept, PyNative mode.

**SIGKILL.** The run is done once uninterrupted, in a process of its own: the reference (its losses,
the SHA-256 of its deltas and optimizer state after every step, and those values themselves). Then the
same command (``resume=True``) is killed at 20 moments chosen by a seeded ``random.Random``, each killed
process being the resumed run of the kill before it, and run once more to the end. The moments: inside
steps (at their begin, inside the loss, after the optimizer's update, after their callbacks) and inside
checkpoint writes (adapter written only, train state half written, marker missing or half written,
complete but not renamed, renamed but older ones not rotated, half-way through deleting the oldest, the
checkpoint written but not save_dir's adapter), landed there by the script SIGKILLing itself from
wrappers of ``pet_hooks.training.run_checkpoint``'s functions; and 4 at a random time, SIGKILL sent
from outside. After each kill:

- every ``step-<n>`` folder is one ``latest_checkpoint`` accepts (a kill never leaves a broken one in
  view), loads (``restore_checkpoint``), and holds exactly the uninterrupted run's deltas and optimizer
  state after step n; the newest is the one the kill's moment allows (the last save whose rename happened);
- save_dir's adapter, when there is one, holds exactly the deltas of one of the reference's saved steps;
- the killed process began at the step after the checkpoint it resumed from, and every step it did had
  the reference's loss, deltas and optimizer state, bit for bit.

The last run ends with the reference's adapter (bit for bit) and checkpoints, and nothing hidden left.

Why this fails if resume is broken: batches not skipped, the resumed step trains on batch 1 again (its
loss differs from the reference's at that step); optimizer state not restored (Adam's moments, its step
counter and with it the learning rate), the deltas after the first resumed step differ; the step count
not carried on, the checkpoints are written at other steps and the kills land elsewhere (the last step
done is checked against the moment asked for); a save not atomic, a killed write leaves a folder that
is not complete, or a complete one with wrong values, in view.

To keep it fast (about 20 runs), the killed runs are forked from a server that imported MindSpore and
pet_hooks once (``resume_train.py --serve``): each is a process of its own, killed for real, but starts
in a fraction of a second; the reference is a new Python process. PyNative runs with
``pynative_synchronize`` (no compile; on 2 busy cores ~15x faster per step than asynchronous).

**Corrupted on disk** (in this process): a run stopped after step 6 (checkpoints 4 and 6), then step-6's
adapter truncated, its marker deleted, one bit of its train state or of its adapter flipped (files that
still parse: only the hash tells); or both checkpoints broken. The resumed run warns once per broken
folder, naming it, resumes from the newest complete one (or from step 0), replaces the broken folder when
it reaches its step, and ends with the uninterrupted run's adapter bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn
from mindspore.train import Callback, Model
from safetensors.numpy import load_file

import pet_hooks
from pet_hooks.training.run_checkpoint import latest_checkpoint, restore_checkpoint
from samples.tiny_gpt import LMLoss, build
from tests.conftest import GPT_LORA, ROOT, SMALL
from tests.resume_train import WRITE_PHASES, learning_rates, setup

WORKER = os.path.join(ROOT, "tests", "resume_train.py")
STEPS, SAVE_STEPS, KEEP, SEED = 40, 3, 2, 27
LAST_SAVE = STEPS // SAVE_STEPS * SAVE_STEPS
IN_STEP = ["step_begin", "forward", "after_update", "step_end"]
IN_WRITE = list(WRITE_PHASES)
#: kill moments after which step <step>'s checkpoint is in place (the rename was done)
COMMITTED = {"ckpt_after_rename", "ckpt_in_rotate", "before_adapter_save", "step_end"}
TIMEOUT = 120


def clean_env() -> dict:
    """Nothing of an outer launcher, cluster or kill request leaks into the runs."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_HOOKS_", "RESUME_TEST_"))
            and k not in ("RANK_ID", "RANK", "MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM", "RANK_SIZE")}


class ForkServer:
    """``resume_train.py --serve``: one request a line in, one answer a line out (see its ``serve``)."""

    def __init__(self, tmp_path):
        self.err_path = tmp_path / "server.err"
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, WORKER, "--serve", "--save-dir", "-", "--log", "-"],
                                     cwd=ROOT, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, start_new_session=True)

    def _answer(self) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"the fork server did not answer within {TIMEOUT} s:\n{self.stderr_tail()}"
        return line

    def ready(self) -> None:
        assert self._answer().strip() == "ready"

    def run(self, argv, env=None, kill_after=None) -> dict:
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._answer())

    def stderr_tail(self, chars=4000) -> str:
        self.err.flush()
        return self.err_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)      # the server and any run it forked
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.err):
            stream.close()


def read_log(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def reference_values(dump) -> dict:
    """step -> {name: value} of the deltas and the optimizer's state after that step."""
    values = {}
    with np.load(dump) as data:
        for key in data.files:
            step, name = key.split("/", 1)
            values.setdefault(int(step), {})[name] = data[key]
    return values


class Checker:
    """Loads checkpoints into a net and an optimizer of this process and compares them with the reference."""

    def __init__(self, tmp_path, ref_values):
        self.ref = ref_values
        self.net = pet_hooks.apply(build(seed=0, **SMALL), GPT_LORA)
        self.deltas = pet_hooks.delta_parameters(self.net)
        self.delta_names = sorted(p.name for p in self.deltas)
        self.optimizer = nn.Adam(self.deltas, learning_rate=learning_rates(STEPS))
        ids = {id(p) for p in self.deltas}
        self.state = {p.name: p for _, p in self.optimizer.parameters_and_names() if id(p) not in ids}
        self.views = tmp_path / "views"
        self.loads = 0

    def expect(self, values: dict, step: int, what: str) -> None:
        assert sorted(values) == sorted(self.ref[step]), f"{what}: other names than the reference's at step {step}"
        for name, value in values.items():
            np.testing.assert_array_equal(value, self.ref[step][name], err_msg=f"{what}: {name}")

    def accepted(self, folder):
        """``latest_checkpoint`` on a save_dir holding only ``folder``: the RunCheckpoint, or None."""
        shutil.rmtree(self.views, ignore_errors=True)
        os.makedirs(self.views / "checkpoints")
        os.symlink(folder, self.views / "checkpoints" / os.path.basename(folder))
        return latest_checkpoint(str(self.views), warn=False)

    def check_folder(self, folder, step: int, what: str) -> None:
        checkpoint = self.accepted(folder)
        assert checkpoint is not None and checkpoint.step == step, \
            f"{what}: {folder} is in view but not a complete checkpoint (a kill left it broken)"
        on_disk = {**load_file(os.path.join(folder, "adapter_model.safetensors")),
                   **load_file(os.path.join(folder, "train_state.safetensors"))}
        self.expect(on_disk, step, f"{what}: the files of {folder}")
        assert restore_checkpoint(self.net, self.optimizer, checkpoint, restore_random=False) == step
        self.loads += 1
        loaded = {p.name: p.asnumpy() for p in self.deltas}
        loaded.update({name: p.asnumpy() for name, p in self.state.items()})
        self.expect({name: value.reshape(self.ref[step][name].shape) for name, value in loaded.items()}, step,
                    f"{what}: {folder} loaded")

    def check_save_dir(self, save_dir, done: int, what: str) -> int:
        """Every checkpoint in view; returns the newest one's step (0: none). ``done``: the steps done so far."""
        root = os.path.join(save_dir, "checkpoints")
        folders = sorted(entry for entry in os.listdir(root) if not entry.startswith(".")) \
            if os.path.isdir(root) else []
        assert len(folders) <= KEEP + 1, f"{what}: {folders}"
        for entry in folders:
            step = int(entry.split("-")[1])
            assert step % SAVE_STEPS == 0 and 0 < step <= done, f"{what}: {entry} after {done} steps"
            self.check_folder(os.path.join(root, entry), step, what)
        newest = latest_checkpoint(save_dir, warn=False)
        adapter = os.path.join(save_dir, "adapter_model.safetensors")
        if os.path.exists(adapter):   # one whole version the reference had at a save step (or the end), never a mix
            saved = load_file(adapter)
            assert sorted(saved) == self.delta_names, what
            saved_at = list(range(SAVE_STEPS, done + 1, SAVE_STEPS)) + ([STEPS] if done == STEPS else [])
            matches = [step for step in saved_at
                       if all(np.array_equal(saved[name], self.ref[step][name]) for name in saved)]
            assert matches, f"{what}: save_dir's adapter holds no deltas the reference had at a save step"
        return 0 if newest is None else newest.step


def plan(rng: random.Random, kind: str, resumed: int, number: int, kills: int):
    """(step, phase, kill_after) of kill ``number`` of ``kills``, for a run resuming after step ``resumed``:
    near an even spread over the run, at least one step after the resumed one."""
    target = min(STEPS, max(resumed + 1, round(STEPS * number / (kills + 1)) + rng.randint(-2, 2)))
    if kind == "timed":               # SIGKILL from outside at a random time (at the latest after 4 steps more)
        return min(target + 4, STEPS), "step_end", round(rng.uniform(0.4, 2.0), 3)
    if kind in IN_WRITE:
        first = SAVE_STEPS * (KEEP + 1) if kind == "ckpt_in_rotate" else SAVE_STEPS   # something to rotate
        saves = [s for s in range(max(first, resumed + SAVE_STEPS), LAST_SAVE + 1, SAVE_STEPS) if s >= target]
        if saves:
            return saves[0], kind, None
        kind = rng.choice(IN_STEP)    # no save ahead: a moment inside a step instead
    return target, kind, None


@pytest.fixture
def fork_server(tmp_path):
    server = ForkServer(tmp_path)
    yield server
    server.close()


def test_sigkill_at_20_moments_and_every_resumed_run_ends_as_the_uninterrupted_one(tmp_path, fork_server):
    began = time.monotonic()
    ref_dir, save_dir, log = tmp_path / "reference", tmp_path / "run", tmp_path / "run.log"
    reference = subprocess.run([sys.executable, WORKER, "--save-dir", str(ref_dir), "--log", str(tmp_path / "ref.log"),
                                "--dump", str(tmp_path / "ref.npz"), "--steps", str(STEPS)],
                               cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-4000:]
    ref_lines = {line["step"]: line for line in read_log(tmp_path / "ref.log")}
    assert sorted(ref_lines) == list(range(1, STEPS + 1))
    checker = Checker(tmp_path, reference_values(tmp_path / "ref.npz"))
    assert sorted(checker.ref) == list(range(1, STEPS + 1))
    fork_server.ready()

    command = ["--save-dir", str(save_dir), "--log", str(log), "--steps", str(STEPS), "--save-steps",
               str(SAVE_STEPS), "--keep", str(KEEP), "--resume"]
    rng = random.Random(SEED)
    kinds = IN_WRITE + IN_STEP * 2 + ["timed"] * 4
    rng.shuffle(kinds)
    assert len(kinds) == 20
    resumed, seen, done_kills, met = 0, 0, [], []

    def new_lines(pid, what):
        """The steps the run did: from the one after the checkpoint it resumed from, each as the reference's."""
        nonlocal seen
        lines = read_log(log)
        mine, seen = lines[seen:], len(lines)
        assert all(line["pid"] == pid for line in mine), what
        assert [line["step"] for line in mine] == list(range(resumed + 1, resumed + 1 + len(mine))), \
            f"{what}: resumed after step {resumed} but did steps {[line['step'] for line in mine]}"
        for line in mine:
            expected = ref_lines[line["step"]]
            assert (line["loss"], line["deltas"], line["state"]) == \
                (expected["loss"], expected["deltas"], expected["state"]), \
                f"{what}: step {line['step']} is not the uninterrupted run's (loss {line['loss']}, {expected['loss']})"
        return mine[-1]["step"] if mine else resumed

    for number, kind in enumerate(kinds, 1):
        step, phase, kill_after = plan(rng, kind, resumed, number, len(kinds))
        what = f"kill {number} ({'after %.3f s, ' % kill_after if kill_after else ''}step {step} {phase}, " \
               f"resumed after {resumed})"
        answer = fork_server.run(command, {"RESUME_TEST_KILL": f"{step}:{phase}"}, kill_after)
        assert answer["signal"] == signal.SIGKILL, f"{what}: not killed: {answer}\n{fork_server.stderr_tail()}"
        last = new_lines(answer["pid"], what)
        if kill_after is None:   # it died where it was asked to: the step counted on from the checkpoint
            assert last == (step if phase == "step_end" else step - 1), f"{what}: the last step done was {last}"
        newest = checker.check_save_dir(str(save_dir), last + 1, what)
        # the newest checkpoint: the last save whose rename was done
        if kill_after is None:
            expected = step // SAVE_STEPS * SAVE_STEPS if phase in COMMITTED else (step - 1) // SAVE_STEPS * SAVE_STEPS
            assert newest == expected, f"{what}: the newest checkpoint is step {newest}, not {expected}"
        else:
            assert max(resumed, last // SAVE_STEPS * SAVE_STEPS) <= newest <= last + 1 and newest % SAVE_STEPS == 0, \
                f"{what}: newest checkpoint step {newest} after doing steps to {last}"
        did = f"steps {resumed + 1}-{last}" if last > resumed else "no step"
        done_kills.append(f"{what}: did {did}, newest checkpoint {newest}")
        met.append((step if kill_after is None else last + 1, "timed" if kill_after else phase))
        resumed = newest

    answer = fork_server.run(command)
    assert answer == {"pid": answer["pid"], "signal": None, "code": 0}, f"{answer}\n{fork_server.stderr_tail()}"
    assert new_lines(answer["pid"], "the last run") == STEPS
    final, ref_final = load_file(str(save_dir / "adapter_model.safetensors")), \
        load_file(str(ref_dir / "adapter_model.safetensors"))
    assert sorted(final) == sorted(ref_final) == checker.delta_names
    for name in final:
        np.testing.assert_array_equal(final[name], ref_final[name], err_msg=name)
        np.testing.assert_array_equal(final[name], checker.ref[STEPS][name], err_msg=name)
    in_view = [f"step-{LAST_SAVE - SAVE_STEPS}", f"step-{LAST_SAVE}"]
    assert sorted(os.listdir(ref_dir / "checkpoints")) == in_view
    left = sorted(os.listdir(save_dir / "checkpoints"))
    # (a killed save's or deletion's hidden folder is swept by the next save, docs/front_doors.md: when the
    # last kill was in the last save's rotation, the resumed run saves no checkpoint after it and it stays)
    assert [entry for entry in left if not entry.startswith(".")] == in_view, left
    assert all(re.match(r"^\.step-\d+\.(tmp|old)-\d+$", entry) for entry in left if entry.startswith(".")), left
    assert checker.check_save_dir(str(save_dir), STEPS, "the last run") == LAST_SAVE
    print(f"\n{len(done_kills)} kills, {checker.loads} checkpoint loads, {time.monotonic() - began:.1f} s:\n  "
          + "\n  ".join(done_kills))
    # every kind of moment was met (the seeded order puts the write moments where a save is ahead), and the
    # kills spread over the run
    assert {phase for _, phase in met} == set(IN_WRITE + IN_STEP + ["timed"])
    assert min(step for step, _ in met) <= 8 and max(step for step, _ in met) >= 30


# ----------------------------------------------------------------------------- corrupted on disk
CORRUPT_STEPS, CORRUPT_SAVE_STEPS = 8, 2


@contextlib.contextmanager
def pynative():
    before = ms.get_context("mode"), ms.get_context("pynative_synchronize")
    ms.set_context(mode=1, pynative_synchronize=True)
    try:
        yield
    finally:
        ms.set_context(mode=before[0], pynative_synchronize=before[1])


class Stopped(Exception):
    pass


class Steps(Callback):
    """After PetCallback: each step's number, deltas and optimizer state; stops the run after ``stop_after``."""

    def __init__(self, net, stop_after=None):
        super().__init__()
        self.net, self.stop_after = net, stop_after
        self.values = {}

    def on_train_step_begin(self, run_context):
        if self.stop_after is not None and run_context.original_args().cur_step_num > self.stop_after:
            raise Stopped

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        ours = {id(p) for p in self.net.get_parameters()}
        values = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(self.net)}
        values.update({p.name: p.asnumpy().copy() for _, p in params.train_network.parameters_and_names()
                       if id(p) not in ours})
        self.values[params.cur_step_num] = values


def train(save_dir, resume=False, stop_after=None) -> Steps:
    net, dataset, optimizer = setup(CORRUPT_STEPS)
    steps = Steps(net, stop_after)
    callback = pet_hooks.PetCallback(GPT_LORA, save_dir=str(save_dir), save_steps=CORRUPT_SAVE_STEPS, keep=KEEP,
                                     resume=resume)
    with contextlib.suppress(Stopped):
        Model(net, LMLoss(), optimizer).train(1, dataset, callbacks=[callback, steps])
    return steps


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The uninterrupted run's per-step values and save_dir, and a run stopped after step 6 (checkpoints 4, 6)."""
    root = tmp_path_factory.mktemp("corrupt")
    with pynative():
        whole = train(root / "whole")
        stopped = train(root / "stopped", stop_after=6)
    assert sorted(whole.values) == list(range(1, CORRUPT_STEPS + 1)) and sorted(stopped.values) == list(range(1, 7))
    assert sorted(os.listdir(root / "stopped" / "checkpoints")) == ["step-4", "step-6"]
    return whole, root


def truncate(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def flip_a_bit(path):
    """The lowest bit of one float32 value in the middle of the file's first float32 tensor flipped: the file
    still parses and one value differs by one unit in the last place (only the hash can tell)."""
    before = load_file(path)
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = sorted(key for key, info in header.items() if key != "__metadata__" and info["dtype"] == "F32"
                  and info["data_offsets"][1] - info["data_offsets"][0] >= 8)[0]
    start, end = header[name]["data_offsets"]
    data[8 + size + start + (end - start) // 8 * 4] ^= 0x01
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    after = load_file(path)
    assert [key for key in before if not np.array_equal(before[key], after[key])] == [name]
    assert np.sum(before[name] != after[name]) == 1 and np.allclose(before[name], after[name], rtol=1e-6)


CORRUPTIONS = {
    "truncated_adapter": ({"step-6": lambda d: truncate(d / "adapter_model.safetensors")}, 4),
    "missing_marker": ({"step-6": lambda d: os.remove(d / "COMPLETE")}, 4),
    "bit_flip_in_train_state": ({"step-6": lambda d: flip_a_bit(d / "train_state.safetensors")}, 4),
    "bit_flip_in_adapter": ({"step-6": lambda d: flip_a_bit(d / "adapter_model.safetensors")}, 4),
    "both_broken": ({"step-6": lambda d: os.remove(d / "COMPLETE"),
                     "step-4": lambda d: flip_a_bit(d / "train_state.safetensors")}, 0),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_checkpoint_corrupted_on_disk_is_skipped_with_one_warning(stopped_run, tmp_path, caplog, corruption):
    whole, root = stopped_run
    save_dir = tmp_path / "run"
    shutil.copytree(root / "stopped", save_dir)
    damage, resumed = CORRUPTIONS[corruption]
    for folder, corrupt in damage.items():
        corrupt(save_dir / "checkpoints" / folder)

    with pynative(), caplog.at_level(logging.WARNING, logger="pet_hooks"):
        run = train(save_dir, resume=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == len(damage), skipped
    for folder in damage:
        assert sum(str(save_dir / "checkpoints" / folder) in line for line in skipped) == 1, (folder, skipped)
    assert all(len(line.splitlines()) == 1 for line in skipped)
    # resumed after the newest complete checkpoint, and every step as the uninterrupted run's
    assert sorted(run.values) == list(range(resumed + 1, CORRUPT_STEPS + 1))
    for step, values in run.values.items():
        assert sorted(values) == sorted(whole.values[step])
        for name, value in values.items():
            np.testing.assert_array_equal(value, whole.values[step][name], err_msg=f"step {step}: {name}")
    final, ref_final = load_file(str(save_dir / "adapter_model.safetensors")), \
        load_file(str(root / "whole" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(ref_final)
    for name in final:
        np.testing.assert_array_equal(final[name], ref_final[name], err_msg=name)
    # the broken folders were replaced when the run reached their steps: both in view are complete
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["step-6", "step-8"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pet_hooks"):
        newest = latest_checkpoint(str(save_dir))
    assert newest.step == 8 and not caplog.records
    for step in (6, 8):
        folder = save_dir / "checkpoints" / f"step-{step}"
        on_disk = {**load_file(str(folder / "adapter_model.safetensors")),
                   **load_file(str(folder / "train_state.safetensors"))}
        assert sorted(on_disk) == sorted(whole.values[step])
        for name, value in on_disk.items():
            np.testing.assert_array_equal(value.reshape(whole.values[step][name].shape), whole.values[step][name],
                                          err_msg=f"step-{step}: {name}")
