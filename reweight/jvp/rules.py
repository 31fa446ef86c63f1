"""The tangent tape's op rules: for each aten op, its tangent from the tangents of its inputs.

A rule gets the recorded op (``Entry``: its arguments as ``Ref``s, the primal tensors it kept)
and the tangents computed so far (by token) and returns the tangents of the op's results. A
convolution's tangent is conv(ẋ, W) + conv(x, Ẇ) + ḃ, a matrix product's likewise, a max-pool's
a gather through the recorded indices, a ReLU's a mask, dropout's the recorded mask, ops linear
in their inputs the same op on the tangents; any other op is re-run once on dual numbers
(``torch.autograd.forward_ad``). ``op_info`` says, from an op's schema, which rule applies, which
primals it reads (so the tape keeps only those), and whether it can be replayed at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from reweight.jvp.base import Unsupported

__all__ = [
    "NO_TANGENT",
    "STATS",
    "Entry",
    "OpInfo",
    "Ref",
    "fused_conv_pool",
    "leaves",
    "map_refs",
    "op_info",
    "rule_convolution",
    "rule_dual",
    "rule_max_pool",
]

aten = torch.ops.aten


@dataclass(slots=True)
class Ref:
    """A tensor argument or result of a recorded op."""

    token: int | None  # identifies the tensor when it depends on the seeds (has a tangent)
    value: Tensor | None  # the primal, kept only where the op's tangent rule reads it
    version: int  # its version counter after the op: a later in-place write is an error
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    copy: bool = False  # the op writes it as a side effect (BatchNorm statistics): replay a copy
    slot: int = -1  # where a tape program captures the kept primal (-1: nothing kept)

    def primal(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("internal error: the tape did not keep a primal its rule reads")
        if self.value._version != self.version:
            raise Unsupported("a tensor of the forward was modified in place after being read")
        return self.value.clone() if self.copy else self.value


Rule = Callable[["Entry", dict[int, Tensor]], list[Tensor | None]]


@dataclass(slots=True)
class Entry:
    func: Any  # an aten OpOverload
    rule: Rule
    args: tuple  # positional arguments, tensors replaced by Ref (lists of tensors by lists)
    kwargs: dict[str, Any]
    named: dict[str, Any]  # the same by schema name, defaults filled in
    outs: list[Ref | None]  # one per result (None: not a tensor)
    last: set[int]  # tokens whose tangent no later entry reads (set when replaying)


def map_refs(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on every tensor (or Ref) of an argument: itself, or a list/tuple of them."""
    if isinstance(obj, (Tensor, Ref)):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(fn(o) if isinstance(o, (Tensor, Ref)) else o for o in obj)
    return obj


def leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [o for o in obj if isinstance(o, (Tensor, Ref))]
    return [obj] if isinstance(obj, (Tensor, Ref)) else []


def _t(tangents: dict[int, Tensor], ref: Any) -> Tensor | None:
    """The tangent of ``ref`` (None when it has none: a constant, or not a tensor)."""
    if isinstance(ref, Ref) and ref.token is not None:
        return tangents.get(ref.token)
    return None


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _shaped(t: Tensor | None, out: Ref) -> Tensor | None:
    """``t`` broadcast to and cast like the result ``out``."""
    if t is None:
        return None
    t = t.to(out.dtype)
    return t if tuple(t.shape) == out.shape else t.expand(out.shape)


def _conv_tangent(e: Entry, T: dict[int, Tensor], rows: slice | None = None) -> Tensor | None:
    """conv(ẋ, W) + conv(x, Ẇ) + ḃ, for the batch ``rows`` only when given."""
    a = e.named
    rest = [
        a[k] for k in ("stride", "padding", "dilation", "transposed", "output_padding", "groups")
    ]
    tx, tw, tb = _t(T, a["input"]), _t(T, a["weight"]), _t(T, a["bias"])
    if rows is not None and tx is not None:
        tx = tx[rows]
    out = None
    if tx is not None:
        out = aten.convolution(tx, a["weight"].primal(), None, *rest)
        del tx
        if rows is None:  # this entry may be the input tangent's last reader: free it now
            token = a["input"].token
            if token in e.last:
                T.pop(token, None)
    if tw is not None:
        x = a["input"].primal()
        term = aten.convolution(x if rows is None else x[rows], tw, tb, *rest)
        out = term if out is None else out.add_(term)
    elif tb is not None:
        res = e.outs[0]
        batched = len(res.shape) == len(a["weight"].shape)
        shape = [1, -1] if batched else [-1]
        view = tb.reshape(shape + [1] * (len(res.shape) - len(shape)))
        if out is None:
            size = list(res.shape)
            if rows is not None:
                size[0] = len(range(*rows.indices(size[0])))
            out = view.to(res.dtype).expand(size)
        else:
            out = out.add_(view)
    return out


def rule_convolution(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    return [_conv_tangent(e, T)]


def _pool_gather(e: Entry, t: Tensor, rows: slice | None = None) -> Tensor:
    dims = 3 if e.func.overloadpacket is aten.max_pool3d_with_indices else 2
    idx = e.outs[1].primal()
    if rows is not None:
        idx = idx[rows]
    return t.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape)


def rule_max_pool(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx = _t(T, e.named["self"])
    return [None if tx is None else _pool_gather(e, tx), None]


def fused_conv_pool(conv: Entry, pool: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """max_pool(conv(...))'s tangent computed a slice of the batch at a time.

    A convolution's tangent is as large as its output; when a max-pool is its only reader, only
    the pooled values are needed, so slices of the batch (both ops act on each example
    separately) keep the full-size tangent from ever existing.
    """
    n = conv.outs[0].shape[0]
    chunks = max(1, min(n, round(math.prod(conv.outs[0].shape) / math.prod(pool.outs[0].shape))))
    step = -(-n // chunks)
    parts = []
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        t = _conv_tangent(conv, T, rows)
        if t is None:
            return [None, None]
        parts.append(_pool_gather(pool, t, rows))
    return [torch.cat(parts), None]


def _rule_addmm(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    beta, alpha = a["beta"], a["alpha"]
    tb, t1, t2 = _t(T, a["self"]), _t(T, a["mat1"]), _t(T, a["mat2"])
    out = None
    if t1 is not None:
        out = aten.mm(t1, a["mat2"].primal())
    if t2 is not None:
        term = aten.mm(a["mat1"].primal(), t2)
        out = term if out is None else out.add_(term)
    if out is not None and alpha != 1:
        out = out.mul_(alpha)
    if tb is not None:
        out = _add(out, _shaped(tb * beta if beta != 1 else tb, e.outs[0]))
    return [out]


def _rule_mm(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    x, y = a["self"], a["mat2"]
    tx, ty = _t(T, x), _t(T, y)
    out = e.func(tx, y.primal()) if tx is not None else None
    return [_add(out, e.func(x.primal(), ty) if ty is not None else None)]


def _rule_relu(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx = _t(T, e.named["self"])
    return [None if tx is None else aten.threshold_backward(tx, e.outs[0].primal(), 0)]


def _rule_dropout(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx, p = _t(T, e.named["input"]), e.named["p"]
    if tx is None or not e.named["train"]:
        return [tx, None]
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return [aten.native_dropout_backward(tx, e.outs[1].primal(), scale), None]


def _rule_batch_norm(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """BatchNorm's tangent from the statistics the forward saved, without recomputing it.

    With x̂ = (x − μ)·σ⁻¹ per channel: in training mode (μ, σ the batch's, so they move with x)
    ẏ = γ·σ⁻¹·(ẋ − mean(ẋ) − x̂·mean(ẋ·x̂)), means over all but the channel dimension; in eval
    mode (running statistics) ẏ = γ·σ⁻¹·ẋ; plus γ̇·x̂ + β̇ in both.

    The training-mode term is the map BatchNorm's backward applies to an output gradient (the
    Jacobian of x ↦ y is symmetric per channel), so torch's fused backward kernel computes it
    from ẋ in two passes over the activation, x̂ formed on the fly; γ̇·x̂ + β̇ takes two more.
    Where that kernel cannot take the tangent as it is (a dtype other than the input's), the
    same terms are gathered per channel as ẏ = k·ẋ + c·x̂ + b: seven passes.
    """
    a = e.named
    tx, tw, tb = _t(T, a["input"]), _t(T, a["weight"]), _t(T, a["bias"])
    ref = a["input"]
    view = [1, ref.shape[1]] + [1] * (len(ref.shape) - 2)
    if a["training"]:
        mean, invstd = e.outs[1].primal(), e.outs[2].primal()
    else:
        mean = a["running_mean"].primal()
        invstd = torch.rsqrt(a["running_var"].primal() + a["eps"])
    out = None
    if tx is not None and a["training"] and tx.dtype == ref.dtype:
        weight = None if a["weight"] is None else a["weight"].primal()
        out = aten.native_batch_norm_backward(
            tx, ref.primal(), weight, None, None, mean, invstd, True, a["eps"], [True, False, False]
        )[0]
        tx = None
    mean, invstd = mean.view(view), invstd.view(view)
    x = ref.primal()
    # the rest as ẏ += k·ẋ + c·x̂ + b, with k, c, b per channel (None: zero)
    k = c = b = None
    if tx is not None:
        k = invstd if a["weight"] is None else invstd * a["weight"].primal().view(view)
        if a["training"]:
            dims = [0, *range(2, len(ref.shape))]
            b = -k * tx.mean(dims, keepdim=True)
            c = -k * (tx * (x - mean).mul_(invstd)).mean(dims, keepdim=True)
    if tw is not None:
        c = _add(c, tw.view(view))
    if tb is not None:
        b = _add(b, tb.view(view))
    if tx is not None:
        out = tx * k if b is None else torch.addcmul(b, tx, k)
        b = None
    if c is not None:  # c·x̂ = (c·σ⁻¹)·x − (c·σ⁻¹)·μ: one pass over x, x̂ not formed again
        c = c * invstd
        b = _add(b, -(c * mean))
        out = x * c if out is None else out.addcmul_(x, c)
    if b is not None:
        out = b if out is None else out.add_(b)
    return [_shaped(out, e.outs[0]), None, None]


def _bn_reads(dep: dict[str, bool]) -> set[str]:
    """The input and weight, and the running statistics (read in eval mode only; in training
    mode the op writes them, and the rule reads the batch statistics it returned instead)."""
    return {"input", "weight", "running_mean", "running_var"}


def _rule_add(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    tx, ty = _t(T, a["self"]), _t(T, a.get("other"))
    alpha = a.get("alpha", 1)
    if ty is not None:
        sign = -1 if e.func.overloadpacket in (aten.sub, aten.sub_) else 1
        ty = ty * (sign * alpha) if sign * alpha != 1 else ty
    return [_shaped(_add(tx, ty), e.outs[0])]


def _rule_mul(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    x, y = a["self"], a["other"]
    tx = _t(T, x)
    if not isinstance(y, Ref):  # times a number
        return [None if tx is None else tx * y]
    ty = _t(T, y)
    out = tx * y.primal() if tx is not None else None
    return [_shaped(_add(out, x.primal() * ty if ty is not None else None), e.outs[0])]


def _rule_linear(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """Ops linear in their tensor arguments: the same op on the tangents (zeros for constants).

    ``view`` becomes ``reshape`` (a tangent need not have the primal's strides) and a constant
    pad pads the tangent with zeros (the pad value is a constant).
    """

    def tangent(ref: Ref) -> Tensor:
        t = _t(T, ref)
        return torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device) if t is None else t

    func = e.func
    args = tuple(map_refs(x, tangent) for x in e.args)
    kwargs = {k: map_refs(v, tangent) for k, v in e.kwargs.items()}
    packet = func.overloadpacket
    if func in (aten.view.default, aten._unsafe_view.default):
        func = aten.reshape.default
    elif packet is aten.constant_pad_nd:
        args, kwargs = args[:2], {}
    out = func(*args, **kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def rule_dual(e: Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """Any other op: run it once more on dual numbers (inside ``fwAD.dual_level``)."""

    def dual(ref: Ref) -> Tensor:
        p, t = ref.primal(), _t(T, ref)
        return p if t is None else fwAD.make_dual(p, t.to(p.dtype))

    out = e.func(
        *(map_refs(x, dual) for x in e.args), **{k: map_refs(v, dual) for k, v in e.kwargs.items()}
    )
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [fwAD.unpack_dual(o).tangent if isinstance(o, Tensor) else None for o in outs]


def _bilinear(a: str, b: str) -> Callable[[dict[str, bool]], set[str]]:
    """For f(a, b) linear in each: ḟ = f(ȧ, b) + f(a, ḃ) reads b when a moves and a when b does."""

    def reads(dep: dict[str, bool]) -> set[str]:
        return ({b} if dep.get(a) else set()) | ({a} if dep.get(b) else set())

    return reads


def _nothing(dep: dict[str, bool]) -> set[str]:
    return set()


# op -> (rule, the arguments it reads as primals, the results it reads as primals)
_RULES: dict[Any, tuple[Rule, Callable[[dict[str, bool]], set[str]], tuple[int, ...]]] = {
    aten.convolution: (rule_convolution, _bilinear("input", "weight"), ()),
    aten.addmm: (_rule_addmm, _bilinear("mat1", "mat2"), ()),
    aten.mm: (_rule_mm, _bilinear("self", "mat2"), ()),
    aten.bmm: (_rule_mm, _bilinear("self", "mat2"), ()),
    aten.mul: (_rule_mul, _bilinear("self", "other"), ()),
    aten.max_pool2d_with_indices: (rule_max_pool, _nothing, (1,)),
    aten.max_pool3d_with_indices: (rule_max_pool, _nothing, (1,)),
    aten.relu: (_rule_relu, _nothing, (0,)),
    aten.relu_: (_rule_relu, _nothing, (0,)),
    aten.native_dropout: (_rule_dropout, _nothing, (1,)),
    aten.native_batch_norm: (_rule_batch_norm, _bn_reads, (1, 2)),
    aten.add: (_rule_add, _nothing, ()),
    aten.add_: (_rule_add, _nothing, ()),
    aten.sub: (_rule_add, _nothing, ()),
    aten.sub_: (_rule_add, _nothing, ()),
    **dict.fromkeys(  # ops linear in their tensor arguments
        (
            aten.view,
            aten._unsafe_view,
            aten.reshape,
            aten.t,
            aten.transpose,
            aten.permute,
            aten.expand,
            aten.squeeze,
            aten.unsqueeze,
            aten.slice,
            aten.select,
            aten.clone,
            aten.alias,
            aten._to_copy,
            aten.mean,
            aten.sum,
            aten.neg,
            aten.cat,
            aten.stack,
            aten.avg_pool2d,
            aten._adaptive_avg_pool2d,
            aten.constant_pad_nd,
            aten.split,
            aten.unbind,
        ),
        (_rule_linear, _nothing, ()),
    ),
}
_IN_PLACE_OK = frozenset({aten.relu_, aten.add_, aten.sub_})
# results that do not depend on their input's values (shape-only factories): constants
NO_TANGENT = frozenset(
    {
        aten.detach,
        aten.lift_fresh,
        aten.empty_like,
        aten.zeros_like,
        aten.ones_like,
        aten.full_like,
        aten.rand_like,
        aten.randn_like,
        aten.randint_like,
        aten.new_empty,
        aten.new_empty_strided,
        aten.new_zeros,
        aten.new_ones,
        aten.new_full,
    }
)
STATS = ("running_mean", "running_var")  # BatchNorm writes these without saying so in its schema


@dataclass(frozen=True, slots=True)
class OpInfo:
    names: tuple[str, ...]
    defaults: dict[str, Any]
    rule: Rule
    reads: Callable[[dict[str, bool]], set[str]] | None  # None: every argument (the fallback)
    reads_out: tuple[int, ...]
    in_place: bool  # writes its first argument
    written: tuple[int, ...]  # positions of the arguments it writes
    refuse: str | None  # why it can never be replayed, if so


@functools.cache
def op_info(func: Any) -> OpInfo:
    schema = func._schema
    names = tuple(a.name for a in schema.arguments)
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    written = tuple(
        i
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    )
    in_place = 0 in written
    packet = func.overloadpacket
    rule, reads, reads_out = _RULES.get(packet, (rule_dual, None, ()))
    refuse = None
    if in_place and packet not in _IN_PLACE_OK:
        refuse = f"in-place {func} on a tensor that depends on the weights"
    elif written and rule is rule_dual:
        refuse = f"{func} writes one of its inputs"
    elif rule is rule_dual and torch.Tag.nondeterministic_seeded in func.tags:
        refuse = f"random op {func} (of the random ops only dropout is supported)"
    return OpInfo(names, defaults, rule, reads, reads_out, in_place, written, refuse)
