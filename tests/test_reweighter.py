"""``Reweighter``: the per-batch object for a loop of one's own.

A hand-written loop with it takes, batch for batch, the same updates as reweight's own
``Trainer.train_step`` (bit for bit on CPU in float64); its state resumes a loop exactly; and
it refuses what it cannot do with one line.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reweight import L2RW, CMWNet, MWNet, Reweighter, Trainer

from .helpers import quiet

LR = 0.1


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n: int, seed: int, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def make(name: str):
    torch.manual_seed(1)
    if name == "l2rw":
        return L2RW()
    if name == "mwnet":
        return MWNet(hidden=6, lr=1e-2, meta_every=2)
    return CMWNet(hidden=6, lr=1e-2)


def hand_loop(method, model, train, trusted, start=None, stop=None, reweighter=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    reweighter = reweighter or Reweighter(
        method, trusted, train_labels=torch.arange(16) % 3, num_classes=3
    )
    for x, y in train[start:stop]:
        out = reweighter(model, x, y, optimizer=opt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return reweighter, opt


@pytest.mark.parametrize("name", ["l2rw", "mwnet", "cmwnet"])
def test_a_hand_written_loop_takes_the_trainers_updates(name: str):
    train, trusted = batches(5, 1), batches(2, 2, size=8)
    ours, theirs = net(), net()
    hand_loop(make(name), ours, train, trusted)
    data = TensorDataset(*train[0])
    trainer = Trainer(
        theirs,
        data,
        meta_data=data,
        method=make(name),
        train_labels=torch.arange(16) % 3,
        num_classes=3,
        optimizer=lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
        config=quiet(),
    )
    for i, (x, y) in enumerate(train):
        trainer.train_step(x, y, *trusted[i % 2])
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(ours.parameters()), next(net().parameters()))


def test_its_state_resumes_a_loop_exactly():
    """MW-Net with meta_every=2, through a DataLoader of trusted batches (3 per pass): 3 steps,
    the state saved and loaded into a new Reweighter and a new net object, 4 more steps, equal
    the 7 steps of one loop (the net, the rhythm and the trusted batches where they were)."""
    train = batches(7, 1)
    trusted = DataLoader(TensorDataset(*batches(1, 2, size=24)[0]), batch_size=8)
    whole = net()
    hand_loop(make("mwnet"), whole, train, trusted)

    model = net()
    first, opt = hand_loop(make("mwnet"), model, train, trusted, stop=3)
    state = copy.deepcopy(first.state_dict())
    again = Reweighter(make("mwnet"), trusted)
    again.load_state_dict(state)
    assert again.steps == 3 and again.meta_drawn == 3
    opt2 = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    for x, y in train[3:]:
        out = again(model, x, y, optimizer=opt2)
        opt2.zero_grad()
        out.loss.backward()
        opt2.step()
    for a, b in zip(model.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)


def test_it_refuses_with_one_line():
    with pytest.raises(ValueError, match="method 'mwnet' needs trusted batches"):
        Reweighter("mwnet")
    model = net()
    x, y = batches(1, 1)[0]
    with pytest.raises(ValueError, match="give the real optimizer, or the virtual step's lr"):
        Reweighter("l2rw", batches(1, 2))(model, x, y)
    erm = Reweighter("erm")(model, x, y, lr=0.1)
    assert torch.equal(erm.weights, torch.full((16,), 1 / 16, dtype=erm.weights.dtype))
    assert erm.losses.grad_fn is not None
    assert torch.allclose(erm.loss, F.cross_entropy(model(x), y))
