"""``ReweightingTrainer`` data-parallel: the real ``transformers.Trainer`` on 2 CPU processes.

Both processes run as torchrun would start them (its environment variables, ``ddp_backend=
"gloo"``): HF wraps the model in DistributedDataParallel and gives each rank its part of every
global batch (its DistributedSampler). The batches each rank drew, concatenated in rank order,
are then replayed through reweight's own ``Trainer.train_step`` in one process from the same
initial weights: after 4 steps the parameters of a tiny BERT (float64) and MW-Net's weighting
net equal those of both ranks to 1e-10, for L2RW and MW-Net.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from reweight import Trainer
from reweight.models.hf import SequenceClassifier

from .helpers import quiet, spawn_ranks
from .test_integration_hf import Pairs, Recorded, args, method, rows, tiny_bert

STEPS = 4
CASES = ("l2rw", "mwnet")


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        model = tiny_bert().double()
        hf = Recorded(
            model=model, args=args(Path(out) / name, per_device_train_batch_size=8,
                                   max_steps=STEPS, ddp_backend="gloo"),
            train_dataset=rows(64, 1), meta_dataset=rows(16, 2), method=method(name),
            meta_batch_size=4, optimizers=(sgd(model.parameters()), None),
        )  # fmt: skip
        hf.train()
        assert hf.args.world_size == world and dist.get_world_size() == world
        seen: list = [None] * world
        dist.all_gather_object(seen, hf.seen)
        state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
        vnet = getattr(hf.reweighter.method, "vnet", None)
        if vnet is not None:
            state.update({f"vnet.{k}": v.detach().clone() for k, v in vnet.state_dict().items()})
        results[name] = {"state": state, "seen": seen, "trusted": hf.trusted}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_ddp")
    return spawn_ranks(_worker, out, weights_only=False)


def union(parts: list[tuple[dict, torch.Tensor]]) -> tuple[dict, torch.Tensor]:
    """One global batch: the ranks' shards in rank order."""
    keys = parts[0][0].keys()
    x = {k: torch.cat([p[0][k] for p in parts]) for k in keys}
    return x, torch.cat([p[1] for p in parts])


@pytest.mark.parametrize("name", CASES)
def test_hf_ddp_equals_one_process_on_the_global_batch(two_ranks, name: str):
    r0, r1 = (ranks[name] for ranks in two_ranks)
    seen = r0["seen"]
    assert [len(s) for s in seen] == [STEPS, STEPS]
    for a, b in zip(seen[0], seen[1], strict=True):  # the ranks drew different examples
        assert not torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    assert len(r0["trusted"]) == STEPS
    for a, b in zip(r0["trusted"], r1["trusted"], strict=True):  # and the same trusted ones
        assert torch.equal(a[1], b[1]) and torch.equal(a[0]["input_ids"], b[0]["input_ids"])
    ours = tiny_bert().double()
    trainer = Trainer(
        SequenceClassifier(ours), Pairs(rows(64, 1)), meta_data=Pairs(rows(16, 2)),
        method=method(name), optimizer=sgd, config=quiet(),
    )  # fmt: skip
    for step in range(STEPS):
        x, y = union([seen[0][step], seen[1][step]])
        mx, my = r0["trusted"][step]
        trainer.train_step(x, y, mx, my)
    want = {f"model.{k}": v for k, v in ours.state_dict().items()}
    vnet = getattr(trainer.method, "vnet", None)
    if vnet is not None:
        want.update({f"vnet.{k}": v.detach() for k, v in vnet.state_dict().items()})
    start = tiny_bert().double().state_dict()
    moved = max(
        float((v - start[k]).abs().max())
        for k, v in ours.state_dict().items()
        if v.is_floating_point()
    )
    assert moved > 1e-3
    for rank, r in enumerate((r0, r1)):
        assert sorted(r["state"]) == sorted(want)
        for key, value in want.items():
            torch.testing.assert_close(
                r["state"][key], value, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}"
            )
