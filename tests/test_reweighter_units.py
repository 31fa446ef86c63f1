"""``Reweighter``'s own bookkeeping (reweight.reweighter) beyond test_reweighter.py's
loop-level comparisons: what a method's step is handed (the lr, the model in training mode,
the trusted batches cycled, this rank's place in a data-parallel batch), setup once per model,
the losses taken when a method gives none, the loss's scale, the gradients summed over ranks,
and the counts a checkpoint keeps; through a recording method and a stand-in process group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reweight import Reweighter
from reweight.methods import Method, MethodOutput, StepInputs
from reweight.reweighter import Reweighted

DT = torch.float64


class Recording(Method):
    """Weights 1/B, no losses of its own; notes each step's inputs and each setup."""

    name = "recording"
    needs_meta = True

    def __init__(self) -> None:
        self.batches: list[StepInputs] = []
        self.setups: list[dict] = []
        self.modes: list[bool] = []
        self.outputs: list[MethodOutput] = []

    def setup(self, **kw) -> None:
        self.setups.append(kw)

    def step(self, batch: StepInputs) -> MethodOutput:
        self.batches.append(batch)
        self.modes.append(batch.model.training)
        n = len(batch.targets)
        self.outputs.append(MethodOutput(weights=torch.full((n,), 1.0 / n, dtype=DT)))
        return self.outputs[-1]


class NoMeta(Recording):
    name = "no_meta"
    needs_meta = False


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def trusted(n: int = 3):
    return [(torch.full((2, 3), float(i), dtype=DT), torch.tensor([i % 2, 1])) for i in range(n)]


def batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def test_each_step_gets_the_lr_the_model_in_training_and_the_next_trusted_batch():
    method, net = Recording(), model()
    labels = torch.tensor([0, 1, 1])
    rw = Reweighter(method, trusted(3), train_labels=labels, num_classes=2)
    assert rw.dist is None and rw.world_size == 1
    opt = torch.optim.SGD(net.parameters(), lr=0.25)
    net.eval()
    x, y = batch()
    for _ in range(4):
        out = rw(net, x, y, optimizer=opt)
    assert method.modes == [True] * 4
    assert [b.lr for b in method.batches] == [0.25] * 4
    assert [b.step for b in method.batches] == [0, 1, 2, 3]
    assert [float(b.meta_inputs[0, 0]) for b in method.batches] == [0.0, 1.0, 2.0, 0.0]  # cycled
    assert [b.meta_targets.tolist()[0] for b in method.batches] == [0, 1, 0, 0]
    assert method.batches[0].optimizer is opt and method.batches[0].loss_fn is F.cross_entropy
    assert method.batches[0].dist is None and method.batches[0].global_batch_size is None
    assert (rw.steps, rw.meta_drawn) == (4, 4)
    rw(net, x, y, optimizer=opt, lr=0.5)  # the lr given wins over the optimizer's
    assert method.batches[-1].lr == 0.5
    # set up once per model: again only for another
    assert len(method.setups) == 1
    setup = method.setups[0]
    assert setup["model"] is net and setup["device"] == torch.device("cpu")
    assert setup["train_labels"] is labels and setup["num_classes"] == 2
    other = model()
    rw(other, x, y, lr=0.1)
    assert len(method.setups) == 2 and method.setups[1]["model"] is other
    # a method without losses of its own: the model's forward, per example, with its graph
    torch.testing.assert_close(out.losses, F.cross_entropy(net(x), y, reduction="none"))
    assert out.losses.grad_fn is not None
    assert out.output is method.outputs[3] and out.weights is method.outputs[3].weights
    hinge = rw(net, x, y, lr=0.1, loss_fn=F.multi_margin_loss)
    torch.testing.assert_close(hinge.losses, F.multi_margin_loss(net(x), y, reduction="none"))


def test_the_loss_is_the_weighted_sum_times_its_scale():
    w = torch.tensor([0.5, 0.25, 0.25])
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    out = Reweighted(w, losses, MethodOutput(weights=w))
    assert out.scale == 1 and out.loss.dtype == DT
    torch.testing.assert_close(out.loss, torch.tensor(2.0, dtype=DT))
    out.scale = 3
    torch.testing.assert_close(out.loss, torch.tensor(6.0, dtype=DT))


class Group:
    """A stand-in process group: rank ``rank`` of shards of ``sizes``."""

    def __init__(self, rank: int, sizes: list[int]) -> None:
        self.rank, self.world_size, self.sizes = rank, len(sizes), sizes
        self.summed: list[list[Tensor]] = []
        self.devices: list[torch.device] = []

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        self.devices.append(tensor.device)
        if tensor.device.type != "meta":
            assert tensor.tolist() == [self.sizes[self.rank]]
        return torch.tensor(self.sizes, dtype=tensor.dtype)

    def sum_gradients(self, params) -> None:
        self.summed.append(list(params))


def test_a_rank_is_handed_its_place_in_the_global_batch():
    method, net = Recording(), model()
    rw = Reweighter(method, trusted())
    group = Group(rank=2, sizes=[5, 3, 4, 6])
    rw._dist = group  # looked up once; here set as the first call would
    assert rw.dist is group and rw.world_size == 4
    x, y = batch(n=4)
    rw(net, x, y, lr=0.1)
    b = method.batches[0]
    assert (b.dist, b.global_batch_size, b.offset) == (group, 18, 8)
    params = list(net.parameters())
    rw.sum_gradients(iter(params))  # any iterable: handed on as a list
    assert group.summed == [params]
    alone = Reweighter(Recording(), trusted())
    alone.sum_gradients(net.parameters())  # one process: nothing to do
    assert alone.world_size == 1


def test_refusals_word_for_word():
    with pytest.raises(ValueError) as info:
        Reweighter(Recording())
    assert str(info.value) == "method 'recording' needs trusted batches (meta_data)"
    x, y = batch()
    with pytest.raises(ValueError) as info:
        Reweighter(Recording(), trusted())(model(), x, y)
    assert str(info.value) == "Reweighter: give the real optimizer, or the virtual step's lr"


def test_a_checkpoint_keeps_the_counts_and_the_trusted_batches_position():
    method, net = Recording(), model()
    rw = Reweighter(method, trusted(3))
    x, y = batch()
    for _ in range(5):
        rw(net, x, y, lr=0.1)
    state = rw.state_dict()
    assert state == {"method": {}, "steps": 5, "meta_drawn": 5}
    again = Reweighter(Recording(), trusted(3))
    again.load_state_dict(state)
    assert (again.steps, again.meta_drawn) == (5, 5)
    again(net, x, y, lr=0.1)
    assert float(again.method.batches[0].meta_inputs[0, 0]) == 2.0  # the 6th: index 5 % 3
    assert again.method.batches[0].step == 5


def test_a_method_without_trusted_batches_draws_none():
    method = NoMeta()
    rw = Reweighter(method)
    x, y = batch()
    rw(model(), x, y, lr=0.1)
    assert method.batches[0].meta_inputs is None and method.batches[0].meta_targets is None
    assert rw.meta_drawn == 0


def test_a_process_group_given_is_the_one_looked_up():
    import torch.distributed as dist

    assert not dist.is_initialized()
    rw = Reweighter(Recording(), trusted(), process_group=object())
    with pytest.raises(RuntimeError, match=r"^torch\.distributed is not initialised"):
        rw.dist  # noqa: B018 (looked up at first use: the group given, not the default)


def test_every_tensor_is_moved_to_the_models_device():
    """A model on the "meta" device (shapes only) stands for one on an accelerator."""
    method, group = Recording(), Group(rank=0, sizes=[4, 4])
    rw = Reweighter(method, trusted())
    rw._dist = group
    net = model().to("meta")
    x, y = batch()
    out = rw(net, x, y, lr=0.1)
    b = method.batches[0]
    for t in (b.inputs, b.targets, b.meta_inputs, b.meta_targets, out.losses):
        assert t.device.type == "meta"
    assert group.devices == [torch.device("meta")]
    assert method.setups[0]["device"] == torch.device("meta")
