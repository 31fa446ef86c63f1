"""Each of the tangent tape's op rules (reweight.jvp.rules) against ``torch.func.jvp`` in
float64, op by op on small tensors, with the tangent on each input alone and on all together
(a rule has one branch per input that moves), and the ops the tape refuses, with their reason.
Small and fast, so that a mutation run of rules.py can run them for each mutant; test_fast.py
checks whole models (ResNet-32, LeNet) through the engines."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from reweight.jvp.base import Unsupported
from reweight.jvp.program import FollowingTape
from reweight.jvp.rules import op_info
from reweight.jvp.tape import TangentTape

DT = torch.float64
aten = torch.ops.aten


def rand(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 17 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g, dtype=DT)


def check(f, tensors, moving=None, rng_seed=None):
    """The tape's JVP of ``f(*tensors)`` when the tensors at positions ``moving`` (default:
    every subset but the empty one, in turn) move, against torch.func.jvp."""
    subsets = (
        [moving]
        if moving is not None
        else [
            s
            for r in range(1, len(tensors) + 1)
            for s in itertools.combinations(range(len(tensors)), r)
        ]
    )
    # the moving tensors require grad, as weights do: some ops dispatch otherwise without it
    # (dropout on a tensor without grad is not aten.native_dropout)
    tensors = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
    for subset in subsets:
        seeds = [tensors[i] for i in subset]
        dirs = [rand(*t.shape, seed=100 + i) for i, t in zip(subset, seeds, strict=True)]

        def g(*moved, subset=subset):
            args = list(tensors)
            for i, m in zip(subset, moved, strict=True):
                args[i] = m
            return f(*args)

        tape = TangentTape(seeds, program=True)
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        with tape:
            out = f(*tensors)
        assert tape.error is None, tape.error
        got = tape.jvp(dirs, out)
        # a tangent is a value: no graph of its own (one would hold every op's inputs, and
        # double the step's memory: ResNet-32's L2RW step went from 1.12x to 2.46x a plain one)
        assert got.grad_fn is None and not got.requires_grad
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        want = jvp(g, tuple(s.detach() for s in seeds), tuple(dirs))[1]
        assert want.abs().max() > 1e-3, subset
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"moving {subset}")
        check_following(f, tensors, subset, dirs, tape.freeze(), rng_seed)


def check_following(f, tensors, subset, dirs, program, rng_seed):
    """The same forward with other values, on a ``FollowingTape`` of the first's program: its
    replay reads the new forward's primals (against torch.func.jvp at the new values)."""
    assert program is not None
    moved = [
        t + 0.25 * rand(*t.shape, seed=7) if i in subset and t.is_floating_point() else t
        for i, t in enumerate(tensors)
    ]
    moved = [t.detach().requires_grad_(t.is_floating_point()) for t in moved]
    seeds = [moved[i] for i in subset]
    follow = FollowingTape(seeds, program)
    if rng_seed is not None:
        torch.manual_seed(rng_seed + 1)  # other dropout masks: read from this forward
    with follow:
        out = f(*moved)
    got = follow.jvp(dirs, out)
    assert follow.stale is None

    def g(*xs):
        args = list(moved)
        for i, m in zip(subset, xs, strict=True):
            args[i] = m
        return f(*args)

    if rng_seed is not None:
        torch.manual_seed(rng_seed + 1)
    want = jvp(g, tuple(s.detach() for s in seeds), tuple(dirs))[1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"following {subset}")


# -- convolutions and pools --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2}, {"groups": 2}],
    ids=["plain", "stride-pad", "dilation", "groups"],
)
def test_conv2d(kw):
    x, w, b = rand(3, 4, 7, 7), rand(6, 4 // kw.get("groups", 1), 3, 3), rand(6)
    check(lambda x, w, b: F.conv2d(x, w, b, **kw).tanh(), [x, w, b])


def test_conv1d_without_bias_and_a_conv_of_an_unbatched_input():
    x, w = rand(2, 3, 9), rand(4, 3, 3)
    check(lambda x, w: F.conv1d(x, w), [x, w])
    check(lambda x, w, b: F.conv2d(x, w, b), [rand(3, 6, 6), rand(2, 3, 3, 3), rand(2)])


def test_conv_then_max_pool_fused_slice_by_slice():
    """A max-pool reading a convolution alone: its tangent made in slices of the batch
    (here 4 = conv size / pool size slices of 6 examples: 2, 2, 2)."""
    x, w, b = rand(6, 2, 8, 8), rand(3, 2, 3, 3), rand(3)
    check(lambda x, w, b: F.max_pool2d(F.conv2d(x, w, b, padding=1), 2), [x, w, b])
    check(lambda x, w, b: F.max_pool2d(F.conv2d(x, w, b, padding=1), 2), [x, w, b], (2,))
    check(lambda x, w, b: F.max_pool2d(F.conv2d(x, w, b), 3, stride=2), [rand(5, 2, 9, 9), w, b])


def test_a_convolution_read_by_a_pool_and_another_op_is_not_fused():
    def f(x, w, b):
        z = F.conv2d(x, w, b, padding=1)
        return F.max_pool2d(z, 2).sum((2, 3)) + z.mean((2, 3))

    check(f, [rand(4, 2, 6, 6), rand(3, 2, 3, 3), rand(3)])


def test_max_pool3d_and_the_pool_of_an_input():
    x = rand(2, 2, 4, 4, 4)
    check(lambda x: F.max_pool3d(x, 2), [x])
    check(lambda x: F.max_pool2d(x, 2, stride=1), [rand(3, 2, 5, 5)])


# -- matrix products ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("beta", "alpha"), [(1.0, 1.0), (0.5, 2.0), (-1.5, 1.0), (1.0, -0.25), (2.0, 1.0)]
)
def test_addmm(beta, alpha):
    b, x, w = rand(5), rand(4, 3), rand(3, 5)
    check(lambda b, x, w: torch.addmm(b, x, w, beta=beta, alpha=alpha), [b, x, w])
    check(lambda b, x, w: torch.addmm(b, x, w, beta=beta, alpha=alpha), [rand(4, 5), x, w])


def test_linear_layers_mm_and_bmm():
    x, w, b = rand(4, 3), rand(5, 3), rand(5)
    check(lambda x, w, b: F.linear(x, w, b), [x, w, b])
    check(lambda x, w: F.linear(x, w), [x, w])
    check(lambda x, y: x @ y, [rand(4, 3), rand(3, 2)])
    check(lambda x, y: torch.bmm(x, y), [rand(2, 4, 3), rand(2, 3, 5)])
    check(lambda x, w, b: F.linear(x, w, b), [rand(2, 4, 3), w, b])  # 3-D: matmul via mm


# -- elementwise -------------------------------------------------------------------------------


def test_mul_by_a_tensor_broadcast_and_by_a_number():
    check(lambda x, y: x * y, [rand(4, 3), rand(3)])
    check(lambda x, y: x * y, [rand(3), rand(4, 3)])
    check(lambda x: x * 2.5, [rand(4, 3)])
    check(lambda x: torch.mul(x, -3), [rand(4, 3)])


def test_relu_and_its_in_place_form():
    x = rand(5, 4)
    check(lambda x: F.relu(x * 1.0), [x])
    check(lambda x: F.relu(x * 1.0, inplace=True), [x])
    check(lambda x: torch.relu_(x * 2.0).tanh(), [x])


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_in_training_replays_the_recorded_mask(p):
    x = rand(6, 5)
    check(lambda x: F.dropout(x * 1.0, p=p, training=True), [x], rng_seed=3)


def test_dropout_outside_training_and_a_dropout_that_drops_everything():
    x = rand(6, 5)
    check(lambda x: F.dropout(x * 2.0, p=0.5, training=False), [x])
    tape = TangentTape([x])
    with tape:
        out = torch.native_dropout(x * 1.0, 1.0, True)[0]
    assert torch.equal(tape.jvp([rand(6, 5)], out), torch.zeros(6, 5, dtype=DT))
    tape = TangentTape([x])
    with tape:
        out = torch.native_dropout(x * 1.0, 0.5, False)[0]
    d = rand(6, 5, seed=4)
    torch.testing.assert_close(tape.jvp([d], out), d, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 2, 2)])
def test_batch_norm_in_training(shape):
    x, w, b = rand(*shape), rand(3), rand(3)

    def f(x, w, b):
        return F.batch_norm(x, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), w, b, True)

    check(f, [x, w, b])
    check(lambda x: F.batch_norm(x, None, None, training=True), [x])


def test_batch_norm_in_eval_mode_reads_the_running_statistics():
    x, w, b = rand(5, 3, 2), rand(3), rand(3)
    mean, var = rand(3), rand(3).abs() + 0.5

    def f(x, w, b):
        return F.batch_norm(x, mean, var, w, b, False, eps=0.1)

    check(f, [x, w, b])
    check(lambda x: F.batch_norm(x, mean, var, None, None, False, eps=0.1), [x])


# -- ops linear in their inputs, and the rest on dual numbers ----------------------------------


LINEAR = {
    "view": lambda x: (x * 1).view(6, 4),
    "reshape": lambda x: x.reshape(4, 6),
    "t": lambda x: x[0].t(),
    "transpose": lambda x: x.transpose(0, 2),
    "permute": lambda x: x.permute(2, 0, 1),
    "expand": lambda x: x[:, :1].expand(2, 5, 4),
    "squeeze": lambda x: x[:, :1].squeeze(1),
    "unsqueeze": lambda x: x.unsqueeze(1),
    "slice": lambda x: x[:, 1:3],
    "select": lambda x: x[1],
    "clone": lambda x: x.clone(),
    "to": lambda x: x.to(torch.float32).to(DT),
    "mean": lambda x: x.mean(1),
    "sum": lambda x: x.sum((0, 2)),
    "neg": lambda x: -x,
    "cat": lambda x: torch.cat([x, 2 * x], 1),
    "stack": lambda x: torch.stack([x, x * 3]),
    "avg_pool2d": lambda x: F.avg_pool2d(x[None], 2),
    "adaptive_avg_pool2d": lambda x: F.adaptive_avg_pool2d(x[None], 1),
    "pad": lambda x: F.pad(x, (1, 2), value=5.0),
    "split": lambda x: torch.stack(torch.split(x, 2, dim=2)),
    "unbind": lambda x: torch.stack(torch.unbind(x, 1)[::-1]),
    "add-constant": lambda x: x + torch.ones(4, dtype=DT),
}


@pytest.mark.parametrize("name", list(LINEAR))
def test_ops_linear_in_their_inputs(name):
    check(lambda x: LINEAR[name](x) * rand(1), [rand(2, 3, 4)])


def test_a_linear_op_of_a_weight_and_a_constant():
    c = rand(2, 3)
    check(lambda x: torch.cat([x, c]) * 2.0, [rand(2, 3)])
    check(lambda x: torch.stack([c, x, c]).sum(0), [rand(2, 3)])


@pytest.mark.parametrize(
    "f",
    [torch.tanh, torch.sigmoid, torch.exp, lambda x: x.pow(3), lambda x: F.softmax(x, -1),
     lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh"),
     lambda x: F.layer_norm(x, (4,))],
    ids=["tanh", "sigmoid", "exp", "pow", "softmax", "gelu", "gelu-tanh", "layer_norm"],
)  # fmt: skip
def test_any_other_op_on_dual_numbers(f):
    check(f, [rand(3, 4)])


def test_dual_numbers_for_an_op_of_two_moving_tensors():
    check(lambda x, y: torch.atan2(x, y), [rand(3, 4), rand(3, 4)])
    check(lambda x, y: torch.where(x > 0, x, y), [rand(3, 4), rand(3, 4)])


def test_results_of_shape_only_factories_are_constants():
    check(lambda x: x * torch.ones_like(x) + torch.zeros_like(x).normal_(), [rand(3)])


# -- what the tape refuses ---------------------------------------------------------------------


def record(f, *seeds):
    tape = TangentTape(list(seeds))
    with tape:
        out = f(*seeds)
    return tape, out


def test_an_in_place_op_on_a_moving_tensor_is_refused_with_its_name():
    x = rand(3)
    tape, out = record(lambda x: (x * 2).mul_(3.0), x)
    assert tape.error == (
        "aten.mul_.Tensor: Unsupported: in-place aten.mul_.Tensor on a tensor that depends on "
        "the weights"
    )
    with pytest.raises(Unsupported, match=r"^aten\.mul_\.Tensor: Unsupported: in-place"):
        tape.jvp([x], out)
    assert tape.entries == []


def test_a_random_op_and_an_op_writing_its_input_are_refused():
    tape, _ = record(lambda x: torch.bernoulli(torch.sigmoid(x)), rand(3))
    assert tape.error.endswith(
        "random op aten.bernoulli.default (of the random ops only dropout is supported)"
    )
    buf = torch.empty(3, dtype=DT)
    tape, _ = record(lambda x: torch.tanh(x * 1, out=buf), rand(3))
    assert tape.error.endswith("aten.tanh.out writes one of its inputs")


def test_an_op_info_says_what_each_op_may_do():
    assert op_info(aten.relu_.default).refuse is None and op_info(aten.relu_.default).in_place
    assert op_info(aten.add_.Tensor).refuse is None
    assert op_info(aten.sub_.Tensor).refuse is None
    assert op_info(aten.mul_.Tensor).refuse.startswith("in-place aten.mul_.Tensor")
    info = op_info(aten.addmm.default)
    assert info.names == ("self", "mat1", "mat2", "beta", "alpha")
    assert info.defaults == {"beta": 1, "alpha": 1}
    assert info.reads({"self": True, "mat1": True, "mat2": False}) == {"mat2"}
    assert info.reads({"self": False, "mat1": False, "mat2": True}) == {"mat1"}
    assert info.reads({"mat1": True, "mat2": True}) == {"mat1", "mat2"}
    assert not info.in_place and info.written == () and info.refuse is None
    bn = op_info(aten.native_batch_norm.default)
    assert bn.reads({}) == {"input", "weight", "running_mean", "running_var"}
    assert bn.reads_out == (1, 2)
    assert op_info(aten.max_pool2d_with_indices.default).reads_out == (1,)
    assert op_info(aten.relu.default).reads({"self": True}) == set()
    assert op_info(aten.tanh.default).reads is None  # dual numbers: every argument
    assert op_info(aten.native_dropout.default).refuse is None  # random, but it has a rule
    assert op_info(aten.randn_like.default).refuse is not None


def test_a_tensor_modified_after_a_rule_read_it_is_refused_at_the_replay():
    def f(x):
        a = x * 2.0
        b = a * a  # keeps a as a primal
        a.add_(1.0)
        return b

    x = rand(3)
    tape, out = record(f, x)
    assert tape.error is None
    with pytest.raises(Unsupported) as info:
        tape.jvp([rand(3)], out)
    assert str(info.value) == "a tensor of the forward was modified in place after being read"


def test_an_output_that_does_not_depend_on_the_seeds_has_a_zero_tangent():
    x = rand(3)
    tape, _ = record(lambda x: x * 2, x)
    c = rand(3)
    assert torch.equal(tape.jvp([rand(3)], c), torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_native_dropout_scales_the_tangent_by_the_recorded_mask(p):
    """aten.native_dropout (what dropout dispatches to on CUDA; on CPU it is bernoulli and a
    mul): the tangent is the direction times the kept mask over (1 - p)."""
    x = rand(6, 5).requires_grad_()
    tape = TangentTape([x])
    torch.manual_seed(3)
    with tape:
        out, mask = torch.native_dropout(x * 1.0, p, True)
    d = rand(6, 5, seed=4)
    want = d * mask / (1 - p)
    assert 0 < int(mask.sum()) < mask.numel()
    torch.testing.assert_close(tape.jvp([d], out), want, rtol=1e-12, atol=0)


# -- edges the rules handle (a seed without a direction, dtypes, scales of 2, freeing) ---------


@pytest.mark.parametrize("alpha", [1, 2, -2, 0.5])
def test_add_and_sub_scale_the_second_tangent_by_alpha(alpha):
    x, y = rand(4, 3), rand(3)
    check(lambda x, y: torch.add(x, y, alpha=alpha), [x, y])
    check(lambda x, y: torch.sub(x, y, alpha=alpha), [x, y])


def test_a_seed_without_a_direction_leaves_relu_mul_and_max_pool_without_a_tangent():
    """A direction of None: the rules of the ops reading only that seed get no tangent."""
    x, w = rand(2, 1, 4, 4), rand(2, 1, 2, 2)
    tape, out = record(lambda x, w: F.max_pool2d(F.relu(x * 1.0) * 2.0, 2) + w, x, w)
    d = rand(2, 1, 2, 2, seed=5)
    torch.testing.assert_close(tape.jvp([None, d], out), d, rtol=0, atol=0)


def test_a_tangent_is_cast_like_the_result_it_belongs_to():
    """A float32 tangent of a float64 result (a float32 weight plus a float64 constant, a
    float32 direction for a float64 bias) comes back float64."""
    x, c = rand(4, 3).float(), rand(4, 3)
    tape, out = record(lambda x: x + c, x)
    d = rand(4, 3, seed=6).float()
    got = tape.jvp([d], out)
    assert got.dtype == DT
    torch.testing.assert_close(got, d.to(DT), rtol=0, atol=0)
    x, w, b = rand(2, 2, 5, 5), rand(3, 2, 3, 3), rand(3)
    tape, out = record(lambda b: F.conv2d(x, w, b), b)
    db = rand(3, seed=7).float()
    got = tape.jvp([db], out)
    assert got.dtype == DT
    torch.testing.assert_close(got, db.to(DT).view(1, 3, 1, 1).expand(2, 3, 3, 3), rtol=0, atol=0)


def test_an_op_on_dual_numbers_casts_a_float32_tangent_like_its_float64_primal():
    tape, out = record(lambda x: torch.flip(x, [0]), rand(4, 3))  # flip: on dual numbers
    d = rand(4, 3, seed=6).float()
    got = tape.jvp([d], out)
    assert got.dtype == DT
    torch.testing.assert_close(got, torch.flip(d, [0]).to(DT), rtol=0, atol=0)


def test_a_linear_op_of_a_bfloat16_weight_and_a_constant_stays_bfloat16():
    """The zeros standing for a constant's tangent have the constant's dtype (float32 zeros
    would make cat's result float32)."""
    x, c = rand(2, 3).bfloat16(), rand(2, 3).bfloat16()
    tape, out = record(lambda x: torch.cat([x, c]), x)
    d = rand(2, 3, seed=8).bfloat16()
    got = tape.jvp([d], out)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.cat([d, torch.zeros_like(c)]))


def test_an_op_with_a_result_that_is_not_a_tensor_is_replayed():
    def f(x):
        y = x * 2.0
        return y.tanh() if torch.equal(y, y) else y

    check(f, [rand(3)])


def test_a_primal_the_tape_did_not_keep_is_an_internal_error():
    from reweight.jvp.rules import Ref

    ref = Ref(None, None, 0, (3,), DT, torch.device("cpu"))
    with pytest.raises(RuntimeError) as info:
        ref.primal()
    assert str(info.value) == "internal error: the tape did not keep a primal its rule reads"


def test_a_matrix_product_keeps_only_the_primal_its_rule_reads():
    x, w = rand(4, 3), rand(3, 5)
    tape, _ = record(lambda x: x @ w, x)
    (e,) = tape.entries
    assert e.named["self"].value is None and e.named["mat2"].value is w
    tape, _ = record(lambda w: x @ w, w)
    (e,) = tape.entries
    assert e.named["self"].value is x and e.named["mat2"].value is None


def test_a_convolution_frees_its_input_tangent_when_it_is_the_last_reader():
    from reweight.jvp.rules import rule_convolution

    x, w = rand(2, 2, 5, 5), rand(3, 2, 3, 3)
    tape, _ = record(lambda x: F.conv2d(x * 1.0, w), x)
    e = tape.entries[-1]
    token = e.named["input"].token
    tangent = rand(2, 2, 5, 5, seed=10)
    e.last = set()
    T = {token: tangent}
    rule_convolution(e, T)
    assert T == {token: tangent}
    e.last = {token}
    (got,) = rule_convolution(e, T)
    assert T == {}
    torch.testing.assert_close(got, F.conv2d(tangent, w), rtol=1e-12, atol=1e-12)


class _GraphsMade(torch.overrides.TorchFunctionMode):
    """Counts the ops whose result starts a graph of its own (requires grad, not a view)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.requires_grad and not out._is_view():
            self.made.append(getattr(func, "__name__", str(func)))
        return out


def test_the_replay_builds_no_graph_even_with_grad_enabled():
    """Tangents are values: the replay runs without grad, whatever the caller's mode, so no
    op of it saves its inputs for a backward (with grad on, each would: ResNet-32's L2RW fast
    step peaked at 2.46x a plain step's memory instead of 1.12x)."""
    from reweight.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet32", num_classes=10, in_channels=3).to(DT)
    x, y = rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    weights = list(model.parameters())
    tape = TangentTape(weights)
    with tape:
        out = F.cross_entropy(model(x), y, reduction="none")
    with torch.enable_grad(), _GraphsMade() as mode:
        got = tape.jvp([rand(*w.shape, seed=5) for w in weights], out)
    assert got.abs().max() > 0 and not got.requires_grad
    # only the forward-AD bookkeeping of the dual level (dual tensors of the weights) remains
    assert set(mode.made) <= {"_make_dual"}, sorted(set(mode.made))
