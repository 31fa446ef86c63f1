"""The small-loss meta source's parts (reweight.train.meta_source) that test_meta_source.py's
runs through the Trainer do not pin down, on a stand-in trainer: the selection schedule
(warm-up, refresh, none after the first), what each selection records, the losses in
evaluation mode and dataset order against the cross entropy written out, the seeded draw of a
meta batch from a larger selection, the refusals word for word, the checkpoint, and the two
helpers the Trainer and the builder use (``drop_rows``, ``meta_source_for``)."""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from reweight.train.meta_source import (
    SmallLossMetaSource,
    drop_rows,
    meta_source_for,
    small_loss_selection,
)

DT = torch.float64
N, K = 30, 3


def data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 4, generator=g, dtype=DT)
    return x, torch.arange(N) % K


class EvalSpy(nn.Linear):
    """A linear model that notes its mode at each call."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(4, K, dtype=DT)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return super().forward(x)


def trainer(meta_batch_size: int = 100, eval_batch_size: int = 7):
    x, y = data()
    return SimpleNamespace(
        model=EvalSpy(),
        train_data=TensorDataset(x, y),
        config=SimpleNamespace(
            meta_batch_size=meta_batch_size, eval_batch_size=eval_batch_size, num_workers=0
        ),
        device=torch.device("cpu"),
        placement=SimpleNamespace(autocast=contextlib.nullcontext, inputs=lambda x: x),
        loss_fn=F.cross_entropy,
        step=0,
    )


def losses_by_hand(model, x, y):
    with torch.no_grad():
        logits = x @ model.weight.T + model.bias
        return (torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).float()


@pytest.mark.parametrize(
    ("warmup", "refresh", "want"),
    [(3, 4, [3, 7, 11]), (3, 0, [3]), (0, 5, [0, 5, 10]), (2, 1, list(range(2, 13)))],
)
def test_selections_by_loss_follow_the_schedule(warmup, refresh, want):
    t = trainer()
    _, y = data()
    source = SmallLossMetaSource(y, K, per_class=2, warmup=warmup, refresh=refresh)
    batches = source.batches(t, stream=1, position=0)
    at = []
    for step in range(13):
        t.step = step
        next(batches)
        if source.history and source.history[-1]["step"] == step:
            at.append(step)
        assert source.selected_at == max([-1, *[s for s in want if s <= step]])
    assert at == want
    assert [r["step"] for r in source.history] == [float(s) for s in want]
    # another stream (the final scoring) reads the selection and changes nothing
    before = len(source.history)
    other = source.batches(t, stream=2, position=0)
    t.step = 40
    next(other)
    assert len(source.history) == before


def test_a_selection_is_the_smallest_losses_by_hand_and_says_what_it_holds():
    t = trainer()
    x, y = data()
    corrupted = torch.arange(N) % 2 == 0
    source = SmallLossMetaSource(y, K, per_class=3, warmup=0, refresh=0, corrupted=corrupted)
    t.model.train()
    start = time.perf_counter()
    idx, mx, my = next(source.batches(t, stream=1, position=0))
    elapsed = time.perf_counter() - start
    losses = losses_by_hand(t.model, x, y)
    assert source.selected.tolist() == small_loss_selection(losses, y, K, 3).tolist()
    assert torch.equal(idx, source.selected)  # 9 fit in a meta batch of 100: all of them
    assert torch.equal(mx, x[idx]) and torch.equal(my, y[idx])
    # one forward over the training set in evaluation mode, in batches of 7; the mode restored
    assert t.model.modes == [False] * 5 and t.model.training
    torch.testing.assert_close(SmallLossMetaSource.training_losses(t), losses)
    assert SmallLossMetaSource.training_losses(t).dtype == torch.float32
    frac = float(corrupted[source.selected].float().mean())
    (record,) = source.history
    assert record["step"] == 0.0 and record["size"] == 9.0
    assert 0 <= record["seconds"] <= elapsed  # the selection's own time, within the call's
    assert record["corrupted_frac"] == frac
    assert source.describe() == {
        "meta_source": "small_loss",
        "meta_source_per_class": 3,
        "meta_source_warmup": 0,
        "meta_source_refresh": 0,
        "meta_source_selections": [record],
        "meta_source_selected": source.selected.tolist(),
        "meta_source_corrupted_frac": frac,
    }
    assert source.serving() is source.selected
    plain = SmallLossMetaSource(y, K, per_class=3, warmup=0, refresh=0)
    next(plain.batches(trainer(), stream=1, position=0))
    assert "corrupted_frac" not in plain.history[0]
    assert "meta_source_corrupted_frac" not in plain.describe()
    empty = SmallLossMetaSource(y, K, per_class=3, corrupted=corrupted)
    empty.selected = torch.zeros(0, dtype=torch.long)
    assert empty.describe()["meta_source_corrupted_frac"] == 0.0


def test_a_larger_selection_is_drawn_from_seeded_by_stream_and_step():
    _, y = data()
    source = SmallLossMetaSource(y, K, per_class=5, warmup=100, seed=2)  # 15 selected
    t = trainer(meta_batch_size=4)

    def draw(stream, step, seed=2):
        source.seed = seed
        t.step = step
        return next(source.batches(t, stream=stream, position=0))[0]

    a = draw(1, 3)
    assert len(a) == 4 and set(a.tolist()) <= set(source.selected.tolist())
    assert len(set(a.tolist())) == 4  # without replacement
    assert torch.equal(a, draw(1, 3))  # the same step: the same batch
    g = torch.Generator().manual_seed(2 * 1_000_003 + 1 * 10_007 + 3)
    assert torch.equal(a, source.selected[torch.randperm(15, generator=g)[:4]])
    draws = {tuple(draw(s, step, seed).tolist()) for s, step, seed in
             [(1, 3, 2), (1, 4, 2), (2, 3, 2), (1, 3, 5)]}  # fmt: skip
    assert len(draws) == 4  # the step, the stream and the seed each change the draw
    t.config.meta_batch_size = 15  # exactly the selection: all of it, in order
    t.step = 3
    assert torch.equal(next(source.batches(t, stream=1, position=0))[0], source.selected)


def test_refusals_word_for_word():
    _, y = data()
    for kw, msg in [
        ({"per_class": 0}, "per_class must be >= 1, got 0"),
        ({"per_class": 1, "warmup": -1}, "warmup must be >= 0, got -1"),
        ({"per_class": 1, "refresh": -1}, "refresh must be >= 0, got -1"),
    ]:
        with pytest.raises(ValueError) as info:
            SmallLossMetaSource(y, K, **kw)
        assert str(info.value) == f"small-loss meta source: {msg}"
    source = SmallLossMetaSource(y, K, per_class=1, warmup=0, refresh=0)
    source.check_single_process(None)
    with pytest.raises(ValueError) as info:
        source.check_single_process(object())
    assert str(info.value) == (
        "dataset.meta_source=small_loss does not run data-parallel yet (each rank would drop a "
        "different number of serving examples from its shard); use one process"
    )


def test_the_defaults_and_the_warm_up_draw():
    _, y = data()
    source = SmallLossMetaSource(y.int(), K, per_class=2)
    assert (source.warmup, source.refresh, source.seed) == (200, 500, 0)
    assert source.labels.dtype == torch.int64 and source.corrupted is None
    g = torch.Generator().manual_seed(0)
    want = small_loss_selection(torch.rand(N, generator=g), y, K, 2)
    assert torch.equal(source.selected, want) and source.selected_at == -1
    none = small_loss_selection(torch.ones(0), torch.zeros(0), 0, 2)  # no class: no index
    assert none.dtype == torch.long and none.tolist() == []


def test_a_checkpoint_round_trip():
    _, y = data()
    source = SmallLossMetaSource(y, K, per_class=2, warmup=0)
    next(source.batches(trainer(), stream=1, position=0))
    state = source.state_dict()
    assert state["selected"] is not source.selected  # a copy, not the live tensor
    assert state["selected_at"] == 0 and state["history"] == source.history
    state["selected"] = state["selected"].int()
    resumed = SmallLossMetaSource(y, K, per_class=2, warmup=0)
    resumed.load_state_dict(state)
    assert resumed.selected.dtype == torch.int64
    assert torch.equal(resumed.selected, source.selected)
    assert resumed.selected_at == 0 and resumed.history == source.history
    assert resumed.history is not state["history"]


def test_drop_rows():
    idx = torch.tensor([4, 7, 9, 2])
    x = {"a": torch.arange(4) * 10, "b": torch.arange(4)}
    y = torch.tensor([0, 1, 2, 0])
    kept = drop_rows(idx, x, y, torch.tensor([7, 2, 100]))
    assert kept[0].tolist() == [4, 9] and kept[1]["a"].tolist() == [0, 20]
    assert kept[1]["b"].tolist() == [0, 2] and kept[2].tolist() == [0, 2]
    same = drop_rows(idx, x, y, torch.tensor([5]))  # none serving: the batch as it is
    assert same[0] is idx and same[1] is x and same[2] is y
    whole = drop_rows(idx, x, y, idx)  # all serving: the whole batch rather than none
    assert whole[0] is idx and whole[1] is x and whole[2] is y


def test_meta_source_for_a_bundle():
    _, y = data()
    corrupted = torch.zeros(N, dtype=torch.bool)
    info = {"name": "small_loss", "per_class": 2, "warmup": 5, "refresh": 7}
    bundle = SimpleNamespace(
        info={"meta_source": info}, train_labels=y, num_classes=K, corrupted=corrupted
    )
    source = meta_source_for(bundle, seed=9)
    assert (source.per_class, source.warmup, source.refresh, source.seed) == (2, 5, 7, 9)
    assert source.num_classes == K and torch.equal(source.labels, y)
    assert torch.equal(source.corrupted, corrupted)
    bundle.info = {"meta_source": {"name": "clean"}}
    assert meta_source_for(bundle, seed=9) is None
    bundle.info = {}
    assert meta_source_for(bundle, seed=9) is None


def test_ties_go_to_the_lower_index_in_a_large_class():
    """Many tied losses in classes of 150 (where an unstable sort reorders ties on CPU)."""
    g = torch.Generator().manual_seed(1)
    losses = torch.randint(0, 3, (300,), generator=g).double()
    labels = torch.arange(300) % 2
    want = []
    for c in range(2):
        members = [i for i in range(300) if int(labels[i]) == c]
        want += sorted(members, key=lambda i: (float(losses[i]), i))[:120]
    assert small_loss_selection(losses, labels, 2, 120).tolist() == want
