"""Buffer-backed meta modules: differentiable weights that may carry autograd history.

An ``nn.Parameter`` is always a leaf, so it cannot hold the result of a virtual SGD step
θ′ = θ − lr·∇θ Σ εᵢℓᵢ(θ) whose history reaches back to ε. A buffer can hold any tensor, and
layers read their weights through attribute access (``self.weight``), which resolves buffers
exactly as it resolves parameters. So a *twin* of the model whose weights live in buffers
computes the same function and lets us swap in θ′ with its history. The real model stays an
ordinary ``nn.Module`` with ``nn.Parameter``s, so ``torch.optim``, ``state_dict``, DDP and
torchvision keep working on it; the twin exists only inside a meta step.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from reweight.meta import to_meta
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> twin = to_meta(model)
    >>> x = torch.randn(5, 3)
    >>> torch.equal(twin(x), model(x))
    True
    >>> loss = twin(x).pow(2).mean()
    >>> new = twin.virtual_step(loss, lr=0.1)  # θ′ = θ − 0.1·∇θ loss, with history
    >>> [name for name, _ in twin.named_params()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> twin.bind(model)  # back to the model's own parameters
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from reweight.meta.kernels import native_rnn_kernels
from reweight.meta.sgd import sgd_step

__all__ = [
    "MetaBatchNorm1d",
    "MetaBatchNorm2d",
    "MetaBatchNorm3d",
    "MetaConv1d",
    "MetaConv2d",
    "MetaLinear",
    "MetaModule",
    "MetaModuleDict",
    "MetaModuleList",
    "MetaSequential",
    "MetaSyncBatchNorm",
    "bufferize_",
    "to_meta",
]

# Attribute on every converted module listing the buffer names that hold its weights.
_META_NAMES = "_meta_param_names"
# Attribute listing the (non-weight) buffers a twin shares with its source model, read-only:
# BatchNorm running statistics. ``bind`` re-points only these; other buffers stay copies.
_SHARED_NAMES = "_meta_shared_buffers"


def bufferize_(module: nn.Module) -> nn.Module:
    """Move ``module``'s own parameters (not its children's) into persistent buffers, in place.

    The buffers keep the parameters' names, so ``state_dict`` keys are unchanged and every
    ``self.weight``-style read in ``forward`` finds the buffer. Returns ``module``.
    """
    names: list[str] = list(getattr(module, _META_NAMES, ()))
    for name, param in list(module._parameters.items()):
        del module._parameters[name]
        # nn.Module.register_buffer refuses names that were parameters a moment ago only
        # while they are still registered; after the del it is a plain registration.
        module.register_buffer(name, param, persistent=True)
        names.append(name)
    setattr(module, _META_NAMES, tuple(names))
    return module


class MetaModule(nn.Module):
    """A module whose differentiable weights are buffers that may hold non-leaf tensors.

    ``named_params()`` lists those weights under the same names ``named_parameters()`` gives on
    the source model (``layer1.0.conv1.weight``); ``set_params()`` puts new tensors in, history
    and all; ``virtual_step()`` takes one SGD step through autograd; ``bind()`` points the
    weights back at a real model's parameters.
    """

    def named_params(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` for every meta weight in this tree (skipping ``None``)."""
        for mod_name, mod in self.named_modules(prefix=prefix, remove_duplicate=True):
            for name in getattr(mod, _META_NAMES, ()):
                value = mod._buffers.get(name)
                if value is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), value

    def params(self) -> Iterator[Tensor]:
        """The meta weights, in ``named_params()`` order."""
        for _, value in self.named_params():
            yield value

    def set_params(self, params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> None:
        """Replace meta weights by name; tensors may carry autograd history.

        Names not given keep their current tensors. An unknown name or a shape change raises
        ``KeyError`` / ``ValueError`` before anything is replaced.
        """
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        targets = [(*self._slot(name, value), value) for name, value in items]
        for mod, leaf, value in targets:
            mod._buffers[leaf] = value

    def _slot(self, name: str, value: Tensor) -> tuple[nn.Module, str]:
        """Where meta weight ``name`` lives, checked to take ``value`` (its shape)."""
        mod, leaf = self._resolve(name)
        if leaf not in getattr(mod, _META_NAMES, ()):
            raise KeyError(f"{name!r} is not a meta weight of {type(self).__name__}")
        current = mod._buffers[leaf]
        if current is not None and value.shape != current.shape:
            raise ValueError(
                f"{name}: new weight has shape {tuple(value.shape)}, "
                f"expected {tuple(current.shape)}"
            )
        return mod, leaf

    def bind(self, source: nn.Module) -> None:
        """Point this twin at ``source``'s current parameters and buffers, sharing storage.

        Also mirrors each submodule's train/eval flag. Cheap (no copies): call it at the start
        of every meta step so the twin follows the real model after optimizer steps,
        ``.to(device)`` or a ``load_state_dict``.
        """
        self.binding(source)()

    def binding(self, source: nn.Module) -> Callable[[], None]:
        """``bind(source)`` as a function to call again while ``source``'s module tree and
        parameter objects stay the same (``reweight.meta.twins.signature``): names are
        resolved and checked once, here; each call only copies references and flags."""
        # every slot of a tied weight (an embedding shared with the output layer), not only the
        # first name of it: a slot left out would keep the previous step's θ′
        src_mods = dict(source.named_modules())
        slots = []
        for name, value in source.named_parameters(remove_duplicate=False):
            mod, leaf = self._slot(name, value)
            path, _, key = name.rpartition(".")
            slots.append((mod._buffers, leaf, src_mods[path]._parameters, key))
        pairs = []
        for name, mod in self.named_modules():
            src = src_mods.get(name)
            if src is None:
                raise KeyError(f"bind: {name!r} has no counterpart in {type(source).__name__}")
            # the source's modules held weakly: a cache keyed weakly on the model holds this
            pairs.append((mod, weakref.ref(src), src._buffers, getattr(mod, _SHARED_NAMES, ())))

        def apply() -> None:
            for buffers, leaf, params, key in slots:
                buffers[leaf] = params[key]
            for mod, src, buffers, shared in pairs:
                mod.training = src().training
                for buf_name in shared:
                    mod._buffers[buf_name] = buffers[buf_name]

        return apply

    def virtual_step(
        self,
        loss: Tensor,
        lr: float | Tensor,
        *,
        first_order: bool = False,
    ) -> dict[str, Tensor]:
        """One SGD step θ′ = θ − lr·∇θ loss on the meta weights, kept in the autograd graph.

        With ``first_order=True`` the gradient is detached (θ′ still depends on θ, but not
        through the gradient), the usual first-order approximation. Weights that ``loss`` does
        not depend on are left as they are. Returns the new weights by name.
        """
        names, tensors = zip(*self.named_params(), strict=True)
        new = sgd_step(dict(zip(names, tensors, strict=True)), loss, lr, first_order=first_order)
        self.set_params(new)
        return new

    def _resolve(self, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        try:
            mod = self.get_submodule(path) if path else self
        except AttributeError as err:
            raise KeyError(f"{name!r}: no submodule {path!r} in {type(self).__name__}") from err
        return mod, leaf


class _MetaInit:
    """Mixin for the explicit meta layers: build as the torch layer, then bufferize."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bufferize_(self)  # type: ignore[arg-type]


class MetaLinear(_MetaInit, nn.Linear, MetaModule):
    """``nn.Linear`` with buffer-backed ``weight`` and ``bias``."""


class MetaConv1d(_MetaInit, nn.Conv1d, MetaModule):
    """``nn.Conv1d`` with buffer-backed ``weight`` and ``bias``."""


class MetaConv2d(_MetaInit, nn.Conv2d, MetaModule):
    """``nn.Conv2d`` with buffer-backed ``weight`` and ``bias``."""


class _MetaBatchNorm(_MetaInit, MetaModule):
    """BatchNorm whose virtual steps never touch running statistics.

    Policy: in training mode the layer normalises with the batch's statistics and does not
    update ``running_mean``, ``running_var`` or ``num_batches_tracked`` (a twin shares those
    tensors with the real model, which must change only through the real step). In eval mode
    it normalises with the running statistics, like the real layer.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)  # type: ignore[attr-defined]
        use_batch_stats = self.training or self.running_mean is None  # type: ignore[attr-defined]
        return F.batch_norm(
            input,
            None if use_batch_stats else self.running_mean,  # type: ignore[attr-defined]
            None if use_batch_stats else self.running_var,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            use_batch_stats,
            0.0,
            self.eps,  # type: ignore[attr-defined]
        )


class MetaBatchNorm1d(_MetaBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with buffer-backed affine weights; see ``_MetaBatchNorm``."""


class MetaBatchNorm2d(_MetaBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with buffer-backed affine weights; see ``_MetaBatchNorm``."""


class MetaBatchNorm3d(_MetaBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with buffer-backed affine weights; see ``_MetaBatchNorm``."""


class MetaSyncBatchNorm(_MetaBatchNorm, nn.SyncBatchNorm):
    """Twin of ``nn.SyncBatchNorm``: a virtual step uses this rank's batch statistics only."""


class _MetaRNN(MetaModule):
    """Twin of an ``nn.RNNBase`` layer (LSTM, GRU, RNN): the same forward, no cuDNN.

    The layer reads its weights from ``_flat_weights``, a list torch refreshes at each forward
    when a weight attribute holds another tensor (``_update_flat_weights``, the mechanism that
    makes ``torch.func.functional_call`` work), so buffers holding θ′ are seen. The twin never
    packs its weights into cuDNN's contiguous buffer (that rewrites the tensors in place) and
    runs on GPU without cuDNN, whose backward has no derivative.
    """

    def flatten_parameters(self) -> None:
        """No-op: a twin's weights are the model's tensors or a virtual step's results."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weight = self._flat_weights[0]  # type: ignore[attr-defined]
        native = weight is not None and weight.is_cuda
        with native_rnn_kernels() if native else contextlib.nullcontext():
            return super().forward(*args, **kwargs)


class MetaSequential(nn.Sequential, MetaModule):
    """``nn.Sequential`` that is also a ``MetaModule``."""


class MetaModuleList(nn.ModuleList, MetaModule):
    """``nn.ModuleList`` that is also a ``MetaModule``."""


class MetaModuleDict(nn.ModuleDict, MetaModule):
    """``nn.ModuleDict`` that is also a ``MetaModule``."""


# Exact types (not subclasses: a subclass may override forward) with explicit counterparts.
_COUNTERPARTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: MetaLinear,
    nn.Conv1d: MetaConv1d,
    nn.Conv2d: MetaConv2d,
    nn.BatchNorm1d: MetaBatchNorm1d,
    nn.BatchNorm2d: MetaBatchNorm2d,
    nn.BatchNorm3d: MetaBatchNorm3d,
    nn.SyncBatchNorm: MetaSyncBatchNorm,
    nn.Sequential: MetaSequential,
    nn.ModuleList: MetaModuleList,
    nn.ModuleDict: MetaModuleDict,
}
_GENERATED: dict[type[nn.Module], type[nn.Module]] = {}


def _meta_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` itself if already meta, its explicit counterpart, or a generated subclass.

    Generated subclasses add ``MetaModule``'s methods and nothing else, the same device
    ``torch.nn.utils.parametrize`` uses to give a module new behaviour in place.
    """
    if issubclass(cls, MetaModule):
        return cls
    if cls in _COUNTERPARTS:
        return _COUNTERPARTS[cls]
    if cls not in _GENERATED:
        bases = (_MetaRNN, cls) if issubclass(cls, nn.RNNBase) else (cls, MetaModule)
        _GENERATED[cls] = type(f"Meta{cls.__name__}", bases, {"__module__": __name__})
    return _GENERATED[cls]


def to_meta(module: nn.Module) -> MetaModule:
    """Return a buffer-backed twin of ``module`` that computes the same function.

    The twin shares storage with ``module``: its weight buffers *are* the model's parameters
    (so a forward through it sends gradients to them) and BatchNorm running statistics are the
    model's own tensors, read but never written. No data is copied, so building a twin is cheap.
    Any layer that reads its weights through attributes works without a rewrite (embeddings,
    attention, LayerNorm, GroupNorm, tied weights); recurrent layers follow ``_MetaRNN`` and
    BatchNorm layers the policy of ``MetaBatchNorm2d``. Buffers of other layers are copied so
    that a forward through the twin cannot write to the model.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> twin = to_meta(model.eval())
        >>> x = torch.randn(2, 3, 32, 32)
        >>> torch.allclose(twin(x), model(x))
        True
    """
    bn_types = tuple(t for t in _COUNTERPARTS if issubclass(t, nn.modules.batchnorm._BatchNorm))
    memo: dict[int, Any] = {id(p): p for p in module.parameters()}
    shared_names: list[tuple[str, ...]] = []
    for mod in module.modules():
        weights = set(getattr(mod, _META_NAMES, ()))
        shared = ()
        if isinstance(mod, (*bn_types, _MetaBatchNorm)):
            shared = tuple(n for n, b in mod._buffers.items() if b is not None and n not in weights)
        shared_names.append(shared)
        memo.update(
            {
                id(b): b
                for n, b in mod._buffers.items()
                if (n in weights or n in shared) and b is not None
            }
        )
    twin = copy.deepcopy(module, memo)
    for mod, shared in zip(twin.modules(), shared_names, strict=True):
        bufferize_(mod)
        setattr(mod, _SHARED_NAMES, shared)
        mod.__class__ = _meta_class(type(mod))
    assert isinstance(twin, MetaModule)
    return twin
