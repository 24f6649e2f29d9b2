"""The progress line and the loss plot of ``pet-hooks run``: the losses against the train step's own
outputs, the PNG decoded here, the command under a terminal (a pty), a pipe and ``--quiet``."""
from __future__ import annotations

import importlib.util
import io
import os
import pty
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Callback, Model

from pet_hooks.cli.progress import (CURVE_RGB, PLOT_MARGINS, PLOT_SIZE, TrainingMonitor, write_loss_plot,
                                    write_png_plot)
from samples.data import lm_batches
from samples.tiny_gpt import LMLoss, build
from tests.conftest import ROOT

CONFIG = os.path.join(ROOT, "samples", "configs", "lora.yaml")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class OwnRecord(Callback):
    """The reference: the loss each step returned, read here without pet_hooks."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_step_end(self, run_context):
        self.losses.append(float(run_context.original_args().net_outputs.asnumpy()))


def _model_and_data(steps):
    net = build(seed=0, hidden_size=32, seq_length=16)
    batches = lm_batches(seq_length=16, batch_size=4, seed=0)
    data = ds.GeneratorDataset([next(batches) for _ in range(steps)], ["input_ids", "labels"], shuffle=False)
    return Model(net, LMLoss(), nn.Adam(net.trainable_params(), 1e-2)), data


def test_monitor_records_each_step_and_draws_the_line(mode):
    model, data = _model_and_data(5)
    terminal = FakeTerminal()
    monitor = TrainingMonitor(show=True, stream=terminal, min_interval=0.0)
    original = Model.__dict__["train"]
    own = OwnRecord()
    with monitor.installed():
        model.train(1, data, callbacks=[own])
        model.train(1, data, callbacks=own)                    # a second run counts on
    assert Model.__dict__["train"] is original
    assert [s for s, _ in monitor.losses] == list(range(1, 11))
    np.testing.assert_allclose([l for _, l in monitor.losses], own.losses, rtol=1e-6)
    assert own.losses[-1] < own.losses[0]
    text = terminal.getvalue()
    assert f"\rpet-hooks: step 5/5  loss {own.losses[4]:.4f}" in text
    assert re.search(rf"pet-hooks: step 10/10  loss {own.losses[9]:.4f}  [0-9.]+ steps/s", text)
    assert text.endswith("\n") and "\r\x1b[K" in text               # cleared before each step, ended after

    quiet = TrainingMonitor(show=False, stream=FakeTerminal())
    with quiet.installed():
        model.train(1, data)
    assert len(quiet.losses) == 5 and quiet.stream.getvalue() == ""
    model.train(1, data)                                        # not installed: nothing recorded
    assert len(quiet.losses) == 5


def _decode_png(blob: bytes) -> np.ndarray:
    """A minimal PNG reader for 8-bit RGB, filter 0 (what the built-in writer produces)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(blob):
        length, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        data = blob[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + data)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, colour = header[:4]
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_builtin_png_puts_every_point_where_it_belongs(tmp_path):
    losses = [5.0, 4.2, 4.6, 3.1, 3.3, 2.0]
    points = [(i + 1, l) for i, l in enumerate(losses)]
    write_png_plot(points, str(tmp_path / "loss.png"))
    pixels = _decode_png((tmp_path / "loss.png").read_bytes())
    width, height = PLOT_SIZE
    left, right, top, bottom = PLOT_MARGINS
    assert pixels.shape == (height, width, 3)
    curve = (pixels == np.array(CURVE_RGB, np.uint8)).all(-1)
    for step, loss in points:   # step 1 at the left edge, step 6 at the right; loss 5 at the top, 2 at the bottom
        x = round(left + (step - 1) / 5 * (width - left - right - 1))
        y = round(top + (5.0 - loss) / 3.0 * (height - top - bottom - 1))
        assert curve[y, x], (step, loss, x, y)
    assert not curve[:, :left].any() and not curve[:top].any()  # nothing drawn outside the plot area


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_matplotlib_png(tmp_path):
    write_loss_plot([(1, 3.0), (2, 2.5), (3, 2.0)], str(tmp_path / "m.png"), use_matplotlib=True)
    blob = (tmp_path / "m.png").read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", blob[16:24]) == (640, 400)


def test_plot_needs_png_and_points(tmp_path):
    with pytest.raises(ValueError, match="ending in .png"):
        write_loss_plot([(1, 1.0)], str(tmp_path / "loss.jpg"))
    with pytest.raises(ValueError, match="no loss was recorded"):
        write_loss_plot([], str(tmp_path / "loss.png"))


# ----------------------------------------------------------------------------- the command
def _run(args, terminal: bool):
    command = [sys.executable, "-m", "pet_hooks", "run", *args]
    if not terminal:
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        return out.returncode, out.stdout, out.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdout=slave, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    stderr = proc.stderr.read().decode()
    return proc.wait(timeout=600), b"".join(chunks).decode(errors="replace"), stderr


@pytest.mark.parametrize("mode", [0, 1])
def test_run_shows_progress_on_a_terminal_and_writes_the_plot(tmp_path, mode):
    plot = tmp_path / "loss.png"
    code, out, err = _run(["--config", CONFIG, "--plot", str(plot), "samples/legacy_train.py", "--steps", "8",
                           "--mode", str(mode), "--log-every", "1"], terminal=True)
    assert code == 0, err[-2000:]
    logged = [float(v) for v in re.findall(r"loss is ([0-9.]+)", out)]     # the script's own LossMonitor
    assert len(logged) == 8
    assert f"pet-hooks: step 8/8  loss {logged[-1]:.4f}" in out and "steps/s" in out
    assert "loss curve of 8 steps written to" in err
    pixels = _decode_png(plot.read_bytes()) if importlib.util.find_spec("matplotlib") is None else None
    if pixels is not None:  # the built-in writer: the highest loss sits on the top edge of the plot
        curve = (pixels == np.array(CURVE_RGB, np.uint8)).all(-1)
        step = 1 + int(np.argmax(logged))
        x = round(PLOT_MARGINS[0] + (step - 1) / 7 * (PLOT_SIZE[0] - PLOT_MARGINS[0] - PLOT_MARGINS[1] - 1))
        assert curve[PLOT_MARGINS[2], x]
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_is_quiet_with_quiet_or_without_a_terminal(tmp_path):
    code, out, err = _run(["--config", CONFIG, "--quiet", "samples/legacy_train.py", "--steps", "3", "--log-every", "1"],
                          terminal=True)
    assert code == 0 and "loss is" in out and "pet-hooks: step" not in out, err[-2000:]
    code, out, err = _run(["--config", CONFIG, "--plot", str(tmp_path / "p.png"), "samples/legacy_train.py",
                           "--steps", "3"], terminal=False)
    assert code == 0 and "pet-hooks: step" not in out + err and (tmp_path / "p.png").is_file(), err[-2000:]


def test_plot_without_model_train_and_a_bad_name(tmp_path):
    script = tmp_path / "no_train.py"
    script.write_text("print('nothing to train')\n")
    code, _, err = _run(["--config", CONFIG, "--plot", str(tmp_path / "p.png"), str(script)], terminal=False)
    assert code == 1 and "no loss was recorded" in err and not (tmp_path / "p.png").exists()
    code, _, err = _run(["--config", CONFIG, "--plot", "loss.svg", str(script)], terminal=False)
    lines = [l for l in err.splitlines() if l.startswith("pet-hooks:")]
    assert code == 2 and len(lines) == 1 and "ending in .png" in lines[0]
