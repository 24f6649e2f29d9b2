"""Progress and pictures for ``pet-hooks run``: a live step/loss/speed line, and the loss curve as a PNG.

    monitor = TrainingMonitor(show=sys.stdout.isatty())
    with monitor.installed():              # every Model.train inside gets the monitor's callback
        model.train(1, dataset)            #   pet-hooks: step 12/60  loss 4.7123  18.3 steps/s
    write_loss_plot(monitor.losses, "loss.png")

``installed()`` sees every ``mindspore.train.Model.train`` call (``pet_hooks.doors.train_calls``, the
one wrap of it, taken off on exit) so that its ``callbacks`` get one more: a :class:`ProgressCallback` that records the loss of
every step and, when ``show`` is true, redraws one line (``\\r``) on the stream. It clears that
line when the next step begins, so whatever the script prints during a step (a
``LossMonitor``) starts at the left margin. MindFormers' Trainer trains through
``Model.train`` too.

``write_loss_plot`` uses matplotlib when it is installed (the ``plot`` extra) and otherwise
draws the curve itself into a small PNG (frame, grid lines and the curve; no text), written
with ``zlib`` alone.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
import time
import zlib
from typing import Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np
from mindspore.train import Callback

from ..utils.files import write_bytes
from ..doors.train_calls import add_handler, callbacks_of

__all__ = ["TrainingMonitor", "ProgressCallback", "write_loss_plot", "write_png_plot", "loss_value",
           "PLOT_SIZE", "PLOT_MARGINS", "CURVE_RGB"]


def loss_value(outputs) -> Optional[float]:
    """The loss as a float from a train step's outputs (a Tensor, or a tuple whose first item is it)."""
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0] if outputs else None
    if outputs is None:
        return None
    try:
        value = np.asarray(outputs.asnumpy() if hasattr(outputs, "asnumpy") else outputs, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(value.mean()) if value.size else None


class ProgressCallback(Callback):
    """Records ``(step, loss)`` into its monitor and draws the progress line."""

    def __init__(self, monitor: "TrainingMonitor"):
        super().__init__()
        self.monitor = monitor
        self._first_end: Optional[float] = None
        self._first_step = 0

    def on_train_begin(self, run_context):
        self._first_end = None

    def on_train_step_begin(self, run_context):
        self.monitor.clear_line()

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        now = time.perf_counter()
        step = int(getattr(params, "cur_step_num", 0) or 0)
        total = None
        batches, epochs = getattr(params, "batch_num", None), getattr(params, "epoch_num", None)
        if isinstance(batches, int) and isinstance(epochs, int):
            total = batches * epochs
        if self._first_end is None:  # the first step includes the graph compile: speed counts from here
            self._first_end, self._first_step = now, step
            rate = None
        else:
            rate = (step - self._first_step) / max(now - self._first_end, 1e-9)
        self.monitor.record(step, loss_value(getattr(params, "net_outputs", None)), total, rate)

    def on_train_end(self, run_context):
        self.monitor.end_line()


class TrainingMonitor:
    """The losses of every ``Model.train`` run while installed, and (``show``) a live line on ``stream``."""

    def __init__(self, show: bool = False, stream: Optional[TextIO] = None, min_interval: float = 0.1):
        self.show = show
        self.stream = stream
        self.min_interval = min_interval
        self.losses: List[Tuple[int, float]] = []   # (global step from 1, loss)
        self._offset = 0        # steps of earlier Model.train runs
        self._last_local = 0
        self._drawn = False
        self._last_draw = 0.0

    # -- what the callback calls ---------------------------------------------------------------
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def record(self, step: int, loss: Optional[float], total: Optional[int], rate: Optional[float]) -> None:
        if step < self._last_local:  # a new Model.train run counts on from the last one
            self._offset += self._last_local
        self._last_local = step
        if loss is not None and math.isfinite(loss):
            self.losses.append((self._offset + step, loss))
        now = time.perf_counter()
        if not self.show or (now - self._last_draw < self.min_interval and step != total):
            return
        self._last_draw = now
        line = (f"pet-hooks: step {self._offset + step}" + (f"/{self._offset + total}" if total else "")
                + (f"  loss {loss:.4f}" if loss is not None else "")
                + (f"  {rate:.1f} steps/s" if rate is not None else ""))
        self._out().write("\r" + line + "\x1b[K")
        self._out().flush()
        self._drawn = True

    def clear_line(self) -> None:
        if self._drawn:
            self._out().write("\r\x1b[K")
            self._out().flush()
            self._drawn = False

    def end_line(self) -> None:
        if self._drawn:
            self._out().write("\n")
            self._out().flush()
            self._drawn = False

    # -- the patch -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator["TrainingMonitor"]:
        """Inside the block every ``Model.train`` call gets a :class:`ProgressCallback` as well."""
        monitor = self

        def with_progress(model, bound, proceed):
            bound.arguments["callbacks"] = callbacks_of(bound) + [ProgressCallback(monitor)]
            return proceed()

        remove = add_handler(with_progress)
        try:
            yield self
        finally:
            remove()
            self.end_line()


# ----------------------------------------------------------------------------- the picture
PLOT_SIZE = (640, 400)              # width, height of the built-in PNG
PLOT_MARGINS = (64, 12, 12, 28)     # left, right, top, bottom: the plot area lies inside
CURVE_RGB = (31, 119, 180)
_GRID_RGB, _FRAME_RGB = (225, 225, 225), (0, 0, 0)
# A 3x5 font for the axis labels (the loss range at the left, the step range below).
_GLYPHS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
           "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
           "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
           "e": "010101111100011", "+": "000010111010000"}


def _text(pixels: np.ndarray, x: int, y: int, text: str, scale: int = 2) -> None:
    """Draw ``text`` (digits, '.', '-', '+', 'e') with its top-left corner at (x, y)."""
    for char in text:
        bits = _GLYPHS.get(char, "0" * 15)
        for index, bit in enumerate(bits):
            if bit == "1":
                row, col = divmod(index, 3)
                pixels[y + row * scale:y + (row + 1) * scale, x + col * scale:x + (col + 1) * scale] = _FRAME_RGB
        x += 4 * scale


def _png_bytes(pixels: np.ndarray) -> bytes:
    """(height, width, 3) uint8 -> a PNG file (8-bit RGB, no filter)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def plot_point(step: float, loss: float, steps: Tuple[float, float], losses: Tuple[float, float]) -> Tuple[int, int]:
    """Pixel (x, y) of a point in the built-in plot: steps left to right, the highest loss at the top."""
    width, height = PLOT_SIZE
    left, right, top, bottom = PLOT_MARGINS
    (s0, s1), (l0, l1) = steps, losses
    x = left + (step - s0) / ((s1 - s0) or 1.0) * (width - left - right - 1)
    y = top + (l1 - loss) / ((l1 - l0) or 1.0) * (height - top - bottom - 1)
    return int(round(x)), int(round(y))


def write_png_plot(points: Sequence[Tuple[float, float]], path: str) -> str:
    """Draw ``(step, loss)`` points as a line in a PNG of :data:`PLOT_SIZE`, without matplotlib."""
    width, height = PLOT_SIZE
    left, right, top, bottom = PLOT_MARGINS
    pixels = np.full((height, width, 3), 255, np.uint8)
    for i in range(1, 5):                                      # grid
        pixels[top + i * (height - top - bottom - 1) // 5, left:width - right] = _GRID_RGB
    pixels[top, left:width - right] = pixels[height - bottom - 1, left:width - right] = _FRAME_RGB
    pixels[top:height - bottom, left] = pixels[top:height - bottom, width - right - 1] = _FRAME_RGB
    if points:
        steps = (min(p[0] for p in points), max(p[0] for p in points))
        losses = (min(p[1] for p in points), max(p[1] for p in points))
        _text(pixels, 4, top, f"{losses[1]:.4g}")
        _text(pixels, 4, height - bottom - 10, f"{losses[0]:.4g}")
        _text(pixels, left, height - bottom + 6, f"{steps[0]:g}")
        last = f"{steps[1]:g}"
        _text(pixels, width - right - 8 * len(last), height - bottom + 6, last)
        xy = [plot_point(s, l, steps, losses) for s, l in points]
        for (x0, y0), (x1, y1) in zip(xy, xy[1:] or xy):
            count = max(abs(x1 - x0), abs(y1 - y0), 1)
            for t in range(count + 1):
                x, y = x0 + (x1 - x0) * t // count, y0 + (y1 - y0) * t // count
                pixels[y:min(y + 2, height - bottom), x:min(x + 2, width - right)] = CURVE_RGB  # 2 px thick
    _write_atomic(path, _png_bytes(pixels))
    return path


def _write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    write_bytes(os.path.abspath(path), data)


def write_loss_plot(points: Sequence[Tuple[float, float]], path: str, title: str = "loss",
                    use_matplotlib: Optional[bool] = None) -> str:
    """Write the loss curve to ``path`` (PNG): matplotlib when importable, else the built-in writer.

    Raises:
        ValueError: ``path`` does not end in ``.png``, or there are no points to draw.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a file name ending in .png, not {path!r}")
    if not points:
        raise ValueError("no loss was recorded (the script did not train through Model.train), so there is no plot")
    if use_matplotlib is None:
        import importlib.util
        use_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if not use_matplotlib:
        return write_png_plot(points, path)
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    axes = figure.add_subplot()
    axes.plot([p[0] for p in points], [p[1] for p in points], color="#1f77b4")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    from io import BytesIO
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomic(path, buffer.getvalue())
    return path
