"""Kernels that a meta step can differentiate twice and push tangents through.

Some of torch's fastest kernels have a first derivative only. A meta step needs more from
the forwards it differentiates through a virtual step (``meta_grad="unrolled"``: a double
backward) or runs on dual numbers and tangent tapes (``meta_grad="fast"``):

- ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``, ``nn.Transformer*``,
  HuggingFace models) picks a flash or memory-efficient kernel, whose backward has no
  derivative and which has no forward-mode rule. The math kernel computes the same function
  from matrix products and a softmax, which have both.
- ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused "fast path" in
  evaluation mode without gradient (a dual-number forward is one), again without either.
- ``nn.LSTM``/``nn.GRU``/``nn.RNN`` run oneDNN (CPU, float32) or cuDNN kernels without a
  forward-mode rule (cuDNN's backward also has no derivative); with both off they run the
  native cells, composed of ordinary ops. Packing and unpacking a padded batch
  (``pack_padded_sequence``, ``pad_packed_sequence``) have no forward-mode rule either; here
  they are composed of slices and concatenations (the same values).

``differentiable_kernels`` switches to those kernels for the forwards that need them, and
only there: the real update's own forward and backward keep the fast kernels wherever the
meta step does not read that forward's derivatives beyond the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_kernels", "has_rnn", "native_rnn_kernels"]


def has_rnn(module: nn.Module, modules: Iterable[nn.Module] | None = None) -> bool:
    """Whether ``module`` contains an ``nn.RNNBase`` layer (LSTM, GRU, RNN); ``modules``: its
    modules, when the caller has them."""
    return any(
        isinstance(m, nn.RNNBase) for m in (module.modules() if modules is None else modules)
    )


@contextlib.contextmanager
def native_rnn_kernels() -> Iterator[None]:
    """oneDNN and cuDNN off for the duration: recurrent layers run their native cells."""
    # torch.backends.mkldnn.flags() would also set oneDNN's TF32 flag, which warns on every
    # build without Intel GPU support; these two switches are the ones the RNN dispatch reads.
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)


def _pack_composite(original: Callable) -> Callable:
    def pack(input: Tensor, lengths: Tensor, batch_first: bool) -> tuple[Tensor, Tensor]:
        _, batch_sizes = original(input.detach(), lengths, batch_first)  # torch's checks
        steps = input.transpose(0, 1) if batch_first else input  # (T, B, *)
        data = torch.cat([steps[t, :n] for t, n in enumerate(batch_sizes.tolist())])
        return data, batch_sizes

    return pack


def _pad_composite(original: Callable) -> Callable:
    def pad(
        data: Tensor, batch_sizes: Tensor, batch_first: bool, value: float, total: int
    ) -> tuple[Tensor, Tensor]:
        _, lengths = original(data.detach(), batch_sizes, batch_first, value, total)
        sizes = batch_sizes.tolist()
        width, rows, start = sizes[0], [], 0
        for n in sizes:
            step = data[start : start + n]
            start += n
            fill = step.new_full((width - n, *data.shape[1:]), value)
            rows.append(torch.cat([step, fill]) if n < width else step)
        rows += [data.new_full((width, *data.shape[1:]), value)] * (total - len(sizes))
        out = torch.stack(rows)  # (T, B, *)
        return (out.transpose(0, 1) if batch_first else out), lengths

    return pad


@contextlib.contextmanager
def _packing_composite() -> Iterator[None]:
    # torch.nn.utils.rnn calls these through torch._VF; an attribute set on that module
    # object shadows the native function until it is deleted again
    vf = torch._VF
    pack, pad = vf._pack_padded_sequence, vf._pad_packed_sequence
    vf._pack_padded_sequence = _pack_composite(pack)
    vf._pad_packed_sequence = _pad_composite(pad)
    try:
        yield
    finally:
        del vf._pack_padded_sequence, vf._pad_packed_sequence


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def differentiable_kernels(module: nn.Module | None = None) -> Iterator[None]:
    """Run the enclosed forwards with kernels that have every derivative a meta step takes.

    Attention runs the math kernel and no fused fast path. When ``module`` contains a
    recurrent layer (or ``module`` is None), oneDNN and cuDNN are also switched off for the
    duration, so the recurrent layers run their native cells, and packing is composite; they
    are left on otherwise,
    since convolutions differentiate twice with them. Restores every switch on exit.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(_mha_fastpath_off())
        if module is None or has_rnn(module):
            stack.enter_context(native_rnn_kernels())
            stack.enter_context(_packing_composite())
        yield
