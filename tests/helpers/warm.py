"""``python -m reweight`` in a process forked from a warm interpreter.

A fresh interpreter spends 6-8 s of a CLI test's ~12 s importing torch, the compiler that
torch.optim's first use imports, Hydra and matplotlib, before the run does anything. The
suite starts a few hundred such runs, so each pytest worker starts this module once as a
server, which imports all that, freezes it out of garbage collection and waits on a Unix
socket; a run asked of it is a fork of the server that takes the caller's standard streams,
working directory, environment and arguments, re-seeds what a fresh interpreter would have
seeded anew (Python's and numpy's global generators), and runs ``reweight`` as ``python -m``
does (``runpy``, as ``__main__``). Its exit status is the process's own, a signal's death
included; the caller gets it as ``subprocess.run`` or ``subprocess.Popen`` would give it
(``run_warm``, ``WarmProcess``), and may signal the run by its pid.

Runs started in another way (torchrun, ``-X`` options, another interpreter, a
``preexec_fn`` or a session of their own, a variable read at start such as ``PYTHONPATH`` set
otherwise) take a fresh interpreter, as do all runs when ``REWEIGHT_TESTS_FRESH=1``: those
cover the start of a fresh process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import io
import json
import locale
import os
import select
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
from typing import IO, Any

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


Target = int | IO[Any]  # subprocess.PIPE, subprocess.DEVNULL or an open file


class WarmProcess:
    """What ``subprocess.Popen(command, stdout=..., stderr=..., text=True)`` gives for
    ``python -m reweight ARGS``, the process forked from the warm server (started with
    ``server_env`` on first use): ``pid``, ``args``, ``returncode``, ``stdout`` and ``stderr``
    (text streams where they are pipes), ``poll``, ``wait``, ``communicate``, ``send_signal``,
    ``terminate``, ``kill``, a context manager. Its exit status comes from the server, which
    reaps it (a signal's death is minus the signal, as for Popen)."""

    def __init__(
        self,
        command: list[str],
        cwd: Path | None,
        env: dict[str, str],
        server_env: dict[str, str],
        stdout: Target = subprocess.PIPE,
        stderr: Target = subprocess.PIPE,
    ) -> None:
        self._server = _started(server_env)
        self.args, self.returncode = command, None
        self._received = b""  # the server's lines not yet read
        self._output: dict[str, list[bytes]] = {"stdout": [], "stderr": []}  # communicate's
        ends = [_end(subprocess.DEVNULL, "r"), _end(stdout, "w"), _end(stderr, "w")]
        body = json.dumps({"args": command[3:], "cwd": str(cwd or os.getcwd()), "env": env})
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self._server.path)
            socket.send_fds(self._sock, [_HEADER.pack(len(body))], [fd for fd, _ in ends])
            self._sock.sendall(body.encode())
        finally:
            for fd, _ in ends:
                os.close(fd)
        self.pid = int(self._line(None))
        self.stdout, self.stderr = (_stream(ours) for _, ours in ends[1:])

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line (this run's pid, then its exit status), or None when none
        came within ``timeout`` seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._received:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._sock], [], [], left)[0]:
                return None
            data = self._sock.recv(64)
            if not data:
                raise RuntimeError(
                    f"the warm server failed: {self._server.log.read_text()[-2000:]}"
                )
            self._received += data
        line, self._received = self._received.split(b"\n", 1)
        return line

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
            self._sock.close()
        return self.returncode

    def poll(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # not yet reaped: the pid is still the run's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """As Popen's: the pipes read to their ends from their descriptors (what was read
        through ``stdout``/``stderr`` before is not in it), then the exit status awaited;
        called again after ``TimeoutExpired``, it goes on where it stopped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pipes = {
            name: stream
            for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
            if stream is not None and not stream.closed
        }
        with selectors.DefaultSelector() as selector:
            for name, stream in pipes.items():
                selector.register(stream.fileno(), selectors.EVENT_READ, name)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout, *self._decoded())
                for key, _ in selector.select(timeout=left):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        self._output[key.data].append(data)
                    else:
                        selector.unregister(key.fd)
                        pipes[key.data].close()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        return self._decoded()

    def _decoded(self) -> tuple[str | None, str | None]:
        streams = (self.stdout, self.stderr)
        return tuple(  # type: ignore[return-value]
            None if stream is None else _text(b"".join(self._output[name]))
            for name, stream in zip(("stdout", "stderr"), streams, strict=True)
        )

    def __enter__(self) -> WarmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def _end(target: Target, mode: str) -> tuple[int, int | None]:
    """(the run's descriptor, ours to read where ``target`` is a pipe): a pipe's write end,
    the null device, or a duplicate of an open file's descriptor."""
    if target == subprocess.PIPE:
        ours, theirs = os.pipe()
        return theirs, ours
    if target == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY), None
    return os.dup(target if isinstance(target, int) else target.fileno()), None


def _stream(fd: int | None) -> IO[str] | None:
    """A pipe's read end as Popen gives it in text mode (universal newlines)."""
    if fd is None:
        return None
    return io.TextIOWrapper(open(fd, "rb"), encoding=locale.getpreferredencoding(False))


def run_warm(
    command: list[str],
    cwd: Path | None,
    env: dict[str, str],
    timeout: float,
    server_env: dict[str, str],
) -> subprocess.CompletedProcess:
    """``command`` (``python -m reweight ARGS``) as ``subprocess.run(..., capture_output=True,
    text=True, timeout=timeout)`` would give it, the run a ``WarmProcess``."""
    with WarmProcess(command, cwd, env, server_env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(command, timeout, out, err) from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


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
