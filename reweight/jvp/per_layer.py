"""The per-layer engine: JVPs and weighted gradients from one backward, layer by layer.

For a model whose examples do not interact (no BatchNorm in training mode, no op that mixes
the rows of a batch), the gradient of example i's loss with respect to the weight of a linear
or convolutional layer is an outer product of two things one backward already has: the layer's
input Xᵢ and the gradient Gᵢ = ∂ℓᵢ/∂zᵢ at its output. So after one forward and one backward of
Σᵢ ℓᵢ that stops at the layer outputs (no weight gradients, nothing below the first layer),
everything the fast meta steps need follows per layer, without forming per-example gradients of
the large layers (the "ghost" trick used for per-example gradient norms, Goodfellow 2015):

    ⟨∇θℓᵢ, u⟩ = Σ_layers ⟨Gᵢ, layer(Xᵢ; U, u_b)⟩          (the JVP: one linear op per layer)
    ∇θ Σᵢ sᵢℓᵢ = per layer, the weight gradient of (Xᵢ, sᵢ·Gᵢ)   (any seeds s, as often as needed)

The second gives both MW-Net's virtual step and the real update, each for the price of a
backward's weight-gradient half; the recorded forward's graph is freed after the one backward,
so nothing the size of the training graph is held across the meta pass. A layer whose
per-example gradients are no bigger than its output (a first convolution with few input
channels) keeps those instead of Xᵢ and Gᵢ.

Whether a model qualifies is decided in two stages. By structure: every trainable tensor is the
weight or bias of an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (zero padding, not transposed), no
BatchNorm is in training mode, and every layer's input and output are batched and not written
in place later in the forward (``ReLU(inplace=True)`` right after a layer is). By measurement,
because a model's own code may still mix examples or use a weight outside its layer: on the
first step of every (model, structure, mode) a separate forward computes a JVP both ways (this
one and an exact engine's) and the per-layer path is used only if they agree to rounding;
otherwise a warning says so and the exact general path stays (``reweight.jvp.planner``).

Layers are named as in ``model.named_modules()``, so the same record can be made of the real
model or of its twin (whose layers have the same names and hold the same weight tensors).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reweight.jvp.base import Forward, Recording

__all__ = [
    "GhostRecord",
    "Ineligible",
    "Layers",
    "PerLayerRecording",
    "agree",
    "finish",
    "ghost_layers",
    "jvp_of",
    "losses_of",
    "recording",
    "weighted_grads_of",
]

# name in ``model.named_modules()`` -> (its trainable weight, its trainable bias), None if frozen
Layers = dict[str, tuple[Tensor | None, Tensor | None]]

aten = torch.ops.aten
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# affine normalisations: per example, their weight's gradient is Σ (g ⊙ x̂) over the positions
_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_LAYERS = (nn.Linear, *_CONVS, *_NORMS, nn.Embedding)


class Ineligible(Exception):
    """The model (or this forward) does not fit the per-layer path; the reason is the message."""


@dataclass(slots=True)
class _Layer:
    """One call of a linear or convolutional layer in the recorded forward."""

    module: nn.Module
    weight: Tensor | None  # the trainable weight (None: frozen)
    bias: Tensor | None  # the trainable bias (None: frozen or absent)
    x: Tensor | None = None  # input (B, ...), detached; None once per-example grads replace it
    z: Tensor | None = None  # output, with graph, until the backward has run
    g: Tensor | None = None  # ∂Σℓ/∂z (B, ...), detached
    per_example: Tensor | None = None  # (B, weight.numel() [+ bias.numel()]) instead of x, g
    versions: tuple[int, int] = (0, 0)  # of x and z when recorded: in-place writes show later
    problem: str | None = None  # why this call cannot be used (raised by ``finish``)

    # -- the layer's maths -----------------------------------------------------------------

    def _conv_args(self) -> tuple:
        m = self.module
        padding = m.padding
        if isinstance(padding, str):  # "valid" or a symmetric "same" (checked at record time)
            padding = (
                [0] * len(m.kernel_size)
                if padding == "valid"
                else [d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True)]
            )
        return list(m.stride), list(padding), list(m.dilation), m.groups

    def apply(self, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """The layer's linear map of the recorded input with the given weight and bias."""
        assert self.x is not None
        if isinstance(self.module, nn.Linear):
            out = self.x @ weight.t() if weight is not None else None
            if bias is not None:
                out = bias.expand(*self.x.shape[:-1], -1) if out is None else out + bias
            return out
        stride, padding, dilation, groups = self._conv_args()
        w = weight if weight is not None else torch.zeros_like(self.module.weight)
        return aten.convolution(
            self.x, w, bias, stride, padding, dilation, False, [0] * len(padding), groups
        )

    def normalized(self) -> Tensor:
        """A normalisation layer's input normalised, before its affine weight and bias: x̂."""
        m, x = self.module, self.x
        assert x is not None
        if isinstance(m, nn.GroupNorm):
            return torch.nn.functional.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return torch.nn.functional.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return torch.nn.functional.rms_norm(x, m.normalized_shape, None, m.eps)

    def _embedding_rows(self, seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(indices, g) of an embedding's calls, flat, padding positions dropped (its row gets
        no gradient), g scaled per example by ``seeds``."""
        assert self.x is not None and self.g is not None
        idx, g = self.x, self.g
        if seeds is not None:
            g = g * seeds.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
        idx, g = idx.reshape(-1), g.reshape(-1, g.shape[-1])
        pad = self.module.padding_idx
        if pad is not None:
            keep = idx != pad
            idx, g = idx[keep], g[keep]
        return idx, g

    def weighted_grads(self, seeds: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(∂/∂W, ∂/∂b) of Σᵢ sᵢℓᵢ for this layer."""
        if isinstance(self.module, nn.Embedding):
            idx, g = self._embedding_rows(seeds)
            assert self.weight is not None
            return torch.zeros_like(self.weight).index_add_(0, idx, g.to(self.weight.dtype)), None
        if self.per_example is not None:
            flat = seeds.to(self.per_example.dtype) @ self.per_example
            return self._split(flat)
        assert self.x is not None and self.g is not None
        gs = self.g * seeds.to(self.g.dtype).view(-1, *([1] * (self.g.dim() - 1)))
        if isinstance(self.module, nn.Linear):
            x2, g2 = self.x.reshape(-1, self.x.shape[-1]), gs.reshape(-1, gs.shape[-1])
            gw = g2.t() @ x2 if self.weight is not None else None
            gb = g2.sum(0) if self.bias is not None else None
            return gw, gb
        stride, padding, dilation, groups = self._conv_args()
        w = self.module.weight
        _, gw, gb = aten.convolution_backward(
            gs,
            self.x,
            w,
            [w.shape[0]] if self.bias is not None else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(padding),
            groups,
            [False, self.weight is not None, self.bias is not None],
        )
        return gw, gb

    def inner(self, u_w: Tensor | None, u_b: Tensor | None) -> Tensor:
        """⟨∇ℓᵢ, (u_w, u_b)⟩ restricted to this layer, for every i: (B,)."""
        if isinstance(self.module, nn.Embedding):
            # the forward's derivative, padding row included, as dual numbers and the tape take
            # it (a direction made by a backward is zero there: torch gives that row no gradient)
            assert self.x is not None and self.g is not None and u_w is not None
            rows = torch.nn.functional.embedding(self.x, u_w.to(self.g.dtype))
            return (rows * self.g).flatten(1).sum(1)
        if self.per_example is not None:
            parts = [
                (torch.zeros_like(t) if u is None else u).reshape(-1)
                for t, u in ((self.weight, u_w), (self.bias, u_b))
                if t is not None
            ]
            return self.per_example @ torch.cat(parts).to(self.per_example.dtype)
        assert self.g is not None
        t = self.apply(u_w.to(self.g.dtype) if u_w is not None else None, u_b)
        return (t * self.g).flatten(1).sum(1)

    def _norm_per_example(self) -> Tensor:
        """(B, P): a normalisation's per-example (weight, bias) gradients, Σ over positions of
        g ⊙ x̂ and of g (the affine acts on dim 1 for GroupNorm, on the trailing dims else)."""
        assert self.g is not None
        g, b = self.g, self.g.shape[0]
        if isinstance(self.module, nn.GroupNorm):
            dims = tuple(range(2, g.dim()))
        else:
            dims = tuple(range(1, g.dim() - len(self.module.normalized_shape)))

        def over_positions(t: Tensor) -> Tensor:  # (B, P); an empty dims would sum everything
            return (t.sum(dims) if dims else t).reshape(b, -1)

        cols = []
        if self.weight is not None:
            cols.append(over_positions(g * self.normalized()))
        if self.bias is not None:
            cols.append(over_positions(g))
        return torch.cat(cols, 1) if len(cols) > 1 else cols[0]

    def _split(self, flat: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gw = gb = None
        k = 0
        if self.weight is not None:
            k = self.weight.numel()
            gw = flat[:k].view(self.weight.shape)
        if self.bias is not None:
            gb = flat[k:].view(self.bias.shape)
        return gw, gb

    def make_per_example(self) -> None:
        """Replace (x, g) by the per-example gradients (B, P) of this layer."""
        assert self.x is not None and self.g is not None
        b = self.x.shape[0]
        if isinstance(self.module, _NORMS):
            self.per_example = self._norm_per_example()
            self.x = self.g = None
            return
        cols = []
        if self.weight is not None:
            if isinstance(self.module, nn.Linear):
                x3, g3 = (
                    self.x.reshape(b, -1, self.x.shape[-1]),
                    self.g.reshape(b, -1, self.g.shape[-1]),
                )
                cols.append((g3.transpose(1, 2) @ x3).reshape(b, -1))
            else:  # the batch as groups: one grouped weight gradient gives all B of them
                stride, padding, dilation, groups = self._conv_args()
                w = self.module.weight
                x = self.x.reshape(1, -1, *self.x.shape[2:])
                g = self.g.reshape(1, -1, *self.g.shape[2:])
                wide = w.detach().repeat(b, *([1] * (w.dim() - 1)))
                _, gw, _ = aten.convolution_backward(
                    g,
                    x,
                    wide,
                    None,
                    stride,
                    padding,
                    dilation,
                    False,
                    [0] * len(padding),
                    groups * b,
                    [False, True, False],
                )
                cols.append(gw.reshape(b, -1))
        if self.bias is not None:
            if isinstance(self.module, nn.Linear):
                cols.append(self.g.reshape(b, -1, self.g.shape[-1]).sum(1))
            else:
                cols.append(self.g.flatten(2).sum(2))
        self.per_example = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
        self.x = self.g = None


def ghost_layers(model: nn.Module, weights: Sequence[Tensor]) -> Layers:
    """The layers the per-layer path needs, by name: (trainable weight, trainable bias).

    Raises ``Ineligible`` when the model's structure rules the path out.
    """
    wanted = {id(w) for w in weights}
    layers: Layers = {}
    covered: set[int] = set()
    for name, m in model.named_modules():
        # BatchNorm couples the examples of a batch for every weight it lies downstream of; one
        # registered before every weight the direction moves (the body of a net whose head
        # alone moves) leaves their per-example gradients exact. Registration order stands in
        # for the order of the forward here; the first step's numerical check confirms it.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and layers:
            raise Ineligible(f"BatchNorm in training mode ({name or type(m).__name__})")
        own = [p for p in m._parameters.values() if p is not None and id(p) in wanted]
        if not own:
            continue
        if type(m) not in _LAYERS:
            raise Ineligible(
                f"{name or 'the model'} ({type(m).__name__}) has trainable weights, and only "
                "nn.Linear, nn.Conv, nn.Embedding and affine normalisation layers' are read "
                "per layer"
            )
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
            # max_norm rewrites the weight in the forward; scale_grad_by_freq couples examples
            raise Ineligible(f"{name}: Embedding with max_norm or scale_grad_by_freq")
        if isinstance(m, nn.Embedding) and m.sparse:
            raise Ineligible(f"{name}: a sparse Embedding")
        if isinstance(m, _CONVS):
            if m.padding_mode != "zeros":
                raise Ineligible(f"{name}: padding_mode={m.padding_mode!r}")
            if m.padding == "same" and any(
                d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size, strict=True)
            ):
                raise Ineligible(f"{name}: asymmetric 'same' padding")
        if m._forward_pre_hooks or m._forward_hooks or getattr(m, "parametrizations", None):
            raise Ineligible(f"{name}: hooks or parametrizations")
        w = m.weight if id(m.weight) in wanted else None
        bias = getattr(m, "bias", None)  # Embedding and RMSNorm have none
        b = bias if bias is not None and id(bias) in wanted else None
        layers[name] = (w, b)
        covered.update(id(p) for p in own)
    missing = wanted - covered
    if missing:
        raise Ineligible("a trainable tensor is not a weight or bias of a linear/conv layer")
    return layers


def _kind(layer: nn.Module) -> str:
    """The layer's class as the model has it (a twin's ``MetaLinear`` is a ``Linear``)."""
    return next(c.__name__ for c in _LAYERS if isinstance(layer, c))


@contextlib.contextmanager
def recording(model: nn.Module, layers: Layers) -> Iterator[list[_Layer]]:
    """Note every call of the named layers of ``model`` made inside (their input and output)."""
    calls: list[_Layer] = []
    by_module = {m: layers[n] for n, m in model.named_modules() if n in layers}

    def hook(module: nn.Module, args: tuple, out: object) -> None:
        if module not in by_module:
            return
        # never raise here: that would abort the model's forward, which may be the real one
        x = args[0] if args else None
        w, b = by_module[module]
        if not isinstance(x, Tensor) or not isinstance(out, Tensor) or not out.requires_grad:
            problem = f"{_kind(module)}: not called on one tensor with a graph"
            calls.append(_Layer(module, w, b, problem=problem))
            return
        calls.append(_Layer(module, w, b, x=x.detach(), z=out, versions=(x._version, out._version)))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def finish(
    weights: Sequence[Tensor], calls: list[_Layer], losses: Tensor, keep_graph: bool = False
) -> GhostRecord:
    """The record of a recorded forward, from its per-example losses (B,), with graph (with
    ``keep_graph``, the record's ``graph`` holds those losses with their graph still whole).

    Runs one backward of Σℓ to the layer outputs (no weight gradients), which frees the
    forward's graph unless ``keep_graph``: when the recorded weights are some of the model's
    trainable ones, the real update backpropagates through the forward itself.
    """
    n = losses.shape[0]
    for c in calls:
        name = _kind(c.module)
        if c.problem is not None:
            raise Ineligible(c.problem)
        least = 1 if isinstance(c.module, nn.Embedding) else 2  # indices (B,) or (B, T, ...)
        if c.x is None or c.x.dim() < least or c.x.shape[0] != n or c.z is None:
            raise Ineligible(f"{name}: input not batched like the losses")
        if c.z.shape[0] != n:
            raise Ineligible(f"{name}: input not batched like the losses")
        if (c.x._version, c.z._version) != c.versions:
            # e.g. ReLU(inplace=True) on a layer's output: autograd would then differentiate
            # with respect to the ReLU's result, not the layer's output
            raise Ineligible(f"{name}: its input or output was modified in place")
    zs = [c.z for c in calls]
    gs = torch.autograd.grad(losses.sum(), zs, allow_unused=True, retain_graph=keep_graph)
    for c, g in zip(calls, gs, strict=True):
        c.g = torch.zeros_like(c.z) if g is None else g.detach()
        c.z = None
    del zs, gs
    for c in calls:
        params = sum(t.numel() for t in (c.weight, c.bias) if t is not None)
        if isinstance(c.module, _NORMS) or (
            not isinstance(c.module, nn.Embedding) and c.g.dim() > 2 and params * n <= c.g.numel()
        ):
            c.make_per_example()
    record = GhostRecord(weights, calls, losses.detach())
    record.graph = losses if keep_graph else None
    return record


def losses_of(records: Sequence[GhostRecord]) -> Tensor:
    """The losses of consecutive slices of a batch (B,), their backward the records' own:
    ``(s * losses).sum().backward()`` fills ``.grad`` as a backward through the forward would."""
    values = torch.cat([r.values for r in records]) if len(records) > 1 else records[0].values
    return _GhostLosses.apply(records, values, *records[0].weights)


def jvp_of(records: Sequence[GhostRecord], directions: Sequence[Tensor]) -> Tensor:
    """⟨∇θℓᵢ(θ), u⟩ over consecutive slices of a batch: (B,)."""
    parts = [r.jvp(directions) for r in records]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class GhostRecord:
    """One training forward kept per layer: JVPs and weighted gradients for any seeds."""

    def __init__(self, weights: Sequence[Tensor], calls: list[_Layer], values: Tensor) -> None:
        self.weights = list(weights)
        self.calls = calls
        self.values = values  # the losses (B,), detached
        self.graph: Tensor | None = None  # the losses with their forward's graph, when kept
        self._index = {id(w): i for i, w in enumerate(self.weights)}

    @torch.no_grad()
    def jvp(self, directions: Sequence[Tensor]) -> Tensor:
        """⟨∇θℓᵢ(θ), u⟩ for every example i, u given per weight: (B,)."""
        by_id = {id(w): d for w, d in zip(self.weights, directions, strict=True)}
        out = torch.zeros_like(self.values)
        for call in self.calls:
            u_w = by_id.get(id(call.weight)) if call.weight is not None else None
            u_b = by_id.get(id(call.bias)) if call.bias is not None else None
            if u_w is None and u_b is None:  # a layer the direction does not move
                continue
            out += call.inner(u_w, u_b).to(out.dtype)
        return out

    @torch.no_grad()
    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        """∇θ Σᵢ sᵢℓᵢ per weight (None for a weight no layer reached)."""
        grads: list[Tensor | None] = [None] * len(self.weights)
        for call in self.calls:
            for t, g in zip((call.weight, call.bias), call.weighted_grads(seeds), strict=True):
                if t is None or g is None:
                    continue
                i = self._index[id(t)]
                g = g.to(t.dtype)
                grads[i] = g if grads[i] is None else grads[i] + g
        return grads


class _GhostLosses(torch.autograd.Function):
    """The losses' values; backward: the records' weighted gradients for the incoming seeds."""

    @staticmethod
    def forward(ctx, records: Sequence[GhostRecord], values: Tensor, *weights: Tensor) -> Tensor:
        ctx.records = records
        return values.clone()

    @staticmethod
    def backward(ctx, seeds: Tensor) -> tuple:
        return (None, None, *weighted_grads_of(ctx.records, seeds))


def weighted_grads_of(records: Sequence[GhostRecord], seeds: Tensor) -> list[Tensor | None]:
    """∇θ Σᵢ sᵢℓᵢ over consecutive slices of a batch, per weight (None: no layer reached it)."""
    total: list[Tensor | None] = [None] * len(records[0].weights)
    start = 0
    for r in records:
        n = len(r.values)
        for i, g in enumerate(r.weighted_grads(seeds[start : start + n])):
            if g is not None:
                total[i] = g if total[i] is None else total[i] + g
        start += n
    return total


def agree(a: Tensor, b: Tensor) -> bool:
    """Whether two JVPs (B,) agree to rounding: within √eps of their largest entry."""
    tol = math.sqrt(torch.finfo(a.dtype).eps) * float(torch.maximum(a.abs().max(), b.abs().max()))
    return bool(((a - b).abs() <= tol).all())


class PerLayerRecording(Recording):
    """A forward recorded per layer (in ``chunks`` slices of the batch, each slice's graph freed
    before the next is made): JVPs and weighted gradients are per-layer linear ops."""

    engine = "per_layer"

    def __init__(self, fwd: Forward, layers: Layers, chunks: int = 1) -> None:
        self.records: list[GhostRecord] = []
        # the recorded weights are some of the model's trainable ones (a virtual step over part
        # of it): the real update backpropagates through the forward, whose graph is kept
        trainable = sum(1 for p in fwd.module.parameters() if p.requires_grad)
        keep = fwd.update and len(fwd.weights) < trainable
        kept: list[Tensor] = []
        n = len(fwd.targets)
        with torch.enable_grad():  # the backward to the layer outputs needs the forward's graph
            for part in torch.arange(n).tensor_split(chunks):
                if not len(part):
                    continue
                rows = slice(int(part[0]), int(part[-1]) + 1)
                with recording(fwd.module, layers) as calls:
                    losses = fwd.run(rows=rows)
                record = finish(fwd.weights, calls, losses, keep)
                self.records.append(record)
                if record.graph is not None:
                    kept.append(record.graph)
                    record.graph = None  # held once, by this recording
                del calls, losses
        self.values = (
            torch.cat([r.values for r in self.records])
            if len(self.records) > 1
            else self.records[0].values
        )
        self._update: Tensor | None = None
        if kept:
            self._update = torch.cat(kept) if len(kept) > 1 else kept[0]

    def jvp(self, direction: Sequence[Tensor]) -> Tensor:
        return jvp_of(self.records, direction)

    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        return weighted_grads_of(self.records, seeds)

    def update_losses(self) -> Tensor:
        if self._update is None:
            self._update = losses_of(self.records)
        return self._update
