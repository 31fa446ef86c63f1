"""``nn.LSTM`` on the per-layer path: its gate gradients, from the fused kernel's outputs.

An LSTM layer's gates at step t are one linear map of the step's input and the previous hidden
state, z_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, so example i's gradient with respect to
each of its four weights is a sum over steps of outer products of δᵢₜ = ∂ℓᵢ/∂z_t with x_t or
h_{t-1}: the layer is two linear maps over time steps (``LayerCall`` "linear", one per weight
pair), once δ is known. The fused kernels (oneDNN on CPU, cuDNN) that run the real forward and
backward do not expose δ, and the native cells that would are several times slower. So the
recorded forward stays fused, and ``lstm_calls`` computes δ after the one backward of the
per-layer engine has given the gradient at the layer's output:

- the gates in bulk, from the fused output (every h_t, per direction): two matrix products
  over all steps; the cell states c_t are the one sequential part of the forward (two
  elementwise ops a step);
- δ by backpropagation through time over those stored gates: per step, a few elementwise ops
  on (B, H) and one (B, 4H) × (4H, H) product for the gradient reaching h_{t-1}.

A stacked LSTM's lower layers' outputs, which the module does not return, are recomputed
fused without graph (one more forward of those layers); their output gradients are the next
layer's δ through W_ih. The cell state recomputed at the last step is checked against the
module's returned c_n: a mismatch (an initial state passed by keyword, a subclass's own
forward) refuses the path for this forward (the exact general engine runs), as does anything
the recomputation does not model (projections, dropout between layers in training mode,
packed sequences), refused by structure before a forward is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reweight.jvp.layers import LayerCall

aten = torch.ops.aten

__all__ = ["GatesCall", "LstmRecord", "lstm_calls", "lstm_problem", "record_lstm"]


def lstm_problem(m: nn.LSTM) -> str | None:
    """Why the per-layer path cannot read this LSTM layer, by structure (None: it can)."""
    if m.proj_size:
        return "LSTM with proj_size"
    if m.num_layers > 1 and m.dropout and m.training:
        return "LSTM with dropout between layers in training mode"
    return None


def _layer_weights(m: nn.Module, values: list[Tensor], layer: int, direction: int) -> list:
    """(W_ih, W_hh, b_ih, b_hh) of one layer and direction among ``values`` (the module's flat
    weights, in ``_flat_weights_names``' order); biases None when the layer has none."""
    per = 4 if m.bias else 2
    dirs = 2 if m.bidirectional else 1
    k = (layer * dirs + direction) * per
    w = values[k : k + per]
    return [w[0], w[1], *(w[2:] if m.bias else [None, None])]


def _deltas(
    xt: Tensor, ht: Tensor, gt: Tensor, g_last: tuple[Tensor, Tensor], w: list
) -> tuple[Tensor, Tensor, Tensor]:
    """(xh (T, B, I + H): each step's input and previous hidden state; δ (T, B, 4H); the last
    step's cell state (B, H)) of one layer and direction, time-major in the order the direction
    runs, from its inputs xt (T, B, I), hidden states ht (T, B, H), their gradient gt
    (T, B, H), and the gradients at its final hidden and cell states (B, H each). Gates in
    torch's order: i, f, g, o."""
    w_ih, w_hh, b_ih, b_hh = w
    t_len, b, hidden = ht.shape
    width = xt.shape[-1]
    xh = torch.empty(t_len, b, width + hidden, dtype=ht.dtype, device=ht.device)
    xh[..., :width] = xt
    xh[0, :, width:] = 0  # the state before the first step
    xh[1:, :, width:] = ht[:-1]
    bias = None if b_ih is None else b_ih + b_hh
    z = torch.nn.functional.linear(xh, torch.cat([w_ih, w_hh], 1), bias)  # (T, B, 4H)
    z4 = z.view(t_len, b, 4, hidden)
    torch.sigmoid_(z4[:, :, :2])
    torch.sigmoid_(z4[:, :, 3])
    _tanh(z4[:, :, 2], inplace=True)
    i, f, gg, o = z4.unbind(2)
    c = i * gg  # the cell states, one step after another
    # each step's views made once, by unbind (an index in Python is a few µs of host time,
    # and the loops below would take ~14 a step)
    cs, fs = c.unbind(0), f.unbind(0)
    for t in range(1, t_len):
        cs[t].addcmul_(fs[t], cs[t - 1])
    tc = _tanh(c)
    # per step: ∂(i, f, g gates' pre-activations)/∂c, ∂(o gate's)/∂h and ∂c/∂h (through h's
    # tanh), by the activations' own backward kernels
    fac = torch.empty(t_len, b, 5, hidden, dtype=z.dtype, device=z.device)
    aten.sigmoid_backward.grad_input(gg, i, grad_input=fac[:, :, 0])
    fac[0, :, 1] = 0  # c before the first step is zero
    aten.sigmoid_backward.grad_input(c[:-1], f[1:], grad_input=fac[1:, :, 1])
    aten.tanh_backward.grad_input(i, gg, grad_input=fac[:, :, 2])
    aten.sigmoid_backward.grad_input(tc, o, grad_input=fac[:, :, 3])
    aten.tanh_backward.grad_input(o, tc, grad_input=fac[:, :, 4])
    delta = torch.empty(t_len, b, 4, hidden, dtype=z.dtype, device=z.device)
    gts, rows = gt.unbind(0), delta.view(t_len, b, -1).unbind(0)
    d_ifg, d_o = delta[:, :, :3].unbind(0), delta[:, :, 3].unbind(0)
    k_ifg, k_o, k_c = fac[:, :, :3].unbind(0), fac[:, :, 3].unbind(0), fac[:, :, 4].unbind(0)
    dh = gts[-1] + g_last[0]
    dc = torch.addcmul(g_last[1], dh, k_c[-1])
    for t in range(t_len - 1, -1, -1):
        if t < t_len - 1:  # the gradient reaching step t's states from step t + 1
            dh = torch.addmm(gts[t], rows[t + 1], w_hh)
            dc = torch.addcmul(dc.mul_(fs[t + 1]), dh, k_c[t])  # dc: this loop's own
        torch.mul(k_ifg[t], dc.unsqueeze(1), out=d_ifg[t])
        torch.mul(k_o[t], dh, out=d_o[t])
    return xh, delta.view(t_len, b, 4 * hidden), cs[-1]


def _tanh(t: Tensor, inplace: bool = False) -> Tensor:
    """tanh (written into ``t`` when ``inplace``). On a CPU as 2σ(2x) − 1, the same function:
    torch's vectorised tanh costs 2.5x its sigmoid there (1.8 against 0.7 ms for an LSTM's
    (28, 100, 128) gates, one thread), so the four passes take less than the one; the result
    differs from ``tanh`` by rounding (about 2⁻²³ absolute in float32). On a GPU, where each
    pass is one more over memory, torch's own."""
    if t.device.type != "cpu":
        return t.tanh_() if inplace else t.tanh()
    return (t.mul_(2) if inplace else t * 2).sigmoid_().mul_(2).sub_(1)


@dataclass(slots=True, eq=False)
class GatesCall:
    """One layer and direction of an LSTM as the per-layer engine reads it (the interface of
    ``LayerCall``: ``tensors``, ``inner_of``, ``grads_of``): the gates z_t = [W_ih | W_hh]
    [x_t; h_{t-1}] + b_ih + b_hh over all steps, time-major. The order of the steps does not
    matter to a sum over them, so a reverse direction's stay reversed."""

    tensors: tuple[Tensor | None, ...]  # W_ih, W_hh, b_ih, b_hh: trainable, or None
    xh: Tensor  # (T, B, I + H)
    delta: Tensor  # (T, B, 4H): ∂Σℓ/∂z
    kind: str = "gates"
    name: str = "LSTM"
    per_example: None = None

    def inner_of(self, us: list[Tensor | None]) -> Tensor:
        """⟨∇ℓᵢ, u⟩ restricted to this layer's gates, for every i: (B,)."""
        u_ih, u_hh, u_bi, u_bh = (None if u is None else u.to(self.delta.dtype) for u in us)
        width = self.xh.shape[-1] - self.delta.shape[-1] // 4
        bias = u_bi if u_bh is None else (u_bh if u_bi is None else u_bi + u_bh)
        if u_ih is None and u_hh is None:
            assert bias is not None
            return self.delta.sum(0) @ bias
        if u_hh is None:
            t = torch.nn.functional.linear(self.xh[..., :width], u_ih, bias)
        elif u_ih is None:
            t = torch.nn.functional.linear(self.xh[..., width:], u_hh, bias)
        else:
            t = torch.nn.functional.linear(self.xh, torch.cat([u_ih, u_hh], 1), bias)
        return t.mul_(self.delta).sum((0, 2))

    def grads_of(self, seeds: Tensor, last: list | None = None) -> list[Tensor | None]:
        """∂/∂(W_ih, W_hh, b_ih, b_hh) of Σᵢ sᵢℓᵢ (None where frozen; ``last`` unused: no
        other call reads this layer's inputs)."""
        t_ih, t_hh, t_bi, t_bh = self.tensors
        s = seeds.to(self.delta.dtype)
        grads: list[Tensor | None] = [None] * 4
        if t_ih is not None or t_hh is not None:
            width = self.xh.shape[-1] - self.delta.shape[-1] // 4
            xs = (self.xh * s.view(1, -1, 1)).view(-1, self.xh.shape[-1])  # the narrower
            both = self.delta.view(-1, self.delta.shape[-1]).t() @ xs
            grads[0] = both[:, :width] if t_ih is not None else None
            grads[1] = both[:, width:] if t_hh is not None else None
        if t_bi is not None or t_bh is not None:
            gb = s @ self.delta.sum(0)
            grads[2] = gb if t_bi is not None else None
            grads[3] = gb if t_bh is not None else None
        return grads


@dataclass(slots=True)
class LstmRecord:
    """What a recorded ``nn.LSTM`` call keeps beyond its ``LayerCall``'s input and output."""

    values: list[Tensor]  # the flat weights the forward used, detached
    trainable: list[Tensor | None]  # per flat weight: the trainable tensor, or None (frozen)
    out: Tensor  # the output (T, B, D·H), detached, time-major
    finals: tuple[Tensor, Tensor] | None  # (h_n, c_n) (L·D, B, H), with graph until the backward
    c_n: Tensor  # detached
    g_finals: tuple[Tensor, Tensor] | None = None  # ∂Σℓ/∂(h_n, c_n), detached


def record_lstm(module: nn.LSTM, args: tuple, out: object, trainable: list) -> LstmRecord | str:
    """The record of one call of an LSTM layer, or why it cannot be read (its input, batch
    first, and output are the ``LayerCall``'s)."""
    x = args[0] if args else None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return "LSTM: a packed sequence"
    if len(args) > 1 and args[1] is not None:
        return "LSTM: called with an initial state"
    if not isinstance(x, Tensor) or x.dim() != 3:
        return "LSTM: not called on one batched tensor"
    output, finals = out  # type: ignore[misc]
    if module.batch_first:
        output = output.transpose(0, 1)
    values = [t.detach() for t in module._flat_weights]  # type: ignore[attr-defined]
    return LstmRecord(values, trainable, output.detach(), tuple(finals), finals[1].detach())


def lstm_calls(call: LayerCall) -> list[GatesCall]:
    """The recorded call of an ``nn.LSTM`` (its input x batch first, its output gradient g, its
    ``LstmRecord``) as its gates, one ``GatesCall`` per layer and direction.

    Raises ``ValueError`` when the recomputed cell state differs from the module's.
    """
    m, x, g, rec = call.module, call.x, call.g, call.recurrent
    assert m is not None and x is not None and g is not None and rec is not None
    assert rec.g_finals is not None
    x = x.transpose(0, 1)  # time-major from here on
    if m.batch_first:
        g = g.transpose(0, 1)
    g_h, g_c = rec.g_finals
    dirs, hidden = (2 if m.bidirectional else 1), m.hidden_size
    inputs = [x]
    with torch.no_grad():
        for layer in range(m.num_layers - 1):  # the lower layers' outputs, fused, no graph
            flat = [
                t
                for d in range(dirs)
                for t in _layer_weights(m, rec.values, layer, d)
                if t is not None
            ]
            h0 = x.new_zeros(dirs, x.shape[1], hidden)
            args = (m.bias, 1, 0.0, False, m.bidirectional, False)
            inputs.append(torch.lstm(inputs[-1], (h0, h0), flat, *args)[0])
    inputs.append(rec.out)
    calls: list[GatesCall] = []
    tol = math.sqrt(torch.finfo(x.dtype).eps)
    for layer in range(m.num_layers - 1, -1, -1):
        below = None
        for d in range(dirs):
            w = _layer_weights(m, rec.values, layer, d)
            k = layer * dirs + d
            xt, ht = inputs[layer], inputs[layer + 1][..., d * hidden : (d + 1) * hidden]
            gt = g[..., d * hidden : (d + 1) * hidden]
            if d:  # the reverse direction runs from the last step to the first
                xt, ht, gt = xt.flip(0), ht.flip(0), gt.flip(0)
            xh, delta, last = _deltas(xt, ht, gt, (g_h[k], g_c[k]), w)
            ref = rec.c_n[k]
            if not torch.allclose(last, ref, rtol=tol, atol=tol * float(ref.abs().max())):
                raise ValueError("its recomputed cell state differs from the module's")
            tensors = tuple(_layer_weights(m, rec.trainable, layer, d))
            if any(t is not None for t in tensors):
                calls.append(GatesCall(tensors, xh, delta))
            if layer:  # the gradient at the layer below's output
                part = delta @ w[0]
                part = part.flip(0) if d else part
                below = part if below is None else below + part
        g = below
    return calls
