"""``python -m reweight`` run to its end in a process forked from a warm interpreter.

A fresh interpreter spends 6-8 s of a CLI test's ~12 s importing torch, the compiler that
torch.optim's first use imports, Hydra and matplotlib, before the run does anything. The
suite starts a few hundred such runs, so each pytest worker starts this module once as a
server, which imports all that and waits on a Unix socket; a run asked of it is a fork of
the server that takes the caller's standard streams, working directory, environment and
arguments, re-seeds what a fresh interpreter would have seeded anew (Python's and numpy's
global generators), and runs ``reweight`` as ``python -m`` does (``runpy``, as
``__main__``). Its exit status is the process's own, a signal's death included.

Runs that a test signals, stops or starts in another way (torchrun, ``-X`` options, another
interpreter, a ``preexec_fn``, a variable read at start such as ``PYTHONPATH`` set otherwise)
take a fresh interpreter, as do all runs when ``REWEIGHT_TESTS_FRESH=1``: those cover the start
of a fresh process.
"""

from __future__ import annotations

import atexit
import gc
import json
import locale
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FRESH_ENV = "REWEIGHT_TESTS_FRESH"  # "1": every run takes a fresh interpreter
# variables read as an interpreter, the C library or torch start: a run whose values differ from
# the server's (a PYTHONPATH that shadows a package, malloc's limits) takes a fresh interpreter
_READ_AT_START = ("PYTHON", "MALLOC_", "OMP_", "MKL_", "KMP_", "LD_", "GLIBC_", "TORCH")
_HEADER = struct.Struct("!Q")  # the request's length, sent with the three descriptors


# -- the server ---------------------------------------------------------------------------------


def _warm_up() -> None:
    """Import what every run imports (nothing is computed: the server stays one thread), then
    freeze the heap."""
    import matplotlib
    import torch._dynamo  # noqa: F401  (torch.optim's first use imports it)

    matplotlib.use("Agg")  # as reweight.outputs.plots does before pyplot
    import matplotlib.pyplot

    import reweight.cli  # noqa: F401

    # what was imported stays out of every garbage collection: a child's collections (and its
    # pages, shared with the server until written) then see only the run's own objects
    gc.freeze()


def _serve(path: str) -> tuple[dict[str, Any], list[int]]:
    """Accept runs on ``path`` until the parent goes; returns (request, fds) in a forked child
    only. The server answers each connection with the child's pid, then its exit status."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        while os.getppid() == parent:
            for _ in selector.select(timeout=0.05):
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                pid = os.fork()
                if pid == 0:  # the run: nothing of the server's stays open in it
                    for other in (listener, conn, *children.values()):
                        other.close()
                    return request, fds
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                children[pid] = conn
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid)
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()
    sys.exit(0)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    while len(head) < _HEADER.size:
        head += conn.recv(_HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    body = b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), fds


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """The forked child takes the caller's stdin, stdout, stderr, cwd, environment, argv."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["-m", *request["args"]]  # runpy puts the module's file in argv[0]
    sys.path[0] = request["cwd"]  # as for python -m (here: this file's folder)
    import random

    import numpy as np

    random.seed()  # a fresh interpreter seeds these from the system's entropy
    np.random.seed()  # noqa: NPY002  (the legacy global generator itself)


# -- the client ---------------------------------------------------------------------------------


def can_run_warm(env: dict[str, str], server_env: dict[str, str]) -> bool:
    """Whether a run with ``env`` starts as it would in a fresh interpreter started with it:
    every variable read at start the same as the server's, and no ``REWEIGHT_TESTS_FRESH=1``."""
    return os.environ.get(FRESH_ENV) != "1" and _at_start(env) == _at_start(server_env)


def _at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_START)}


class _Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.folder = Path(tempfile.mkdtemp(prefix="reweight-warm-"))
        self.path = str(self.folder / "socket")
        self.log = self.folder / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, self.path],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the warm server did not start: {self.log.read_text()[-2000:]}")
        atexit.register(self.close)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_server: _Server | None = None


def _started(env: dict[str, str]) -> _Server:
    """The running server, (re)started if it is gone or was started with other start values."""
    global _server
    if _server is not None and _at_start(_server.env) != _at_start(env):
        _server.close()
        _server = None
    if _server is None or _server.proc.poll() is not None:
        _server = _Server(env)
    return _server


def run_warm(
    command: list[str],
    cwd: Path | None,
    env: dict[str, str],
    timeout: float,
    server_env: dict[str, str],
) -> subprocess.CompletedProcess:
    """``command`` (``python -m reweight ARGS``) as ``subprocess.run(..., capture_output=True,
    text=True, timeout=timeout)`` would give it, the run forked from the warm server (started
    with ``server_env`` on first use)."""
    server = _started(server_env)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdin = os.open(os.devnull, os.O_RDONLY)
    body = json.dumps({"args": command[3:], "cwd": str(cwd or os.getcwd()), "env": env}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.path)
        socket.send_fds(sock, [_HEADER.pack(len(body))], [stdin, out_w, err_w])
        sock.sendall(body)
        for fd in (stdin, out_w, err_w):
            os.close(fd)
        answers = sock.makefile("rb")
        line = answers.readline()
        if not line:
            raise RuntimeError(f"the warm server failed: {server.log.read_text()[-2000:]}")
        pid = int(line)
        out, err, finished = _drain(out_r, err_r, time.monotonic() + timeout)
        if not finished:
            os.kill(pid, signal.SIGKILL)
        code = int(answers.readline())
    stdout, stderr = _text(out), _text(err)
    if not finished:
        raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
    return subprocess.CompletedProcess(command, code, stdout, stderr)


def _drain(out_r: int, err_r: int, deadline: float) -> tuple[bytes, bytes, bool]:
    """Both pipes read to their ends (every process holding them gone), or to the deadline."""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(timeout=left):
                data = os.read(key.fd, 1 << 16)
                if data:
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
        finished = not selector.get_map()
    for fd in chunks:
        os.close(fd)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r]), finished


def _text(data: bytes) -> str:
    """As ``subprocess`` decodes a captured stream in text mode (universal newlines)."""
    text = data.decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    _warm_up()
    _request, _fds = _serve(sys.argv[1])
    _become(_request, _fds)
    del _request, _fds
    import runpy

    runpy.run_module("reweight", run_name="__main__", alter_sys=True)
