"""The tangent tape: record a forward once, replay its JVP without the primal computation.

The per-example losses the real update backpropagates come from a forward of the real model;
that forward is recorded on a ``TangentTape`` (a ``TorchDispatchMode`` that notes each aten op
reachable from the weights and keeps only the primal tensors its tangent rule reads, most of
which autograd saves anyway). The tape then replays just the tangent half of forward-mode AD,
op by op with the rules of ``reweight.jvp.rules``, without recomputing the primal: the training
batch goes through the network once per step, as in plain training, and the tangent pass
builds no graph. A max-pool fed by a convolution has its tangent computed a slice of the batch
at a time, so the full-size tangent of that convolution never exists.

An op the tape cannot replay (an in-place op on a view or other than ReLU/add/sub, a random op
other than dropout) makes ``jvp`` raise ``Unsupported``; the planner then uses dual numbers
through the twin (or, for a forced ``engine="tape"``, stops with an error).

Recording costs Python work at every op (~70 µs, as much again as the dispatch mode itself),
which dominates a small model's step. So the second recording of a batch signature, given the
planner's ``ModelPrograms``, becomes its model's program for that signature after its JVP, and
later forwards of the signature run on a ``FollowingTape`` that checks each op against it and
keeps only the primals (``reweight.jvp.program``).

Two arrangements for MW-Net, whose JVP direction exists only after its meta pass:

- ``TapeRecording`` records the real forward first; its graph serves the virtual step's
  weighted gradient, the replay and the real update. The training batch goes through the
  network once, but its graph is held across the meta pass (ResNet-32: 1.99× a plain step's
  peak memory): the cpu policy's choice.
- ``LeanTapeRecording`` takes the virtual step's gradient from a forward of the twin whose
  graph that backward frees, and records the real forward when the JVP is asked for, after
  the meta pass: one forward more, no training graph across the meta pass (ResNet-32: 1.13×),
  and still one forward fewer than dual numbers through the twin: the cuda policy's tape (one
  of the two candidates it times, ``reweight.jvp.planner``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from reweight.jvp.base import Forward, Recording, Stale, Unsupported
from reweight.jvp.dual import DualTwinRecording
from reweight.jvp.program import (
    CONSTANT,
    INDEPENDENT,
    RECORDED,
    FollowingTape,
    ModelPrograms,
    OpSpec,
    Program,
    Watcher,
    freeze,
    program_key,
    replay,
    schedule,
    split,
)
from reweight.jvp.rules import NO_TANGENT, STATS, Entry, Ref, leaves, map_refs, op_info, rule_dual
from reweight.meta.kernels import differentiable_kernels

__all__ = ["LeanTapeRecording", "TangentTape", "TapeRecording"]


class TangentTape(Watcher):
    """Record one forward's aten ops that depend on ``seeds``; replay its JVP on demand.

    Use as a context manager around the forward (autograd still builds its reverse graph: the
    mode sits below autograd), then ``jvp(directions, output)``. Only ops reachable from the
    seeds are recorded, and each keeps just the primal tensors its tangent rule reads.
    """

    def __init__(self, seeds: Sequence[Tensor], program: bool = False) -> None:
        super().__init__()
        self.entries: list[Entry] = []
        self.error: str | None = None
        self._ids: dict[int, tuple[weakref.ref, int]] = {}
        self._dependent: set[int] = set()
        self._viewed: set[int] = set()  # tokens of tensors that are views or have views
        self._count = 0
        # refs of tensors the last op wrote: autograd bumps their version counters only after
        # this mode returns, so their versions are read at the next op (or on exit)
        self._written: list[tuple[Ref, Tensor]] = []
        self._seeds = [self._new_token(s) for s in seeds]
        self._dependent.update(self._seeds)
        # every op dispatched, as a program checks them (None: no program is to be made)
        self.ops: list[OpSpec] | None = [] if program else None
        self._slots = 0  # kept primals so far (each Ref that keeps one has its slot)
        self.target: int | None = None  # the token of the latest JVP's output

    # -- recording --------------------------------------------------------------------------

    def _new_token(self, t: Tensor) -> int:
        self._count += 1
        self._ids[id(t)] = (weakref.ref(t), self._count)
        return self._count

    def _token(self, t: Tensor) -> int | None:
        """The token of ``t`` if it depends on the seeds (a live tensor seen before), else None."""
        entry = self._ids.get(id(t))
        if entry is None or entry[1] not in self._dependent or entry[0]() is not t:
            return None
        return entry[1]

    def _refresh_versions(self) -> None:
        if self._written:
            for ref, t in self._written:
                ref.version = t._version
            self._written.clear()

    def _failed(self, why: str) -> None:
        self.error = why
        self.entries.clear()

    def _note(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func.overloadpacket in NO_TANGENT:
            if self.ops is not None:
                self.ops.append(OpSpec(func, CONSTANT))
            return  # its results are constants for the JVP
        # each input's token, looked up once for this op (by id: the inputs are alive)
        flat, static = split(args, kwargs)
        tokens = {id(t): self._token(t) for t in flat}
        if all(token is None for token in tokens.values()):
            if self.ops is not None:
                self.ops.append(OpSpec(func, INDEPENDENT))
            return  # likewise: no input depends on the seeds
        info = op_info(func)
        if info.refuse is not None:
            raise Unsupported(info.refuse)
        first = tokens.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if info.in_place and (args[0]._is_view() or (first is not None and first in self._viewed)):
            raise Unsupported(f"in-place {func} on a view")
        by_name = dict(zip(info.names, args, strict=False)) | kwargs
        dep = {
            name: any(tokens[id(t)] is not None for t in leaves(v)) for name, v in by_name.items()
        }
        keep = None if info.reads is None else info.reads(dep)
        copy = info.rule is rule_dual

        def ref_of(name: str) -> Callable[[Tensor], Ref]:
            kept = keep is None or name in keep

            def make(t: Tensor) -> Ref:
                ref = self._ref(t, tokens[id(t)], kept)
                ref.copy = copy and name in STATS
                return ref

            return make

        rargs = tuple(
            map_refs(a, ref_of(info.names[i] if i < len(info.names) else ""))
            for i, a in enumerate(args)
        )
        rkwargs = {k: map_refs(v, ref_of(k)) for k, v in kwargs.items()}
        results = list(out) if isinstance(out, (list, tuple)) else [out]
        outs: list[Ref | None] = []
        for i, o in enumerate(results):
            if not isinstance(o, Tensor):
                outs.append(None)
                continue
            token = None
            if o.is_floating_point() or o.is_complex():
                token = first if info.in_place and o is args[0] else None
                token = token if token is not None else self._new_token(o)
                self._dependent.add(token)
                if func.is_view and first is not None:
                    self._viewed.update((token, first))
            outs.append(self._ref(o, token, i in info.reads_out))
        named = info.defaults | dict(zip(info.names, rargs, strict=False)) | rkwargs
        rflat = [r for a in (*rargs, *rkwargs.values()) for r in leaves(a)]
        written = self._note_written(info.written, args, flat, rflat, results, outs)
        self.entries.append(Entry(func, info.rule, rargs, rkwargs, named, outs, set()))
        if self.ops is not None:
            self.ops.append(_spec(func, info.in_place, static, rflat, outs, written))

    def _note_written(
        self,
        positions: tuple[int, ...],
        args: tuple,
        flat: list[Tensor],
        rflat: list[Ref],
        results: list[Any],
        outs: list[Ref | None],
    ) -> tuple[tuple[int, int], ...]:
        """Note the refs of the tensors an op writes (their versions are read at the next op);
        return the (position, slot) of those that keep a primal, as ``OpSpec.written``."""
        if not positions:
            return ()
        targets = {id(args[i]) for i in positions if i < len(args)}
        pairs = [(r, t, pos) for pos, (r, t) in enumerate(zip(rflat, flat, strict=True))]
        pairs += [(r, t, -1 - i) for i, (r, t) in enumerate(zip(outs, results, strict=True)) if r]
        self._written = [(r, t) for r, t, _ in pairs if id(t) in targets]
        return tuple((pos, r.slot) for r, t, pos in pairs if id(t) in targets and r.slot >= 0)

    def _ref(self, t: Tensor, token: int | None, keep: bool) -> Ref:
        ref = Ref(token, t if keep else None, t._version, tuple(t.shape), t.dtype, t.device)
        if keep:
            ref.slot = self._slots
            self._slots += 1
        return ref

    # -- replay -----------------------------------------------------------------------------

    def jvp(self, directions: Sequence[Tensor], output: Tensor) -> Tensor:
        """The tangent of ``output`` when the seeds move in ``directions``."""
        if self.error is not None:
            raise Unsupported(self.error)
        found = self._ids.get(id(output))
        if found is None or found[0]() is not output:
            return torch.zeros_like(output)
        self.target = found[1]
        fused = schedule(self.entries, self.target)
        out = replay(self.entries, fused, self._seeds, directions, self.target)
        return torch.zeros_like(output) if out is None else out

    def freeze(self) -> Program | None:
        """This recording as a program for later forwards (``reweight.jvp.program``), once its
        JVP has been computed; None when there is none to make."""
        if self.error is not None or self.target is None or self.ops is None:
            return None
        return freeze(self.ops, self.entries, self._seeds, self.target)


class TapeRecording(Recording):
    """A forward recorded on the tangent tape; JVPs by replaying its tangents.

    For a training step the forward is the real model's, with graph (its losses are the real
    update's); for the functional entry points it is the twin's, without graph.
    """

    engine = "tape"

    def __init__(self, fwd: Forward, programs: ModelPrograms | None = None) -> None:
        self.weights = fwd.weights
        self.tape, self._keyed = _tape(fwd, programs)
        grad = torch.enable_grad() if fwd.update else torch.no_grad()
        # the tape replays every op by its rule or on dual numbers: kernels that have them
        with grad, differentiable_kernels(fwd.module), self.tape:
            self.losses = fwd.run()
        self.values = self.losses.detach()

    @property
    def error(self) -> str | None:
        """Why the tape cannot replay this forward (None: it can, as far as recording knows)."""
        return self.tape.error

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        return _tape_jvp(self.tape, self._keyed, direction, self.losses)

    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        return list(
            torch.autograd.grad(
                (seeds.to(self.losses.dtype) * self.losses).sum(),
                self.weights,
                retain_graph=True,
                allow_unused=True,
            )
        )

    def update_losses(self) -> Tensor:
        return self.losses


class LeanTapeRecording(DualTwinRecording):
    """MW-Net's tape without a training graph across the meta pass (module docstring).

    As ``DualTwinRecording`` without a direction (the twin's forward with graph, freed by the
    one ``weighted_grads`` it serves; the real forward drawing the random numbers the first
    drew), except that ``jvp`` records that real forward on a tangent tape and replays it.
    """

    engine = "tape"

    def __init__(self, fwd: Forward, programs: ModelPrograms | None = None) -> None:
        if not fwd.update:
            raise RuntimeError("internal error: the lean tape serves a training step")
        super().__init__(fwd)
        self.programs = programs

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        if self._update is not None:
            raise RuntimeError("internal error: the lean tape replays one JVP per recording")
        tape, keyed = _tape(self.fwd, self.programs)
        # the real update's forward, recorded (kernels the tape replays, as TapeRecording's)
        with torch.enable_grad(), self.fwd.rng.replay():
            with differentiable_kernels(self.fwd.module), tape:
                self._update = self.fwd.run()
        return _tape_jvp(tape, keyed, direction, self._update)


def _spec(
    func: Any,
    in_place: bool,
    static: tuple,
    rflat: list[Ref],
    outs: list[Ref | None],
    written: tuple[tuple[int, int], ...],
) -> OpSpec:
    """A recorded op as a later forward must repeat it (``reweight.jvp.program.OpSpec``)."""
    return OpSpec(
        func,
        RECORDED,
        static,
        tuple(r.token for r in rflat),
        tuple(None if r is None else (r.token, r.shape, r.dtype) for r in outs),
        tuple((pos, r.slot) for pos, r in enumerate(rflat) if r.slot >= 0)
        + tuple((-1 - i, r.slot) for i, r in enumerate(outs) if r is not None and r.slot >= 0),
        written,
        in_place,
    )


Tape = TangentTape | FollowingTape
Keyed = tuple[ModelPrograms, tuple] | None  # a model's programs and this forward's key


def _tape(fwd: Forward, programs: ModelPrograms | None) -> tuple[Tape, Keyed]:
    """The tape to record ``fwd`` on: following its program when its model has one for this
    signature (``reweight.jvp.program``), else recording in full."""
    if programs is None:
        return TangentTape(fwd.weights), None
    key = program_key(fwd)
    program = programs.get(key)
    if program is not None:
        return FollowingTape(fwd.weights, program), (programs, key)
    if not programs.wanted(key):  # a signature's first forward: one that may never come again
        return TangentTape(fwd.weights), None
    return TangentTape(fwd.weights, program=True), (programs, key)


def _tape_jvp(tape: Tape, keyed: Keyed, direction: Sequence[Tensor], output: Tensor) -> Tensor:
    """``tape``'s JVP; a full recording becomes its signature's program, a stale one is
    dropped (``Stale`` propagates: the caller computes this JVP another way)."""
    try:
        out = tape.jvp(direction, output)
    except Stale:
        if keyed is not None:
            keyed[0].drop(keyed[1])
        raise
    if keyed is not None:
        programs, key = keyed
        if isinstance(tape, FollowingTape):
            programs.followed += 1
        elif (program := tape.freeze()) is not None:
            programs.put(key, program)  # (not once the model's programs are off)
    return out
