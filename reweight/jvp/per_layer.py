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
weight or bias of an ``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding, not transposed),
``nn.Embedding``, affine normalisation layer or ``nn.LSTM`` (its gates are linear maps of each
step's input and previous hidden state: ``reweight.jvp.recurrent``), or a ``loose`` weight,
read where the forward uses it (``reweight.jvp.shared``): an ``nn.MultiheadAttention``'s
projections, and the own weights of modules outside ``torch.nn`` (a ViT's class token and
position embedding, a module's own ``F.linear`` or ``F.conv*`` weight); no BatchNorm is in
training mode, and every layer's input and output are batched (or, for a call made once for
the whole batch, such as BERT's position embeddings, broadcast over it; or, for the linear and
norm layers of torch's own sequence-first transformer layers, batched along their second dim)
and not written in place later in the forward (``ReLU(inplace=True)`` right after a layer
is). By measurement, because a model's own code may still mix examples or use a weight outside its
layer: on the first step of every (model, structure, mode) a separate forward computes a JVP
both ways (this one and an exact engine's) and the per-layer path is used only if they agree
to rounding; otherwise a warning says so and the exact general path stays
(``reweight.jvp.planner``).

Layers are named as in ``model.named_modules()``, so the same record can be made of the real
model or of its twin (whose layers have the same names and hold the same weight tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from reweight.jvp.base import Forward, Recording
from reweight.jvp.layers import CONVS, LAYERS, LayerCall, same_padding
from reweight.jvp.recurrent import lstm_calls, lstm_problem
from reweight.jvp.shared import Watch, fold_shared, recording

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


@dataclass(frozen=True)
class Layers:
    """What the per-layer path reads of a model: ``modules``, name in ``model.named_modules()``
    -> (its trainable weight, its trainable bias), None if frozen (an LSTM's: one per flat
    weight, in its order); ``loose``, the trainable tensors no such layer owns, read where the
    forward uses them (``reweight.jvp.shared``)."""

    modules: dict[str, tuple[Tensor | None, ...]]
    loose: tuple[Tensor, ...] = ()
    # layers called on (T, B, ...): the feed-forward and norm layers of torch's sequence-first
    # transformer layers (``batch_first=False``, torch's default), and their stacks' final norm
    seq_first: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.modules)


class Ineligible(Exception):
    """The model (or this forward) does not fit the per-layer path; the reason is the message."""


def ghost_layers(model: nn.Module, weights: Sequence[Tensor]) -> Layers:
    """The layers the per-layer path needs, by name: (trainable weight, trainable bias).

    Raises ``Ineligible`` when the model's structure rules the path out.
    """
    wanted = {id(w) for w in weights}
    layers: dict[str, tuple[Tensor | None, ...]] = {}
    loose: list[Tensor] = []
    covered: set[int] = set()
    attention_parts: set[int] = set()  # an nn.MultiheadAttention's out_proj (called functionally)
    for name, m in model.named_modules():
        # BatchNorm couples the examples of a batch for every weight it lies downstream of; one
        # registered before every weight the direction moves (the body of a net whose head
        # alone moves) leaves their per-example gradients exact. Registration order stands in
        # for the order of the forward here; the first step's numerical check confirms it.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and (layers or loose):
            raise Ineligible(f"BatchNorm in training mode ({name or type(m).__name__})")
        if isinstance(m, nn.MultiheadAttention):
            if m.bias_k is not None or not m._qkv_same_embed_dim:
                raise Ineligible(f"{name}: MultiheadAttention with add_bias_kv or kdim/vdim")
            attention_parts.add(id(m.out_proj))
        own = [p for p in m._parameters.values() if p is not None and id(p) in wanted]
        if not own:
            continue
        if isinstance(m, nn.LSTM) and _torch(m):
            layers[name] = _lstm_entry(name, m, wanted)
            covered.update(id(p) for p in own)
            continue
        if isinstance(m, nn.MultiheadAttention) or id(m) in attention_parts or not _torch(m):
            # read where the forward uses them: F.linear calls, broadcasts over the batch
            loose.extend(own)
            covered.update(id(p) for p in own)
            continue
        if type(m) not in LAYERS:
            raise Ineligible(
                f"{name or 'the model'} ({type(m).__name__}) has trainable weights, and only "
                "nn.Linear, nn.Conv, nn.Embedding, nn.MultiheadAttention, nn.LSTM and affine "
                "normalisation layers' are read per layer"
            )
        _check_layer(name, m)
        w = m.weight if id(m.weight) in wanted else None
        bias = getattr(m, "bias", None)  # Embedding and RMSNorm have none
        b = bias if bias is not None and id(bias) in wanted else None
        layers[name] = (w, b)
        covered.update(id(p) for p in own)
    missing = wanted - covered
    if missing:
        raise Ineligible("a trainable tensor is not a weight or bias of a linear/conv layer")
    return Layers(layers, tuple(loose), _sequence_first(model) & frozenset(layers))


_SEQ_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SEQ_STACKS = (nn.TransformerEncoder, nn.TransformerDecoder)


def _sequence_first(model: nn.Module) -> frozenset[str]:
    """The names of the layers torch's transformer classes call on sequence-first (T, B, ...)
    tensors: in a layer with ``batch_first=False``, its linear and norm layers; in a stack of
    such layers, its final norm. Known by the classes' own forward (their exact types only),
    so a batch of T examples is never read as T steps of one."""
    names = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(m) in _SEQ_LAYERS and not m.self_attn.batch_first:
            parts = ("linear1", "linear2", "norm1", "norm2", "norm3")
            names.update(prefix + p for p in parts if isinstance(getattr(m, p, None), nn.Module))
        elif type(m) in _SEQ_STACKS and m.norm is not None and len(m.layers):
            first = m.layers[0]
            if type(first) in _SEQ_LAYERS and not first.self_attn.batch_first:
                names.add(prefix + "norm")
    return frozenset(names)


def _check_layer(name: str, m: nn.Module) -> None:
    """Raise ``Ineligible`` for an option of a layer its per-layer reading does not model."""
    if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq):
        # max_norm rewrites the weight in the forward; scale_grad_by_freq couples examples
        raise Ineligible(f"{name}: Embedding with max_norm or scale_grad_by_freq")
    if isinstance(m, nn.Embedding) and m.sparse:
        raise Ineligible(f"{name}: a sparse Embedding")
    if isinstance(m, CONVS):
        if m.padding_mode != "zeros":
            raise Ineligible(f"{name}: padding_mode={m.padding_mode!r}")
        if m.padding == "same" and same_padding(m.dilation, m.kernel_size) is None:
            raise Ineligible(f"{name}: asymmetric 'same' padding")
    if m._forward_pre_hooks or m._forward_hooks or getattr(m, "parametrizations", None):
        raise Ineligible(f"{name}: hooks or parametrizations")


def _lstm_entry(name: str, m: nn.LSTM, wanted: set[int]) -> tuple[Tensor | None, ...]:
    """An LSTM's entry in ``Layers.modules``: one per flat weight, in the module's order, the
    trainable tensor or None (frozen); ``Ineligible`` for what ``recurrent`` does not model."""
    problem = lstm_problem(m)
    if problem is not None or m._forward_pre_hooks or m._forward_hooks:
        raise Ineligible(f"{name}: {problem or 'hooks'}")
    return tuple(t if id(t) in wanted else None for t in m._flat_weights)


def _torch(module: nn.Module) -> bool:
    """A layer of torch's own (``torch.nn``): its weights are read by its class or not at all;
    another module's own weights (a class token, a position embedding) are read where used."""
    return type(module).__module__.startswith("torch.")


def finish(
    weights: Sequence[Tensor], watch: Watch, losses: Tensor, keep_graph: bool = False
) -> GhostRecord:
    """The record of a recorded forward, from its per-example losses (B,), with graph (with
    ``keep_graph``, the record's ``graph`` holds those losses with their graph still whole).

    Runs one backward of Σℓ to the layer outputs (no weight gradients), which frees the
    forward's graph unless ``keep_graph``: when the recorded weights are some of the model's
    trainable ones, the real update backpropagates through the forward itself.
    """
    n = losses.shape[0]
    calls = list(watch.calls)
    shared = _shared_calls(calls, watch, n)
    followed = [w for w in watch.entries if w.call is None or id(w.call) in shared]
    uses = [u for w in followed for u in w.uses]
    for w in followed:
        if w.problem is not None:
            raise Ineligible(w.problem)
    for u in uses:
        if u.out.shape[0] != n or u.out._version != u.version:
            raise Ineligible("a weight shared by the batch is not broadcast like the losses")
    batched = [c for c in calls if id(c) not in shared]
    lstms = [c for c in batched if c.kind == "lstm"]
    finals = [t for c in lstms for t in c.recurrent.finals]  # an LSTM's (h_n, c_n)
    zs = [c.z for c in batched] + [u.out for u in uses] + finals
    gs = torch.autograd.grad(losses.sum(), zs, allow_unused=True, retain_graph=keep_graph)
    gs = [torch.zeros_like(z) if g is None else g.detach() for z, g in zip(zs, gs, strict=True)]
    n_out = len(batched) + len(uses)  # the layer outputs' and broadcasts' gradients come first
    for t, g in zip([*batched, *uses], gs[:n_out], strict=True):
        t.g = g
    for c in batched:
        _rows_per_example(c, n)
    for k, c in enumerate(lstms):
        c.recurrent.g_finals = tuple(gs[n_out + 2 * k : n_out + 2 * k + 2])
        c.recurrent.finals = None
    for c in calls:
        c.z = None
    for u in uses:
        u.out = None
    del zs, gs
    if lstms:  # each as the linear maps it is made of, once its gate gradients are known
        try:
            calls = [e for c in calls for e in (lstm_calls(c) if c.kind == "lstm" else [c])]
        except ValueError as err:
            raise Ineligible(f"LSTM: {err}") from err
    fold_shared(followed, calls, n)
    for c in calls:
        if c.per_example is not None or c.kind == "gates":
            continue
        params = sum(t.numel() for t in (c.weight, c.bias) if t is not None)
        if c.kind == "norm" or (
            c.kind != "embedding" and c.g.dim() > 2 and params * n <= c.g.numel()
        ):
            c.make_per_example()
    record = GhostRecord(weights, calls, losses.detach())
    record.graph = losses if keep_graph else None
    return record


def _rows_per_example(c: LayerCall, n: int) -> None:
    """An addmm call's input and output gradient, (B·k, ·) rows, viewed as (B, k, ·): per
    example; a call's on step-major (T·B, ·) rows as (T, B, ·). (A sequence-first call's stay
    (T, B, ·): its maths sums over dim 0.)"""
    if c.addmm:
        c.x, c.g = c.x.reshape(n, -1, c.x.shape[-1]), c.g.reshape(n, -1, c.g.shape[-1])
    elif c.steps:
        c.x, c.g = c.x.reshape(c.steps, n, c.x.shape[-1]), c.g.reshape(c.steps, n, c.g.shape[-1])


def _shared_calls(calls: list[LayerCall], watch: Watch, n: int) -> dict[int, Any]:
    """Every layer call checked to be readable per example (batched like the ``n`` losses, not
    modified in place); ``{id(call): its Watched}`` for those on an input the batch shares."""
    shared = {}  # id(call) -> its Watched: a layer call on an input shared by the batch
    followed = {id(w.call): w for w in watch.entries if w.call is not None}
    for c in calls:
        if c.problem is not None:
            raise Ineligible(c.problem)
        least = 1 if c.kind == "embedding" else 2  # indices (B,) or (B, T, ...)
        w = followed.get(id(c))
        if w is not None:  # called on one row: shared by the batch if its uses broadcast it
            z = w.ref()  # None: gone, so unchanged since the watch last saw it
            if c.x is None or c.x.dim() < least or w.shape[0] != 1 or not w.uses:
                raise Ineligible(f"{c.name}: input not batched like the losses")
            if c.x._version != c.versions[0] or (z is not None and z._version != c.versions[1]):
                raise Ineligible(f"{c.name}: its input or output was modified in place")
            shared[id(c)] = w
            continue
        if c.x is None or c.x.dim() < least or c.z is None:
            raise Ineligible(f"{c.name}: input not batched like the losses")
        if (c.x._version, c.z._version) != c.versions:
            # e.g. ReLU(inplace=True) on a layer's output: autograd would then differentiate
            # with respect to the ReLU's result, not the layer's output
            raise Ineligible(f"{c.name}: its input or output was modified in place")
        if c.addmm:  # k rows per example, consecutive: read per example once g is known
            if c.x.shape[0] % n or c.z.shape[0] != c.x.shape[0]:
                raise Ineligible(f"{c.name}: rows not batched like the losses")
            continue
        if c.steps:  # (T·B, ·) rows, step-major: read as (T, B, ·) once g is known
            if c.x.dim() != 2 or c.x.shape[0] != c.steps * n or c.z.shape[0] != c.x.shape[0]:
                raise Ineligible(f"{c.name}: rows not batched like the losses")
            continue
        if c.seq_first:  # (T, B, ...): read per example once g is known
            if c.x.dim() < 3 or c.x.shape[1] != n or c.z.shape[1] != n:
                raise Ineligible(f"{c.name}: input not batched like the losses")
            continue
        # an LSTM's input is kept batch first; its output is as the module returns it
        z_batch = 1 if c.kind == "lstm" and not c.module.batch_first else 0
        if c.x.shape[0] != n or c.z.shape[z_batch] != n:
            raise Ineligible(f"{c.name}: input not batched like the losses")
    return shared


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

    def __init__(self, weights: Sequence[Tensor], calls: list[LayerCall], values: Tensor) -> None:
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
            us = [None if t is None else by_id.get(id(t)) for t in call.tensors]
            if all(u is None for u in us):  # a layer the direction does not move
                continue
            out += call.inner_of(us).to(out.dtype)
        return out

    @torch.no_grad()
    def weighted_grads(self, seeds: Tensor) -> list[Tensor | None]:
        """∇θ Σᵢ sᵢℓᵢ per weight (None for a weight no layer reached)."""
        grads: list[Tensor | None] = [None] * len(self.weights)
        last: list = []  # the latest scaled input, for the next call on the same input
        for call in self.calls:
            for t, g in zip(call.tensors, call.grads_of(seeds, last), strict=True):
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
                with recording(fwd.module, layers, len(part)) as watch:
                    losses = fwd.run(rows=rows)
                record = finish(fwd.weights, watch, losses, keep)
                self.records.append(record)
                if record.graph is not None:
                    kept.append(record.graph)
                    record.graph = None  # held once, by this recording
                del watch, losses
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
