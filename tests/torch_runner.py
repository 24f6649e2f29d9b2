"""Run the PyTorch reference scripts (tests/*_reference*.py) without paying torch's import each time.

Every PEFT comparison runs its reference in a process of its own, apart from MindSpore: the two frameworks
never share one interpreter. Starting Python, torch, transformers and PEFT took 6-9 s per script on the
2-core CI machine, for about thirty scripts a suite. So each pytest process starts one server on first use
(``python tests/torch_runner.py``): it imports torch, transformers and PEFT once, then forks a child per
request. The child is the fresh process the script would have had (nothing carries from one script to the
next: globals, seeds, imported sibling modules and torch's thread pool all die with it; the server itself
never runs a torch operation, so the fork copies no started threads), runs the script as ``__main__`` with
its argv and working directory, and exits with the script's code; its stdout and stderr come back whole.

``run_reference(argv, timeout)`` is ``subprocess.run([sys.executable, *argv], capture_output=True,
text=True, timeout=timeout)`` for such a script: ``argv`` is ``[script, *args]`` or ``["-c", code, *args]``,
the result a ``subprocess.CompletedProcess``, a script running past ``timeout`` is killed and raises
``subprocess.TimeoutExpired``.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from typing import List, Optional

_SERVER: Optional[subprocess.Popen] = None
_LOCK = threading.Lock()
#: what the children import anyway (transformers loads its model modules lazily, at first use)
_PRELOAD = ("numpy", "torch", "safetensors.numpy", "transformers", "transformers.models.llama.modeling_llama",
            "transformers.models.qwen3.modeling_qwen3", "peft")


def _server() -> subprocess.Popen:
    global _SERVER
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
        ready = _SERVER.stdout.readline()
        if json.loads(ready or "{}").get("ready") is not True:
            raise RuntimeError(f"the torch reference server did not start (said {ready!r}; its stderr is above)")
    return _SERVER


def run_reference(argv: List[str], timeout: float, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run a reference script in a forked child of this process's torch server; see the module docstring."""
    with _LOCK:
        server = _server()
        server.stdin.write(json.dumps({"argv": [str(a) for a in argv], "cwd": cwd or os.getcwd(),
                                       "timeout": timeout}) + "\n")
        server.stdin.flush()
        # the server kills the child at `timeout`; the margin covers its reply
        ready, _, _ = select.select([server.stdout], [], [], timeout + 60)
        if not ready:
            server.kill()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch reference server ended (exit code {server.wait()}) without answering "
                               f"for {argv[:1]}; its stderr is above")
    reply = json.loads(line)
    if reply["returncode"] == "timeout":
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, reply["stdout"], reply["stderr"])
    return subprocess.CompletedProcess([sys.executable, *argv], reply["returncode"], reply["stdout"],
                                       reply["stderr"])


def _run_child(request: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become the script's process, run it, exit with its code (never returns)."""
    import runpy
    import signal
    import traceback
    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(handle, fd)
            os.close(handle)
        sys.stdin = open(os.devnull, encoding="utf-8")
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(max(1, int(request["timeout"])))
        os.chdir(request["cwd"])
        argv = request["argv"]
        try:
            if argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                sys.path.insert(0, "")
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, (int, type(None))):
                print(done.code, file=sys.stderr)
        except BaseException:                     # what Python prints for an uncaught exception, exit code 1
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001  (a closed stream: nothing more to keep)
                pass
        os._exit(code)


def _serve() -> None:
    import importlib
    import tempfile
    import time
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)                                  # a stray print of an import cannot corrupt the replies
    for name in _PRELOAD:
        importlib.import_module(name)
    protocol.write(json.dumps({"ready": True}) + "\n")
    scratch = tempfile.mkdtemp(prefix="torch_runner_")
    out_path, err_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
    for line in sys.stdin:                         # the client's end closes with the pytest process
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_child(request, out_path, err_path)
        started, killed = time.monotonic(), False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - started > request["timeout"] + 5:    # the child's alarm did not end it
                os.kill(pid, 9)
                killed = True
            time.sleep(0.02)
        if killed or (os.WIFSIGNALED(status) and os.WTERMSIG(status) == 14):
            returncode = "timeout"
        else:
            returncode = os.waitstatus_to_exitcode(status)
        reply = {"returncode": returncode}
        for key, path in (("stdout", out_path), ("stderr", err_path)):
            with open(path, encoding="utf-8", errors="replace") as handle:
                reply[key] = handle.read()
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    _serve()
