"""Resume under msrun (issue 27 item 6): 2 CPU ranks, rank 0 writes the run checkpoints, every rank resumes.

    msrun --worker_num=2 --local_worker_num=2 --master_port=P --join=True --log_dir=L \
        tests/resume_train.py --door callback --data-parallel --mode 0 --steps 12 --save-steps 3 --keep 2 --resume ...

The script (``tests/resume_train.py``) trains with ``Model.train`` and ``PetCallback(..., save_steps=3,
keep=2, resume=True)`` on every rank; each rank trains on its own rows of the global batch, gradients
averaged (as in tests/doors/test_data_parallel.py), graph mode. (``pet-hooks run ... -- msrun`` is the
other way in: its Python children get the checkpoints through the bootstrap, the last test here.)

Three runs of the same command: uninterrupted (the reference); one whose two workers SIGKILL themselves
as step 7 begins, once rank 0 has written ``step-6/`` (every rank waits to see the folder in place and the
other rank at the same point before it dies, so msrun cannot take a rank down before then); and the same
command again, which resumes. The first two are one msrun job: with ``--reference`` each worker does the
uninterrupted run first (the first run of a fresh process, as the resumed one is), then the killed one,
with a new net and model. The resumed run's steps 7-12, on both ranks, have the reference's losses,
deltas and optimizer state bit for bit, as have the killed run's steps 1-6; its adapter is the
reference's, bit for bit; the killed run's checkpoint holds rank 0's values of step 6 of the reference.

Why this fails if resume is broken: a rank that did not load the checkpoint (only rank 0 resuming)
trains from the initial deltas and moments, so its losses and deltas differ from the reference's at
step 7 on; batches not skipped, step 7 trains on batch 1 again; the optimizer state not restored, the
deltas after step 7 differ; a rank other than 0 writing too, or none, shows in the folders checked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from tests.conftest import GPT_LORA, ROOT
from tests.doors.test_data_parallel import descendants, free_port, kill_tree   # msrun on the CPU, as that module runs it

WORKER = os.path.join(ROOT, "tests", "resume_train.py")
STEPS, SAVE_STEPS, KEEP, RANKS, KILL_AFTER = 12, 3, 2, 2, 6
TIMEOUT = 240


def clean_env() -> dict:
    """Nothing of an outer launcher, cluster or kill request leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PET_HOOKS_", "RESUME_TEST_"))
            and k not in ("RANK_ID", "RANK", "MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM", "RANK_SIZE")}


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def workers_dead(log) -> bool:
    """Every rank reached its kill (its file beside the log) and its process is gone."""
    if not all(os.path.exists(f"{log}.at-kill-{rank}") for rank in range(RANKS)):
        return False
    pids = {entry[4] for rank_lines in lines_by_rank(log).values() for entry in rank_lines[-1:]}
    return len(pids) == RANKS and all(dead(pid) for pid in pids)


def run(tmp_path, save_dir, log, name, kill=None, dump=None, reference=None) -> tuple:
    """The command, run once: (exit code, output, the workers' logs). A run whose workers killed themselves is
    ended once they are gone (msrun would wait 30 s for their heartbeats to time out)."""
    logs = tmp_path / f"logs-{name}"
    cmd = ["msrun", f"--worker_num={RANKS}", f"--local_worker_num={RANKS}", f"--master_port={free_port()}",
           "--join=True", f"--log_dir={logs}",
           WORKER, "--door", "callback", "--data-parallel", "--mode", "0", "--steps", str(STEPS),
           "--save-steps", str(SAVE_STEPS), "--keep", str(KEEP), "--resume", "--save-dir", str(save_dir),
           "--log", str(log)] + (["--dump", str(dump)] if dump else []) \
        + (["--reference", *map(str, reference)] if reference else [])
    cmd[0] = shutil.which("msrun") or os.path.join(os.path.dirname(sys.executable), "msrun")
    env = clean_env()
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])   # workers: this Python
    if kill:
        env["RESUME_TEST_KILL"] = kill
    began = time.monotonic()
    with open(tmp_path / f"{name}.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while proc.poll() is None and time.monotonic() - began < TIMEOUT:
            if kill and workers_dead(log):
                break
            time.sleep(0.1)
    finally:  # done, timed out, a failed assertion or ^C: no process of the run outlives it
        if proc.poll() is None or descendants(proc.pid):
            kill_tree(proc)
    workers = [(logs / f"worker_{rank}.log").read_text(errors="replace") if (logs / f"worker_{rank}.log").exists()
               else "" for rank in range(RANKS)]
    print(f"\n{name} run: exit {proc.returncode} after {time.monotonic() - began:.1f} s", flush=True)
    return proc.returncode, (tmp_path / f"{name}.out").read_text(errors="replace"), workers


def lines_by_rank(log) -> dict:
    """rank -> [(step, loss, deltas' hash, state's hash, pid)] in the order written."""
    found = {rank: [] for rank in range(RANKS)}
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            found[entry["rank"]].append((entry["step"], entry["loss"], entry["deltas"], entry["state"], entry["pid"]))
    return found


def test_msrun_run_killed_after_a_checkpoint_resumes_on_every_rank_as_the_uninterrupted_run(tmp_path):
    began = time.monotonic()
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "cut"
    # One msrun job for the first two runs: each worker does the uninterrupted run first (the first run of its
    # process, as the resumed run is), then, a new net and model, the run that kills itself.
    code, out, workers = run(tmp_path, cut_dir, tmp_path / "cut.log", "killed", kill=f"{KILL_AFTER}:after_checkpoint",
                             reference=(ref_dir, tmp_path / "ref.log", tmp_path / "ref{rank}.npz"))
    assert code != 0, out[-3000:]
    for rank in range(RANKS):      # the uninterrupted run ended on every rank (then the killed one began)
        assert f"resume_train: done (rank {rank})" in workers[rank], out[-3000:] + workers[rank][-3000:]
    reference = lines_by_rank(tmp_path / "ref.log")
    for rank in range(RANKS):
        assert [entry[0] for entry in reference[rank]] == list(range(1, STEPS + 1)), rank
    assert [e[1] for e in reference[0]] != [e[1] for e in reference[1]]      # each rank on its own rows
    assert [e[2] for e in reference[0]] == [e[2] for e in reference[1]]      # ... the same deltas after each step
    # rank 0 wrote the run checkpoints (the newest 2 kept)
    assert sorted(os.listdir(ref_dir)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoints"]
    assert sorted(os.listdir(ref_dir / "checkpoints")) == ["step-12", "step-9"]
    for rank in range(RANKS):
        assert f"SIGKILL at step {KILL_AFTER + 1} after_checkpoint" in workers[rank], workers[rank][-3000:]
    killed = lines_by_rank(tmp_path / "cut.log")
    for rank in range(RANKS):
        assert [e[:4] for e in killed[rank]] == [e[:4] for e in reference[rank][:KILL_AFTER]], rank
    # rank 0's checkpoint of step 6: complete, and the reference's values after step 6
    from pet_hooks.training.run_checkpoint import latest_checkpoint
    newest = latest_checkpoint(str(cut_dir))
    assert newest is not None and newest.step == KILL_AFTER
    assert sorted(os.listdir(cut_dir / "checkpoints")) == ["step-3", "step-6"]
    with np.load(tmp_path / "ref0.npz") as dump:
        expected = {key.split("/", 1)[1]: dump[key] for key in dump.files if key.startswith(f"{KILL_AFTER}/")}
    saved = {**load_file(os.path.join(newest.path, "adapter_model.safetensors")),
             **load_file(os.path.join(newest.path, "train_state.safetensors"))}
    assert sorted(saved) == sorted(expected)
    for name, value in saved.items():
        np.testing.assert_array_equal(value.reshape(expected[name].shape), expected[name], err_msg=name)
    adapter = load_file(str(cut_dir / "adapter_model.safetensors"))    # PetCallback's save at step 6
    assert sorted(adapter) == sorted(load_file(os.path.join(newest.path, "adapter_model.safetensors")))
    for name, value in adapter.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    timings = [time.monotonic() - began]

    code, out, workers = run(tmp_path, cut_dir, tmp_path / "cut.log", "resumed")
    assert code == 0, out[-3000:] + "".join(log[-3000:] for log in workers)
    for rank in range(RANKS):
        assert f"resuming from {newest.path} (step {KILL_AFTER})" in workers[rank], workers[rank][-3000:]
    resumed = lines_by_rank(tmp_path / "cut.log")
    for rank in range(RANKS):
        mine = resumed[rank][KILL_AFTER:]
        assert len({e[4] for e in mine}) == 1 and mine[0][4] != killed[rank][0][4]      # the new process's lines
        assert [e[0] for e in mine] == list(range(KILL_AFTER + 1, STEPS + 1)), rank
        for got, want in zip(mine, reference[rank][KILL_AFTER:]):
            assert got[:4] == want[:4], f"rank {rank} step {got[0]}: loss {got[1]} vs {want[1]} of the reference"
    final, ref_final = load_file(str(cut_dir / "adapter_model.safetensors")), \
        load_file(str(ref_dir / "adapter_model.safetensors"))
    assert sorted(final) == sorted(ref_final) and len(final) == 12
    for name in final:
        np.testing.assert_array_equal(final[name], ref_final[name], err_msg=name)
    assert sorted(os.listdir(cut_dir / "checkpoints")) == ["step-12", "step-9"]
    timings.append(time.monotonic() - began)
    print("\nreference and killed, resumed runs done after " + ", ".join(f"{t:.1f}" for t in timings) + " s")


# ----------------------------------------------------------------------------- pet-hooks run's children
def test_a_python_child_of_the_launcher_writes_run_checkpoints_and_resumes(tmp_path):
    """``pet-hooks run --save-steps 2 --resume -- python script.py``: the child gets the checkpoints through the
    bootstrap (``PET_HOOKS_CHECKPOINTS``), as msrun workers do. Killed as step 3 begins, it leaves step-2/;
    run again, it resumes from it and does steps 3-4 only."""
    save_dir, log, config = tmp_path / "run", tmp_path / "run.log", tmp_path / "lora.json"
    config.write_text(json.dumps(GPT_LORA))
    cmd = [sys.executable, "-m", "pet_hooks", "run", "--config", str(config), "--save-dir", str(save_dir),
           "--save-steps", "2", "--keep", str(KEEP), "--resume", "--", "python", WORKER, "--door", "launcher",
           "--mode", "1", "--steps", "4", "--save-dir", str(save_dir), "--log", str(log)]
    killed = subprocess.run(cmd, cwd=str(tmp_path), env={**clean_env(), "RESUME_TEST_KILL": "3:step_begin"},
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert "SIGKILL at step 3 step_begin" in killed.stderr, killed.stderr[-3000:]
    assert [e[0] for e in lines_by_rank(log)[0]] == [1, 2]
    assert os.path.isdir(save_dir / "checkpoints"), "the child wrote no run checkpoint"
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["step-2"]
    resumed = subprocess.run(cmd, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "(step 2)" in resumed.stderr
    assert [e[0] for e in lines_by_rank(log)[0]] == [1, 2, 3, 4]
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["step-2", "step-4"]
