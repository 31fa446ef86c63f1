"""``ReweightingModule`` under Lightning's DDP strategy, 2 CPU processes (gloo), no mocks.

The real ``lightning.Trainer(strategy="ddp", devices=2)`` (the processes started here, as
torchrun would, with Lightning's environment variables): each rank gets its half of every
global batch, the trusted batches are the same on both. After 4 steps both ranks hold the
parameters, the weighting net and the weights (gathered in rank order) of one process
trained on the whole global batches, in float64 to 1e-10, for L2RW and MW-Net.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from reweight import L2RW, MWNet
from reweight.integrations.lightning import ReweightingModule

from .helpers import spawn_ranks

STEPS, BATCH = 4, 24  # the global batch; each of 2 ranks takes 12
CASES = ("l2rw", "mwnet")


def global_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(STEPS * BATCH, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (STEPS * BATCH,), generator=g)


def trusted() -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (12,), generator=g)), batch_size=6)


def shards(rank: int, world: int) -> DataLoader:
    """This rank's part of each global batch, in order."""
    x, y = global_data()
    per = BATCH // world
    keep = torch.cat(
        [torch.arange(k * BATCH + rank * per, k * BATCH + (rank + 1) * per) for k in range(STEPS)]
    )
    return DataLoader(TensorDataset(x[keep], y[keep]), batch_size=per)


class Classifier(ReweightingModule):
    def __init__(self, name: str) -> None:
        torch.manual_seed(1)
        super().__init__(L2RW() if name == "l2rw" else MWNet(hidden=6, lr=1e-2), trusted())
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        self.weights: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.reweigh(self.net, x, y)
        self.weights.append(out.weights.detach())
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)


def fit(name: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    module = Classifier(name)
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, shards(rank, world))
    weights = module.weights
    if world > 1:  # both shards' weights, in rank order
        gathered: list[list[torch.Tensor] | None] = [None] * world
        dist.all_gather_object(gathered, weights)
        weights = [torch.cat(parts) for parts in zip(*gathered, strict=True)]  # type: ignore[misc]
    state = {f"net.{k}": v.detach().clone() for k, v in module.net.state_dict().items()}
    state["weights"] = torch.stack(weights)  # (STEPS, BATCH)
    vnet = getattr(module.reweighter.method, "vnet", None)
    if vnet is not None:
        state.update({f"vnet.{k}": v.detach().clone() for k, v in vnet.state_dict().items()})
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    results = {name: fit(name, rank, world) for name in CASES}
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_ddp")
    return spawn_ranks(_worker, out)


@pytest.mark.parametrize("name", CASES)
def test_lightning_ddp_equals_one_process_on_the_global_batch(two_ranks, name: str):
    single = fit(name)
    assert single["weights"].shape == (STEPS, BATCH)
    assert float(single["weights"].std()) > 0
    for rank, results in enumerate(two_ranks):
        assert sorted(results[name]) == sorted(single)
        for key, value in single.items():
            torch.testing.assert_close(
                results[name][key], value, rtol=0, atol=1e-10, msg=f"rank {rank}: {key}"
            )
