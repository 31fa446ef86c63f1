"""The twin of a model inside a meta step: cached, re-bound, and run at other weights.

``TwinCache`` is the one place a model's twin (``to_meta``) is kept between steps: a method
owns one, and the forward-mode engines it uses get theirs from it. ``substituted`` puts other
tensors in a module's weight slots for one forward (dual numbers, θ′ as fresh leaves), and
``meta_gradient`` is ∇θL_meta through the twin at θ or at given weights θ′.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from reweight.core import inputs as batch_inputs
from reweight.meta.modules import MetaModule, to_meta

__all__ = [
    "LossFn",
    "TwinCache",
    "meta_gradient",
    "modules_of",
    "signature",
    "slots",
    "substituted",
    "trainable",
]

# ``loss_fn(outputs, targets)`` is a mean loss, ``loss_fn(outputs, targets, reduction="none")``
# the per-example losses (B,): the signature of ``torch.nn.functional.cross_entropy``.
LossFn = Callable[..., Tensor]

_Slot = tuple[dict, str, Tensor]  # (module._parameters or module._buffers, key, original)


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the weights a virtual step moves (``requires_grad``), in order."""
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in pairs], [p for _, p in pairs]


def slots(module: nn.Module, weights: Sequence[Tensor]) -> list[_Slot]:
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
def substituted(
    module: nn.Module, weights: Sequence[Tensor], new: Sequence[Tensor]
) -> Iterator[None]:
    """Run ``module`` with ``new[k]`` in place of ``weights[k]`` for the duration; always
    restore (the model keeps its own ``nn.Parameter`` objects)."""
    found = slots(module, weights)
    by_id = {id(p): q for p, q in zip(weights, new, strict=True)}
    try:
        for store, key, t in found:
            store[key] = by_id[id(t)]
        yield
    finally:
        for store, key, t in found:
            store[key] = t


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``: every module once, in the same order, without the names
    ``named_modules`` builds (this runs on every meta step)."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def structure(model: nn.Module, mods: Sequence[nn.Module] | None = None) -> tuple:
    """The model's module tree and parameter objects (not what its buffers hold, which a
    forward may write every step). ``mods``: ``modules_of(model)``, when the caller has it."""
    mods = modules_of(model) if mods is None else mods
    return (
        tuple(id(m) for m in mods),
        tuple(id(p) for m in mods for p in m._parameters.values() if p is not None),
    )


def signature(model: nn.Module, mods: Sequence[nn.Module] | None = None) -> tuple:
    """What a twin copies from its model: its ``structure`` and the contents (by version) of
    buffers other than BatchNorm statistics (which it shares). ``mods``: ``modules_of(model)``,
    when the caller has it."""
    mods = modules_of(model) if mods is None else mods
    return (
        *structure(model, mods),
        tuple(
            (id(b), b._version)
            for m in mods
            if not isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m._buffers.values()
            if b is not None
        ),
    )


class TwinCache:
    """Each model's twin, built once (``to_meta`` copies the module tree) and re-bound per use.

    A twin is rebuilt when its model's modules or parameter objects are replaced. When only a
    buffer the twin holds a copy of (anything but BatchNorm statistics, which it shares) has
    been written to, the twin gets fresh copies of them (a forward that updates a counter or a
    running average of its own every step would otherwise rebuild the twin every step); a
    buffer replaced by one of another shape, dtype or device rebuilds it. Models are held
    weakly.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> twins = TwinCache()
        >>> twin = twins.bound(model)
        >>> twin is twins.bound(model), torch.equal(twin(torch.ones(1, 3)), model(torch.ones(1, 3)))
        (True, True)
    """

    def __init__(self) -> None:
        self._twins: weakref.WeakKeyDictionary[
            nn.Module, tuple[tuple, MetaModule, Callable[[], None]]
        ] = weakref.WeakKeyDictionary()

    def bound(self, model: nn.Module) -> MetaModule:
        """The twin of ``model`` bound to its current weights, modes and BatchNorm statistics."""
        mods = modules_of(model)
        sig = signature(model, mods)
        entry = self._twins.get(model)
        if entry is not None and entry[0] != sig:
            if entry[0][:2] == sig[:2] and _refreshed(entry[1], model):  # the same structure
                entry = (sig, *entry[1:])
                self._twins[model] = entry
            else:
                entry = None
        if entry is None:
            twin = to_meta(model)
            entry = (sig, twin, twin.binding(model))  # names resolved once per structure
            self._twins[model] = entry
        entry[2]()
        return entry[1]


def _refreshed(twin: MetaModule, model: nn.Module) -> bool:
    """Give ``twin`` fresh copies of ``model``'s buffers (new tensors, as a rebuild would: a
    graph still holding an old copy keeps it unchanged); False, and nothing changed, if one has
    no counterpart of the same shape, dtype and device."""
    fresh = []
    for name, b in model.named_buffers(remove_duplicate=False):  # a tied buffer under each name
        path, _, leaf = name.rpartition(".")
        try:
            mod = twin.get_submodule(path)
        except AttributeError:
            return False
        mine = mod._buffers.get(leaf)
        if mine is b:  # shared (BatchNorm statistics)
            continue
        if mine is None or (mine.shape, mine.dtype, mine.device) != (b.shape, b.dtype, b.device):
            return False
        fresh.append((mod._buffers, leaf, b))
    copies: dict[int, Tensor] = {}  # one copy of a buffer tied under several names, as deepcopy
    for buffers, leaf, b in fresh:
        if id(b) not in copies:
            copies[id(b)] = b.detach().clone()
        buffers[leaf] = copies[id(b)]
    return True


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def meta_gradient(
    twin: MetaModule,
    weights: Sequence[Tensor],
    at: Sequence[Tensor] | None,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    loss_fn: LossFn,
    chunks: int = 1,
) -> tuple[list[Tensor], Tensor]:
    """∇L_meta at ``at`` (at θ when None) through the bound twin, and L_meta (detached).

    Nothing accumulates into ``.grad`` and no running statistics are written (the twin's
    BatchNorm uses batch statistics in training mode and never writes its running ones).
    With ``chunks`` > 1 the clean batch is taken in that many slices, one forward and backward
    each, L_meta = Σ (nₖ/n)·L_meta(slice k): the same mean loss and gradient for a model whose
    examples do not interact, with one slice's activations alive at a time. A weight the loss
    does not reach gets a zero gradient.
    """
    if at is None:
        leaves, scope = list(weights), contextlib.nullcontext()
    else:
        leaves = [t.detach().requires_grad_() for t in at]
        scope = substituted(twin, weights, leaves)
    n = len(meta_targets)
    total: list[Tensor | None] = [None] * len(leaves)
    losses = []
    with scope, torch.enable_grad():
        for x, y in zip(
            batch_inputs.split(meta_inputs, chunks), meta_targets.tensor_split(chunks), strict=True
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
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(total, weights, strict=True)]
    return grads, meta_loss
