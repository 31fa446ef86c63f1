"""The real-noise presets end to end through the CLI on replicas of the datasets' layouts
(tests/realnoise_replicas.py): every preset for a few steps with a small ResNet-18 on 16-pixel
crops, resume after SIGTERM with trainer.num_workers=2, a damaged list as one error line, and
mini-WebVision's two test sets (WebVision's and ImageNet's validation images)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import cli_env, run_command, start_command
from tests.realnoise_replicas import (
    IMAGENET_PER_CLASS,
    write_animal10n,
    write_clothing1m,
    write_food101n,
    write_imagenet_val,
    write_mini_webvision,
)
from tests.test_cli import read_csv

WRITERS = {
    "clothing1m": write_clothing1m,
    "food101n": write_food101n,
    "animal10n": write_animal10n,
    "mini_webvision": write_mini_webvision,
}
# a small model and few steps on the replicas; the rest of each preset as published
SMALL = [
    "model.arch=resnet18",
    "model.weights=null",
    "model.pretrained=false",
    "dataset.image_size=16",
    "dataset.val_per_class=1",
    "trainer.batch_size=8",
    "trainer.meta_batch_size=8",
    "trainer.eval_every=0",
    "trainer.final_weights=0",
    "threads=1",
]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realnoise")
    for writer in WRITERS.values():
        writer(root)
    return root


def command(experiment: str, root: Path, run_dir: Path, *extra: str) -> list[str]:
    meta = [] if experiment.endswith("clothing1m") else ["dataset.meta_per_class=1"]
    return [
        sys.executable,
        "-m",
        "reweight",
        f"experiment={experiment}",
        f"dataset.root={root}",
        *SMALL,
        *meta,
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_command(args, cwd, env=cli_env(**env))


# Each dataset's reader with each method once over the file (a Latin square, not all twelve: a
# run costs ~15 s on 2 cores, most of it the process's start and its files). Every one of the
# twelve presets composes and is checked against its recipe in test_configs; mwnet also runs
# on mini_webvision and animal10n below.
REPLICA_RUNS = [
    ("clothing1m", "cmwnet"),
    ("food101n", "mwnet"),
    ("animal10n", "l2rw"),
    ("mini_webvision", "cmwnet"),
]


def test_the_replica_runs_cover_every_reader_and_every_method():
    assert {dataset for dataset, _ in REPLICA_RUNS} == set(WRITERS)
    assert {method for _, method in REPLICA_RUNS} == {"mwnet", "l2rw", "cmwnet"}


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "method"), REPLICA_RUNS)
def test_preset_runs_on_the_replica(replicas, tmp_path, dataset, method):
    proc = run(
        command(f"{method}_{dataset}", replicas, tmp_path / "run", "trainer.max_steps=2"), tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["method"], summary["dataset"], summary["steps"]) == (method, dataset, 2)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "optimizer:" in config and "momentum: 0.9" in config  # the preset's recipe, kept
    info = summary["dataset_info"]
    assert info["name"] == dataset and info["split_sizes"]["train"] > 0
    if dataset == "clothing1m":
        assert info["train_keys_without_label"] == 2


def _checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


@pytest.mark.slow
def test_resume_with_workers_draws_the_same_batches(replicas, tmp_path):
    """SIGTERM a run with trainer.num_workers=2 (random crops and flips in the workers) after a
    checkpoint, run it again: the final model equals an uninterrupted run's, bit for bit."""
    extra = ["trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.num_workers=2"]
    reference = run(command("mwnet_animal10n", replicas, tmp_path / "a", *extra), tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    args = command("mwnet_animal10n", replicas, tmp_path / "b", *extra)
    victim = start_command(args, tmp_path, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_step(tmp_path / "b" / "checkpoint.pt") < 2:
            assert victim.poll() is None, "the run ended before the signal"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGTERM)
        _, err = victim.communicate(timeout=120)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    stopped = _checkpoint_step(tmp_path / "b" / "checkpoint.pt")
    assert victim.returncode == 143, err[-2000:]
    assert 2 <= stopped < 8 and not (tmp_path / "b" / "summary.json").exists()

    resumed = run(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout + resumed.stderr
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    rows_a, rows_b = (
        read_csv(tmp_path / "a" / "metrics.csv"),
        read_csv(tmp_path / "b" / "metrics.csv"),
    )
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("file", "text", "named"),
    [
        ("clothing1m/annotations/clean_label_kv.txt", "images/0/00/1.jpg fourteen\n", "line 1"),
        ("clothing1m/annotations/clean_test_key_list.txt", None, "Cysu/noisy_label"),
    ],
)
def test_bad_list_is_one_error_line(tmp_path, file, text, named):
    write_clothing1m(tmp_path)
    path = tmp_path / file
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    proc = run(
        command("mwnet_clothing1m", tmp_path, tmp_path / "run", "trainer.max_steps=2"), tmp_path
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert str(path.resolve()) in errors[0] and named in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrained_preset_offline_is_one_error_line(replicas, tmp_path):
    """The preset's model.pretrained=true with an empty torch cache and no network."""
    args = command("mwnet_clothing1m", replicas, tmp_path / "run", "trainer.max_steps=2")
    args.remove("model.pretrained=false")
    dead = "http://127.0.0.1:9"
    proc = run(args, tmp_path, TORCH_HOME=str(tmp_path / "torch"), https_proxy=dead, no_proxy="")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in errors[0] and "download.pytorch.org" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("imagenet", [True, False])
def test_mini_webvision_reports_both_test_sets(tmp_path, imagenet):
    """With ILSVRC2012's validation images at <root>/imagenet/val, summary.json, metrics.csv and
    the final log line hold both test accuracies; without, WebVision's alone, said once."""
    write_mini_webvision(tmp_path)
    if imagenet:
        write_imagenet_val(tmp_path, "synset")
    run_dir = tmp_path / "run"
    proc = run(command("mwnet_mini_webvision", tmp_path, run_dir, "trainer.max_steps=2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    log = (run_dir / "train.log").read_text()
    info = summary["dataset_info"]["imagenet_val"]
    assert 0 <= summary["test_accuracy"] <= 1 and summary["dataset_info"]["split_sizes"]["test"] > 0
    final = read_csv(run_dir / "metrics.csv")[-1]
    assert final["test_accuracy"] != ""
    if imagenet:
        assert 0 <= summary["test_imagenet_accuracy"] <= 1
        assert summary["test_imagenet_error"] == pytest.approx(
            1 - summary["test_imagenet_accuracy"]
        )
        assert info == {
            "used": True,
            "folder": str((tmp_path / "imagenet" / "val").resolve()),
            "layout": "synset folders",
            "images": 50 * IMAGENET_PER_CLASS,
        }
        assert float(final["test_imagenet_accuracy"]) == summary["test_imagenet_accuracy"]
        assert f"imagenet test accuracy {summary['test_imagenet_accuracy']:.4f}" in log
    else:
        assert not [k for k in summary if k.startswith("test_imagenet")] and not info["used"]
        assert "test_imagenet_accuracy" not in final
        assert log.count("tested on WebVision's validation images only") == 1


@pytest.mark.slow
def test_imagenet_val_dir_missing_is_one_error_line(tmp_path):
    write_mini_webvision(tmp_path)
    missing = tmp_path / "ILSVRC2012" / "val"
    args = command(
        "mwnet_mini_webvision",
        tmp_path,
        tmp_path / "run",
        "trainer.max_steps=2",
        f"dataset.imagenet_val_dir={missing}",
    )
    proc = run(args, tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert str(missing) in errors[0] and "image-net.org" in errors[0]
    assert not (tmp_path / "run").exists()
