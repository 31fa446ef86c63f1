"""Exact meta-gradients without a second-order graph (``meta_grad="fast"``).

L2RW's virtual step θ′(ε) = θ − lr·∇θ Σᵢ εᵢℓᵢ(θ) is the identity at ε = 0, so

    ∂L_meta(θ′)/∂εᵢ |ε=0 = −lr·⟨∇θℓᵢ(θ), ∇θL_meta(θ)⟩,

the Jacobian-vector product (JVP) of the per-example loss vector ℓ(θ) (B,) in the direction of
the meta gradient: forward-mode AD gives it for about the cost of a forward pass, with no
double backward. Meta-Weight-Net's virtual step θ′(φ) = θ − lr·κ·Σᵢ wᵢ(φ)∇θℓᵢ(θ) (κ = 1 for a
plain SGD step; the replayed optimizer's momentum and dampening change it) likewise gives

    ∂L_meta(θ′)/∂φ = −lr·Σᵢ cᵢ·∂wᵢ/∂φ,     cᵢ = ⟨∇θℓᵢ(θ), κ·∇θL_meta(θ′)⟩,

a JVP of ℓ at θ in the direction of the meta gradient *at θ′*, then a vector-Jacobian product
through the weighting net. Both are exact: equal to ``meta_grad="unrolled"`` up to rounding.
The JVP is taken of the whole batch's loss vector, so BatchNorm's batch statistics couple the
examples exactly as in the unrolled step (per-example gradients would not).

How the JVP is computed. The per-example losses the real update backpropagates come from a
forward of the real model; that forward is recorded on a ``_TangentTape`` (a
``TorchDispatchMode`` that notes each aten op reachable from the parameters and keeps only the
primal tensors its tangent rule reads, most of which autograd saves anyway). The tape then
replays just the tangent half of forward-mode AD, without recomputing the primal: a
convolution's tangent is conv(ẋ, W) + conv(x, Ẇ) + ḃ, a max-pool's is a gather through the
recorded indices (computed a slice of the batch at a time when a convolution feeds the pool,
so the full-size tangent of that convolution never exists), a ReLU's a mask, and any other op
is re-run once on dual numbers (``torch.autograd.forward_ad``). So the training batch goes
through the network once per step, as in plain training, and the tangent pass builds no graph.
An op the tape cannot replay (an in-place op on a view or other than ReLU/add/sub, a random op
other than dropout) makes the step fall back, with a warning, to a dual-number forward through
the model's twin: exact as well, at the cost of one more forward (and, should the model draw
random numbers, with masks of its own).

MW-Net's fast step needs two weighted backwards of the training batch (one for θ′, one for the
real update) with the meta pass in between, so through the tape it would hold the training
graph across the meta pass. For a model whose examples do not interact (checked on its first
step) it takes the per-layer path of ``reweight.ghost`` instead: one forward and a backward
that stops at the layer outputs keep, per linear or convolutional layer, the input and the
output gradient; both weighted gradients are then each layer's weight-gradient op, and the JVP
one linear op per layer. The training graph is freed before the meta pass, and both batch
passes can be taken in slices (``meta_chunks``).

Per step, with F a forward and B a backward of one batch (a plain step is F + B; B_in and B_w
its input- and weight-gradient halves; the per-layer JVP costs about one F):
    L2RW fast:    meta F + B at θ → the real F (taped) → tangent replay → the real B
    MW-Net fast:  the real F → B_in → B_w for θ′ → meta F + B at θ′ → JVP → B_w (the real one)
      (general:   the real F (taped) → B for θ′ → meta F + B at θ′ → tangent replay → the real B)

Example:
    >>> import torch, torch.nn as nn
    >>> from reweight import l2rw_eps_grad
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    >>> fast = l2rw_eps_grad(model, x, y, x[:3], y[:3], lr=0.1, meta_grad="fast")
    >>> slow = l2rw_eps_grad(model, x, y, x[:3], y[:3], lr=0.1, meta_grad="unrolled")
    >>> bool(torch.allclose(fast, slow, rtol=0, atol=1e-12))
    True
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from reweight import ghost
from reweight.functional import LossFn, mwnet_weights
from reweight.meta import MetaModule, to_meta
from reweight.meta.functional import keep_layout

if TYPE_CHECKING:
    from reweight.methods.base import StepInputs
    from reweight.methods.mwnet import MWNet

__all__ = [
    "PER_LAYER",
    "TAPE_DEVICES",
    "l2rw_eps_grad_fast",
    "l2rw_fast_step",
    "mwnet_fast_step",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Device types whose training steps take their JVP from the tangent tape. The tape runs the
# training batch's primal forward once and builds no graph for the tangents (least time and
# memory on CPU), but its TorchDispatchMode costs Python work per op (~0.1 ms per op on the
# 2-core CPU machine this was measured on), which would dominate a GPU step of a small model.
# Elsewhere the steps use a dual-number forward (C++ forward AD): L2RW one forward of the real
# model that yields losses and JVP together, MW-Net one more forward through the twin.
TAPE_DEVICES: set[str] = {"cpu"}

# Whether MW-Net's fast step may take the per-layer path (``reweight.ghost``) for models whose
# examples do not interact: one forward and a backward to the layer outputs give the JVP and
# every weighted gradient, and the training graph is freed before the meta pass. Off: the tape
# (or dual numbers) for every model.
PER_LAYER: bool = True


@functools.cache
def _load_forward_ad() -> None:
    """Trigger torch's one-time set-up of forward AD with its known deprecation warning muted.

    The first ``make_dual`` imports ``torch._decomp.decompositions_for_jvp``, which calls the
    deprecated ``torch.jit.script`` (a warning that is torch's business, not the user's).
    """
    with warnings.catch_warnings():
        # FutureWarning on torch 2.14, DeprecationWarning on 2.13
        warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", Warning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))


# ---------------------------------------------------------------------------------------------
# Substituting tensors for a model's weights for one forward, and the cached twin.

_Slot = tuple[dict, str, Tensor]  # (module._parameters or module._buffers, key, original)


def _trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the weights a virtual step moves (``requires_grad``), in order."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def _slots(module: nn.Module, weights: Sequence[Tensor]) -> list[_Slot]:
    """Every place in ``module``'s tree that holds one of ``weights`` (tied weights included).

    On the real model these are ``_parameters`` entries; on a bound twin, ``_buffers`` entries.
    """
    ids = {id(p) for p in weights}
    return [
        (store, key, t)
        for mod in module.modules()
        for store in (mod._parameters, mod._buffers)
        for key, t in store.items()
        if t is not None and id(t) in ids
    ]


@contextlib.contextmanager
def _substituted(slots: list[_Slot], new: dict[int, Tensor]) -> Iterator[None]:
    """Put ``new[id(original)]`` in every slot for the duration; always restore."""
    try:
        for store, key, t in slots:
            store[key] = new[id(t)]
        yield
    finally:
        for store, key, t in slots:
            store[key] = t


# The twin of a model is built once (``to_meta`` deep-copies the module tree) and re-bound each
# step. It is rebuilt when the model's modules or tensors are replaced, or when a buffer the twin
# holds a copy of (anything but BatchNorm statistics, which it shares) has been written to.
_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, MetaModule]] = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    mods = list(model.modules())
    return (
        tuple(id(m) for m in mods),
        tuple(id(p) for p in model.parameters()),
        tuple(
            (id(b), b._version)
            for m in mods
            if not isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m._buffers.values()
            if b is not None
        ),
    )


def _bound_twin(model: nn.Module) -> MetaModule:
    """A twin of ``model`` bound to its current weights, modes and BatchNorm statistics."""
    sig = _signature(model)
    entry = _TWINS.get(model)
    if entry is None or entry[0] != sig:
        entry = (sig, to_meta(model))
        _TWINS[model] = entry
    twin = entry[1]
    twin.bind(model)
    return twin


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


def _meta_grad(
    twin: MetaModule,
    weights: Sequence[Tensor],
    at: Sequence[Tensor] | None,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    loss_fn: LossFn,
    chunks: int = 1,
) -> tuple[list[Tensor], Tensor]:
    """∇L_meta at ``at`` (at θ when None) through the bound twin, and L_meta.

    Nothing accumulates into ``.grad`` and no running statistics are written (the twin's
    BatchNorm uses batch statistics in training mode and never writes its running ones).
    With ``chunks`` > 1 the clean batch is taken in that many slices, one forward and backward
    each, L_meta = Σ (nₖ/n)·L_meta(slice k): the same mean loss and gradient for a model whose
    examples do not interact, with one slice's activations alive at a time.
    """
    if at is None:
        leaves, scope = list(weights), contextlib.nullcontext()
    else:
        leaves = [t.detach().requires_grad_() for t in at]
        scope = _substituted(
            _slots(twin, weights), {id(p): q for p, q in zip(weights, leaves, strict=True)}
        )
    n = len(meta_targets)
    total: list[Tensor | None] = [None] * len(leaves)
    losses = []
    with scope:
        for x, y in zip(
            meta_inputs.tensor_split(chunks), meta_targets.tensor_split(chunks), strict=True
        ):
            if not len(y):
                continue
            loss = loss_fn(twin(x), y)
            if chunks > 1:
                loss = loss * (len(y) / n)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            total = [_add(a, g) for a, g in zip(total, grads, strict=True)]
            losses.append(loss.detach())
    meta_loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    return _zeros_for_none(total, weights), meta_loss


def _dual_forward(
    module: nn.Module,
    weights: Sequence[Tensor],
    direction: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
) -> tuple[Tensor, Tensor]:
    """Per-example losses (B,) of ``module`` and their JVP in ``direction``: one forward with
    dual-number weights. The primal losses keep the reverse graph grad mode lets the forward
    build: on the real model, the graph of the real update (plus, while the dual level lasts,
    a graph of the tangent computation, which forward AD records when the primals need grad)."""
    _load_forward_ad()
    with fwAD.dual_level():
        duals = {
            id(p): fwAD.make_dual(p, d.to(p.dtype)) for p, d in zip(weights, direction, strict=True)
        }
        with _substituted(_slots(module, weights), duals):
            dual = loss_fn(module(inputs), targets, reduction="none")
        losses, jvp = fwAD.unpack_dual(dual)
    return losses, torch.zeros_like(losses) if jvp is None else jvp.detach()


@torch.no_grad()
def _dual_jvp(
    twin: MetaModule,
    weights: Sequence[Tensor],
    direction: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    """The JVP alone, through the bound twin: no graph, no running-statistics writes."""
    return _dual_forward(twin, weights, direction, inputs, targets, loss_fn)[1]


# ---------------------------------------------------------------------------------------------
# The tangent tape: record a forward once, replay its JVP without the primal computation.


class _Unsupported(Exception):
    """The tape cannot replay this forward's JVP (the caller falls back to a dual forward)."""


@dataclass(slots=True)
class _Ref:
    """A tensor argument or result of a recorded op."""

    token: int | None  # identifies the tensor when it depends on the seeds (has a tangent)
    value: Tensor | None  # the primal, kept only where the op's tangent rule reads it
    version: int  # its version counter after the op: a later in-place write is an error
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    copy: bool = False  # the op writes it as a side effect (BatchNorm statistics): replay a copy

    def primal(self) -> Tensor:
        if self.value is None:
            raise RuntimeError("internal error: the tape did not keep a primal its rule reads")
        if self.value._version != self.version:
            raise _Unsupported("a tensor of the forward was modified in place after being read")
        return self.value.clone() if self.copy else self.value


Rule = Callable[["_Entry", dict[int, Tensor]], list[Tensor | None]]


@dataclass(slots=True)
class _Entry:
    func: Any  # an aten OpOverload
    rule: Rule
    args: tuple  # positional arguments, tensors replaced by _Ref (lists of tensors by lists)
    kwargs: dict[str, Any]
    named: dict[str, Any]  # the same by schema name, defaults filled in
    outs: list[_Ref | None]  # one per result (None: not a tensor)
    last: set[int]  # tokens whose tangent no later entry reads (set when replaying)


def _map(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on every tensor (or _Ref) of an argument: itself, or a list/tuple of them."""
    if isinstance(obj, (Tensor, _Ref)):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(fn(o) if isinstance(o, (Tensor, _Ref)) else o for o in obj)
    return obj


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [o for o in obj if isinstance(o, (Tensor, _Ref))]
    return [obj] if isinstance(obj, (Tensor, _Ref)) else []


def _t(tangents: dict[int, Tensor], ref: Any) -> Tensor | None:
    """The tangent of ``ref`` (None when it has none: a constant, or not a tensor)."""
    if isinstance(ref, _Ref) and ref.token is not None:
        return tangents.get(ref.token)
    return None


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _shaped(t: Tensor | None, out: _Ref) -> Tensor | None:
    """``t`` broadcast to and cast like the result ``out``."""
    if t is None:
        return None
    t = t.to(out.dtype)
    return t if tuple(t.shape) == out.shape else t.expand(out.shape)


def _conv_tangent(e: _Entry, T: dict[int, Tensor], rows: slice | None = None) -> Tensor | None:
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


def _rule_convolution(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    return [_conv_tangent(e, T)]


def _pool_gather(e: _Entry, t: Tensor, rows: slice | None = None) -> Tensor:
    dims = 3 if e.func.overloadpacket is aten.max_pool3d_with_indices else 2
    idx = e.outs[1].primal()
    if rows is not None:
        idx = idx[rows]
    return t.flatten(-dims).gather(-1, idx.flatten(-dims)).view(idx.shape)


def _rule_max_pool(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx = _t(T, e.named["self"])
    return [None if tx is None else _pool_gather(e, tx), None]


def _fused_conv_pool(conv: _Entry, pool: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
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


def _rule_addmm(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
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


def _rule_mm(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    x, y = a["self"], a["mat2"]
    tx, ty = _t(T, x), _t(T, y)
    out = e.func(tx, y.primal()) if tx is not None else None
    return [_add(out, e.func(x.primal(), ty) if ty is not None else None)]


def _rule_relu(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx = _t(T, e.named["self"])
    return [None if tx is None else aten.threshold_backward(tx, e.outs[0].primal(), 0)]


def _rule_dropout(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    tx, p = _t(T, e.named["input"]), e.named["p"]
    if tx is None or not e.named["train"]:
        return [tx, None]
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    return [aten.native_dropout_backward(tx, e.outs[1].primal(), scale), None]


def _rule_add(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    tx, ty = _t(T, a["self"]), _t(T, a.get("other"))
    alpha = a.get("alpha", 1)
    if ty is not None:
        sign = -1 if e.func.overloadpacket in (aten.sub, aten.sub_) else 1
        ty = ty * (sign * alpha) if sign * alpha != 1 else ty
    return [_shaped(_add(tx, ty), e.outs[0])]


def _rule_mul(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    a = e.named
    x, y = a["self"], a["other"]
    tx = _t(T, x)
    if not isinstance(y, _Ref):  # times a number
        return [None if tx is None else tx * y]
    ty = _t(T, y)
    out = tx * y.primal() if tx is not None else None
    return [_shaped(_add(out, x.primal() * ty if ty is not None else None), e.outs[0])]


def _rule_linear(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """Ops linear in their tensor arguments: the same op on the tangents (zeros for constants).

    ``view`` becomes ``reshape`` (a tangent need not have the primal's strides) and a constant
    pad pads the tangent with zeros (the pad value is a constant).
    """

    def tangent(ref: _Ref) -> Tensor:
        t = _t(T, ref)
        return torch.zeros(ref.shape, dtype=ref.dtype, device=ref.device) if t is None else t

    func = e.func
    args = tuple(_map(x, tangent) for x in e.args)
    kwargs = {k: _map(v, tangent) for k, v in e.kwargs.items()}
    packet = func.overloadpacket
    if func in (aten.view.default, aten._unsafe_view.default):
        func = aten.reshape.default
    elif packet is aten.constant_pad_nd:
        args, kwargs = args[:2], {}
    out = func(*args, **kwargs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _rule_dual(e: _Entry, T: dict[int, Tensor]) -> list[Tensor | None]:
    """Any other op: run it once more on dual numbers (inside ``fwAD.dual_level``)."""

    def dual(ref: _Ref) -> Tensor:
        p, t = ref.primal(), _t(T, ref)
        return p if t is None else fwAD.make_dual(p, t.to(p.dtype))

    out = e.func(
        *(_map(x, dual) for x in e.args), **{k: _map(v, dual) for k, v in e.kwargs.items()}
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
    aten.convolution: (_rule_convolution, _bilinear("input", "weight"), ()),
    aten.addmm: (_rule_addmm, _bilinear("mat1", "mat2"), ()),
    aten.mm: (_rule_mm, _bilinear("self", "mat2"), ()),
    aten.bmm: (_rule_mm, _bilinear("self", "mat2"), ()),
    aten.mul: (_rule_mul, _bilinear("self", "other"), ()),
    aten.max_pool2d_with_indices: (_rule_max_pool, _nothing, (1,)),
    aten.max_pool3d_with_indices: (_rule_max_pool, _nothing, (1,)),
    aten.relu: (_rule_relu, _nothing, (0,)),
    aten.relu_: (_rule_relu, _nothing, (0,)),
    aten.native_dropout: (_rule_dropout, _nothing, (1,)),
    aten.add: (_rule_add, _nothing, ()),
    aten.add_: (_rule_add, _nothing, ()),
    aten.sub: (_rule_add, _nothing, ()),
    aten.sub_: (_rule_add, _nothing, ()),
}
_RULES.update(
    dict.fromkeys(
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
    )
)
_IN_PLACE_OK = {aten.relu_, aten.add_, aten.sub_}
# results that do not depend on their input's values (shape-only factories): constants
_NO_TANGENT = {
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
_STATS = ("running_mean", "running_var")  # BatchNorm writes these without saying so in its schema


@dataclass(frozen=True, slots=True)
class _OpInfo:
    names: tuple[str, ...]
    defaults: dict[str, Any]
    rule: Rule
    reads: Callable[[dict[str, bool]], set[str]] | None  # None: every argument (the fallback)
    reads_out: tuple[int, ...]
    in_place: bool  # writes its first argument
    written: tuple[int, ...]  # positions of the arguments it writes
    refuse: str | None  # why it can never be replayed, if so


@functools.cache
def _op_info(func: Any) -> _OpInfo:
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
    rule, reads, reads_out = _RULES.get(packet, (_rule_dual, None, ()))
    refuse = None
    if in_place and packet not in _IN_PLACE_OK:
        refuse = f"in-place {func} on a tensor that depends on the weights"
    elif written and rule is _rule_dual:
        refuse = f"{func} writes one of its inputs"
    elif rule is _rule_dual and torch.Tag.nondeterministic_seeded in func.tags:
        refuse = f"random op {func} (of the random ops only dropout is supported)"
    return _OpInfo(names, defaults, rule, reads, reads_out, in_place, written, refuse)


class _TangentTape(TorchDispatchMode):
    """Record one forward's aten ops that depend on ``seeds``; replay its JVP on demand.

    Use as a context manager around the forward (autograd still builds its reverse graph: the
    mode sits below autograd), then ``jvp(directions, output)``. Only ops reachable from the
    seeds are recorded, and each keeps just the primal tensors its tangent rule reads.
    """

    def __init__(self, seeds: Sequence[Tensor]) -> None:
        super().__init__()
        self.entries: list[_Entry] = []
        self.error: str | None = None
        self._ids: dict[int, tuple[weakref.ref, int]] = {}
        self._dependent: set[int] = set()
        self._viewed: set[int] = set()  # tokens of tensors that are views or have views
        self._count = 0
        # refs of tensors the last op wrote: autograd bumps their version counters only after
        # this mode returns, so their versions are read at the next op (or on exit)
        self._written: list[tuple[_Ref, Tensor]] = []
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
        inputs = [t for a in (*args, *kwargs.values()) for t in _leaves(a)]
        if all(self._token(t) is None for t in inputs) or func.overloadpacket in _NO_TANGENT:
            return  # its results are constants for the JVP
        info = _op_info(func)
        if info.refuse is not None:
            raise _Unsupported(info.refuse)
        if info.in_place:
            token = self._token(args[0])
            if args[0]._is_view() or (token is not None and token in self._viewed):
                raise _Unsupported(f"in-place {func} on a view")
        by_name = dict(zip(info.names, args, strict=False)) | kwargs
        dep = {
            name: any(self._token(t) is not None for t in _leaves(v)) for name, v in by_name.items()
        }
        keep = None if info.reads is None else info.reads(dep)
        copy = info.rule is _rule_dual

        def ref_of(name: str) -> Callable[[Tensor], _Ref]:
            kept = keep is None or name in keep

            def make(t: Tensor) -> _Ref:
                ref = self._ref(t, self._token(t), kept)
                ref.copy = copy and name in _STATS
                return ref

            return make

        rargs = tuple(
            _map(a, ref_of(info.names[i] if i < len(info.names) else ""))
            for i, a in enumerate(args)
        )
        rkwargs = {k: _map(v, ref_of(k)) for k, v in kwargs.items()}
        results = list(out) if isinstance(out, (list, tuple)) else [out]
        outs: list[_Ref | None] = []
        src = self._token(args[0]) if args and isinstance(args[0], Tensor) else None
        for i, o in enumerate(results):
            if not isinstance(o, Tensor):
                outs.append(None)
                continue
            token = None
            if o.is_floating_point() or o.is_complex():
                token = self._token(o) if info.in_place and o is args[0] else None
                token = token if token is not None else self._new_token(o)
                self._dependent.add(token)
                if func.is_view and src is not None:
                    self._viewed.update((token, src))
            outs.append(self._ref(o, token, i in info.reads_out))
        named = info.defaults | dict(zip(info.names, rargs, strict=False)) | rkwargs
        if info.written:
            targets = {id(args[i]) for i in info.written if i < len(args)}
            pairs = [
                (r, t)
                for a, ra in zip(args, rargs, strict=True)
                for r, t in zip(_leaves(ra), _leaves(a), strict=True)
            ]
            pairs += [(r, t) for r, t in zip(outs, results, strict=True) if r is not None]
            self._written = [(r, t) for r, t in pairs if id(t) in targets]
        self.entries.append(_Entry(func, info.rule, rargs, rkwargs, named, outs, set()))

    def _ref(self, t: Tensor, token: int | None, keep: bool) -> _Ref:
        return _Ref(token, t if keep else None, t._version, tuple(t.shape), t.dtype, t.device)

    # -- replay -----------------------------------------------------------------------------

    @torch.no_grad()
    def jvp(self, directions: Sequence[Tensor], output: Tensor) -> Tensor:
        """The tangent of ``output`` when the seeds move in ``directions``."""
        if self.error is not None:
            raise _Unsupported(self.error)
        found = self._ids.get(id(output))
        if found is None or found[0]() is not output:
            return torch.zeros_like(output)
        target = found[1]
        # plan: the last reader of every tangent, and max-pools fused with their convolution
        readers: dict[int, list[int]] = {}
        producer: dict[int, int] = {}
        for i, e in enumerate(self.entries):
            e.last = set()
            for x in (*e.args, *e.kwargs.values()):
                for r in _leaves(x):
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
            if e.rule is _rule_max_pool:
                token = e.named["self"].token
                i = producer.get(token, -1)
                conv = self.entries[i] if i >= 0 else None
                if (
                    conv is not None
                    and conv.rule is _rule_convolution
                    and readers.get(token) == [j]
                    and len(conv.outs[0].shape) == len(conv.named["weight"].shape)  # batched
                ):
                    fused[j] = i
        skipped = set(fused.values())
        tangents = {
            s: d.detach() for s, d in zip(self._seeds, directions, strict=True) if d is not None
        }
        _load_forward_ad()
        with fwAD.dual_level():
            for j, e in enumerate(self.entries):
                if j in skipped:
                    continue
                try:
                    if j in fused:
                        conv = self.entries[fused[j]]
                        results = _fused_conv_pool(conv, e, tangents)
                        for token in conv.last:
                            tangents.pop(token, None)
                    else:
                        results = e.rule(e, tangents)
                except _Unsupported:
                    raise
                except Exception as err:  # a rule that does not fit: the caller falls back
                    raise _Unsupported(f"{e.func}: {type(err).__name__}: {err}") from err
                for ref, t in zip(e.outs, results, strict=False):
                    if ref is not None and ref.token is not None and t is not None:
                        tangents[ref.token] = t
                for token in e.last:
                    tangents.pop(token, None)
        out = tangents.get(target)
        return torch.zeros_like(output) if out is None else out.detach()


def _taped_losses(
    model: nn.Module, weights: Sequence[Tensor], inputs: Tensor, targets: Tensor, loss_fn: LossFn
) -> tuple[Tensor, _TangentTape]:
    """The real model's per-example losses (B,), with graph, recorded on a tangent tape."""
    tape = _TangentTape(weights)
    with tape:
        losses = loss_fn(model(inputs), targets, reduction="none")
    return losses, tape


def _tape_or_dual_jvp(
    tape: _TangentTape | None,
    losses: Tensor,
    model: nn.Module,
    weights: Sequence[Tensor],
    direction: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
) -> Tensor:
    """The tape's JVP when it can replay the forward, else a dual-number forward of the twin."""
    if tape is not None:
        try:
            return tape.jvp(direction, losses)
        except _Unsupported as err:
            _warn_fallback(type(model).__name__, str(err))
    return _dual_jvp(_bound_twin(model), weights, direction, inputs, targets, loss_fn)


@functools.cache
def _warn_fallback(model: str, reason: str) -> None:
    log.warning(
        "meta_grad='fast': the tangent tape cannot replay %s's forward (%s); using a "
        "dual-number forward through the twin instead (exact, one more forward per step)",
        model,
        reason,
    )


# ---------------------------------------------------------------------------------------------
# The real step's forward: per layer, taped, or plain (then dual numbers), and its JVPs

# model -> (key, verdict, layers): verdict "ok" (use the per-layer path), "check" (its first
# step: run the general path and compare), or "no"
_PER_LAYER: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str, dict]] = (
    weakref.WeakKeyDictionary()
)


def _per_layer_state(
    model: nn.Module, weights: Sequence[Tensor], device: torch.device
) -> tuple[str, dict]:
    """("ok" | "check" | "no", layers) for this model in its current structure and modes."""
    if not PER_LAYER or torch.is_autocast_enabled(device.type):
        return "no", {}
    key = (
        _signature(model),
        tuple(m.training for m in model.modules()),
        tuple(id(w) for w in weights),
    )
    entry = _PER_LAYER.get(model)
    if entry is None or entry[0] != key:
        try:
            entry = (key, "check", ghost.ghost_layers(model, weights))
        except ghost.Ineligible as err:
            log.debug("per-layer path off for %s: %s", type(model).__name__, err)
            entry = (key, "no", {})
        _PER_LAYER[model] = entry
    return entry[1], entry[2]


def _set_per_layer(model: nn.Module, verdict: str) -> None:
    entry = _PER_LAYER.get(model)
    if entry is not None:
        _PER_LAYER[model] = (entry[0], verdict, entry[2] if verdict == "ok" else {})


class _TrainForward:
    """The real model's forward on the training batch: ``losses`` (B,), whose backward is the
    real update's, and ``jvp(u)`` = ⟨∇θℓᵢ(θ), u⟩ for every i.

    With ``per_layer``, per layer when the model qualifies (``reweight.ghost``; in ``chunks``
    slices of the batch, each slice's graph freed before the next is made). Otherwise recorded
    on the tangent tape (``TAPE_DEVICES``), or else a plain forward, the JVP then a
    dual-number forward through the twin; with ``direction`` known before the forward (L2RW),
    that last case is instead one dual-number forward of the real model giving both. The first
    step of a model that qualifies runs the general path and compares the two JVPs, to decide.
    """

    def __init__(
        self,
        model: nn.Module,
        weights: Sequence[Tensor],
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        direction: Sequence[Tensor] | None = None,
        *,
        per_layer: bool = False,
        chunks: int = 1,
    ) -> None:
        self.model, self.weights = model, weights
        self.inputs, self.targets, self.loss_fn = inputs, targets, loss_fn
        self.records: list[ghost.GhostRecord] = []
        self.tape: _TangentTape | None = None
        self._jvp: Tensor | None = None
        self.checking = False
        verdict, layers = (
            _per_layer_state(model, weights, inputs.device) if per_layer else ("no", {})
        )
        if verdict == "ok":
            try:
                for x, y in zip(
                    inputs.tensor_split(chunks), targets.tensor_split(chunks), strict=True
                ):
                    if len(y):
                        with ghost.recording(layers) as calls:
                            losses = loss_fn(model(x), y, reduction="none")
                        self.records.append(ghost.finish(weights, calls, losses))
                        del calls, losses
                self.losses = ghost.losses_of(self.records)
                return
            except ghost.Ineligible as err:
                _set_per_layer(model, "no")
                self.records = []
                log.warning("per-layer path off for %s: %s", type(model).__name__, err)
        self.checking = verdict == "check"
        scope = ghost.recording(layers) if self.checking else contextlib.nullcontext([])
        try:
            with scope as calls:
                if inputs.device.type in TAPE_DEVICES:
                    self.losses, self.tape = _taped_losses(model, weights, inputs, targets, loss_fn)
                elif direction is not None and not self.checking:
                    self.losses, self._jvp = _dual_forward(
                        model, weights, direction, inputs, targets, loss_fn
                    )
                else:
                    self.losses = loss_fn(model(inputs), targets, reduction="none")
            if self.checking:
                self.records = [ghost.finish(weights, calls, self.losses, keep_graph=True)]
        except ghost.Ineligible as err:
            _set_per_layer(model, "no")
            log.debug("per-layer path off for %s: %s", type(model).__name__, err)
            self.checking, self.records = False, []
            if not hasattr(self, "losses"):
                raise RuntimeError("internal error: the checked forward did not finish") from err

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        if self.records and not self.checking:
            return ghost.jvp_of(self.records, direction)
        if self._jvp is not None:
            return self._jvp
        exact = _tape_or_dual_jvp(
            self.tape,
            self.losses,
            self.model,
            self.weights,
            direction,
            self.inputs,
            self.targets,
            self.loss_fn,
        )
        if self.checking and self.records:
            if ghost.agree(ghost.jvp_of(self.records, direction), exact):
                _set_per_layer(self.model, "ok")
            else:
                _set_per_layer(self.model, "no")
                log.warning(
                    "meta_grad='fast': %s does not fit the per-layer path (its per-layer JVP "
                    "differs from the exact one: the forward mixes the examples of a batch or "
                    "uses a weight outside its layer); keeping the general path",
                    type(self.model).__name__,
                )
            self.records = []
        return exact


# ---------------------------------------------------------------------------------------------
# L2RW


def l2rw_eps_grad_fast(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
) -> Tensor:
    """∂L_meta(θ′(ε))/∂ε at ε = 0 as −lr·JVP(ℓ, ∇θL_meta), shape (B,), exact.

    Everything runs through the model's twin (the meta gradient, then one dual-number forward
    without graph), so the model, its parameters, their ``.grad`` and its BatchNorm statistics
    are left unchanged. ``reweight.l2rw_eps_grad(..., meta_grad="fast")`` calls this.
    """
    _, weights = _trainable(model)
    twin = _bound_twin(model)
    v, _ = _meta_grad(twin, weights, None, meta_inputs, meta_targets, loss_fn)
    return -lr * _dual_jvp(twin, weights, v, inputs, targets, loss_fn)


def l2rw_fast_step(batch: StepInputs) -> tuple[Tensor, Tensor, float | None]:
    """One L2RW meta step by the exact identity: (∂L_meta/∂ε (B,), losses (B,), L_meta(θ)).

    1. v = ∇θL_meta(θ): a forward and backward of the meta batch through the twin (batch
       statistics, no running-statistics writes, nothing into ``.grad``); done first, so its
       activations are freed before the training forward's are made.
    2. The real model's forward on the training batch, recorded on a tangent tape: its losses
       carry the reverse graph the Trainer backpropagates for the real update (the step's one
       train-mode forward of the real model: BatchNorm statistics move once).
    3. ⟨∇θℓᵢ, v⟩ for every i by replaying the tape's tangents in direction v.

    On devices not in ``TAPE_DEVICES``, 2 and 3 are one forward of the real model with
    dual-number parameters θ + v·dθ: the primal losses carry the real update's graph and their
    tangents are the inner products.
    """
    assert batch.meta_inputs is not None and batch.meta_targets is not None
    model, loss_fn = batch.model, batch.loss_fn
    _, weights = _trainable(model)
    v, meta_loss = _meta_grad(
        _bound_twin(model), weights, None, batch.meta_inputs, batch.meta_targets, loss_fn
    )
    fwd = _TrainForward(model, weights, batch.inputs, batch.targets, loss_fn, direction=v)
    return -batch.lr * fwd.jvp(v), fwd.losses, float(meta_loss)


# ---------------------------------------------------------------------------------------------
# Meta-Weight-Net


def _replay_step(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    names: Sequence[str],
    lr: float,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    momentum_buffers: dict[str, Tensor | None] | None = None,
) -> tuple[list[Tensor], list[float]]:
    """θ′ = θ − lr·d as ``reweight.meta.sgd_step`` computes it (values only), and κ = ∂d/∂g.

    d = g + wd·θ without momentum (κ = 1). With momentum, buf′ = m·buf + (1 − dampening)·d₀
    (κ = 1 − dampening), or buf′ = d₀ on SGD's first step, when there is no buffer yet
    (κ = 1); nesterov takes d = d₀ + m·buf′ (κ = 1 + m·κ_buf). A weight without gradient
    keeps θ (κ = 0). κ is per weight: buffers appear per parameter.
    """
    buffers = momentum_buffers or {}
    new, kappa = [], []
    for name, theta, g in zip(names, weights, grads, strict=True):
        if g is None:
            new.append(theta.detach())
            kappa.append(0.0)
            continue
        d = g + weight_decay * theta.detach() if weight_decay else g
        k = 1.0
        if momentum:
            buf = buffers.get(name)
            if buf is None:
                buf, k_buf = d, 1.0
            else:
                buf, k_buf = momentum * buf.detach() + (1 - dampening) * d, 1 - dampening
            d, k = (d + momentum * buf, 1 + momentum * k_buf) if nesterov else (buf, k_buf)
        new.append(keep_layout((theta.detach() - lr * d).detach(), theta))
        kappa.append(k)
    return new, kappa


def mwnet_fast_step(method: MWNet, batch: StepInputs) -> tuple[list[Tensor], Tensor, float]:
    """One MW-Net meta step by the exact identity: (∂L_meta(θ′)/∂φ, losses (B,), L_meta(θ′)).

    1. ℓ = the real model's per-example losses at θ (the real step's forward, kept for the
       real update): per layer for a model that qualifies (``reweight.ghost``; in slices with
       ``meta_chunks``), else recorded on a tangent tape (plain on devices outside
       ``TAPE_DEVICES``, where 4 runs a dual-number forward of the twin instead);
       w = mwnet_weights(vnet, ℓ.detach()).
    2. g = ∇θ Σ wᵢℓᵢ (each layer's weight gradient, or a backward that keeps the graph);
       θ′ = θ − lr·d(g), replaying the real SGD optimizer when ``method.replay_optimizer``
       says so (values only: how θ′ depends on φ is the identity's business).
    3. v′ = ∇θL_meta(θ′): a meta forward and backward through the twin at θ′ (in slices with
       ``meta_chunks``).
    4. cᵢ = ⟨∇θℓᵢ(θ), κ·v′⟩ per layer or by replaying the tape's tangents; then ∂L_meta/∂φ =
       −lr·Σᵢ cᵢ·∂wᵢ/∂φ, a vector-Jacobian product through the weighting net (it covers both
       normalisations).
    """
    if not method.detach_loss:
        raise ValueError(
            "meta_grad='fast' requires method.detach_loss=true: with detach_loss=false the "
            "weighting net's input ℓ also depends on θ, a path the first-order identity does not "
            "cover; use meta_grad='unrolled' or set method.detach_loss=true"
        )
    if batch.dist is not None:
        raise ValueError(
            "meta_grad='fast' for mwnet does not support data-parallel training yet; "
            "use meta_grad='unrolled'"
        )
    assert batch.meta_inputs is not None and batch.meta_targets is not None
    model, lr, loss_fn = batch.model, batch.lr, batch.loss_fn
    names, weights = _trainable(model)
    # 1. the real step's forward (per layer, or taped); the current net's weights
    chunks = method.meta_chunks
    if chunks == "auto":  # slices once the model is known to keep its examples apart
        chunks = 2 if _per_layer_state(model, weights, batch.inputs.device)[0] == "ok" else 1
    fwd = _TrainForward(
        model, weights, batch.inputs, batch.targets, loss_fn, per_layer=True, chunks=chunks
    )
    losses = fwd.losses  # (B,)
    w = mwnet_weights(method.vnet, losses.detach(), method.normalize)  # (B,), graph to φ
    # 2. the virtual step θ′
    grads = torch.autograd.grad(
        (w.detach() * losses).sum(), weights, retain_graph=True, allow_unused=True
    )
    new, kappa = _replay_step(
        weights, grads, names, lr, **method.sgd_kwargs(model, batch.optimizer)
    )
    del grads
    # 3. the meta gradient at θ′
    v, meta_loss = _meta_grad(
        _bound_twin(model),
        weights,
        new,
        batch.meta_inputs,
        batch.meta_targets,
        loss_fn,
        chunks,
    )
    del new
    # 4. c = J(θ)·(κ v′), then the VJP into φ
    direction = [d if k == 1 else k * d for k, d in zip(kappa, v, strict=True)]
    c = fwd.jvp(direction)
    del fwd
    phi = list(method.vnet.parameters())
    vnet_grads = torch.autograd.grad(w, phi, grad_outputs=(-lr * c).to(w.dtype), allow_unused=True)
    return _zeros_for_none(vnet_grads, phi), losses, float(meta_loss)
