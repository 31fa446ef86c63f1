"""Tape programs: a forward recorded once per model and call signature, followed after that.

Recording a forward on the tangent tape (``reweight.jvp.tape``) costs Python work at every aten
op: a token per tensor, a ``Ref`` per argument, an ``Entry`` per op. For a given model and
batch signature the recorded ops are the same every step; only the tensors differ. So a
recording is frozen into a ``Program`` (its entries without tensors, and for every op the
forward dispatched what the tape expects of it), and later forwards of that signature run
under a ``FollowingTape``, which checks each op against the program and keeps just the primal
tensors the replay reads, in the program's slots. The replay is the program's, with those
tensors filled in. The program is made from a signature's second forward (``ModelPrograms``):
making one costs a recording 10–30 %, which a planner used once would pay for nothing.

What is checked at each op, so that a followed forward replays exactly what a recorded one
would: the op itself, its arguments other than tensors (sizes, scalars, flags), whether each
tensor argument depends on the weights (and through which earlier result), and each result's
shape and dtype. A forward that differs anywhere (data-dependent control flow, a scalar that
changes between steps, a weight used where a buffer was) raises ``Stale`` at its JVP: that
step's JVP is computed by dual numbers (exact), the program is dropped, and the next forward
is recorded afresh; a model whose forwards keep departing (``MAX_STALE`` times) is recorded in
full at every step.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from reweight.core import inputs as batch_inputs
from reweight.jvp.base import Forward, Stale, Unsupported, load_forward_ad
from reweight.jvp.rules import (
    Entry,
    Ref,
    fused_conv_pool,
    leaves,
    map_refs,
    rule_convolution,
    rule_max_pool,
)

__all__ = [
    "MAX_STALE",
    "FollowingTape",
    "ModelPrograms",
    "OpSpec",
    "Program",
    "freeze",
    "program_key",
    "replay",
    "schedule",
    "split",
]

MAX_STALE = 3  # forwards that did not follow their program before a model is always recorded

CONSTANT, INDEPENDENT, RECORDED = 0, 1, 2  # OpSpec.kind


@dataclass(frozen=True, slots=True)
class OpSpec:
    """What one dispatched op of a recorded forward was, as a later forward must repeat it.

    ``kind``: CONSTANT (its results are constants: only the op is checked), INDEPENDENT (no
    argument depends on the weights: checked to stay so) or RECORDED (an entry of the program).
    For a recorded op, per tensor argument in ``split`` order its token (None: a constant);
    per result (token, shape, dtype), None for a result that is not a tensor (an argument's
    shape comes from an earlier op's checked result, or is one the replay does not read);
    ``captures``: (position, slot) of each primal the replay reads (position ≥ 0: a tensor
    argument, -1 - i: result i); ``written``: those the op writes (versions read afterwards).
    """

    func: Any
    kind: int
    static: tuple = ()
    tokens: tuple[int | None, ...] = ()
    outs: tuple[tuple[int | None, tuple[int, ...], torch.dtype] | None, ...] = ()
    captures: tuple[tuple[int, int], ...] = ()
    written: tuple[tuple[int, int], ...] = ()
    in_place: bool = False


class _Tensor:
    """Where ``split`` found a tensor (None is an argument of its own: ``x[None, i]``)."""

    def __repr__(self) -> str:
        return "<tensor>"


TENSOR = _Tensor()


def split(args: tuple, kwargs: dict) -> tuple[list[Tensor], tuple]:
    """An op's tensor arguments in order (lists flattened) and the rest, tensors as TENSOR."""
    flat: list[Tensor] = []
    static: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            flat.append(a)
            static.append(TENSOR)
        elif isinstance(a, (list, tuple)):
            items = []
            for o in a:
                if isinstance(o, Tensor):
                    flat.append(o)
                    items.append(TENSOR)
                else:
                    items.append(o)
            static.append(tuple(items))
        else:
            static.append(a)
    return flat, (*static, *kwargs)


@dataclass
class Program:
    """A recorded forward frozen for reuse: entries whose kept primals are slots to fill."""

    ops: list[OpSpec]
    entries: list[Entry]
    kept: list[Ref]  # by slot
    seeds: list[int]
    target: int  # the token whose tangent the replay returns
    fused: dict[int, int]  # max-pool entry -> the convolution it is fused with


def freeze(ops: list[OpSpec], entries: list[Entry], seeds: list[int], target: int) -> Program:
    """A program from a recording's ops and entries: the same entries with no tensor kept."""
    memo: dict[int, Ref] = {}

    def bare(r: Ref) -> Ref:
        new = memo.get(id(r))
        if new is None:
            new = Ref(r.token, None, 0, r.shape, r.dtype, r.device, r.copy, r.slot)
            memo[id(r)] = new
        return new

    def copy(x: Any) -> Any:
        return map_refs(x, bare)

    copied = [
        Entry(
            e.func,
            e.rule,
            tuple(copy(a) for a in e.args),
            {k: copy(v) for k, v in e.kwargs.items()},
            {k: copy(v) for k, v in e.named.items()},
            [None if r is None else bare(r) for r in e.outs],
            set(),
        )
        for e in entries
    ]
    kept = sorted((r for r in memo.values() if r.slot >= 0), key=lambda r: r.slot)
    return Program(ops, copied, kept, seeds, target, schedule(copied, target))


def schedule(entries: list[Entry], target: int) -> dict[int, int]:
    """Mark each entry's ``last``: the tangents no entry after it reads (freed once it ran),
    and return the max-pools fused with the convolution they read (pool entry -> conv)."""
    readers: dict[int, list[int]] = {}
    producer: dict[int, int] = {}
    for i, e in enumerate(entries):
        e.last = set()
        for x in (*e.args, *e.kwargs.values()):
            for r in leaves(x):
                if r.token is not None:
                    readers.setdefault(r.token, []).append(i)
        for r in e.outs:
            if r is not None and r.token is not None:
                producer[r.token] = i
    for token, idx in readers.items():
        if token != target:
            entries[idx[-1]].last.add(token)
    fused: dict[int, int] = {}
    for j, e in enumerate(entries):
        if e.rule is rule_max_pool:
            token = e.named["self"].token
            i = producer.get(token, -1)
            conv = entries[i] if i >= 0 else None
            if (
                conv is not None
                and conv.rule is rule_convolution
                and readers.get(token) == [j]
                and len(conv.outs[0].shape) == len(conv.named["weight"].shape)  # batched
            ):
                fused[j] = i
    return fused


@torch.no_grad()  # tangents are values: no graph of their own, nothing saved for one
def replay(
    entries: list[Entry],
    fused: dict[int, int],
    seeds: Sequence[int],
    directions: Sequence[Tensor | None],
    target: int,
) -> Tensor | None:
    """The tangent of token ``target`` when the seeds move in ``directions`` (None: none)."""
    skipped = set(fused.values())
    tangents = {s: d.detach() for s, d in zip(seeds, directions, strict=True) if d is not None}
    load_forward_ad()
    with fwAD.dual_level():
        for j, e in enumerate(entries):
            if j in skipped:
                continue
            try:
                if j in fused:
                    conv = entries[fused[j]]
                    results = fused_conv_pool(conv, e, tangents)
                    for token in conv.last:
                        tangents.pop(token, None)
                else:
                    results = e.rule(e, tangents)
            except Unsupported:
                raise
            except Exception as err:  # a rule that does not fit: the caller falls back
                raise Unsupported(f"{e.func}: {type(err).__name__}: {err}") from err
            for ref, t in zip(e.outs, results, strict=False):
                if ref is not None and ref.token is not None and t is not None:
                    tangents[ref.token] = t
            for token in e.last:
                tangents.pop(token, None)
    out = tangents.get(target)
    return None if out is None else out.detach()


class Watcher(TorchDispatchMode):
    """A dispatch mode that runs each op of a forward, then hands it to ``_note`` (the tapes'
    common part). The versions of the tensors an op writes are read at the next op (autograd
    bumps them after this mode returns) or on exit, by ``_refresh_versions``. Whatever
    ``_note`` raises is caught: watching must never break the real forward; ``_failed`` keeps
    the reason and turns watching off."""

    watching = True

    def _note(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        raise NotImplementedError

    def _failed(self, why: str) -> None:
        raise NotImplementedError

    def _refresh_versions(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        self._refresh_versions()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._refresh_versions()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.watching:
            try:
                self._note(func, args, kwargs, out)
            except Exception as err:
                self.watching = False
                self._failed(f"{func}: {type(err).__name__}: {err}")
        return out


class FollowingTape(Watcher):
    """A forward checked against ``program`` op by op, keeping the primals its replay reads.

    Used like ``TangentTape`` (a context manager around the forward, then ``jvp``); where the
    forward departs from the program, ``jvp`` raises ``Stale`` (module docstring).
    """

    def __init__(self, seeds: Sequence[Tensor], program: Program) -> None:
        super().__init__()
        self.program = program
        self.error: str | None = None  # never set by following: the program recorded fine
        self.stale: str | None = None
        self.values: list[tuple[Tensor, int] | None] = [None] * len(program.kept)
        self._ids: dict[int, tuple[weakref.ref, int]] = {
            id(s): (weakref.ref(s), token) for s, token in zip(seeds, program.seeds, strict=True)
        }
        self._k = 0  # the next op's index in the program
        self._written: list[tuple[int, Tensor]] = []

    def _token(self, t: Tensor) -> int | None:
        entry = self._ids.get(id(t))
        return None if entry is None or entry[0]() is not t else entry[1]

    def _refresh_versions(self) -> None:
        if self._written:
            for slot, t in self._written:
                self.values[slot] = (t, t._version)
            self._written.clear()

    def _note(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        why = self._follow(func, args, kwargs, out)
        if why is not None:
            self._failed(f"op {self._k - 1} ({func}): {why}")

    def _failed(self, why: str) -> None:
        self.watching = False
        self.stale = why

    def _follow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> str | None:
        ops, k = self.program.ops, self._k
        self._k += 1
        if k >= len(ops) or ops[k].func is not func:
            return "a different op" if k < len(ops) else "more ops"
        spec = ops[k]
        if spec.kind == CONSTANT:
            return None
        if spec.kind == INDEPENDENT:
            ids = self._ids
            for a in (*args, *kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    if id(t) in ids and self._token(t) is not None:
                        return "an argument now depends on the weights"
            return None
        flat, static = split(args, kwargs)
        if static != spec.static:
            return "arguments other than tensors differ"
        if len(flat) != len(spec.tokens):
            return "a different number of tensor arguments"
        for t, token in zip(flat, spec.tokens, strict=True):
            if self._token(t) != token:
                return "a tensor argument depends on the weights differently"
        if spec.in_place and args[0]._is_view():
            return "an in-place op on a view"
        results = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(results) != len(spec.outs):
            return "a different number of results"
        for o, want in zip(results, spec.outs, strict=True):
            if want is None:
                continue
            token, shape, dtype = want
            if not isinstance(o, Tensor) or o.shape != shape or o.dtype is not dtype:
                return "a result differs"
            if token is not None:
                self._ids[id(o)] = (weakref.ref(o), token)
        for pos, slot in spec.captures:
            t = flat[pos] if pos >= 0 else results[-1 - pos]
            self.values[slot] = (t, t._version)
        if spec.written:
            self._written = [
                (slot, flat[pos] if pos >= 0 else results[-1 - pos]) for pos, slot in spec.written
            ]
        return None

    def jvp(self, directions: Sequence[Tensor], output: Tensor) -> Tensor:
        """The tangent of ``output`` when the seeds move in ``directions``."""
        program = self.program
        if self.stale is None and self._token(output) != program.target:
            self.stale = "the JVP: asked of another tensor than the recorded one's"
        if self.stale is not None:
            raise Stale(f"the forward departs from its tape program at {self.stale}")
        try:
            for ref, value in zip(program.kept, self.values, strict=True):
                if value is None:
                    raise Stale("the forward departs from its tape program: a primal is missing")
                ref.value, ref.version = value
            out = replay(program.entries, program.fused, program.seeds, directions, program.target)
        finally:
            for ref in program.kept:
                ref.value = None
        return torch.zeros_like(output) if out is None else out


def program_key(fwd: Forward) -> tuple:
    """What a program is kept by, besides its model: the batch's and the mode's signature."""
    x = fwd.inputs
    items = list(x.items()) if isinstance(x, Mapping) else [("", x)]
    return (
        fwd.update,
        fwd.module.training,
        len(fwd.weights),
        tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in items if isinstance(t, Tensor)),
        (tuple(fwd.targets.shape), fwd.targets.dtype),
        torch.is_autocast_enabled(batch_inputs.device(x).type),
    )


class ModelPrograms:
    """One model's programs by ``program_key``; off after ``MAX_STALE`` stale forwards.

    A program is made from a signature's second forward, not its first: making one costs its
    recording 10–30 %, which a planner used once (a functional call's) would pay for nothing.
    """

    def __init__(self) -> None:
        self.programs: dict[tuple, Program] = {}
        self.seen: set[tuple] = set()  # signatures recorded once
        self.stale = 0
        self.followed = 0  # forwards replayed from a program (a count, for tests and reports)

    def wanted(self, key: tuple) -> bool:
        """Whether this forward (with no program) is to be recorded as one."""
        if self.stale >= MAX_STALE:
            return False
        if key in self.seen:
            return True
        self.seen.add(key)
        return False

    def get(self, key: tuple) -> Program | None:
        return None if self.stale >= MAX_STALE else self.programs.get(key)

    def put(self, key: tuple, program: Program) -> None:
        if self.stale < MAX_STALE:
            self.programs[key] = program

    def drop(self, key: tuple) -> None:
        self.programs.pop(key, None)
        self.stale += 1
