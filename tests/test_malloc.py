"""reweight.core.malloc: glibc's thresholds lifted (freed memory stays with the process), or
left alone; measured by what a freed 64 MiB tensor does to the resident memory, in a fresh
process each (the tuning is for the whole process)."""

from __future__ import annotations

import ctypes
import json
import sys

import pytest
import torch

from reweight.core import malloc

from .helpers import cli_env, run_command

# A fresh process: tune (argv[1]), then the resident memory (MiB) with a 64 MiB tensor
# written, and after it is freed.
_PROBE = """
import json, os, sys
import torch
from reweight.core.malloc import tune_malloc
said = tune_malloc(sys.argv[1])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
x = torch.ones(16 * 2**20)  # 64 MiB, every page written
held = rss()
del x
print(json.dumps({"said": said, "held": held, "freed": rss()}))
"""

glibc = pytest.mark.skipif(
    not malloc._glibc(),
    reason="glibc's malloc (the CI machine's): elsewhere tune_malloc changes nothing",
)


def probe(choice: str, **env: str) -> dict:
    proc = run_command([sys.executable, "-c", _PROBE, choice], env=cli_env(**env), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@glibc
def test_tuned_keeps_a_freed_tensor_and_system_gives_it_back():
    tuned, system = probe("tuned"), probe("system")
    assert tuned["said"] == "freed memory kept for reuse (mmap and trim thresholds 2 GiB)"
    assert system["said"] == "left as it is (malloc=system)"
    # glibc maps a 64 MiB block on its own and unmaps it when freed; tuned, it comes from the
    # heap and stays there for the next step
    assert system["held"] - system["freed"] > 48
    assert tuned["held"] - tuned["freed"] < 16


@glibc
def test_a_limit_set_in_the_environment_stands():
    kept = probe("tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept["said"] == "MALLOC_MMAP_THRESHOLD_ set in the environment: unchanged"
    assert kept["held"] - kept["freed"] > 48  # glibc's mmap for the block, as the user said


def test_nothing_is_asked_of_the_c_library_unless_tuned(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the C library was opened")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert malloc.tune_malloc("system") == "left as it is (malloc=system)"
    for gpu in ("cuda", "cuda:1", torch.device("cuda", 0)):  # a GPU run's steps are on the GPU
        said = malloc.tune_malloc("tuned", gpu)
        assert said == "left as it is: a cuda run (the tuning is for steps on the CPU)"
    monkeypatch.setattr(malloc, "_glibc", lambda: False)
    assert malloc.tune_malloc("tuned") == "not glibc: unchanged"
    with pytest.raises(ValueError, match="malloc must be one of tuned, system; got 'jemalloc'"):
        malloc.tune_malloc("jemalloc")


def stand_in_libc(monkeypatch, answer: int) -> list[tuple[int, int]]:
    """glibc without limits in the environment, and a C library whose mallopt answers
    ``answer``; returns the list its calls are recorded in."""
    calls: list[tuple[int, int]] = []

    class Libc:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            calls.append((param, value))
            return answer

    monkeypatch.setattr(malloc, "_glibc", lambda: True)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    return calls


def test_a_refused_mallopt_is_said(monkeypatch):
    stand_in_libc(monkeypatch, answer=0)
    assert malloc.tune_malloc("tuned") == "mallopt refused: unchanged"


def test_tuned_asks_mallopt_for_both_limits(monkeypatch):
    calls = stand_in_libc(monkeypatch, answer=1)
    assert malloc.tune_malloc("tuned", torch.device("cpu")).startswith("freed memory kept")
    assert calls == [(-3, 2**31 - 1), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
