"""suspects.csv and the ranking metrics to the letter (reweight.outputs.suspects), in-process: a
real Trainer, real files. The CLI tests in test_own_data.py check the same through a subprocess;
these pin down what a mutation run (tools/mutation.py) showed they leave open in-process."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from reweight.outputs.suspects import (
    SUSPECT_COLUMNS,
    precision_recall_at_k,
    ranking_metrics,
    score_examples,
    suspect_order,
    suspects_table,
    write_suspects,
)
from reweight.train.trainer import FitResult, Trainer

from .helpers import tiny_l2rw_trainer

HEADER = (
    "rank,index,id,given_label,predicted_label,probability,loss,final_weight,mean_weight,corrupted"
)


@pytest.fixture(scope="module")
def fitted() -> tuple[Trainer, FitResult]:
    trainer = tiny_l2rw_trainer()
    return trainer, trainer.fit()


def read(path) -> tuple[bytes, list[dict[str, str]]]:
    data = path.read_bytes()
    with path.open(newline="") as f:
        return data, list(csv.DictReader(f))


def test_suspects_csv_to_the_letter(fitted: tuple[Trainer, FitResult], tmp_path):
    trainer, result = fitted
    ids = [f"img{i}.png" for i in range(50)]
    corrupted = torch.arange(50) % 4 == 0
    final = result.example_weights
    rows, ranked_by, losses = suspects_table(
        trainer, final=final, class_names=["a", "b", "c"], ids=ids, corrupted=corrupted
    )
    write_suspects(tmp_path / "suspects.csv", rows)
    data, table = read(tmp_path / "suspects.csv")
    assert tuple(HEADER.split(",")) == SUSPECT_COLUMNS
    assert data.decode("utf-8").split("\n")[0] == HEADER and b"\r" not in data
    assert len(table) == 50 and [r["rank"] for r in table] == [str(k) for k in range(1, 51)]
    order = suspect_order(ranked_by, losses)
    assert [int(r["index"]) for r in table] == order.tolist()
    scores = score_examples(trainer)
    mean = trainer.mean_example_weights()
    names = ["a", "b", "c"]
    for r in table:
        i = int(r["index"])
        assert r["id"] == ids[i]
        assert r["given_label"] == names[int(trainer.train_labels[i])]
        assert r["predicted_label"] == names[int(scores["predicted"][i])]
        assert r["probability"] == f"{float(scores['probability'][i]):.6g}"
        assert r["loss"] == f"{float(scores['loss'][i]):.6g}"
        assert r["final_weight"] == f"{float(final[i]):.6g}"
        assert r["mean_weight"] == f"{float(mean[i]):.6g}"
        assert r["corrupted"] == ("1" if corrupted[i] else "0")


def test_without_ids_labels_or_corruption(fitted: tuple[Trainer, FitResult], tmp_path):
    """No ids: the index; no known corruption: empty; no train_labels: the data's labels."""
    trainer = fitted[0]
    saved = trainer.train_labels
    trainer.train_labels = None
    try:
        rows, _, _ = suspects_table(trainer)
    finally:
        trainer.train_labels = saved
    write_suspects(tmp_path / "suspects.csv", rows)
    _, table = read(tmp_path / "suspects.csv")
    labels = trainer.train_data.labels
    for r in table:
        i = int(r["index"])
        assert r["id"] == str(i) and r["corrupted"] == ""
        assert r["given_label"] == str(int(labels[i]))


def test_precision_recall_at_k_edges():
    order, corrupted = torch.tensor([2, 0, 1]), torch.tensor([False, False, True])
    p, r = precision_recall_at_k(order, corrupted, 0)
    assert math.isnan(p) and r == 0.0
    p, r = precision_recall_at_k(order, torch.zeros(3, dtype=torch.bool), 2)
    assert p == 0.0 and math.isnan(r)


def test_ranking_metrics_to_the_letter():
    """Ten examples: k = 10 is one of the fixed k (k <= N); the small-loss ranking breaks ties
    by index (stable)."""
    weights = torch.tensor([0.0, 1.0, 0.2, 1.0, 0.1, 1.0, 1.0, 0.9, 1.0, 1.0])
    losses = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0, 3.0, 0.5, 1.0, 0.1, 0.2])
    corrupted = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    got = ranking_metrics(weights, losses, corrupted)
    # by weight: 0 (0.0), 4 (0.1), 2 (0.2), 7, then the 1.0s by loss: 1, 5, 3, 6, 9, 8
    # by loss, ties by index: 1, 5, 4, 0, 2, 3, 7, 6, 9, 8
    assert suspect_order(weights, losses).tolist() == [0, 4, 2, 7, 1, 5, 3, 6, 9, 8]
    assert suspect_order(weights, losses).dtype == torch.int64
    assert got == {
        "num_corrupted": 3,
        "weight": {
            "precision_at_k": pytest.approx(2 / 3),
            "recall_at_k": pytest.approx(2 / 3),
            "precision_at_10": 0.3,
            "recall_at_10": 1.0,
        },
        "small_loss": {
            "precision_at_k": pytest.approx(1 / 3),
            "recall_at_k": pytest.approx(1 / 3),
            "precision_at_10": 0.3,
            "recall_at_10": 1.0,
        },
    }
    # k = 3 for both; a different tie-break of the losses would change small_loss's top 3
    ties = torch.tensor([1.0, 1.0, 1.0, 0.5])
    marked = torch.tensor([False, False, True, False])
    assert ranking_metrics(torch.ones(4), ties, marked)["small_loss"]["precision_at_k"] == 0.0
