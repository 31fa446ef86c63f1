"""One recorded call of a layer the per-layer engine reads (``reweight.jvp.per_layer``): its
input and output gradient, and the layer's own maths on them (JVPs, weighted gradients,
per-example gradients) for linear, convolutional, embedding and affine normalisation layers,
``F.linear``, ``torch.addmm`` and ``F.conv*`` calls on weights outside such layers (``module``
None) and weights shared by every example of a batch (``kind`` "broadcast": a class token, a
position embedding), whose per-example gradients are read off the output of the op that
broadcasts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CONVS",
    "LAYERS",
    "NORMS",
    "LayerCall",
    "conv_call_args",
    "kind_of",
    "norm_stats",
    "same_padding",
]

aten = torch.ops.aten
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# affine normalisations: per example, their weight's gradient is Σ (g ⊙ x̂) over the positions
NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
LAYERS = (nn.Linear, *CONVS, *NORMS, nn.Embedding)


def kind_of(layer: nn.Module) -> str:
    """Linear, conv, norm or embedding (a twin's ``MetaLinear`` is a linear layer)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, CONVS):
        return "conv"
    return "norm" if isinstance(layer, NORMS) else "embedding"


@dataclass(slots=True)
class LayerCall:
    """One call of a layer in the recorded forward (or one broadcast use of a shared weight)."""

    module: nn.Module | None  # None: an ``F.linear`` call or a broadcast use
    kind: str  # "linear", "conv", "norm", "embedding" or "broadcast"
    name: str  # for messages: the layer's class, or the function
    weight: Tensor | None  # the trainable weight (None: frozen)
    bias: Tensor | None  # the trainable bias (None: frozen or absent)
    x: Tensor | None = None  # input (B, ...), detached; None once per-example grads replace it
    z: Tensor | None = None  # output, with graph, until the backward has run
    g: Tensor | None = None  # ∂Σℓ/∂z (B, ...), detached
    per_example: Tensor | None = None  # (B, weight.numel() [+ bias.numel()]) instead of x, g
    versions: tuple[int, int] = (0, 0)  # of x and z when recorded: in-place writes show later
    problem: str | None = None  # why this call cannot be used (raised by ``finish``)
    recurrent: Any = None  # an ``nn.LSTM`` call's ``LstmRecord`` (``reweight.jvp.recurrent``)
    _g_sum: Tensor | None = None  # a linear call's g summed over positions (B, out), once
    # a linear call as ``torch.addmm(b, x, W)`` (HuggingFace's ``Conv1D``): W is (in, out), and
    # x, z are the batch flattened to (B·k, ·) rows, k consecutive ones per example, until
    # ``finish`` views x and g per example
    addmm: bool = False
    # called on (T, B, ...) (``Layers.seq_first``): x, z, g and stats stay so, the batch dim 1
    seq_first: bool = False
    # a sequence-first call on (T·B, ·) rows, step-major (T, when so): x and g are viewed as
    # (T, B, ·) by ``finish`` (torch's own attention's output projection)
    steps: int = 0
    # a LayerNorm's or GroupNorm's mean and 1/std as its forward computed them (``norm_stats``),
    # detached: shaped to broadcast against x (LayerNorm), or (N, groups); None: x̂ is
    # recomputed from x
    stats: tuple[Tensor, Tensor] | None = None
    # a functional convolution's (``F.conv*`` on a weight no layer owns, ``module`` None): its
    # stride, padding, dilation and groups, as ``aten.convolution`` takes them, and the weight
    # it was called with, detached (for its shape: no value of it enters the maths)
    conv: tuple[list[int], list[int], list[int], int] | None = None
    kernel: Tensor | None = None

    # -- the layer's maths -----------------------------------------------------------------

    @property
    def tensors(self) -> tuple[Tensor | None, Tensor | None]:
        """The trainable tensors this call reads: (weight, bias), None where frozen."""
        return self.weight, self.bias

    def inner_of(self, us: list[Tensor | None]) -> Tensor:
        """``inner`` with the direction given per tensor of ``tensors``."""
        return self.inner(*us)

    def grads_of(
        self, seeds: Tensor, last: list | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``weighted_grads``, per tensor of ``tensors`` (``last``: see ``weighted_grads``)."""
        return self.weighted_grads(seeds, last)

    def _conv_args(self) -> tuple:
        if self.conv is not None:
            return self.conv
        m = self.module
        padding = m.padding
        if isinstance(padding, str):  # "valid" or a symmetric "same" (checked at record time)
            padding = (
                [0] * len(m.kernel_size)
                if padding == "valid"
                else same_padding(m.dilation, m.kernel_size)
            )
        return list(m.stride), list(padding), list(m.dilation), m.groups

    def _kernel(self) -> Tensor:
        """A convolution's weight as the forward used it (a frozen one included)."""
        return self.kernel if self.kernel is not None else self.module.weight

    def convolve(self, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """A convolution's map of the recorded input with the given weight and bias."""
        assert self.x is not None
        stride, padding, dilation, groups = self._conv_args()
        w = weight if weight is not None else torch.zeros_like(self._kernel())
        return aten.convolution(
            self.x, w, bias, stride, padding, dilation, False, [0] * len(padding), groups
        )

    def normalized(self) -> Tensor:
        """A normalisation layer's input normalised, before its affine weight and bias: x̂
        (from the forward's own mean and 1/std where recorded: two passes over x, against a
        layer norm's three)."""
        m, x = self.module, self.x
        assert x is not None
        if self.stats is not None:
            mean, rstd = self.stats
            if isinstance(m, nn.GroupNorm):
                groups = x.reshape(*mean.shape, -1)
                return _times(groups - mean[..., None], rstd[..., None]).view(x.shape)
            return _times(x - mean, rstd)
        if isinstance(m, nn.GroupNorm):
            return torch.nn.functional.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return torch.nn.functional.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return torch.nn.functional.rms_norm(x, m.normalized_shape, None, m.eps)

    def weighted_grads(
        self, seeds: Tensor, last: list | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(∂/∂W, ∂/∂b) of Σᵢ sᵢℓᵢ for this layer. ``last``: a list shared by the calls of one
        record, holding the latest scaled input; the next call on the same input (an
        attention block's query, key and value projections read one tensor) reuses it."""
        if self.kind == "embedding":
            assert self.x is not None and self.g is not None and self.weight is not None
            g = self.g * self._seeds_shaped(seeds.to(self.g.dtype))
            gw = torch.zeros_like(self.weight).index_add_(
                0, self.x.reshape(-1), g.reshape(-1, g.shape[-1]).to(self.weight.dtype)
            )
            if self.module.padding_idx is not None:  # that row gets no gradient (torch's rule);
                gw[self.module.padding_idx] = 0  # the other rows' sums are as without its rows
            return gw, None
        if self.per_example is not None:
            flat = seeds.to(self.per_example.dtype) @ self.per_example
            return self._split(flat)
        assert self.x is not None and self.g is not None
        s = self._seeds_shaped(seeds.to(self.g.dtype))
        if self.kind == "linear":
            x, g = self.x, self.g
            gw = gb = None
            if self.weight is not None:  # the seeds scale the narrower of input and gradient
                last = [] if last is None else last
                x, g = (_scaled(x, s, last), g) if x.shape[-1] <= g.shape[-1] else (x, g * s)
                x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
                gw = x.t() @ g if self.addmm else g.t() @ x
            if self.bias is not None:
                gb = seeds.to(self.g.dtype) @ self.g_sum()
            return gw, gb
        gs = self.g * s
        stride, padding, dilation, groups = self._conv_args()
        w = self._kernel()
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
        if self.kind == "embedding":
            # the forward's derivative, padding row included, as dual numbers and the tape take
            # it (a direction made by a backward is zero there: torch gives that row no gradient)
            assert self.x is not None and self.g is not None and u_w is not None
            rows = torch.nn.functional.embedding(self.x, u_w.to(self.g.dtype))
            return self._per_row(_times(rows, self.g))
        if self.per_example is not None:
            parts = [
                (torch.zeros_like(t) if u is None else u).reshape(-1)
                for t, u in ((self.weight, u_w), (self.bias, u_b))
                if t is not None
            ]
            return self.per_example @ torch.cat(parts).to(self.per_example.dtype)
        assert self.g is not None and self.x is not None
        if self.kind != "linear":
            t = self.convolve(u_w.to(self.g.dtype) if u_w is not None else None, u_b)
            return self._per_row(_times(t, self.g))
        # Σₜ gₜ·(U xₜ + u_b): U on the narrower side (gₜU against xₜ where the output is the
        # wider), the bias through g summed over positions
        x, g = self.x, self.g
        out = None
        if u_w is not None:
            u = u_w.to(g.dtype).t() if self.addmm else u_w.to(g.dtype)  # (out, in)
            if g.shape[-1] > x.shape[-1]:
                out = self._per_row(_times(torch.matmul(g, u), x))
            else:
                out = self._per_row(_times(torch.nn.functional.linear(x, u), g))
        if u_b is not None:
            part = self.g_sum() @ u_b.to(g.dtype)
            out = part if out is None else out + part
        assert out is not None
        return out

    def g_sum(self) -> Tensor:
        """A linear call's output gradient summed over positions: (B, out), kept."""
        if self._g_sum is None:
            assert self.g is not None
            g = self.g
            if self.seq_first:  # (T, B, ..., out): over dim 0 and any between B and out
                self._g_sum = g.sum((0, *range(2, g.dim() - 1)))
            else:
                self._g_sum = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        return self._g_sum

    def _per_row(self, t: Tensor) -> Tensor:
        """(B,): ``t`` (batched as x and g are) summed over all but its batch dim."""
        if self.seq_first:
            return t.sum((0, *range(2, t.dim())))
        return t.flatten(1).sum(1)

    def _seeds_shaped(self, seeds: Tensor) -> Tensor:
        """The seeds (B,) shaped to scale g (or x) per example along its batch dim."""
        assert self.g is not None
        shape = [1] * self.g.dim()
        shape[1 if self.seq_first else 0] = -1
        return seeds.view(shape)

    def _norm_per_example(self) -> Tensor:
        """(B, P): a normalisation's per-example (weight, bias) gradients, Σ over positions of
        g ⊙ x̂ and of g (the affine acts on dim 1 for GroupNorm, on the trailing dims else)."""
        assert self.g is not None
        g = self.g
        if isinstance(self.module, nn.GroupNorm):
            dims: tuple[int, ...] = tuple(range(2, g.dim()))
        else:
            dims = tuple(range(1, g.dim() - len(self.module.normalized_shape)))
        if self.seq_first:  # (T, B, ...): the batch is dim 1, the steps dim 0
            dims = (0, *(d for d in dims if d != 1))
        b = g.shape[1 if self.seq_first else 0]

        def over_positions(t: Tensor) -> Tensor:  # (B, P); an empty dims would sum everything
            return (t.sum(dims) if dims else t).reshape(b, -1)

        cols = []
        if self.weight is not None:
            cols.append(over_positions(_times(self.normalized(), g)))
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
        b = self.x.shape[1 if self.seq_first else 0]
        if self.kind == "norm":
            self.per_example = self._norm_per_example()
            self.x = self.g = self.stats = None
            return
        cols = []
        if self.weight is not None:
            if self.kind == "linear":
                x, g = (
                    (self.x.transpose(0, 1), self.g.transpose(0, 1))
                    if self.seq_first
                    else (self.x, self.g)
                )
                x3, g3 = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
                per = x3.transpose(1, 2) @ g3 if self.addmm else g3.transpose(1, 2) @ x3
                cols.append(per.reshape(b, -1))
            else:  # the batch as groups: one grouped weight gradient gives all B of them
                stride, padding, dilation, groups = self._conv_args()
                w = self._kernel()
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
            if self.kind == "linear":
                cols.append(self.g_sum())
            else:
                cols.append(self.g.flatten(2).sum(2))
        self.per_example = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
        self.x = self.g = None


def same_padding(dilation: Sequence[int], kernel_size: Sequence[int]) -> list[int] | None:
    """The padding on each side that ``padding="same"`` gives, per spatial dim; None where the
    two sides differ (an even d·(k − 1): torch pads one side more, by copying the input)."""
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True)]
    return None if any(t % 2 for t in total) else [t // 2 for t in total]


def conv_call_args(
    a: dict, w: Tensor, nd: int
) -> tuple[list[int], list[int], list[int], int] | str:
    """A functional convolution's (stride, padding, dilation, groups) as ``aten.convolution``
    takes them, each of the first three one int per spatial dim; or why they cannot be."""

    def per_dim(v: Any) -> list[int]:
        v = [v] * nd if isinstance(v, int) else list(v)
        return v * nd if len(v) == 1 else v

    stride, dilation = per_dim(a.get("stride", 1)), per_dim(a.get("dilation", 1))
    padding = a.get("padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        padding = same_padding(dilation, w.shape[2:])
        if padding is None:
            return "asymmetric 'same' padding"
    return stride, per_dim(padding), dilation, int(a.get("groups", 1))


def norm_stats(module: nn.Module, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor] | None:
    """The mean and 1/std a LayerNorm's or GroupNorm's forward computed on ``x`` to give
    ``out``, detached; None when ``out`` is not that kernel's output on ``x`` itself (a
    subclass's own forward, an input cast first, an RMSNorm)."""
    node = out.grad_fn
    kind = type(node).__name__
    if not (
        (kind == "NativeLayerNormBackward0" and type(module) is nn.LayerNorm)
        or (kind == "NativeGroupNormBackward0" and type(module) is nn.GroupNorm)
    ):
        return None
    saved = node._saved_input
    if saved.data_ptr() != x.data_ptr() or saved.shape != x.shape or saved.dtype != x.dtype:
        return None
    # LayerNorm's broadcast against x; GroupNorm's are (N, groups)
    return node._saved_result1.detach(), node._saved_result2.detach()


def _times(fresh: Tensor, other: Tensor) -> Tensor:
    """``fresh * other``, written into ``fresh`` (a result nothing else holds) where its dtype
    is the product's: one tensor of the batch's size made fewer per product."""
    if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype:
        return fresh.mul_(other)
    return fresh * other


def _scaled(x: Tensor, s: Tensor, last: list) -> Tensor:
    """x scaled per example by the seeds ``s``; ``last`` (one per set of seeds) holds the latest
    result, reused when the same tensor (storage and layout) is scaled again."""
    key = (x.data_ptr(), x.shape, x.stride(), x.dtype, s.dtype, s.shape)
    if last and last[0] == key:
        return last[1]
    out = x * s
    last[:] = [key, out]
    return out
