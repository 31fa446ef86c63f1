"""Golden outputs of a few seeded float64 Trainer runs, to prove that a refactoring changed nothing.

    python benchmarks/golden.py record outputs/golden/before.pt   # before the first move
    python benchmarks/golden.py compare outputs/golden/before.pt  # after: bit for bit, or how far

Cases: l2rw and mwnet × meta_grad fast / unrolled × {LeNet, ResNet-32 on 8×8 inputs, an LSTM,
a tiny BERT} × {plain SGD virtual step, the replayed AdamW}; each 5 Trainer steps on CPU in
float64 from fixed seeds. Recorded per case: the final parameters, the last step's weights, the
weighting net's state (MW-Net), and the summary metrics. ``compare`` prints one line per case:
``identical``, or the largest absolute and relative differences (a case fails where a value
is off by more than ``--atol`` and by more than ``--rtol``, both 1e-12 by default).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from reweight import L2RW, MWNet, Trainer, TrainerConfig
from reweight.models import LeNet, resnet32
from reweight.models.sequence import RowLSTM

MODELS = ("lenet", "resnet32", "lstm", "bert")
METHODS = ("l2rw", "mwnet")
MODES = ("fast", "unrolled")
OPTIMIZERS = ("sgd", "adamw")


class _Tokens(Dataset):
    """(dict of tensors, label) pairs for the tiny BERT."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 40, (n, 8), generator=g)
        mask = (torch.arange(8) < torch.randint(3, 9, (n,), generator=g)[:, None]).long()
        self.x = {"input_ids": ids * mask, "attention_mask": mask}
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.x.items()}, int(self.y[i])


def _images(n: int, shape: tuple[int, ...], classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, classes, (n,), generator=g))


def _case_data(model: str) -> tuple[nn.Module, list[Dataset]]:
    torch.manual_seed(0)
    if model == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        from reweight.models.hf import SequenceClassifier

        config = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0,
        )
        net = SequenceClassifier(BertForSequenceClassification(config)).double()
        return net, [_Tokens(40, 1), _Tokens(16, 2), _Tokens(16, 3)]
    if model == "lenet":
        net, shape, classes = LeNet(num_classes=2), (1, 28, 28), 2
    elif model == "resnet32":
        net, shape, classes = resnet32(num_classes=3), (3, 8, 8), 3
    else:
        net, shape, classes = RowLSTM(in_features=8, num_classes=3, hidden=8), (1, 8, 8), 3
    return net.double(), [_images(n, shape, classes, s) for n, s in ((40, 1), (16, 2), (16, 3))]


def run_case(model: str, method: str, mode: str, opt: str) -> dict:
    net, (train, meta, test) = _case_data(model)
    torch.manual_seed(1)
    replay = opt == "adamw"
    if method == "l2rw":
        meth = L2RW(meta_grad=mode, replay_optimizer=replay)
    else:
        meth = MWNet(hidden=8, meta_grad=mode, replay_optimizer=replay)

    def optimizer(p):
        if opt == "sgd":
            return torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2)

    weights: list[torch.Tensor] = []
    trainer = Trainer(
        net,
        train,
        meta_data=meta,
        test_data=test,
        method=meth,
        optimizer=optimizer,
        config=TrainerConfig(
            max_steps=5,
            batch_size=8,
            meta_batch_size=8,
            eval_every=5,
            log_every=1,
            seed=0,
            progress=False,
            final_weights=1,
            channels_last=False,
        ),
    )
    original = trainer.train_step

    def keep(*args, **kwargs):
        out = original(*args, **kwargs)
        weights.append(out.method.weights.detach().clone())
        return out

    trainer.train_step = keep  # type: ignore[method-assign]
    result = trainer.fit()
    metrics = {
        k: v
        for k, v in result.metrics.items()
        if isinstance(v, (int, float)) and not k.endswith("time_s") and "time" not in k
    }
    return {
        "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "weights": weights,
        "vnet": (
            {k: v.clone() for k, v in meth.vnet.state_dict().items()} if method == "mwnet" else {}
        ),
        "metrics": metrics,
        "example_weights": trainer.example_weights().clone(),
        "engine": str(meth.describe()["meta_engine"].get("jvps") or mode),
    }


def cases() -> list[tuple[str, str, str, str]]:
    return list(itertools.product(MODELS, METHODS, MODES, OPTIMIZERS))


def _tensors(blob: dict) -> dict[str, torch.Tensor | float]:
    flat: dict[str, torch.Tensor | float] = {}
    for k, v in blob["params"].items():
        flat[f"params.{k}"] = v
    for i, w in enumerate(blob["weights"]):
        flat[f"weights.{i}"] = w
    for k, v in blob["vnet"].items():
        flat[f"vnet.{k}"] = v
    for k, v in blob["metrics"].items():
        flat[f"metrics.{k}"] = float(v)
    flat["example_weights"] = blob["example_weights"]
    flat["engine"] = blob["engine"]
    return flat


def _diff(a, b) -> tuple[float, float]:
    """The largest absolute difference, and that relative to the tensor's largest magnitude (a
    sum taken in another order differs by rounding relative to the size of what it sums)."""
    if isinstance(a, str):
        return (0.0, 0.0) if a == b else (math.inf, math.inf)
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf, math.inf
        if torch.equal(a, b):
            return 0.0, 0.0
        if not a.is_floating_point():
            return math.inf, math.inf
        both_nan = torch.isnan(a) & torch.isnan(b)
        diff = (a - b).abs().masked_fill(both_nan, 0)
        scale = torch.maximum(a.abs(), b.abs()).masked_fill(both_nan, 0).max().clamp_min(1e-300)
        return float(diff.max()), float(diff.max() / scale)
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0, 0.0
    return abs(a - b), abs(a - b) / max(abs(a), abs(b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["record", "compare"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--atol", type=float, default=1e-12)
    parser.add_argument("--rtol", type=float, default=1e-12, help="a value passes within either")
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    only = [s for s in args.only.split(",") if s]
    selected = [c for c in cases() if not only or any(s in "-".join(c) for s in only)]
    if args.action == "record":
        out = {"-".join(c): run_case(*c) for c in selected}
        args.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, args.path)
        print(f"recorded {len(out)} cases in {args.path}")
        return 0
    golden = torch.load(args.path, weights_only=True)
    worst, failed = 0.0, 0
    for c in selected:
        name = "-".join(c)
        got, want = _tensors(run_case(*c)), _tensors(golden[name])
        keys = sorted(set(got) | set(want))
        missing = (math.inf, math.inf)
        diffs = {k: (_diff(got[k], want[k]) if k in got and k in want else missing) for k in keys}
        d = max(a for a, _ in diffs.values())
        rel = max(r for _, r in diffs.values())
        worst = max(worst, rel)
        bad = any(a > args.atol and r > args.rtol for a, r in diffs.values())
        failed += bad
        where = max(diffs, key=lambda k: diffs[k][1])
        said = f"max |diff| {d:.3g}, relative {rel:.3g} ({where})"
        print(f"{name:32s} {'identical' if d == 0 else said}{'  FAIL' if bad else ''}")
    print(
        f"{len(selected)} cases, {failed} over atol {args.atol:g} and rtol {args.rtol:g}, "
        f"worst relative {worst:.3g}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
