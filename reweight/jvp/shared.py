"""What the per-layer engine sees of a recorded forward (``recording``): its layers' calls, by
module hooks, and beyond them weights used outside a layer (``F.linear`` on an attention block's
projections, a class token, a position embedding) and layer calls shared by every example (a
position embedding looked up once for the batch), by a ``Watch``.

A ``Watch`` is a ``TorchFunctionMode`` over the recorded forward, entered only while it follows
something (every op under it takes a detour through Python). It follows *watched* tensors (the
trainable weights no layer owns, from the start; the outputs of layer calls on an unbatched
input, from the call until they are gone) and notes each use of one:

- ``F.linear(x, W, b)`` with a watched ``W`` or ``b``: a linear call like an ``nn.Linear``'s;
- ``F.conv1d/2d/3d(x, W, b, ...)`` with a watched ``W`` or ``b``: a convolution like an
  ``nn.Conv*``'s (zero padding, ``"same"`` only where it pads both sides alike);
- ``torch.addmm(b, x, W)`` likewise (HuggingFace's ``Conv1D``, GPT-2's projections): W is
  (in, out) and x the batch's tokens flattened to rows, read per example once the batch size
  is known (k consecutive rows per example; the first step's check catches any other order);
- a broadcast over the batch (``t.expand(B, ...)``, ``x + t``, ``x += t``): for every example,
  ∂ℓᵢ/∂t is the gradient at that op's output, example i's row, summed over the broadcast dims,
  so the gradient of a weight shared by every example comes from the same one backward;
- an op that returns a watched tensor itself (``.to`` the device it is on) is no use;
- anything else that carries a watched tensor's graph on is a use the path cannot read: noted
  as the reason the model is refused (the forward itself goes on untouched).

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``, a Python function that the
mode sees whole and whose ``F.linear`` calls it would not; for self-attention without masks,
extra key/value biases or returned weights (a ViT's encoder), the watch computes it from calls
it does see: the packed projection, ``F.scaled_dot_product_attention`` and the output
projection, batch first (the same maths; its dropout draws what torch's would). Otherwise
(masks, returned weights) it runs torch's own function, less its torch-function check, under
the mode: the packed input projection is then read on the sequence-first query, the output
projection on (T·B, E) rows, step-major, and any other use of a weight (a key/value projection
split off the packed one, a trained key bias) refuses the model as usual.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from reweight.jvp.layers import LAYERS, LayerCall, conv_call_args, kind_of, norm_stats
from reweight.jvp.recurrent import record_lstm

if TYPE_CHECKING:  # the per-layer engine's, which imports this module
    from reweight.jvp.per_layer import Layers

__all__ = ["Use", "Watch", "Watched", "fold_shared", "recording", "reduce_to"]

# out = f(t, ...) broadcasting t over the batch: ∂out/∂t is the identity, broadcast
_BROADCASTS = frozenset(
    {
        Tensor.expand,
        Tensor.expand_as,
        Tensor.broadcast_to,
        torch.broadcast_to,
        torch.add,
        Tensor.add,
        Tensor.add_,
        Tensor.__add__,
        Tensor.__radd__,
        Tensor.__iadd__,
    }
)
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
# F.conv1d/2d/3d (torch's own functions) by their number of spatial dims, and their arguments
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# the functions whose calls the watch reads (the others it only scans for watched tensors)
_READ = frozenset({F.multi_head_attention_forward, F.linear, torch.addmm, *_CONVS})
_UNREAD = object()  # ``Watch._read``'s answer for a call it leaves to torch


@dataclass(slots=True)
class Use:
    """One broadcast use of a watched tensor: ``out`` carries it over the batch."""

    out: Tensor  # with graph until the backward
    shape: torch.Size  # the watched tensor's
    version: int  # of ``out`` when made: an in-place write later shows
    g: Tensor | None = None  # ∂Σℓ/∂out, detached


@dataclass(slots=True)
class Watched:
    """A watched tensor's owner and uses: a weight no layer owns (``call`` None until its
    broadcast record exists) or a layer call on an unbatched input (held weakly: the mode
    follows it only while it lives)."""

    ref: weakref.ref  # the tensor
    shape: torch.Size
    call: LayerCall | None = None  # the layer call whose output this is
    uses: list[Use] = field(default_factory=list)
    problem: str | None = None


def _watched(t: Tensor, call: LayerCall | None = None) -> Watched:
    return Watched(weakref.ref(t), t.shape, call)


class Watch(TorchFunctionMode):
    """Notes the uses of watched tensors in a forward (``calls``: where ``F.linear`` calls on
    watched weights go, in order with the layer calls).

    On (the torch-function mode entered) only while something is followed: from ``begin`` to
    ``end`` when there are weights no layer owns (they may be used anywhere); else from the
    first followed output until, at a later module call, no followed output lives. Every op
    under the mode costs a detour through Python, so a BERT, whose one followed output is its
    position embeddings, runs its encoder's layers without it.
    """

    def __init__(self, loose: tuple[Tensor, ...], calls: list[LayerCall]) -> None:
        super().__init__()
        self.calls = calls
        self.loose = {id(t) for t in loose}
        # every watched tensor's record, and an index of them by id for the ops' arguments: a
        # followed output is held weakly, so once it is gone its id may be another tensor's,
        # whose record then takes the index's slot while this list keeps both
        self.entries: list[Watched] = [_watched(t) for t in loose]
        self.watched: dict[int, Watched] = {id(w.ref()): w for w in self.entries}
        self.active = False  # the mode entered
        self._depth = 0  # the torch-function mode stack's depth when the recording began

    def begin(self) -> None:
        """The recording begins: on at once when there are weights no layer owns."""
        self._depth = torch._C._len_torch_function_stack()
        if self.loose:
            self._switch(True)

    def end(self) -> None:
        if self.active:
            self._switch(False)

    def settle(self) -> None:
        """Off when nothing followed lives and the mode is the innermost one (a mode the
        model entered and has not left stays above it)."""
        if (
            self.active
            and not self.loose
            and all(w.ref() is None for w in self.entries)
            and torch._C._len_torch_function_stack() == self._depth + 1
        ):
            self._switch(False)

    def _switch(self, on: bool) -> None:
        if on:
            self.__enter__()
        else:
            self.__exit__(None, None, None)
        self.active = on

    def watch_output(self, call: LayerCall, out: Tensor) -> None:
        """Follow a layer call's output (its input is not batched: it may be shared). Turning
        the mode on inside one the model entered would leave it above that one, whose exit
        would then take ours off the stack: such a call is refused instead."""
        w = _watched(out, call)
        self.entries.append(w)
        self.watched[id(out)] = w
        if self.active:
            return
        if torch._C._len_torch_function_stack() == self._depth:
            self._switch(True)
        else:
            call.problem = f"{call.name}: called on an input shared by the batch inside a mode"

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ:  # a call the watch reads itself (most ops are only scanned)
            out = self._read(func, args, kwargs)
            if out is not _UNREAD:
                return out
        hits = self._hits(args, kwargs)
        out = func(*args, **kwargs)
        return self._used(func, hits, kwargs, out) if hits else out

    def _read(self, func: Callable, args: tuple, kwargs: dict) -> object:
        """The result of a linear call on a watched weight, or of self-attention computed from
        calls the watch sees; ``_UNREAD`` for a call it leaves to torch."""
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            if self._hits((), {k: v for k, v in bound.arguments.items() if isinstance(v, Tensor)}):
                if _plain_self_attention(bound.arguments):
                    with self:  # its linear calls are seen
                        return _self_attention(**bound.arguments)
                return self._attention(args, kwargs, bound.arguments["query"])
        if func is F.linear:
            x, w, b = _linear_args(args, kwargs)
            if id(w) in self.loose or (b is not None and id(b) in self.loose):
                out = func(*args, **kwargs)
                self._linear(x, w, b, out)
                return out
        if func in _CONVS:
            a = dict(zip(_CONV_ARGS, args, strict=False)) | kwargs
            w, b = a["weight"], a.get("bias")
            if id(w) in self.loose or (b is not None and id(b) in self.loose):
                out = func(*args, **kwargs)
                self._conv(func, a, out)
                return out
        if func is torch.addmm and not kwargs and len(args) == 3:  # b + x W: HF's Conv1D
            b, x, w = args
            if id(w) in self.loose or id(b) in self.loose:
                out = func(*args)
                self._linear(x, w, b, out, "addmm")
                return out
        return _UNREAD

    def _used(self, func: Callable, hits: list[Watched], kwargs: dict, out: object) -> object:
        """Note ``out``, made by ``func`` from the watched tensors ``hits``, as their use."""
        name = getattr(func, "__name__", str(func))
        if not name.endswith("_") and any(out is w.ref() for w in hits):
            # an op that hands its input on as it is (``.to`` its own device) is no use of it;
            # one that writes into it in place is (the version checks refuse that later)
            return out
        if (
            func in _BROADCASTS
            and len(hits) == 1  # once: ``t + t`` is not a broadcast of t
            and "alpha" not in kwargs
            and isinstance(out, Tensor)
            and out.requires_grad
        ):
            hits[0].uses.append(Use(out, hits[0].shape, out._version))
        elif _carries_graph(out):
            for w in hits:
                w.problem = w.problem or f"a weight shared by the batch is used by {name}"
        return out

    def _hits(self, args: tuple, kwargs: dict) -> list[Watched]:
        """The watched tensors among the arguments (and in lists or tuples of them)."""
        watched, found = self.watched, []
        for a in (*args, *kwargs.values()) if kwargs else args:
            for t in a if isinstance(a, (list, tuple)) else (a,):
                w = watched.get(id(t))  # an id is a watched tensor's only while it lives
                if w is not None and w.ref() is t:
                    found.append(w)
        return found

    def _linear(
        self, x: object, w: Tensor, b: Tensor | None, out: Tensor, name: str = "F.linear"
    ) -> None:
        """A linear call on a watched weight: ``F.linear(x, W, b)``, or ``torch.addmm(b, x, W)``
        (W transposed; x the batch's rows flattened, read per example by ``finish``)."""
        weight = w if id(w) in self.loose else None
        bias = b if b is not None and id(b) in self.loose else None
        call = LayerCall(None, "linear", name, weight, bias)
        call.addmm = name == "addmm"
        if not isinstance(x, Tensor) or not out.requires_grad:
            call.problem = f"{name}: not called on one tensor with a graph"
        elif (weight is None and w.requires_grad) or (
            bias is None and b is not None and b.requires_grad
        ):
            call.problem = f"{name}: a trainable weight of a layer used outside its layer"
        elif name == "addmm" and (b.dim() != 1 or x.dim() != 2):
            call.problem = "addmm: not a bias and a matrix of rows"
        else:
            call.x, call.z, call.versions = x.detach(), out, (x._version, out._version)
        self.calls.append(call)

    def _attention(self, args: tuple, kwargs: dict, query: Tensor) -> object:
        """torch's own attention (masks, returned weights), its body run under the watch: its
        packed input projection is an ``F.linear`` call on the sequence-first (T, B, E) query,
        its output projection one on (T·B, E) rows, step-major; both read so. Any other use of
        the weights (a separate key/value projection's split) is refused as usual."""
        start = len(self.calls)
        if _MHA_BODY is None:  # a torch whose function cannot be run so: refused, not misread
            self.calls.append(LayerCall(None, "linear", "attention", None, None))
            self.calls[-1].problem = "F.multi_head_attention_forward: not readable in this torch"
            return F.multi_head_attention_forward(*args, **kwargs)
        with self:
            out = _MHA_BODY(*args, **kwargs)
        for call in self.calls[start:]:
            if query.dim() != 3:  # one sequence: not batched like the losses
                call.problem = call.problem or "attention on an unbatched query"
                continue
            call.seq_first = True  # (T, B, E)
            if call.x is not None and call.x.dim() == 2:  # the output projection's rows
                call.steps = query.shape[0]
        return out

    def _conv(self, func: Callable, a: dict, out: Tensor) -> None:
        """A convolution on a watched weight or bias: ``F.conv2d(x, W, b, stride, ...)``."""
        x, w, b = a["input"], a["weight"], a.get("bias")
        name = f"F.{func.__name__}"
        weight = w if id(w) in self.loose else None
        bias = b if b is not None and id(b) in self.loose else None
        call = LayerCall(None, "conv", name, weight, bias)
        nd = _CONVS[func]
        args = conv_call_args(a, w, nd)
        if not isinstance(x, Tensor) or not out.requires_grad:
            call.problem = f"{name}: not called on one tensor with a graph"
        elif (call.weight is None and w.requires_grad) or (
            call.bias is None and b is not None and b.requires_grad
        ):
            call.problem = f"{name}: a trainable weight of a layer used outside its layer"
        elif x.dim() != nd + 2:
            call.problem = f"{name}: an unbatched input"
        elif isinstance(args, str):
            call.problem = f"{name}: {args}"
        else:
            call.x, call.z, call.versions = x.detach(), out, (x._version, out._version)
            call.conv, call.kernel = args, w.detach()
        self.calls.append(call)


def fold_shared(followed: list[Watched], calls: list[LayerCall], n: int) -> None:
    """Each weight shared by the batch gets its per-example gradients (the sum over its uses,
    reduced to its shape): a weight no layer owns as a record of its own, a layer called on a
    shared input as if called on every example's copy of it."""
    for w in followed:
        if not w.uses:
            continue
        per_example = sum(reduce_to(u.g, u.shape) for u in w.uses)
        if w.call is None:  # a weight no layer owns: its per-example gradients, as they are
            calls.append(LayerCall(None, "broadcast", "broadcast", w.ref(), None))
            calls[-1].per_example = per_example
        else:  # the layer's call, as if made on every example's copy of its input
            c = w.call
            c.g = per_example.view(n, *w.shape[1:])
            c.x = c.x.expand(n, *c.x.shape[1:])
        w.uses = []


@contextlib.contextmanager
def recording(model: nn.Module, layers: Layers, batch: int) -> Iterator[Watch]:
    """Note every call of the named layers of ``model`` made inside (their input and output),
    and every use of a weight no layer owns (the ``Watch``), in a forward of ``batch``
    examples: a layer called on one row when the batch has more may be shared by all of them,
    and its output is followed (held only by the watch, weakly)."""
    watch = Watch(layers.loose, [])
    by_module: dict[nn.Module, tuple[Tensor | None, ...]] = {}
    seq_first: set[nn.Module] = set()  # the layers called on (T, B, ...)
    kinds: dict[nn.Module, tuple[str, str]] = {}  # a layer's kind and its class's name
    for n, m in model.named_modules():
        if n in layers.modules:
            by_module[m] = layers.modules[n]
            if not isinstance(m, nn.LSTM):
                kinds[m] = kind_of(m), next(c.__name__ for c in LAYERS if isinstance(m, c))
        if n in layers.seq_first:
            seq_first.add(m)

    def settle(module: nn.Module, args: tuple) -> None:  # the mode off once nothing followed lives
        watch.settle()

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        watch.settle()
        if module not in by_module:
            return
        # never raise here: that would abort the model's forward, which may be the real one
        x = args[0] if args else None
        if isinstance(module, nn.LSTM):
            _record_lstm(watch, module, args, out, list(by_module[module]))
            return
        w, b = by_module[module]
        kind, name = kinds[module]
        if not isinstance(x, Tensor) or not isinstance(out, Tensor) or not out.requires_grad:
            problem = f"{name}: not called on one tensor with a graph"
            watch.calls.append(LayerCall(module, kind, name, w, b, problem=problem))
            return
        call = LayerCall(
            module, kind, name, w, b, x=x.detach(), z=out, versions=(x._version, out._version),
            seq_first=module in seq_first,
            stats=norm_stats(module, x, out) if kind == "norm" and w is not None else None,
        )  # fmt: skip
        watch.calls.append(call)
        if batch != 1 and x.dim() and x.shape[0] == 1:  # perhaps shared: its uses are followed
            call.z = None  # its gradient comes from its uses: the watch holds it, weakly
            watch.watch_output(call, out)

    handles = (
        nn.modules.module.register_module_forward_pre_hook(settle),
        nn.modules.module.register_module_forward_hook(hook),
    )
    watch.begin()
    try:
        yield watch
    finally:
        watch.end()
        for handle in handles:
            handle.remove()


def _record_lstm(watch: Watch, module: nn.LSTM, args: tuple, out: Any, trainable: list) -> None:
    rec = record_lstm(module, args, out, trainable)
    if isinstance(rec, str):
        watch.calls.append(LayerCall(module, "lstm", "LSTM", None, None, problem=rec))
        return
    x, z = args[0], out[0]
    if not module.batch_first:
        x = x.transpose(0, 1)
    versions = (args[0]._version, z._version)
    call = LayerCall(module, "lstm", "LSTM", None, None, x=x.detach(), z=z, versions=versions)
    call.recurrent = rec
    watch.calls.append(call)


def reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    """(B, P): per example, ``g`` (B, ...) summed over the dims an operand of ``shape`` was
    broadcast along (its dims of size 1 and the leading ones it lacks), batch dim kept."""
    full = (1,) * (g.dim() - len(shape)) + tuple(shape)
    dims = [d for d in range(1, g.dim()) if full[d] == 1 and g.shape[d] != 1]
    out = g.sum(dims, keepdim=True) if dims else g
    return out.reshape(g.shape[0], -1)


def _linear_args(args: tuple, kwargs: dict) -> tuple[object, Tensor, Tensor | None]:
    named = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    return named.get("input"), named["weight"], named.get("bias")


def _carries_graph(out: object) -> bool:
    items = out if isinstance(out, (list, tuple)) else (out,)
    return any(isinstance(t, Tensor) and t.requires_grad for t in items)


def _mha_body() -> Callable | None:
    """``F.multi_head_attention_forward`` less its own torch-function check (the one use of
    ``has_torch_function`` in it), so that run under the watch its calls reach the mode instead
    of handing the whole function back to it; None where the function is not so made."""
    f = F.multi_head_attention_forward
    code = f.__code__
    if "has_torch_function" not in code.co_names or code.co_freevars:
        return None
    scope = {**f.__globals__, "has_torch_function": lambda *_: False}
    body = types.FunctionType(code, scope, f.__name__, f.__defaults__)
    body.__kwdefaults__ = f.__kwdefaults__
    return body


_MHA_BODY = _mha_body()


def _plain_self_attention(a: dict) -> bool:
    """Self-attention on a batched (T, B, E) input with one packed projection, no masks, no
    extra key/value biases, no returned weights: what ``_self_attention`` computes."""
    q = a["query"]
    return (
        q is a["key"] is a["value"]
        and q.dim() == 3
        and a.get("in_proj_weight") is not None
        and a.get("bias_k") is None
        and a.get("bias_v") is None
        and not a.get("add_zero_attn")
        and not a.get("need_weights", True)
        and a.get("key_padding_mask") is None
        and a.get("attn_mask") is None
        and not a.get("use_separate_proj_weight", False)
        and a.get("static_k") is None
        and a.get("static_v") is None
        and not a.get("is_causal", False)
        and q.shape[-1] == a["embed_dim_to_check"]
        and q.shape[-1] % a["num_heads"] == 0
    )


def _self_attention(
    query: Tensor,
    num_heads: int,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    **_: object,
) -> tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` in the cases ``_plain_self_attention`` admits."""
    x = query.transpose(0, 1)  # (B, T, E): nn.MultiheadAttention hands it sequence first
    b, t, e = x.shape
    h = num_heads
    qkv = F.linear(x, in_proj_weight, in_proj_bias)  # (B, T, 3E)
    q, k, v = qkv.view(b, t, 3, h, e // h).permute(2, 0, 3, 1, 4)  # each (B, H, T, E/H)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0)
    o = F.linear(o.transpose(1, 2).reshape(b, t, e), out_proj_weight, out_proj_bias)
    # (T, B, E) contiguous, as torch's own returns it: a dropout's mask follows the memory
    # layout, so a dropout after the attention draws the masks the model's own forward draws
    return o.transpose(0, 1).contiguous(), None
