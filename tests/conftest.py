"""Shared test settings: the real MNIST of the shared data folder, one torch thread, and MD5
records (reweight.data.checksums) in a temporary folder rather than the user's cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from reweight.data.checksums import CACHE_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read real MNIST from the shared data folder unless REWEIGHT_DATA_DIR says otherwise;
# they never download.
os.environ.setdefault("REWEIGHT_DATA_DIR", str(SHARED_DATA))


def pytest_report_header(config) -> str:
    """Which torch this pass runs (CI runs the suite on the newest and the oldest allowed)."""
    import torchvision

    return f"torch {torch.__version__}, torchvision {torchvision.__version__}"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["REWEIGHT_DATA_DIR"])
    raw = root / "MNIST" / "raw"
    missing = [
        f for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte") if not (raw / f).exists()
    ]
    if missing:
        pytest.fail(
            f"real MNIST not found: {raw} lacks {missing}. Set REWEIGHT_DATA_DIR to a folder with "
            "MNIST/raw/ (the four IDX files)."
        )
    return root


@pytest.fixture(autouse=True, scope="session")
def _md5_records_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Point REWEIGHT_CACHE_DIR (inherited by CLI subprocesses) at a session folder."""
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("reweight-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Deterministic, and fair to the 2-core CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def denied(monkeypatch):
    """os.access refusing the paths added to the returned set (the tests run as root, for whom
    a mode bit refuses nothing); records each (path, mode) asked."""
    refused: set[Path] = set()
    asked: list[tuple[Path, int]] = []
    real = os.access

    def access(path, mode, **kwargs):
        asked.append((Path(path), mode))
        return Path(path) not in refused and real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return refused, asked


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline, writing only under the test's temporary folder, silent."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def mlflow_quiet():
    """MLflow's SQL store uses APIs that SQLAlchemy 2.1 deprecates: their warnings hidden."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
