"""Issue #24's own-data cases through the real command line (``python -m reweight`` in a
subprocess, on images cut from the real MNIST of the shared data folder): a 16-bit PNG among 8-bit
ones, a trusted set that lacks a class, and the 16-bit precision switch (``trainer.bf16``) where it
cannot run. Each checks the exit status, what stderr and ``train.log`` say, and the run folder's
files. (tests/test_own_data.py checks the same readers in-process.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from tests.helpers import REWEIGHT, cli_env, run_command
from tests.test_cli import read_csv

N_TRAIN, N_META, N_TEST = 60, 30, 30  # digits 0-2 only
TINY = [
    "trainer.max_steps=3",
    "trainer.batch_size=10",
    "trainer.meta_batch_size=10",
    "trainer.eval_every=0",
    "trainer.log_every=1",
    "trainer.final_weights=0",
    "threads=1",
]


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_command([*REWEIGHT, *args], cwd, env=cli_env(**env))


def write_png(image: np.ndarray, path: Path) -> None:
    """An 8-bit (uint8) or 16-bit (uint16) grayscale PNG, by PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def mnist_folders(root: Path, data_root: Path, classes: tuple[int, ...] = (0, 1, 2)) -> None:
    """``root/{train,meta,test}/<digit>/<i>.png``: real MNIST digits of ``classes``, 8-bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mnist = torchvision.datasets.MNIST(str(data_root), train=True, download=False)
    keep = torch.isin(mnist.targets, torch.tensor(classes)).nonzero().flatten()
    x, y = mnist.data[keep].numpy(), mnist.targets[keep].tolist()
    for i in range(N_TRAIN + N_META + N_TEST):
        split = "train" if i < N_TRAIN else "meta" if i < N_TRAIN + N_META else "test"
        write_png(x[i], root / split / str(y[i]) / f"{i}.png")


def image_args(root: Path) -> list[str]:
    return [
        "dataset=image_folder",
        f"dataset.train_dir={root / 'train'}",
        f"dataset.meta_dir={root / 'meta'}",
        f"dataset.test_dir={root / 'test'}",  # a labelled test set: no warning about it
        "dataset.grayscale=true",
        "dataset.val_per_class=1",
        "model=mlp",
        "model.hidden=[16]",
    ]


def finished(run: Path) -> dict:
    """The run's summary.json, after checking that the run says it finished and holds its
    files."""
    for name in ("config.yaml", "checkpoint.pt", "metrics.csv", "labels.pt", "dataset.json"):
        assert (run / name).is_file(), name
    return json.loads((run / "summary.json").read_text())


def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.mark.slow  # two CLI runs: ~20 s of CPU
def test_a_sixteen_bit_png_among_eight_bit_ones_trains_as_its_eight_bit_twin(tmp_path, data_root):
    """Some training digits saved again as 16-bit PNGs (each value times 257, so v / 65535 is
    v / 255 exactly): read by their own range, the run is the run on the 8-bit files, bit for
    bit (metrics.csv, the model, dataset.json's statistics). Read as 8-bit (÷ 255) they would be
    257 times too bright and train another model. Nothing on stderr."""
    mnist_folders(tmp_path / "eight", data_root)
    shutil.copytree(tmp_path / "eight", tmp_path / "mixed")
    deep = sorted((tmp_path / "mixed" / "train").rglob("*.png"))[::3]
    for path in deep:
        with Image.open(path) as image:
            v = np.asarray(image).astype(np.uint16)
        write_png(v * 257, path)
        with Image.open(path) as image:
            assert image.mode.startswith("I;16")  # truly a 16-bit PNG
    runs = {}
    for name in ("eight", "mixed"):
        run = tmp_path / f"run-{name}"
        proc = cli([*image_args(tmp_path / name), *TINY, f"hydra.run.dir={run}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr == "", proc.stderr
        runs[name] = run
    a, b = runs["eight"], runs["mixed"]
    assert finished(a)["steps"] == finished(b)["steps"] == 3
    assert without_time(read_csv(a / "metrics.csv")) == without_time(read_csv(b / "metrics.csv"))
    model_a = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    model_b = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    info_a = json.loads((a / "dataset.json").read_text())
    info_b = json.loads((b / "dataset.json").read_text())
    assert info_a["standardized"] == info_b["standardized"]  # the pixels' mean and std
    assert 0 < info_b["standardized"]["mean"][0] < 1  # in [0, 1]: not 257 times too bright


@pytest.mark.slow  # one CLI run: ~10 s of CPU
def test_a_trusted_set_without_a_class_runs_with_one_warning_naming_it(tmp_path, data_root):
    """The trusted folder lacks the digit 2 (training has it): the run goes on, finished as
    any other, with exactly one warning naming the class and the fix, in train.log and on the
    console's log; dataset.json records the missing class; stderr stays empty."""
    mnist_folders(tmp_path, data_root)
    shutil.rmtree(tmp_path / "meta" / "2")
    run = tmp_path / "run"
    proc = cli([*image_args(tmp_path), *TINY, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr
    assert finished(run)["steps"] == 3
    log = (run / "train.log").read_text().splitlines()
    warned = [line for line in log if "][WARNING] - " in line]
    [line] = [w for w in warned if "trusted set" in w]
    assert "no example of class '2'" in line and "add trusted examples of it" in line
    assert [w for w in warned if w != line] == [], warned  # nothing else warned
    assert line in proc.stdout.splitlines()  # the console shows the same line
    assert json.loads((run / "dataset.json").read_text())["meta_classes_missing"] == ["2"]


@pytest.mark.slow  # one CLI run up to the Trainer: ~8 s of CPU
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_bf16_where_there_is_no_cuda_is_one_line_and_writes_nothing(tmp_path, data_root, device):
    """trainer.bf16=true (16-bit autocast, CUDA only) on a CPU run: exit 2, one line naming the
    key, the device and the fix, and no run folder. No GPU is visible to the run (so that
    ``auto`` resolves to the CPU on a machine with one too)."""
    run = tmp_path / "runs" / "run"
    args = ["dataset=mnist_imbalanced", *TINY, "trainer.bf16=true", f"trainer.device={device}"]
    proc = cli([*args, f"hydra.run.dir={run}"], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: trainer.bf16=true needs a CUDA device"), line
    assert "cpu" in line
    assert list(tmp_path.iterdir()) == []  # not even the folders Hydra made for the run
