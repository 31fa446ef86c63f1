"""``Reweighter`` data-parallel: 2 CPU processes (gloo) equal one process on the union batch.

A hand-written loop, each rank given its shard of every global batch and the same trusted
batches, calling ``sum_gradients`` between backward and step: after a few steps every rank's
parameters, and the weights of every step gathered in rank order, equal those of one process
on the concatenated batches (float64, 1e-10), for L2RW and MW-Net (both normalisations, the
replayed AdamW, shards of unequal size), and the weighting net of MW-Net too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from reweight import L2RW, MWNet, Reweighter

from .helpers import spawn_ranks

STEPS = 4
CASES = {
    "l2rw": lambda: L2RW(),
    "l2rw_unrolled": lambda: L2RW(meta_grad="unrolled"),
    "mwnet": lambda: MWNet(hidden=6, lr=1e-2),
    "mwnet_sum": lambda: MWNet(hidden=6, lr=1e-2, normalize="sum"),
    "mwnet_adamw_replay": lambda: MWNet(hidden=6, lr=1e-2, replay_optimizer=True),
    "mwnet_unrolled": lambda: MWNet(hidden=6, lr=1e-2, meta_grad="unrolled"),
}
UNEVEN = {"mwnet_sum"}  # rank 0 takes 10 of each 24, rank 1 14


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def global_batches(seed: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        x = torch.randn(size, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (size,), generator=g)
        out.append((x, y))
    return out


def shard(case: str, rank: int, world: int, n: int) -> slice:
    if world == 1:
        return slice(0, n)
    if case in UNEVEN:
        cut = 10
        return slice(0, cut) if rank == 0 else slice(cut, n)
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def run(case: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The hand-written loop on this rank's shards; the weights of every step gathered."""
    model = net()
    torch.manual_seed(1)
    method = CASES[case]()
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if "adamw" in case
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    reweight = Reweighter(method, global_batches(seed=7, size=6))  # the same on every rank
    weights = []
    for x, y in global_batches(seed=3, size=24):
        part = shard(case, rank, world, len(y))
        out = reweight(model, x[part], y[part], optimizer=opt)
        opt.zero_grad()
        out.loss.backward()
        reweight.sum_gradients(model.parameters())
        opt.step()
        w = out.weights.detach()
        if world > 1:  # every shard's weights, in rank order (shards may differ in size)
            parts: list[torch.Tensor | None] = [None] * world
            dist.all_gather_object(parts, w)
            w = torch.cat(parts)  # type: ignore[arg-type]
        weights.append(w)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["weights"] = torch.stack(weights)  # (STEPS, 24)
    vnet = getattr(method, "vnet", None)
    if vnet is not None:
        state.update({f"vnet.{k}": v.clone() for k, v in vnet.state_dict().items()})
    state["steps"] = torch.tensor(reweight.steps)
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: run(case, rank, world) for case in CASES}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("reweighter_ddp")
    return spawn_ranks(_worker, out)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_equal_one_on_the_union_batch(two_ranks, case: str):
    single = run(case)
    assert single["weights"].shape == (STEPS, 24)
    assert float(single["weights"].std()) > 0  # the weights are not uniform: a real test
    if case.startswith("mwnet"):
        assert any(k.startswith("vnet.") for k in single)
    for rank, results in enumerate(two_ranks):
        assert sorted(results[case]) == sorted(single)
        for key, value in single.items():
            torch.testing.assert_close(
                results[case][key], value, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}"
            )


def test_one_process_has_no_group_and_sums_nothing():
    reweight = Reweighter("l2rw", global_batches(seed=7, size=6))
    model = net()
    model(torch.zeros(1, 5, dtype=torch.float64)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    reweight.sum_gradients(model.parameters())
    assert reweight.dist is None and reweight.world_size == 1
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)
