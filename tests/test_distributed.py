"""Data-parallel training on 2 CPU processes (gloo) equals one process on the global batch.
Every method, and both meta-gradient modes of L2RW and MW-Net: ``fast`` (the default) with the
engines the planner picks for this MLP (per layer, its first step checked) and the tangent tape
forced; both methods on a small attention model with a class token and a position embedding
(per layer: their per-example terms summed over ranks like any weight's) and on a
bidirectional LSTM (per layer: its gates read from the fused kernel's outputs); MW-Net with both
normalisations, the replayed optimizer and the net fed the losses undetached
(detach_loss=False: the virtual step's seeds then take the other ranks' weights' dependence on
the local losses through the normalisation).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from reweight import MWNet, Trainer, TrainerConfig, build_method
from reweight.jvp import ENGINES

from .helpers import REWEIGHT, cli_env, free_port, gloo_group, quiet, run_command, torchrun

STEPS = 6
CASES = {
    "erm": lambda: build_method("erm"),
    "random": lambda: build_method("random", seed=3),
    "class_balanced": lambda: build_method("class_balanced"),
    "l2rw": lambda: build_method("l2rw"),
    "l2rw_tape": lambda: build_method("l2rw", engine="tape"),
    "l2rw_unrolled": lambda: build_method("l2rw", meta_grad="unrolled"),
    "mwnet": lambda: MWNet(hidden=8, lr=1e-2),
    "mwnet_sum": lambda: MWNet(hidden=8, lr=1e-2, normalize="sum"),
    "mwnet_replay": lambda: MWNet(hidden=8, lr=1e-2, replay_optimizer=True),
    "mwnet_tape_sum_undetached": lambda: MWNet(
        hidden=8, lr=1e-2, normalize="sum", detach_loss=False, replay_optimizer=True, engine="tape"
    ),
    "mwnet_sum_undetached": lambda: MWNet(
        hidden=8, lr=1e-2, normalize="sum", detach_loss=False, engine_policy="cuda"
    ),
    "mwnet_dual_twin": lambda: MWNet(hidden=8, lr=1e-2, engine="dual_twin"),
    "l2rw_attention": lambda: build_method("l2rw"),
    "mwnet_attention": lambda: MWNet(hidden=8, lr=1e-2, normalize="sum"),
    "l2rw_lstm": lambda: build_method("l2rw"),
    "mwnet_lstm": lambda: MWNet(hidden=8, lr=1e-2, replay_optimizer=True),
    "mwnet_masked_attention": lambda: MWNet(hidden=8, lr=1e-2, normalize="sum"),
    "l2rw_fconv": lambda: build_method("l2rw"),
    "mwnet_fconv": lambda: MWNet(hidden=8, lr=1e-2, replay_optimizer=True),
    "mwnet_unrolled": lambda: MWNet(hidden=8, lr=1e-2, meta_grad="unrolled"),
    "mwnet_unrolled_sum": lambda: MWNet(hidden=8, lr=1e-2, normalize="sum", meta_grad="unrolled"),
    "mwnet_unrolled_replay": lambda: MWNet(
        hidden=8, lr=1e-2, replay_optimizer=True, meta_grad="unrolled"
    ),
}


class Tokens(nn.Module):
    """Each of the 5 features a token, a class token and a position embedding (weights shared
    by every example), one self-attention layer: the per-layer path's shared weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 8)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, 8))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 6, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.unsqueeze(-1))  # (B, 5, 8)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos
        return self.head(self.attn(t, t, t, need_weights=False, **self.masks(x))[0][:, 0])

    def masks(self, x: torch.Tensor) -> dict:
        return {}


class MaskedTokens(Tokens):
    """``Tokens`` with the features above 1 masked as padding (torch's own attention code)."""

    def masks(self, x: torch.Tensor) -> dict:
        return {"key_padding_mask": torch.cat([torch.zeros_like(x[:, :1]), x], 1) > 1.0}


class Steps(nn.Module):
    """The 5 features as 5 steps of one feature, a bidirectional 2-layer LSTM, a head on the
    final hidden states of the top layer's two directions."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x.unsqueeze(-1))
        return self.head(torch.cat([h[-2], h[-1]], 1))


class Signal(nn.Module):
    """The 5 features as a 1-channel signal, convolved by ``F.conv1d`` with a weight and bias of
    the module's own (no ``nn.Conv1d``): the per-layer path's functional convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(4, 1, 3))
        self.bias = nn.Parameter(0.1 * torch.randn(4))
        self.head = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(F.conv1d(x.unsqueeze(1), self.weight, self.bias, padding=1))
        return self.head(t.flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


# the others: mlp
MODELS = {
    "l2rw_attention": Tokens,
    "mwnet_attention": Tokens,
    "l2rw_lstm": Steps,
    "mwnet_lstm": Steps,
    "mwnet_masked_attention": MaskedTokens,
    "l2rw_fconv": Signal,
    "mwnet_fconv": Signal,
}


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(160, generator=g, dtype=torch.float64) > 0).long()
    y[:40] = 1 - y[:40]  # some flipped labels
    return x, y


def train(case: str, out: Path | None = None) -> dict[str, torch.Tensor]:
    x, y = data()
    torch.manual_seed(0)
    model = MODELS.get(case, mlp)().double()
    trainer = Trainer(
        model,
        TensorDataset(x, y),
        TensorDataset(x[:20], y[:20]),
        TensorDataset(x, y),
        method=CASES[case](),
        train_labels=y,
        optimizer=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=1e-3),
        checkpoint_path=out / f"{case}.pt" if out else None,
        config=quiet(max_steps=STEPS, batch_size=32, meta_batch_size=10, log_every=2, eval_every=3),
    )
    result = trainer.fit()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state["_history_loss"] = torch.tensor([r["train_loss"] for r in result.history])
    jvps = result.metrics.get("meta_engine", {}).get("jvps", {})
    state["_jvps"] = torch.tensor([jvps.get(e, 0) for e in ENGINES], dtype=torch.float64)
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        x, y = data()
        try:  # 33 examples cannot be split evenly between 2 processes
            Trainer(nn.Linear(5, 2), TensorDataset(x, y), config=TrainerConfig(batch_size=33))
            error = ""
        except ValueError as err:
            error = str(err)
        results = {case: train(case, Path(out)) for case in CASES}
        results["_error"] = error
        if rank == 0:
            torch.save(results, Path(out) / "results.pt")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, torch.load(out / "results.pt", weights_only=True)


def test_uneven_batch_is_refused_with_the_key(two_process_results):
    _, results = two_process_results
    assert results["_error"] == (
        "trainer.batch_size (33) must be divisible by the number of processes (2): each takes "
        "an equal shard of every batch"
    )


# the JVPs each engine computed in 6 steps (the same in one process and on each rank)
WANT_JVPS = {
    "l2rw": {"per_layer": 6},
    "l2rw_tape": {"tape": 6},
    "mwnet": {"per_layer": 6},
    "mwnet_sum": {"per_layer": 6},
    "mwnet_replay": {"per_layer": 6},
    "mwnet_tape_sum_undetached": {"tape": 6},
    "mwnet_sum_undetached": {"per_layer": 6},
    "mwnet_dual_twin": {"dual_twin": 6},
    "l2rw_attention": {"per_layer": 6},
    "mwnet_attention": {"per_layer": 6},
    "l2rw_lstm": {"per_layer": 6},
    "mwnet_lstm": {"per_layer": 6},
    "mwnet_masked_attention": {"per_layer": 6},
    "l2rw_fconv": {"per_layer": 6},
    "mwnet_fconv": {"per_layer": 6},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_equal_one(two_process_results, case: str):
    out, results = two_process_results
    single = train(case)
    want = WANT_JVPS.get(case, {})
    assert single["_jvps"].tolist() == [want.get(e, 0) for e in ENGINES]
    for key, value in single.items():
        torch.testing.assert_close(results[case][key], value, rtol=0, atol=1e-6, msg=key)
    # rank 0 wrote the checkpoint; it holds the same parameters
    ckpt = torch.load(out / f"{case}.pt", weights_only=True)
    assert ckpt["step"] == STEPS
    for key, value in ckpt["model"].items():
        torch.testing.assert_close(value, single[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_torchrun_cli_writes_one_set_of_outputs_equal_to_one_process(tmp_path, data_root):
    """`torchrun --nproc_per_node=2 -m reweight ...` on CPU: one run directory, rank 0's
    files only, and the parameters of a single-process run of the same command.

    MW-Net, whose weights are a smooth function of the losses: L2RW's clamped, sum-normalised
    weights turn float32 rounding differences (torchrun runs each rank on one thread) into
    different weights when a batch's weight sum is near zero (measured on torch 2.14.1: 9e-4
    apart after 20 steps; MW-Net 3e-8). Every method's data-parallel step equals one process
    in float64 in test_two_processes_equal_one."""
    args = [
        "dataset=mnist_imbalanced",
        "method=mwnet",
        "trainer.max_steps=20",
        "trainer.eval_every=0",
        "trainer.final_weights=0",
    ]
    env = cli_env(REWEIGHT_DATA_DIR=str(data_root))  # one thread, as torchrun gives each rank
    console = {}
    for cmd, run in ((torchrun(), "ddp"), (REWEIGHT, "single")):
        proc = console[run] = run_command(
            [*cmd, *args, f"hydra.run.dir={tmp_path / run}"], tmp_path, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] in (
        ["ddp", "single"],
        ["single", "ddp"],
    )
    log = (ddp / "train.log").read_text()
    assert log.count("run directory:") == 1  # rank 1 did not write into the log file
    # nor on the console: rank 1 logs only warnings, so each line is printed once
    assert console["ddp"].stdout.count("run directory:") == 1, console["ddp"].stdout[-3000:]
    assert console["ddp"].stdout.count("done: step 20") == 1
    a = torch.load(ddp / "checkpoint.pt", weights_only=True)
    b = torch.load(single / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
