"""Faults: exceptions, interrupts and SIGKILL while pet_hooks is at work; nothing is damaged or lost.

- an exception, KeyboardInterrupt or SystemExit inside ``enable()`` or a script under
  ``pet-hooks run`` restores every patch (and the launcher's sys.argv, sys.path and
  environment) and passes the exit status through;
- a process SIGKILLed while ``save_adapter`` writes leaves the previous adapter complete and
  loadable (at fixed points through a hook, and at random moments);
- ``load_adapter`` failing half-way through writing leaves the net as it was;
- after training through each front door, a hash of every base parameter is what it was.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import mindspore as ms
import mindspore.dataset as ds
from mindspore import Tensor, nn
from mindspore.train import Model

import pet_hooks
from pet_hooks.doors import launcher
from pet_hooks.doors import context
from pet_hooks.utils.patching import is_patched
from samples.data import lm_batches
from samples.tiny_gpt import GPTWithLoss, LMLoss, build
from tests.conftest import GPT_LORA, ROOT, SMALL, snapshot
from tests.nets import TwoDense

CFG = GPT_LORA
WIDE = 1024          # the saver's layers: 2 x 2 x (128 x 1024) float32 deltas, 2 MiB on disk
PATCHED = [(nn.Cell, "__init__"), (nn.Optimizer, "__init__")]


# PyNative ops run synchronously here (tests/conftest.py: synchronous_pynative)
pytestmark = pytest.mark.usefixtures("synchronous_pynative")


def originals():
    return [owner.__dict__.get(name) for owner, name in PATCHED]


def assert_unpatched(before):
    assert all(now is then for now, then in zip(originals(), before))
    assert context.active_session() is None


def batches(steps, seed=1):
    source = lm_batches(seq_length=SMALL["seq_length"], batch_size=4, seed=seed)
    return [next(source) for _ in range(steps)]


# ----------------------------------------------------------------------------- enable()
@pytest.mark.parametrize("exc", [RuntimeError("the body broke"), KeyboardInterrupt(), SystemExit(3)],
                         ids=["exception", "interrupt", "exit"])
def test_enable_restores_every_patch_and_reraises(mode, exc):
    before = originals()
    with pytest.raises(type(exc)) as info:
        with pet_hooks.enable(CFG):
            net = build(seed=0, **SMALL)
            step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
            step(*map(Tensor, batches(1)[0]))           # the model was adapted and trained
            raise exc
    assert info.value is exc                               # the same exception, status and all
    assert_unpatched(before)
    after = build(seed=0, **SMALL)
    nn.Adam(after.trainable_params(), 1e-2)
    assert pet_hooks.surgery.has_pet(net) and not pet_hooks.surgery.has_pet(after)
    with pet_hooks.enable(CFG):                            # and it can be entered again
        assert all(is_patched(now) for now in originals())
    assert_unpatched(before)


# ----------------------------------------------------------------------------- pet-hooks run
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import mindspore as ms
    from mindspore import Tensor, nn
    sys.path.insert(0, {root!r})
    from samples.data import lm_batches
    from samples.tiny_gpt import GPTWithLoss, build
    ms.set_context(mode=int(sys.argv[1]))
    net = build(seed=0, num_layers=2, hidden_size=16, num_heads=2, seq_length=8)
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
    data = lm_batches(seq_length=8, batch_size=4, seed=1)
    for _ in range(3):
        step(*map(Tensor, next(data)))
    how = sys.argv[2]
    if how == "exception":
        raise RuntimeError("the script broke")
    if how == "interrupt":
        raise KeyboardInterrupt
    sys.exit(int(how))
""")
# (A real SIGINT is not among them: MindSpore 2.9 installs its own C-level handler that ends the
# process with SIGTERM, so no Python code, pet_hooks' or the script's, runs after it.)
# Each ending once, the interrupt in both modes.
ENDINGS = [("exception", 1, 0), ("interrupt", 130, 1), ("interrupt", 130, 0), ("7", 7, 1)]


@pytest.mark.parametrize("how,code,mode", ENDINGS, ids=[f"{e[0]}-{'graph' if e[2] == 0 else 'pynative'}"
                                                        for e in ENDINGS])
def test_launcher_restores_everything_and_passes_the_status(tmp_path, how, code, mode):
    ms.set_context(mode=mode)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=ROOT))
    before, argv, path, env = originals(), sys.argv[:], sys.path[:], dict(os.environ)
    result = launcher.run_script(str(script), [str(mode), how], pet_hooks.load_config(CFG), str(tmp_path / "ad"))
    assert result == code
    assert_unpatched(before)
    assert (sys.argv, sys.path, dict(os.environ)) == (argv, path, env)
    # Nothing lost: the adapter trained before the failure was saved and loads.
    fresh = build(seed=0, **SMALL)
    pet_hooks.load_adapter(fresh, tmp_path / "ad")
    assert any(p.asnumpy().any() for p in pet_hooks.delta_parameters(fresh) if p.name.endswith("lora_B"))


def test_cli_passes_the_status_through(tmp_path):
    # The CLI's part is passing run_script's status on as the process's; the script need not train for that
    # (a script trained, then interrupted: run_script in both modes, the test above).
    script = tmp_path / "train.py"
    script.write_text("raise KeyboardInterrupt\n")
    run = [sys.executable, "-m", "pet_hooks", "run", "--config", os.path.join(ROOT, "samples", "configs", "lora.yaml")]
    out = subprocess.run(run + [str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 130 and "KeyboardInterrupt" in out.stderr and "pet-hooks: error" not in out.stderr
    out = subprocess.run(run + ["--", "sh", "-c", "exit 4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr


# ----------------------------------------------------------------------------- SIGKILL while saving
SAVER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn
    sys.path.insert(0, {root!r})
    import pet_hooks
    from pet_hooks.io import adapter_io
    from tests.nets import TwoDense

    directory, stall = sys.argv[1], sys.argv[2]
    net = pet_hooks.apply(TwoDense("", din=WIDE, dh=WIDE, dout=WIDE), {{"pet_type": "lora", "lora_rank": 128, "target_modules": ["dense1", "dense2"]}})

    def save(version):
        for param in pet_hooks.delta_parameters(net):
            param.set_data(Tensor(np.full(param.shape, version, np.float32)))
        pet_hooks.save_adapter(net, directory)
        print("saved", version, flush=True)

    def hang():
        print("stalled", flush=True)
        time.sleep(600)

    save(1)
    if stall == "loop":                  # save again and again until killed
        version = 2
        while True:
            save(version)
            version += 1
    fsyncs = [0]
    real_fsync, real_fdopen = os.fsync, os.fdopen

    def fsync(fd):                       # stall after the n-th file is written and flushed
        fsyncs[0] += 1
        if stall == "fsync%d" % fsyncs[0]:
            hang()
        real_fsync(fd)

    class HalfWriter:                    # write half the bytes, flush them, stall
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)
        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            hang()

    adapter_io.os.fsync = fsync
    if stall == "midwrite":
        adapter_io.os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
    save(2)
""")


def start_saver(tmp_path, stall):
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=ROOT).replace("WIDE", str(WIDE)))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "adapter"), stall],
                            stdout=subprocess.PIPE, text=True)


def wait_for(proc, line):
    for got in proc.stdout:
        if got.strip() == line:
            return
    pytest.fail(f"the saver ended before printing {line!r} (exit {proc.wait()})")


def loaded_versions(tmp_path) -> set:
    """Load the adapter into a fresh net; the set of values its deltas hold."""
    fresh = TwoDense("", din=WIDE, dh=WIDE, dout=WIDE)
    pet_hooks.load_adapter(fresh, tmp_path / "adapter")
    return {float(v) for p in pet_hooks.delta_parameters(fresh) for v in np.unique(p.asnumpy())}


@pytest.mark.parametrize("stall,expected", [("midwrite", {1.0}), ("fsync1", {1.0}), ("fsync2", {2.0})],
                         ids=["mid-write of the weights", "weights written, not yet replaced",
                              "weights replaced, config not yet"])
def test_sigkill_while_saving_leaves_a_complete_adapter(tmp_path, stall, expected):
    proc = start_saver(tmp_path, stall)
    try:
        wait_for(proc, "saved 1")
        wait_for(proc, "stalled")
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert loaded_versions(tmp_path) == expected


@pytest.mark.parametrize("delay", [0.0, 0.013, 0.047])
def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path, delay):
    proc = start_saver(tmp_path, "loop")
    try:
        wait_for(proc, "saved 2")
        time.sleep(delay)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    versions = loaded_versions(tmp_path)
    assert len(versions) == 1 and min(versions) >= 2          # one whole version, never a mix


# ----------------------------------------------------------------------------- load_adapter half-way
@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A trained adapter's folder, made once: a file, the same whichever mode made it (PyNative here: no
    train step to compile); every case below loads it in its own mode."""
    before = ms.get_context("mode")
    ms.set_context(mode=1)
    try:
        trained = pet_hooks.apply(build(seed=0, **SMALL), CFG)
        step = nn.TrainOneStepCell(GPTWithLoss(trained), nn.Adam(trained.trainable_params(), 1e-2))
        for ids, labels in batches(2):
            step(Tensor(ids), Tensor(labels))
        folder = tmp_path_factory.mktemp("trained_adapter")
        pet_hooks.save_adapter(trained, folder)
    finally:
        ms.set_context(mode=before)
    return folder


@pytest.mark.parametrize("already_applied", [False, True], ids=["fresh net", "net with the same PET"])
def test_load_adapter_failing_half_way_leaves_the_net_as_it_was(mode, trained_adapter, monkeypatch,
                                                                already_applied):
    tmp_path = trained_adapter
    net = build(seed=0, **SMALL)
    if already_applied:
        pet_hooks.apply(net, {**CFG, "seed": 5})
    x = Tensor(batches(1, seed=9)[0][0])
    out = net(x).asnumpy()
    values = snapshot(net)
    classes = {name: type(cell) for name, cell in net.cells_and_names()}
    flags = {p.name: p.requires_grad for p in net.get_parameters()}

    calls = [0]
    real = pet_hooks.utils.ms_compat.write_values              # every write of a value into the net

    def flaky(param, values):                             # the third write into the net fails
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt("interrupted while loading")
        return real(param, values)

    monkeypatch.setattr(pet_hooks.utils.ms_compat, "write_values", flaky)
    with pytest.raises(KeyboardInterrupt):
        pet_hooks.load_adapter(net, tmp_path)
    monkeypatch.undo()
    assert calls[0] > 3                                   # it failed after writing, and put values back
    assert {name: type(cell) for name, cell in net.cells_and_names()} == classes
    assert {p.name: p.requires_grad for p in net.get_parameters()} == flags
    assert snapshot(net).keys() == values.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(net.parameters_dict()[name].asnumpy(), value, err_msg=name)
    np.testing.assert_array_equal(net(x).asnumpy(), out)
    assert pet_hooks.surgery.has_pet(net) == already_applied


# ----------------------------------------------------------------------------- base weights untouched
def base_hash(net, names) -> str:
    sha = hashlib.sha256()
    params = net.parameters_dict()
    for name in sorted(names):
        sha.update(name.encode() + params[name].asnumpy().tobytes())
    return sha.hexdigest()


def train_explicit(cfg, data):
    net = pet_hooks.apply(build(seed=0, **SMALL), cfg)
    step = nn.TrainOneStepCell(GPTWithLoss(net), nn.Adam(net.trainable_params(), 1e-2))
    for ids, labels in data:
        step(Tensor(ids), Tensor(labels))
    return net


def train_callback(cfg, data):
    net = build(seed=0, **SMALL)
    model = Model(net, LMLoss(), nn.Momentum(net.trainable_params(), 0.1, 0.9))
    model.train(1, ds.GeneratorDataset(data, ["ids", "labels"], shuffle=False),
                callbacks=[pet_hooks.PetCallback(cfg)])
    return net


def train_enable(cfg, data):
    with pet_hooks.enable(cfg):
        net = build(seed=0, **SMALL)
        step = nn.TrainOneStepCell(GPTWithLoss(net), nn.AdamWeightDecay(net.get_parameters(), 1e-2))
    for ids, labels in data:
        step(Tensor(ids), Tensor(labels))
    return net


PTUNING2 = {"pet_type": "ptuning2", "pre_seq_len": 3}
DOORS = [(door, CFG, mode) for door in (train_explicit, train_callback, train_enable) for mode in (0, 1)] + [
    (train_explicit, PTUNING2, 1), (train_enable, PTUNING2, 0)]


@pytest.mark.parametrize("front_door,cfg,mode", DOORS, ids=[
    f"{door.__name__[6:]}-{cfg['pet_type']}-{'graph' if mode == 0 else 'pynative'}" for door, cfg, mode in DOORS])
def test_training_leaves_every_base_parameter_bit_for_bit(front_door, cfg, mode):
    ms.set_context(mode=mode)
    reference = build(seed=0, **SMALL)                    # the untrained model, never given PET
    names = [p.name for p in reference.get_parameters()]
    net = front_door(cfg, batches(3))
    assert base_hash(net, names) == base_hash(reference, names)
    deltas = pet_hooks.delta_parameters(net)
    assert deltas and all(p.name not in names for p in deltas)
    # The deltas' init is seeded (by mindspore.set_seed here): the same config on a fresh model
    # gives the starting values, and training moved them.
    initial = {p.name: p.asnumpy() for p in pet_hooks.delta_parameters(pet_hooks.apply(build(seed=0, **SMALL), cfg))}
    assert sorted(initial) == sorted(p.name for p in deltas)
    assert any(not np.array_equal(p.asnumpy(), initial[p.name]) for p in deltas)
