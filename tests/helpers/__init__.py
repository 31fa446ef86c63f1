"""What several test files build alike: a tiny BERT's config, a quiet TrainerConfig; for the CLI
in a subprocess its environment, its command line (alone or under torchrun on a free port), a
started and a finished run, a signal at a line of its output; a gloo process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

from reweight import Trainer, TrainerConfig
from tests.helpers.warm import WarmProcess, can_run_warm, run_warm

__all__ = [
    "REWEIGHT",
    "TINY",
    "cli_env",
    "free_port",
    "gloo_group",
    "quiet",
    "run_command",
    "signal_at",
    "start_command",
    "tiny_bert_config",
    "tiny_distilbert_config",
    "tiny_l2rw_trainer",
    "torchrun",
]

REWEIGHT = [sys.executable, "-m", "reweight"]  # the CLI; its arguments go after it


# the tiny transformers' sizes: vocabulary, width, layers, heads, feed-forward width, longest
# sequence, labels
TINY = {"vocab": 40, "width": 16, "layers": 2, "heads": 2, "ffn": 32, "positions": 16, "labels": 3}


def tiny_bert_config(dropout: float = 0.0, **overrides: Any):
    """A 2-layer BERT of width 16 (vocabulary 40, 3 labels, sequences up to 16: ``TINY``),
    random weights when built: nothing is downloaded."""
    from transformers import BertConfig

    options = {
        "vocab_size": TINY["vocab"],
        "hidden_size": TINY["width"],
        "num_hidden_layers": TINY["layers"],
        "num_attention_heads": TINY["heads"],
        "intermediate_size": TINY["ffn"],
        "max_position_embeddings": TINY["positions"],
        "num_labels": TINY["labels"],
        "hidden_dropout_prob": dropout,
        "attention_probs_dropout_prob": dropout,
    }
    return BertConfig(**{**options, **overrides})


def tiny_distilbert_config(dropout: float = 0.0, **overrides: Any):
    """tiny_bert_config's DistilBERT: the same ``TINY`` sizes, ``dropout`` everywhere."""
    from transformers import DistilBertConfig

    options = {
        "vocab_size": TINY["vocab"],
        "dim": TINY["width"],
        "n_layers": TINY["layers"],
        "n_heads": TINY["heads"],
        "hidden_dim": TINY["ffn"],
        "max_position_embeddings": TINY["positions"],
        "num_labels": TINY["labels"],
        "dropout": dropout,
        "attention_dropout": dropout,
        "seq_classif_dropout": dropout,
    }
    return DistilBertConfig(**{**options, **overrides})


def quiet(**settings: Any) -> TrainerConfig:
    """A TrainerConfig without a progress bar or final weight scoring (the tests' usual)."""
    return TrainerConfig(**{"progress": False, "final_weights": 0, **settings})


def tiny_l2rw_trainer(final_weights: int = 1) -> Trainer:
    """L2RW on a linear model, not yet fitted: 60 Gaussian points in 4 features, labels
    ``i % 3``, the first 50 to train on (``train_labels`` given), the last 10 the meta set; 4
    steps of 10 examples, no evaluation; ``final_weights`` scoring passes at the end."""
    from reweight.data.core import TensorData

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    torch.manual_seed(0)
    return Trainer(
        torch.nn.Linear(4, 3),
        TensorData(x[:50], y[:50]),
        TensorData(x[50:], y[50:]),
        method="l2rw",
        config=quiet(max_steps=4, batch_size=10, eval_every=0, final_weights=final_weights),
        train_labels=y[:50],
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, timeout: timedelta | None = None) -> Iterator:
    """In a process ``mp.spawn`` started: one torch thread and a gloo process group on
    127.0.0.1:``port`` (``timeout``: torch's default where None), destroyed on the way out."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", rank=rank, world_size=world, **options)
    try:
        yield
    finally:
        dist.destroy_process_group()


def torchrun(nproc: int = 2) -> list[str]:
    """The command line that runs the CLI under torchrun, ``nproc`` processes on a free port;
    the CLI's arguments go after it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "reweight",
    ]


_NOT_INHERITED = (
    "HYDRA_FULL_ERROR",
    "PYTHONPATH",
    *("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
)


def cli_env(**extra: str) -> dict[str, str]:
    """The test environment for a subprocess: the shared MNIST, one thread (2-core CI), no
    inherited HYDRA_FULL_ERROR or PYTHONPATH, nor a rank or rendezvous of torch.distributed (a
    rank is given by ``extra`` where a test means one); ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _warm_server_env(command: list[str], env: dict[str, str], options: dict) -> dict | None:
    """The warm server's environment where ``command`` may be forked from it: ``python -m
    reweight ...`` with no other ``options``, starting alike (``can_run_warm``); else None."""
    base = cli_env()  # what the warm server starts with
    if command[:3] == REWEIGHT and not options and can_run_warm(env, base):
        return base
    return None


def run_command(
    command: list[str],
    cwd: Path | None = None,
    *,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    **options: Any,
) -> subprocess.CompletedProcess:
    """``command`` run to its end in ``cwd`` with ``env`` (``cli_env()`` where None), its stdout
    and stderr captured as text. ``python -m reweight ...`` without other ``options`` is forked
    from a warm interpreter where it would start alike (``tests.helpers.warm.can_run_warm``)."""
    env = cli_env() if env is None else env
    options = {k: v for k, v in options.items() if v is not None}
    server_env = _warm_server_env(command, env, options)
    if server_env is not None:
        return run_warm(command, cwd, env, timeout, server_env=server_env)
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **options,
    )


def start_command(
    command: list[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    stdout: int | IO[Any] = subprocess.PIPE,
    stderr: int | IO[Any] = subprocess.PIPE,
    **options: Any,
) -> subprocess.Popen | WarmProcess:
    """``command`` started in ``cwd`` with ``env`` (``cli_env()`` where None), its stdout and
    stderr text pipes unless they say otherwise (``subprocess.DEVNULL``, an open file). As in
    ``run_command``, ``python -m reweight ...`` is forked from the warm interpreter where it
    would start alike: a ``WarmProcess``, which answers as a Popen does."""
    env = cli_env() if env is None else env
    server_env = _warm_server_env(command, env, options)
    if server_env is not None:
        return WarmProcess(command, cwd, env, server_env, stdout=stdout, stderr=stderr)
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True, **options
    )


def signal_at(proc: subprocess.Popen | WarmProcess, text: str, signum: signal.Signals) -> None:
    """Sends ``signum`` to ``proc`` when a line of its stdout first holds ``text`` (the lines
    before it are read and dropped; none is sent if its stdout ends first)."""
    for line in proc.stdout:
        if text in line:
            proc.send_signal(signum)
            break


def spawn_ranks(worker: Callable[..., None], out: Path, world: int = 2, **load: Any) -> list:
    """``worker(rank, world, port, out)`` in ``world`` spawned processes (``mp.spawn``, a free
    port for their gloo group); then what each rank saved as ``out/rank<r>.pt``."""
    import torch.multiprocessing as mp

    for attempt in range(3):
        try:
            mp.spawn(worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
            break
        except mp.ProcessRaisedException as err:
            # the port was free when chosen; another test's process may have taken it before
            # rank 0 listened on it (the suite runs in parallel): a fresh port, then again
            if attempt == 2 or "address already in use" not in str(err).lower():
                raise
    return [torch.load(out / f"rank{r}.pt", **{"weights_only": True, **load}) for r in range(world)]


def next_second() -> None:
    """Wait for the next wall-clock second, before a test opens another TensorBoard session in
    the same folder. TensorBoard reads a folder's event files in name order, and a file is
    named by the second it was opened in, then the process id and a counter written without
    padding: sessions of one process within one second sort out of order when the counter
    passes 9 -> 10, and the reader then purges steps as out of order. Sessions of a real
    resume are separate processes, seconds apart."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
