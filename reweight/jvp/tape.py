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
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from reweight.jvp.base import Forward, Recording, Unsupported, load_forward_ad
from reweight.jvp.dual import DualTwinRecording
from reweight.jvp.rules import (
    NO_TANGENT,
    STATS,
    Entry,
    Ref,
    fused_conv_pool,
    leaves,
    map_refs,
    op_info,
    rule_convolution,
    rule_dual,
    rule_max_pool,
)
from reweight.meta.kernels import differentiable_kernels

__all__ = ["LeanTapeRecording", "TangentTape", "TapeRecording"]


class TangentTape(TorchDispatchMode):
    """Record one forward's aten ops that depend on ``seeds``; replay its JVP on demand.

    Use as a context manager around the forward (autograd still builds its reverse graph: the
    mode sits below autograd), then ``jvp(directions, output)``. Only ops reachable from the
    seeds are recorded, and each keeps just the primal tensors its tangent rule reads.
    """

    def __init__(self, seeds: Sequence[Tensor]) -> None:
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
        for ref, t in self._written:
            ref.version = t._version
        self._written.clear()

    def __exit__(self, *exc: object) -> None:
        self._refresh_versions()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._written:
            self._refresh_versions()
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is None:
            try:
                self._record(func, args, kwargs, out)
            except Exception as err:  # recording must never break the real forward
                self.error = f"{func}: {type(err).__name__}: {err}"
                self.entries.clear()
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if func.overloadpacket in NO_TANGENT:
            return  # its results are constants for the JVP
        # each input's token, looked up once for this op (by id: the inputs are alive)
        tokens = {id(t): self._token(t) for a in (*args, *kwargs.values()) for t in leaves(a)}
        if all(token is None for token in tokens.values()):
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
        if info.written:
            targets = {id(args[i]) for i in info.written if i < len(args)}
            pairs = [
                (r, t)
                for a, ra in zip(args, rargs, strict=True)
                for r, t in zip(leaves(ra), leaves(a), strict=True)
            ]
            pairs += [(r, t) for r, t in zip(outs, results, strict=True) if r is not None]
            self._written = [(r, t) for r, t in pairs if id(t) in targets]
        self.entries.append(Entry(func, info.rule, rargs, rkwargs, named, outs, set()))

    def _ref(self, t: Tensor, token: int | None, keep: bool) -> Ref:
        return Ref(token, t if keep else None, t._version, tuple(t.shape), t.dtype, t.device)

    # -- replay -----------------------------------------------------------------------------

    def _schedule(self, target: int) -> dict[int, int]:
        """Mark each entry's ``last``: the tangents no entry after it reads (freed once it ran),
        and return the max-pools fused with the convolution they read (pool entry -> conv)."""
        readers: dict[int, list[int]] = {}
        producer: dict[int, int] = {}
        for i, e in enumerate(self.entries):
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
                self.entries[idx[-1]].last.add(token)
        fused: dict[int, int] = {}
        for j, e in enumerate(self.entries):
            if e.rule is rule_max_pool:
                token = e.named["self"].token
                i = producer.get(token, -1)
                conv = self.entries[i] if i >= 0 else None
                if (
                    conv is not None
                    and conv.rule is rule_convolution
                    and readers.get(token) == [j]
                    and len(conv.outs[0].shape) == len(conv.named["weight"].shape)  # batched
                ):
                    fused[j] = i
        return fused

    @torch.no_grad()  # tangents are values: no graph of their own, nothing saved for one
    def jvp(self, directions: Sequence[Tensor], output: Tensor) -> Tensor:
        """The tangent of ``output`` when the seeds move in ``directions``."""
        if self.error is not None:
            raise Unsupported(self.error)
        found = self._ids.get(id(output))
        if found is None or found[0]() is not output:
            return torch.zeros_like(output)
        target = found[1]
        fused = self._schedule(target)
        skipped = set(fused.values())
        tangents = {
            s: d.detach() for s, d in zip(self._seeds, directions, strict=True) if d is not None
        }
        load_forward_ad()
        with fwAD.dual_level():
            for j, e in enumerate(self.entries):
                if j in skipped:
                    continue
                try:
                    if j in fused:
                        conv = self.entries[fused[j]]
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
        return torch.zeros_like(output) if out is None else out.detach()


class TapeRecording(Recording):
    """A forward recorded on the tangent tape; JVPs by replaying its tangents.

    For a training step the forward is the real model's, with graph (its losses are the real
    update's); for the functional entry points it is the twin's, without graph.
    """

    engine = "tape"

    def __init__(self, fwd: Forward) -> None:
        self.weights = fwd.weights
        self.tape = TangentTape(fwd.weights)
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
        return self.tape.jvp(direction, self.losses)

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

    def __init__(self, fwd: Forward) -> None:
        if not fwd.update:
            raise RuntimeError("internal error: the lean tape serves a training step")
        super().__init__(fwd)

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        if self._update is not None:
            raise RuntimeError("internal error: the lean tape replays one JVP per recording")
        tape = TangentTape(self.fwd.weights)
        # the real update's forward, recorded (kernels the tape replays, as TapeRecording's)
        with torch.enable_grad(), self.fwd.rng.replay():
            with differentiable_kernels(self.fwd.module), tape:
                self._update = self.fwd.run()
        return tape.jvp(direction, self._update)
