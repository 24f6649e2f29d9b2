"""The training script of the resume tests (tests/doors/test_resume_faults.py, tests/doors/test_resume_msrun.py).

    python tests/resume_train.py --save-dir D --log L [--resume]                    (PetCallback)
    pet-hooks run --config C --save-dir D --save-steps N --resume -- msrun ... \\
        tests/resume_train.py --door launcher --data-parallel --save-dir D --log L  (a plain script)

The sample GPT (``build(seed=0, **SMALL)``) trained with ``Model.train`` on ``lm_batches(8, 4, seed=1)``
(under ``--data-parallel`` each rank takes its 4 rows of a global batch of 4 x ranks), LoRA from
``tests.conftest.GPT_LORA``, Adam with a learning rate that changes every step (so the optimizer's
step counter is state a resume must restore, as its moments are).

- ``--door callback`` adds ``PetCallback(GPT_LORA, save_dir, save_steps, keep=keep, resume=resume)``;
  ``--door launcher`` adds nothing (``pet-hooks run`` brings the hooks and the checkpoints).
- Every step end appends one JSON line to ``--log`` (rank, pid, global step, loss, SHA-256 of the deltas
  and of the optimizer's state after the step), flushed at once: a killed run keeps its lines.
- ``--dump F`` writes every step's deltas and optimizer state (by parameter name) to ``F`` (npz,
  ``"<step>/<name>"``; ``{rank}`` in ``F`` is the rank) at the end: the uninterrupted run's values, to
  compare checkpoints with.
- ``RESUME_TEST_KILL="<step>:<phase>"`` makes the process SIGKILL itself at that moment of global step
  ``<step>`` (the phases: ``KILL_PHASES`` below). For the moments inside a checkpoint write the writer is
  wrapped, from here, by replacing names in ``pet_hooks.training.run_checkpoint``'s namespace (its
  ``save_adapter``, ``_write``, ``os.rename``, ``shutil.rmtree``) and ``pet_hooks.doors.flow.save_for_rank``;
  pet_hooks itself is not changed, and a run with no such kill is not wrapped at all.
- ``--serve``: a fork server for many short runs (``serve`` below).
- ``--reference D L F``: before the run asked for, the uninterrupted run (no kill) with save dir ``D``, log ``L``
  and dump ``F``, in the same process (tests/doors/test_resume_msrun.py: one msrun job for both).
"""
import argparse
import hashlib
import json
import os
import signal
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402
from mindspore import nn  # noqa: E402
from mindspore.train import Callback, Model  # noqa: E402

import pet_hooks  # noqa: E402
from samples.data import lm_batches  # noqa: E402
from samples.tiny_gpt import LMLoss, build  # noqa: E402

SMALL = dict(num_layers=2, hidden_size=16, num_heads=2, seq_length=8)            # tests.conftest's
GPT_LORA = {"pet_type": "lora", "lora_rank": 4, "target_modules": ".*dense1|.*dense3|.*mapping"}
BATCH = 4

#: where RESUME_TEST_KILL can land, in the order a step meets them. In the step: its begin, the loss
#: (PyNative only: the forward runs Python), after the optimizer's update (PyNative only), its end (after
#: PetCallback's saves). In the step's checkpoint write (a save step, ``--door callback``):
KILL_PHASES = (
    "step_begin", "forward", "after_update",
    "ckpt_after_adapter",     # the adapter written into the hidden temporary folder, nothing else
    "ckpt_state_half",        # half of train_state.safetensors written (and synced)
    "ckpt_before_marker",     # every file written, the COMPLETE marker not
    "ckpt_marker_half",       # half of the marker written
    "ckpt_before_rename",     # complete in the temporary folder, not renamed into place
    "ckpt_after_rename",      # renamed into place, the older ones not rotated away
    "ckpt_in_rotate",         # the oldest renamed away to be deleted, one of its files deleted
    "before_adapter_save",    # the checkpoint written, save_dir's adapter not yet
    "step_end",
    "after_checkpoint",       # as the next step begins, once step-<step>/ is in place and every rank is there
)

WRITE_PHASES = KILL_PHASES[3:11]
STATE = {"step": 0}
KILL = None          # (step, phase)


def die(phase):
    print(f"resume_train: SIGKILL at step {STATE['step']} {phase}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)   # never reached


def wait_for(path, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.002)


def at(phase) -> bool:
    return KILL is not None and KILL == (STATE["step"], phase)


class Proxy:
    """A module with some of its functions replaced (``os``, ``shutil`` as run_checkpoint sees them)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def wrap_checkpoint_writer():
    """Kill points inside pet_hooks.training.run_checkpoint.save_checkpoint (and the adapter save after it)."""
    import shutil
    from pet_hooks.doors import flow
    from pet_hooks.training import run_checkpoint as rc

    real_save_adapter, real_write = rc.save_adapter, rc._write

    def save_adapter(*args, **kwargs):
        result = real_save_adapter(*args, **kwargs)
        if at("ckpt_after_adapter"):
            die("ckpt_after_adapter")
        return result

    def write(path, data):
        name = os.path.basename(path)
        half = (name == rc.STATE_NAME and at("ckpt_state_half")) or (name == rc.MARKER_NAME and at("ckpt_marker_half"))
        if name == rc.MARKER_NAME and at("ckpt_before_marker"):
            die("ckpt_before_marker")
        if half:
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die(f"half of {name}")
        return real_write(path, data)

    def rename(src, dst, *args, **kwargs):
        if ".tmp-" in os.path.basename(src) and at("ckpt_before_rename"):
            die("ckpt_before_rename")
        os.rename(src, dst, *args, **kwargs)
        if ".tmp-" in os.path.basename(src) and at("ckpt_after_rename"):
            die("ckpt_after_rename")

    def rmtree(path, *args, **kwargs):
        if ".old-" in os.path.basename(path) and at("ckpt_in_rotate"):
            files = sorted(os.listdir(path))
            os.remove(os.path.join(path, files[0]))
            die("ckpt_in_rotate")
        return shutil.rmtree(path, *args, **kwargs)

    rc.save_adapter, rc._write = save_adapter, write
    rc.os, rc.shutil = Proxy(os, rename=rename), Proxy(shutil, rmtree=rmtree)
    real_save_for_rank = flow.save_for_rank

    def save_for_rank(*args, **kwargs):
        if at("before_adapter_save"):
            die("before_adapter_save")
        return real_save_for_rank(*args, **kwargs)

    flow.save_for_rank = save_for_rank


class KillingLoss(LMLoss):
    def construct(self, logits, labels):
        if at("forward"):
            die("forward")
        return super().construct(logits, labels)


def digest(arrays: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(arrays):
        sha.update(name.encode())
        sha.update(np.ascontiguousarray(arrays[name]).tobytes())
    return sha.hexdigest()


class Recorder(Callback):
    """The global step for the kill points; a log line per step; the kills around the step."""

    def __init__(self, args, rank, ranks, net):
        super().__init__()
        self.args, self.rank, self.ranks, self.net = args, rank, ranks, net
        self.log = open(args.log, "a", encoding="utf-8")
        self.dump = {}
        self.wrapped = False

    def _state(self, train_network) -> dict:
        """The optimizer's parameters that are not the model's (moments, step counter, learning rate)."""
        ours = {id(p) for p in self.net.get_parameters()}
        return {p.name: p.asnumpy().copy() for _, p in train_network.parameters_and_names() if id(p) not in ours}

    def on_train_step_begin(self, run_context):
        params = run_context.original_args()
        STATE["step"] = params.cur_step_num
        if KILL is not None and KILL[1] == "after_checkpoint" and STATE["step"] == KILL[0] + 1:
            # rank 0 wrote step-<step>/ at the step's end; every rank waits to see it, then for every rank to
            # be here, then dies (before msrun, seeing one rank gone, can end the others)
            wait_for(os.path.join(self.args.save_dir, "checkpoints", f"step-{KILL[0]}"))
            open(f"{self.args.log}.at-kill-{self.rank}", "w").close()
            for rank in range(self.ranks):
                wait_for(f"{self.args.log}.at-kill-{rank}")
            die("after_checkpoint")
        if not self.wrapped and KILL is not None and KILL[1] == "after_update":
            self.wrapped = True
            train_network = params.train_network     # PyNative: its construct is Python (the optimizer's is jit)
            real = train_network.construct

            def construct(*args):
                result = real(*args)                 # forward, backward, the optimizer's update
                if at("after_update"):
                    die("after_update")
                return result

            train_network.construct = construct
        if at("step_begin"):
            die("step_begin")

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        deltas = {p.name: p.asnumpy().copy() for p in pet_hooks.delta_parameters(self.net)}
        state = self._state(params.train_network)
        loss = float(np.asarray(params.net_outputs.asnumpy() if hasattr(params.net_outputs, "asnumpy")
                                else params.net_outputs[0].asnumpy()))
        self.log.write(json.dumps({"rank": self.rank, "pid": os.getpid(), "step": params.cur_step_num, "loss": loss,
                                   "time": time.time(), "deltas": digest(deltas), "state": digest(state)}) + "\n")
        self.log.flush()
        if self.args.dump:
            for name, value in {**deltas, **state}.items():
                self.dump[f"{params.cur_step_num}/{name}"] = value

    def on_train_end(self, run_context):
        if self.args.dump:
            np.savez(self.args.dump.format(rank=self.rank), **self.dump)


class LastCallback(Callback):
    """After the other callbacks of the step (PetCallback's saves; not pet-hooks run's, added after it)."""

    def on_train_step_end(self, run_context):
        if at("step_end"):
            die("step_end")


def setup(steps: int, rank: int = 0, ranks: int = 1):
    """(net, dataset, optimizer) of the run: the sample GPT, this rank's rows of ``steps`` batches, Adam."""
    net = build(seed=0, **SMALL)
    batches = lm_batches(seq_length=SMALL["seq_length"], batch_size=BATCH * ranks, seed=1)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    data = [tuple(part[rows] for part in next(batches)) for _ in range(steps)]
    dataset = ds.GeneratorDataset(data, ["ids", "labels"], shuffle=False)
    optimizer = nn.Adam(net.trainable_params(), learning_rate=learning_rates(steps))
    return net, dataset, optimizer


def learning_rates(steps: int) -> list:
    return [float(1e-2 * 0.97 ** i) for i in range(steps)]


def main():
    global KILL
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--dump", default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--mode", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--door", choices=("callback", "launcher"), default="callback")
    parser.add_argument("--data-parallel", action="store_true")
    parser.add_argument("--serve", action="store_true", help="be the fork server (see serve)")
    parser.add_argument("--reference", nargs=3, metavar=("SAVE_DIR", "LOG", "DUMP"), default=None,
                        help="first, in this process, the uninterrupted run (no kill) into these, then the run asked")
    args = parser.parse_args()
    if args.serve:
        return serve()
    KILL = None
    if os.environ.get("RESUME_TEST_KILL"):
        step, phase = os.environ["RESUME_TEST_KILL"].split(":")
        assert phase in KILL_PHASES, phase
        KILL = (int(step), phase)

    ms.set_device("CPU")
    ms.set_context(mode=args.mode)
    if args.mode == 1:   # ops in this thread: far faster for a net this small (and on a busy machine)
        ms.runtime.launch_blocking()
    rank, ranks = 0, 1
    if args.data_parallel:
        from mindspore.communication import get_group_size, get_rank, init
        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        rank, ranks = get_rank(), get_group_size()
    if args.reference:
        # The reference run of tests/doors/test_resume_msrun.py, the first run of a fresh process as if alone (one
        # msrun job less): nothing is killed or wrapped in it; the run asked for follows, a new net and model.
        kill, KILL = KILL, None
        save_dir, log, dump = args.reference
        train(argparse.Namespace(**{**vars(args), "save_dir": save_dir, "log": log, "dump": dump}), rank, ranks)
        KILL = kill
    if KILL is not None and KILL[1] in WRITE_PHASES:
        wrap_checkpoint_writer()
    train(args, rank, ranks)
    return None


def train(args, rank: int, ranks: int) -> None:
    """One run: a new net, dataset, optimizer and callbacks, trained with ``Model.train``."""
    net, dataset, optimizer = setup(args.steps, rank, ranks)
    callbacks = [Recorder(args, rank, ranks, net), LastCallback()]
    if args.door == "callback":
        callbacks.insert(0, pet_hooks.PetCallback(GPT_LORA, save_dir=args.save_dir, save_steps=args.save_steps,
                                                  keep=args.keep, resume=args.resume))
    model = Model(net, KillingLoss() if KILL is not None and KILL[1] == "forward" else LMLoss(), optimizer)
    model.train(1, dataset, callbacks=callbacks)
    print(f"resume_train: done (rank {rank})", file=sys.stderr, flush=True)


def serve():
    """The fork server: MindSpore and pet_hooks imported once, then one forked process per run.

    Reads one JSON request a line on stdin, ``{"argv": [...], "env": {...}, "kill_after": seconds or null}``,
    forks a process that runs ``main()`` with that command line and environment (added to the server's),
    SIGKILLs it from here after ``kill_after`` seconds if it still runs, and answers one JSON line on
    stdout: ``{"pid", "signal", "code"}``. A forked process starts in a fraction of a second where a new
    Python process needs seconds to import MindSpore; what it does after the fork is what a new process does.
    """
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                 # whatever a run prints goes to stderr; stdout is the answers only
    print("ready", file=answers, flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.pop("RESUME_TEST_KILL", None)
                os.environ.update(request.get("env", {}))
                sys.argv = [os.path.abspath(__file__)] + request["argv"]
                main()
            except BaseException:  # pylint: disable=broad-except
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)  # pylint: disable=protected-access
        status = None
        if request.get("kill_after") is not None:
            deadline = time.monotonic() + request["kill_after"]
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                status = None
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
        if status is None:
            _, status = os.waitpid(pid, 0)
        answer = {"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
