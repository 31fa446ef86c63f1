"""glibc's malloc tuned for training on a CPU: freed memory kept for the next step.

By default glibc serves every allocation above its mmap threshold (128 KiB, raised up to
32 MiB as large blocks are freed) with fresh pages from the kernel, and gives memory freed at
the top of its heap back to the system. A training step frees and allocates the same large
tensors again every step, so each step faults the same pages in anew: a meta step, which holds
more than a plain step, faults in more. With both limits lifted, the heap keeps what it once
held and the next step reuses it (measured on 1 thread: ResNet-32's meta step 5-10 % and
BERT's 3-5 % nearer its floor; docs/benchmarks.md, seventeenth run). The process's resident
memory then stays at its peak.

The CLI calls :func:`tune_malloc` at a CPU run's start (the root key ``malloc``; a GPU run is
left as it is); research code may call it too. glibc's environment variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) do not do the same: set to 2 GiB
before Python started, a 7 MiB tensor still had its pages faulted in at every allocation
(glibc 2.36), where ``mallopt`` here keeps them. It changes nothing where the C library is not
glibc, or where the environment already sets either limit (the user's choice stands).
The limits are the process's: the jobs of a sweep that share a process (Hydra's basic
launcher) keep them once a job has lifted them.
"""

from __future__ import annotations

import ctypes
import os

import torch

__all__ = ["MALLOC_CHOICES", "tune_malloc"]

MALLOC_CHOICES = ("tuned", "system")

# mallopt's parameters (malloc.h) and the largest value its C int takes
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_malloc(choice: str = "tuned", device: str | torch.device = "cpu") -> str:
    """Lift glibc's mmap and trim thresholds to 2 GiB for this process (``choice="tuned"``)
    when it trains on ``device`` = the CPU; ``"system"`` leaves the allocator as it is: glibc's
    defaults, unless this process lifted them before (an earlier job of a sweep; glibc cannot
    restore its adaptive threshold). A GPU run's steps allocate on the GPU: the tuning would
    gain it nothing and keep its host memory at its peak, so it is left as it is too.
    Returns what was done, in words, for the log."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"malloc must be one of {', '.join(MALLOC_CHOICES)}; got {choice!r}")
    if choice == "system":
        return "left as it is (malloc=system)"
    kind = torch.device(device).type
    if kind != "cpu":
        return f"left as it is: a {kind} run (the tuning is for steps on the CPU)"
    if not _glibc():
        return "not glibc: unchanged"
    chosen = [name for name in _ENV if name in os.environ]
    if chosen:
        return f"{' and '.join(chosen)} set in the environment: unchanged"
    try:
        libc = ctypes.CDLL(None)
        done = all(
            libc.mallopt(param, _LIMIT) == 1 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        done = False
    return (
        "freed memory kept for reuse (mmap and trim thresholds 2 GiB)"
        if done
        else "mallopt refused: unchanged"
    )


def _glibc() -> bool:
    """Whether this process's C library is glibc (it alone names itself in this confstr)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not a name this C library knows
        return False
