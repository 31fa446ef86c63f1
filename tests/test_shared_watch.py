"""What the per-layer engine sees beyond its layers' calls (reweight.jvp.shared), on small float64
models: a weight shared by the batch broadcast over other dimensions too (its per-example
gradient summed over them, against torch's ``sum_to_size`` and torch.func), ``F.linear`` on
weights no layer owns (with or without a bias, by keyword, a frozen weight or bias beside a
trainable one), what the watch refuses and why, and ``F.multi_head_attention_forward`` under the
watch: computed from the calls the watch sees exactly where that is torch's own maths, left to
torch (and the weights refused) otherwise, its result or error the same as torch's either way.
Seconds a run: the selection for a mutation run of shared.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from reweight.jvp import per_layer as ghost
from reweight.jvp.shared import Watch, reduce_to

from .test_per_layer_unit import DT, per_example, rand, record, trainable

# -- reduce_to ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("g_shape", "shape"),
    [
        ((3, 2, 5, 4), (4,)),  # leading dims missing: summed over both
        ((3, 2, 5, 4), (5, 4)),  # a missing dim of size 2
        ((3, 2, 5, 4), (5, 1)),  # a missing dim and a dim of size 1
        ((3, 2, 5, 4), (2, 1, 4)),  # one dim of size 1 in the middle
        ((3, 2, 5, 4), (2, 5, 4)),  # nothing broadcast
        ((3, 1, 5, 4), (1, 1, 4)),  # a dim of size 1 in both: nothing to sum there
        ((3, 1, 4), (1, 1, 4)),  # a class token: as many dims as the gradient
    ],
)
def test_reduce_to_sums_each_example_over_the_dims_it_was_broadcast_along(g_shape, shape):
    g = rand(*g_shape, seed=1)
    inner = shape[max(0, len(shape) - (len(g_shape) - 1)) :]  # the dims one example has
    want = torch.stack([gi.sum_to_size(inner) for gi in g]).reshape(g_shape[0], -1)
    got = reduce_to(g, torch.Size(shape))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# -- weights no layer owns ---------------------------------------------------------------------


class Loose(nn.Module):
    """A projection by ``F.linear`` on weights of its own (as attention's), and a shift
    broadcast over the batch and the tokens, both read where used."""

    def __init__(self, forward=None):
        super().__init__()
        self.w = nn.Parameter(rand(4, 2, seed=11))
        self.b = nn.Parameter(rand(4, seed=12))
        self.shift = nn.Parameter(rand(4, seed=13))
        self.head = nn.Linear(4, 2)
        self.fn = forward

    def forward(self, x):  # (B, 3, 2)
        h = self.fn(self, x) if self.fn else F.linear(x, self.w, self.b) + self.shift
        return self.head(torch.tanh(h)).sum(1)  # (B, 2)


def square(out):
    return out.pow(2).flatten(1).sum(1)


FORWARDS = {
    "shift broadcast over the tokens": None,
    "shift by torch.add": lambda m, x: torch.add(F.linear(x, m.w, m.b), m.shift),
    "shift by keyword": lambda m, x: torch.add(F.linear(x, m.w, m.b), other=m.shift),
    "shift on the left": lambda m, x: m.shift + F.linear(x, m.w, m.b),
    "shift by broadcast_to": lambda m, x: (
        F.linear(x, m.w, m.b) * m.shift.broadcast_to(len(x), 3, 4)
    ),
    "no bias": lambda m, x: F.linear(x, m.w) + m.shift,
    "bias by keyword": lambda m, x: F.linear(x, m.w, bias=m.b) + m.shift,
    "every argument by keyword": lambda m, x: F.linear(input=x, weight=m.w, bias=m.b) + m.shift,
    # ops that hand the shift on as it is: no use of it
    "shift through .to and .contiguous": lambda m, x: (
        F.linear(x, m.w, m.b) + m.shift.to(x.dtype).to(x.device).contiguous()
    ),
}
UNUSED = {"no bias": {"b"}}


@pytest.mark.parametrize("name", list(FORWARDS))
@pytest.mark.parametrize("frozen", [None, "w", "b"])
def test_loose_weights_equal_per_example_gradients(name, frozen):
    torch.manual_seed(0)
    model = Loose(FORWARDS[name]).to(DT)
    if frozen is not None:  # a frozen weight beside a trainable bias, or the other way round
        getattr(model, frozen).requires_grad_(False)
    assert_read_per_example(model, UNUSED.get(name, set()))


def assert_read_per_example(model: nn.Module, unused: set[str] = frozenset()) -> ghost.GhostRecord:
    """Each trainable weight's JVP alone, and the weighted gradients, equal torch.func's
    per-example gradients; every weight not ``unused`` counts (a term dropped would show).
    Returns the record."""
    x = rand(5, 3, 2, seed=14)
    weights = trainable(model)
    per, names = per_example(model, x, square)
    rec = record(model, x)
    for n, w in zip(names, weights, strict=True):  # each weight alone: none read wrongly
        if n not in unused:
            assert per[n].abs().max() > 1e-3, n
        u = [rand(*v.shape, seed=20) if v is w else torch.zeros_like(v) for v in weights]
        torch.testing.assert_close(
            rec.jvp(u), per[n].flatten(1) @ u[names.index(n)].flatten(), rtol=1e-10, atol=1e-12
        )
    s = rand(len(x), seed=29)
    for n, g in zip(names, rec.weighted_grads(s), strict=True):
        want = torch.einsum("b,b...->...", s, per[n])
        assert g is not None or want.abs().max() == 0, n
        if g is not None:
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    return rec


class Rows(nn.Module):
    """HuggingFace's ``Conv1D``: ``torch.addmm(b, x, W)`` on the tokens flattened to rows, W
    (in, out), on weights of its own; a ``bias`` of shape (1, out) is not the vector it reads."""

    def __init__(self, bias_shape=(4,)):
        super().__init__()
        self.w = nn.Parameter(rand(2, 4, seed=16))
        self.b = nn.Parameter(rand(*bias_shape, seed=17))
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (B, 3, 2)
        h = torch.addmm(self.b, x.reshape(-1, 2), self.w).view(len(x), 3, 4)
        return self.head(torch.tanh(h)).sum(1)


@pytest.mark.parametrize("frozen", [None, "w", "b", "both"])
def test_addmm_rows_equal_per_example_gradients(frozen):
    """Each of W and b read wherever it is trainable, whichever else is frozen (with both
    frozen, the call is not recorded at all)."""
    torch.manual_seed(0)
    model = Rows().to(DT)
    for n in {"w": ["w"], "b": ["b"], "both": ["w", "b"]}.get(frozen, []):
        getattr(model, n).requires_grad_(False)
    rec = assert_read_per_example(model)
    assert sum(c.name == "addmm" for c in rec.calls) == (frozen != "both")


def test_addmm_with_a_bias_matrix_is_refused():
    model = Rows(bias_shape=(1, 4)).to(DT)
    with pytest.raises(ghost.Ineligible) as info:
        record(model, rand(5, 3, 2, seed=14))
    assert str(info.value) == "addmm: not a bias and a matrix of rows"


def test_per_example_gradients_need_every_term():
    """The check above is not blind: a weight read through ``F.linear`` counted once per use is
    told apart from the same weight's gradient counted twice."""
    model = Loose().to(DT)
    x = rand(5, 3, 2, seed=14)
    per, names = per_example(model, x, square)
    rec = record(model, x)
    u = [rand(*v.shape, seed=20) for v in trainable(model)]
    want = sum(per[n].flatten(1) @ d.flatten() for n, d in zip(names, u, strict=True))
    got = rec.jvp(u)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    twice = per["shift"].flatten(1) @ u[names.index("shift")].flatten()
    assert (got + twice - want).abs().max() > 1e-3


def _layer_weight_outside(m, x):  # a trainable weight of a torch layer, not read where used
    return F.linear(x, m.head.weight.t(), m.b)


def _without_graph(m, x):  # the loose weights under no_grad, then again with a graph
    with torch.no_grad():
        F.linear(x, m.w, m.b)
    return F.linear(x, m.w, m.b) + m.shift


def _written_in_place(m, x):  # the output of F.linear changed after the call
    return F.linear(x, m.w, m.b).mul_(2.0)


def _scaled_broadcast(m, x):  # x + 2t: not the identity's broadcast
    return F.linear(x, m.w, m.b).add(m.shift, alpha=2.0)


def _in_a_list(m, x):  # the watched weight itself in cat's list
    return F.linear(x, m.w, m.b) + torch.cat([m.shift, m.shift])[:4]


def _two_in_a_list(m, x):
    return F.linear(x, m.w, m.b) + torch.stack([m.b, m.shift]).sum(0)


def _written_in_place_without_graph(m, x):  # the weight itself, changed by an in-place op
    with torch.no_grad():
        m.shift.mul_(1.0)  # returns the weight: an op that writes into it is still a use
    return F.linear(x, m.w, m.b) + m.shift


REFUSED = {
    "F.linear: a trainable weight of a layer used outside its layer": _layer_weight_outside,
    "F.linear: not called on one tensor with a graph": _without_graph,
    "F.linear: its input or output was modified in place": _written_in_place,
    "a weight shared by the batch is used by add": _scaled_broadcast,
    "a weight shared by the batch is used by cat": _in_a_list,
    "a weight shared by the batch is used by stack": _two_in_a_list,
    "a weight shared by the batch is used by mul_": _written_in_place_without_graph,
}


@pytest.mark.parametrize("why", list(REFUSED))
def test_what_the_watch_cannot_read_is_refused_with_its_reason(why):
    model = Loose().to(DT)
    with pytest.raises(ghost.Ineligible) as info:
        record(model, rand(4, 3, 2, seed=15), fn=lambda x: REFUSED[why](model, x))
    assert str(info.value) == why


# -- attention ---------------------------------------------------------------------------------

E, H, T, B = 4, 2, 3, 5


def attention_args(**changes):
    """The arguments ``nn.MultiheadAttention`` hands ``F.multi_head_attention_forward`` for
    self-attention (sequence first), with ``changes``; a value ``...`` drops the argument."""
    g = torch.Generator().manual_seed(3)

    def w(*shape):
        return torch.randn(*shape, generator=g, dtype=DT).requires_grad_()

    q = torch.randn(T, B, E, generator=g, dtype=DT)
    args = {
        "query": q, "key": q, "value": q, "embed_dim_to_check": E, "num_heads": H,
        "in_proj_weight": w(3 * E, E), "in_proj_bias": w(3 * E), "bias_k": None, "bias_v": None,
        "add_zero_attn": False, "dropout_p": 0.0, "out_proj_weight": w(E, E),
        "out_proj_bias": w(E), "training": True, "key_padding_mask": None,
        "need_weights": False, "attn_mask": None, "average_attn_weights": True,
        "is_causal": False,
    }  # fmt: skip
    args |= {k: v(args) if callable(v) else v for k, v in changes.items()}
    return {k: v for k, v in args.items() if v is not ...}


def outcome(args):
    """torch's result (the attention output, weights or None) or its error."""
    try:
        out, weights = F.multi_head_attention_forward(**args)
    except (AssertionError, RuntimeError) as error:
        return type(error), str(error)
    return out.detach(), None if weights is None else weights.detach()


def under_watch(args):
    """``outcome`` with the attention's weights watched; and the watch."""
    names = ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")
    loose = tuple(args[k] for k in names if args.get(k) is not None) + tuple(
        args[k] for k in ("bias_k", "bias_v") if args.get(k) is not None and args[k].requires_grad
    )
    watch = Watch(loose, [])
    with watch:
        got = outcome(args)
    return got, watch


def same(a, b):
    assert type(a[0]) is type(b[0])
    if isinstance(a[0], torch.Tensor):
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
        assert (a[1] is None) == (b[1] is None)
        if a[1] is not None:
            torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-12)
    else:
        assert a == b


COMPUTED = {
    "as nn.MultiheadAttention calls it": {},
    "in eval mode": {"training": False},
    "without the arguments that have a default": {
        "training": ...,
        "key_padding_mask": ...,
        "attn_mask": ...,
        "average_attn_weights": ...,
        "is_causal": ...,
    },
    "defaults given": {"use_separate_proj_weight": False, "static_k": None, "static_v": None},
    # p = 1 drops every attention weight, whatever the draw: the output is the output bias
    "every attention weight dropped": {"dropout_p": 1.0},
    "every attention weight dropped, training by default": {"dropout_p": 1.0, "training": ...},
    "dropout in eval mode": {"dropout_p": 1.0, "training": False},
}


@pytest.mark.parametrize("case", list(COMPUTED))
def test_plain_self_attention_is_computed_from_calls_the_watch_sees(case):
    args = attention_args(**COMPUTED[case])
    want = outcome(args)
    got, watch = under_watch(args)
    same(got, want)
    assert [c.name for c in watch.calls] == ["F.linear", "F.linear"]  # in and out projections
    assert watch.calls[0].weight is args["in_proj_weight"]
    assert watch.calls[1].bias is args["out_proj_bias"]
    assert all(w.problem is None for w in watch.entries)
    if args.get("dropout_p") and args.get("training", True):
        torch.testing.assert_close(want[0], args["out_proj_bias"].detach().expand(T, B, E))


def _separate(a):
    return {
        "use_separate_proj_weight": True,
        "q_proj_weight": a["in_proj_weight"][:E].detach(),
        "k_proj_weight": a["in_proj_weight"][E : 2 * E].detach(),
        "v_proj_weight": a["in_proj_weight"][2 * E :].detach(),
    }


# torch's own function, run under the watch: its two projections read, nothing refused
READ_IN_TORCH = {
    "weights returned": {"need_weights": True},
    "weights returned by default": {"need_weights": ...},
    "a key padding mask": {"key_padding_mask": torch.tensor([[False, False, True]] * B)},
    "an attention mask": {"attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1)},
    "both masks and the weights": {
        "key_padding_mask": torch.tensor([[False, True, False]] * B),
        "attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1),
        "need_weights": True,
    },
    "a zero attention": {"add_zero_attn": True},
    "extra key and value biases, frozen": {
        "bias_k": torch.ones(1, 1, E, dtype=DT),
        "bias_v": torch.ones(1, 1, E, dtype=DT),
    },
    "static keys": {"static_k": torch.ones(B * H, T, E // H, dtype=DT)},
    "static values": {"static_v": torch.ones(B * H, T, E // H, dtype=DT)},
}


@pytest.mark.parametrize("case", list(READ_IN_TORCH))
def test_other_attention_runs_torchs_own_code_with_its_projections_read(case):
    """The result is torch's own; the input projection is read on the sequence-first query,
    the output projection on its (T·B, E) rows, step-major."""
    args = attention_args(**READ_IN_TORCH[case])
    want = outcome(args)
    got, watch = under_watch(args)
    same(got, want)
    assert [c.name for c in watch.calls] == ["F.linear", "F.linear"]
    inp, out = watch.calls
    assert inp.weight is args["in_proj_weight"] and out.weight is args["out_proj_weight"]
    assert [c.seq_first for c in watch.calls] == [True, True]
    assert (inp.steps, out.steps) == (0, T)
    assert all(c.problem is None for c in watch.calls)
    assert all(w.problem is None for w in watch.entries)


# torch's own code uses a weight otherwise than by a projection the path reads, or torch refuses
ATTENTION_REFUSED = {
    "extra key and value biases, trained": {
        "bias_k": lambda _: torch.ones(1, 1, E, dtype=DT, requires_grad=True),
        "bias_v": lambda _: torch.ones(1, 1, E, dtype=DT, requires_grad=True),
    },
    "a key bias alone (torch refuses)": {"bias_k": torch.ones(1, 1, E, dtype=DT)},
    "a value bias alone (torch refuses)": {"bias_v": torch.ones(1, 1, E, dtype=DT)},
    "a causal hint without a mask (torch refuses)": {"is_causal": True},
    "separate projection weights": _separate,
    "cross-attention": {"key": lambda a: a["query"] + 1, "value": lambda a: a["query"] + 1},
    "an unbatched query": {
        "query": lambda a: a["query"][:, 0],
        "key": lambda a: a["query"][:, 0],
        "value": lambda a: a["query"][:, 0],
    },
    "no packed projection": lambda a: _separate(a) | {"in_proj_weight": None},
}


@pytest.mark.parametrize("case", list(ATTENTION_REFUSED))
def test_other_attention_that_the_path_cannot_read_is_refused(case):
    """The result is torch's own (or its error), and the watch holds the reason the model is
    refused: a projection it cannot read, or a weight used otherwise."""
    changes = ATTENTION_REFUSED[case]
    args = attention_args(**(changes(attention_args()) if callable(changes) else changes))
    want = outcome(args)
    got, watch = under_watch(args)
    same(got, want)
    if isinstance(want[0], torch.Tensor):
        problems = [c.problem for c in watch.calls] + [w.problem for w in watch.entries]
        assert any(p is not None for p in problems)


# -- the mode on only while something is followed ----------------------------------------------


class Noting(TorchFunctionMode):
    """A mode a model enters itself, noting the names of the functions it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


class Positions(nn.Module):
    """Token embeddings plus positions looked up once for the batch (BERT's pattern), a
    linear layer, a head; no weight outside a layer, so the watch follows only the positions.

    ``how``: "once" as described; "again": the positions added a second time after the
    layer (kept alive, used twice); "twice": a second lookup after the layer, the first one
    gone by then; "in a mode": that second lookup inside a mode the model enters.
    """

    def __init__(self, how: str) -> None:
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(3, 4)
        self.mid = nn.Linear(4, 4)
        self.pos2 = nn.Embedding(3, 4)
        self.head = nn.Linear(4, 2)
        self.how = how

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, 3)
        where = torch.arange(ids.shape[1])[None]
        p = self.pos(where)
        h = self.tok(ids) + p
        if self.how != "again":
            del p
        h = torch.tanh(self.mid(h))
        if self.how == "again":
            h = h + p
        if self.how == "twice":
            h = h + self.pos2(where)
        elif self.how == "in a mode":
            with Noting():
                h = h + self.pos2(where)
        return self.head(torch.tanh(h)).sum(1)


class ModeAbove(Positions):
    """The positions followed, then a mode of the model's own entered while they live; they
    are gone inside it when a module is called: the watch's mode, below it, stays."""

    def __init__(self) -> None:
        super().__init__("once")
        self.seen: set[str] = set()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.pos(torch.arange(ids.shape[1])[None])
        h = self.tok(ids) + p
        noting = Noting()
        with noting:
            del p
            h = torch.tanh(self.mid(h))
        self.seen = noting.names
        return self.head(torch.tanh(h)).sum(1)


def test_a_mode_the_model_entered_above_the_watch_is_left_in_place():
    torch.manual_seed(0)
    model = ModeAbove().to(DT)
    ids = _ids(5)
    rec, seen = _record_seeing_the_mode(model, ids)
    assert {"linear", "tanh"} <= model.seen  # the watch did not take it off the stack
    assert seen["head"] is False  # the watch's mode went off once the model's was gone
    per = _per_example_ids(model, ids)
    u = [rand(*w.shape, seed=20 + k) for k, w in enumerate(trainable(model))]
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    torch.testing.assert_close(rec.jvp(u), want, rtol=1e-10, atol=1e-12)


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 7, (n, 3), generator=torch.Generator().manual_seed(seed))


def _record_seeing_the_mode(model: nn.Module, ids: torch.Tensor) -> tuple[ghost.GhostRecord, dict]:
    """The record of ``square`` losses, and whether the watch's mode was on as ``pos2`` and
    ``head`` began (pre-hooks put on after the layers were read)."""
    weights = trainable(model)
    layers = ghost.ghost_layers(model, weights)
    seen: dict[str, bool] = {}
    box: list[Watch] = []
    handles = [
        getattr(model, name).register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, box[0].active)
        )
        for name in ("pos2", "head")
    ]
    depth = torch._C._len_torch_function_stack()
    try:
        with ghost.recording(model, layers, len(ids)) as watch:
            box.append(watch)
            losses = square(model(ids))
    finally:
        for h in handles:
            h.remove()
    assert torch._C._len_torch_function_stack() == depth  # every mode left as found
    return ghost.finish(weights, watch, losses), seen


def _per_example_ids(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    weights = trainable(model)
    rows = [
        torch.autograd.grad(square(model(ids[i : i + 1])).sum(), weights, allow_unused=True)
        for i in range(len(ids))
    ]
    return [
        torch.stack([torch.zeros_like(w) if r[k] is None else r[k] for r in rows])
        for k, w in enumerate(weights)
    ]


@pytest.mark.parametrize(
    ("how", "mode_at"),
    [
        ("once", {"head": False}),  # off once the positions are gone
        ("again", {"head": True}),  # on while they live: their second use is seen
        # off, then on for the second lookup (its one use is in the record), then off again
        ("twice", {"pos2": False, "head": False}),
    ],
)
def test_the_mode_is_on_while_a_followed_output_lives_and_the_record_is_exact(how, mode_at):
    torch.manual_seed(0)
    model = Positions(how).to(DT)
    ids = _ids(5)
    rec, seen = _record_seeing_the_mode(model, ids)
    assert {k: seen[k] for k in mode_at} == mode_at
    per = _per_example_ids(model, ids)
    weights = trainable(model)
    used = {"pos2"} if how == "twice" else set()
    for (name, _), p in zip(model.named_parameters(), per, strict=True):
        if name.split(".")[0] in {"pos", "mid", "head", "tok"} | used:
            assert p.abs().max() > 1e-3, name  # every term counts
    u = [rand(*w.shape, seed=20 + k) for k, w in enumerate(weights)]
    want = sum(p.flatten(1) @ d.flatten() for p, d in zip(per, u, strict=True))
    torch.testing.assert_close(rec.jvp(u), want, rtol=1e-10, atol=1e-12)
    s = rand(len(ids), seed=29)
    for g, p in zip(rec.weighted_grads(s), per, strict=True):
        torch.testing.assert_close(
            torch.zeros_like(p[0]) if g is None else g, torch.einsum("b,b...->...", s, p)
        )


def test_a_shared_lookup_inside_a_mode_the_model_entered_is_refused():
    torch.manual_seed(0)
    model = Positions("in a mode").to(DT)
    with pytest.raises(ghost.Ineligible, match="Embedding: called on an input shared by"):
        _record_seeing_the_mode(model, _ids(5))


def test_with_one_example_nothing_is_followed_and_the_mode_stays_off():
    torch.manual_seed(0)
    model = Positions("once").to(DT)
    ids = _ids(1)
    rec, seen = _record_seeing_the_mode(model, ids)
    assert seen == {"head": False}
    (p,) = [p for p in _per_example_ids(model, ids)[1:2]]  # the positions' weight
    u = [torch.zeros_like(w) for w in trainable(model)]
    u[1] = rand(*u[1].shape, seed=3)
    torch.testing.assert_close(rec.jvp(u), p.flatten(1) @ u[1].flatten())


def test_a_followed_output_keeps_its_record_when_a_later_tensor_takes_its_id():
    # a gone output's id may be a later tensor's (the watch holds outputs weakly): here two
    # calls' outputs share one id, as a reused id would; the index points at the latest, and
    # both records stay, so finish reads both calls
    watch = Watch((), [])
    watch.begin()
    try:
        out = rand(1, 3).requires_grad_()
        first = ghost.LayerCall(None, "embedding", "a", None, None)
        second = ghost.LayerCall(None, "embedding", "b", None, None)
        watch.watch_output(first, out)
        watch.watch_output(second, out)
    finally:
        watch.end()
    assert [w.call for w in watch.entries] == [first, second]
    assert watch.watched[id(out)].call is second
