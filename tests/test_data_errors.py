"""Bad data files and dataset values, as a user meets them: the real CLI in a subprocess on copies
of the real MNIST files that are then damaged (truncated, flipped magic, flipped pixels, emptied),
offline downloads, and parameters that leave too few examples. Each must give exit status 2,
exactly one stderr line ``error: ...`` naming the file (or key) and the fix, and leave the data
root as it was. Then the MD5 records of :mod:`reweight.data.checksums` and the same file checks
in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torchvision

from reweight.data import build_dataset, checksums
from reweight.data.checksums import CACHE_DIR_ENV, file_md5, resolve_cache_dir, verify_md5
from reweight.data.mnist import check_mnist_files, load_mnist
from tests.helpers import REWEIGHT, cli_env, run_command

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FIX = "delete it to download MNIST again, or replace it with the original uncompressed file"
IMAGES_MD5 = "6bbc9ace898e44ae57da46a324031adb"  # of the real train-images-idx3-ubyte


@pytest.fixture
def mnist_copy(tmp_path: Path, data_root: Path) -> Path:
    """A data root holding a writable copy of the real MNIST IDX files."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copyfile(data_root / "MNIST" / "raw" / name, raw / name)
    return tmp_path / "data"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size, mtime and content hash (folders: mtime only)."""
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        st = path.stat()
        if path.is_dir():
            state[str(path.relative_to(root))] = ("dir", st.st_mtime_ns)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, digest)
    return state


def run_reweight(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m reweight`` with a tiny run, one thread, the MD5 records in tmp_path/cache."""
    environ = cli_env(**{CACHE_DIR_ENV: str(tmp_path / "cache"), **env})
    return run_command(
        [
            *REWEIGHT,
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            "trainer.batch_size=8",
            "threads=1",
            f"hydra.run.dir={tmp_path / 'run'}",
            *args,
        ],
        tmp_path,
        env=environ,
        timeout=300,
    )


def assert_one_error(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {expected}"]


# --- damaged MNIST files through the CLI --------------------------------------------------------


def truncate(path: Path) -> None:
    os.truncate(path, 1_000_000)


def flip_magic(path: Path) -> None:
    with path.open("r+b") as f:
        magic = f.read(4)
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in magic))


def flip_pixels(path: Path) -> None:
    """Invert 100 kB of pixel bytes in the middle of the file: same size, same header."""
    with path.open("r+b") as f:
        f.seek(1_000_000)
        block = f.read(100_000)
        f.seek(1_000_000)
        f.write(bytes(b ^ 0xFF for b in block))


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.slow  # the CLI in a subprocess: 10-30 s on a shared 2-core machine
@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("train-images-idx3-ubyte", truncate, "is truncated: 1000000 bytes, expected 47040016"),
        (
            "train-images-idx3-ubyte",
            flip_magic,
            "is not an IDX image file (magic number 0xfffff7fc, expected 0x00000803)",
        ),
        ("train-images-idx3-ubyte", flip_pixels, "is damaged: its MD5 is {md5} (47040016 bytes), "
         f"expected {IMAGES_MD5}"),
        ("t10k-labels-idx1-ubyte", empty, "is empty"),
    ],
    ids=["truncated", "flipped-magic", "flipped-pixels", "empty"],
)  # fmt: skip
def test_damaged_mnist_file_is_one_line(
    mnist_copy: Path, tmp_path: Path, name: str, damage: Callable[[Path], None], expected: str
) -> None:
    path = mnist_copy / "MNIST" / "raw" / name
    damage(path)
    before = snapshot(mnist_copy)
    proc = run_reweight(tmp_path, "dataset=mnist_imbalanced", f"dataset.root={mnist_copy}")
    message = expected.format(md5=file_md5(path))
    assert_one_error(proc, f"MNIST file {path.resolve()} {message}: {FIX}")
    assert snapshot(mnist_copy) == before  # nothing written into the data root
    records = list((tmp_path / "cache").rglob("*.json"))
    assert not any(name in record.read_text() for record in records)  # no verdict for it


@pytest.mark.slow  # the CLI in a subprocess: 10-30 s on a shared 2-core machine
def test_offline_mnist_is_one_short_line(tmp_path: Path) -> None:
    """No files and no network (a proxy on a closed port: refused at once): the message names
    the folder and the files, without torchvision's multi-line report."""
    root = tmp_path / "data"
    root.mkdir()
    proxy = "http://127.0.0.1:9"
    proc = run_reweight(
        tmp_path,
        "dataset=mnist_imbalanced",
        f"dataset.root={root}",
        http_proxy=proxy,
        https_proxy=proxy,
        HTTP_PROXY=proxy,
        HTTPS_PROXY=proxy,
        no_proxy="",
        NO_PROXY="",
    )
    assert_one_error(
        proc,
        f"MNIST not found at {root.resolve() / 'MNIST' / 'raw'} and the download failed "
        f"(offline? [Errno 111] Connection refused): put the four uncompressed IDX files there "
        f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte) or set dataset.root / REWEIGHT_DATA_DIR",
    )
    assert list(root.iterdir()) == []  # no temporary download folder, no partial MNIST


@pytest.mark.slow  # the CLI in a subprocess: 10-30 s on a shared 2-core machine
def test_damaged_cifar_batch_is_one_line(tmp_path: Path) -> None:
    """Real torchvision MD5s: a truncated batch file is named, with the MD5 torchvision knows."""
    cls = torchvision.datasets.CIFAR10
    folder = tmp_path / "data" / cls.base_folder
    folder.mkdir(parents=True)
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    for name in names:
        (folder / name).write_bytes(b"\x80\x04" + name.encode())  # the start of a pickle
    first, expected_md5 = cls.train_list[0]
    path = folder / first
    before = snapshot(tmp_path / "data")
    proc = run_reweight(tmp_path, "dataset=cifar10_noisy", f"dataset.root={tmp_path / 'data'}")
    assert_one_error(
        proc,
        f"cifar10 file {path} is damaged: its MD5 is {file_md5(path)} "
        f"({path.stat().st_size} bytes), expected {expected_md5}: delete it to download cifar10 "
        f"again, or replace it with the one in "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    )
    assert snapshot(tmp_path / "data") == before


@pytest.mark.slow  # the CLI in a subprocess: 10-30 s on a shared 2-core machine
def test_proportion_that_leaves_no_minority_example(tmp_path: Path) -> None:
    """Checked before any file is read: the data root does not even exist."""
    proc = run_reweight(
        tmp_path,
        "dataset=mnist_imbalanced",
        "dataset.proportion=0.9999",
        f"dataset.root={tmp_path / 'absent'}",
    )
    assert_one_error(
        proc,
        "proportion=0.9999 with n_train=5000 draws 0 images of digit 4 (the minority class), "
        "but the meta set takes meta_per_class=5 of them and at least one must stay for "
        "training; use proportion <= 0.9988",
    )
    assert not (tmp_path / "absent").exists()


# --- the same checks in-process ------------------------------------------------------------------


def cut_in_header(path: Path) -> None:
    os.truncate(path, 10)


def gzip_header(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))


def wrong_shape(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(4)
        f.write((1000).to_bytes(4, "big"))


def too_long(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\x00")


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("train-images-idx3-ubyte", truncate, "is truncated: 1000000 bytes, expected 47040016"),
        ("t10k-images-idx3-ubyte", cut_in_header, "is truncated: 10 bytes, expected 7840016"),
        ("t10k-images-idx3-ubyte", gzip_header, "is gzip-compressed: gunzip it, or "),
        ("train-labels-idx1-ubyte", wrong_shape,
         "has the header of a 1000 label array, expected 60000: "),
        ("t10k-labels-idx1-ubyte", too_long, "is too long: 10009 bytes, expected 10008: "),
        ("t10k-labels-idx1-ubyte", flip_magic,
         "is not an IDX label file (magic number 0xfffff7fe, expected 0x00000801)"),
    ],
    ids=["truncated", "cut-in-header", "gzip", "wrong-shape", "too-long", "flipped-magic"],
)  # fmt: skip
def test_mnist_file_checks(
    mnist_copy: Path, name: str, damage: Callable[[Path], None], expected: str
) -> None:
    path = mnist_copy / "MNIST" / "raw" / name
    damage(path)
    with pytest.raises(ValueError) as info:
        build_dataset("mnist_noisy", root=mnist_copy)
    message = str(info.value)
    assert message.startswith(f"MNIST file {path.resolve()} {expected}"), message
    assert message.endswith(FIX) and "\n" not in message


def test_truncated_file_is_called_truncated_not_damaged(mnist_copy: Path) -> None:
    """The header check runs before the MD5 one, on every file: a truncated file that comes
    after a file whose MD5 fails is still reported as the first problem it has."""
    raw = mnist_copy / "MNIST" / "raw"
    flip_pixels(raw / "train-images-idx3-ubyte")  # first in order, fails only the MD5
    truncate(raw / "t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte is truncated"):
        load_mnist(mnist_copy, download=False)


def test_missing_files_are_listed(mnist_copy: Path) -> None:
    raw = mnist_copy / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(mnist_copy, download=False)
    assert str(info.value).startswith(
        f"MNIST not found at {raw.resolve()} (t10k-labels-idx1-ubyte missing) and "
        f"download=false: put the four uncompressed IDX files there"
    )


# --- MD5 records -------------------------------------------------------------------------------


@pytest.fixture
def md5_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose MD5 is computed, in order."""
    calls: list[str] = []
    real = checksums.file_md5

    def counting(path: str | os.PathLike) -> str:
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(checksums, "file_md5", counting)
    return calls


def test_mnist_md5s_are_computed_once(
    mnist_copy: Path, tmp_path: Path, md5_calls: list[str]
) -> None:
    cache = tmp_path / "cache"
    raw = mnist_copy / "MNIST" / "raw"
    check_mnist_files(raw, cache_dir=cache)
    assert sorted(md5_calls) == sorted(MNIST_FILES)
    check_mnist_files(raw, cache_dir=cache)
    assert len(md5_calls) == 4  # recorded: not read again
    records = sorted(json.loads(p.read_text())["path"] for p in cache.rglob("*.json"))
    assert records == sorted(str((raw / name).resolve()) for name in MNIST_FILES)
    # a damaged file is caught although its old copy was verified: the record no longer fits
    flip_pixels(raw / "train-images-idx3-ubyte")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is damaged"):
        check_mnist_files(raw, cache_dir=cache)
    assert md5_calls[4:] == ["train-images-idx3-ubyte"]


def test_md5_redone_when_the_file_changes(
    tmp_path: Path, md5_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, cache = tmp_path / "f", tmp_path / "cache"
    path.write_bytes(b"abc")
    abc = hashlib.md5(b"abc").hexdigest()
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    assert md5_calls == ["f"]
    os.utime(path, ns=(1, 1))  # same content, another mtime: checked again, then recorded
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    assert md5_calls == ["f", "f"]
    # same size and mtime set back by hand: the ctime still changes, so it is checked again
    st = path.stat()
    time.sleep(0.05)  # file times come from a coarse clock (a few ms): let it move on
    path.write_bytes(b"abd")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=rf"file {path} is damaged: its MD5 is .* \(3 bytes\)"):
        verify_md5(path, abc, fix="fix", cache_dir=cache)
    # the default folder comes from the environment
    monkeypatch.setenv(CACHE_DIR_ENV, str(cache))
    path.write_bytes(b"abc")
    verify_md5(path, abc, fix="fix")
    verify_md5(path, abc, fix="fix")
    assert md5_calls == ["f", "f", "f", "f"]


def test_md5_record_that_cannot_be_written_or_read(tmp_path: Path, md5_calls: list[str]) -> None:
    """A cache folder that cannot be created (here: a file is in the way, which stops root too)
    only means the MD5 is computed every time; a garbled record is ignored and rewritten."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    abc = hashlib.md5(b"abc").hexdigest()
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    verify_md5(path, abc, fix="fix", cache_dir=blocked)
    verify_md5(path, abc, fix="fix", cache_dir=blocked)
    assert md5_calls == ["f", "f"] and blocked.read_text() == ""
    cache = tmp_path / "cache"
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    (record,) = cache.rglob("*.json")
    record.write_text('{"path": ')  # half a record, e.g. from a crashed tool
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    verify_md5(path, abc, fix="fix", cache_dir=cache)
    assert md5_calls == ["f", "f", "f", "f"]
    assert json.loads(record.read_text())["md5"] == abc
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temporary file left


def test_read_only_data_root_is_verified_without_writing(mnist_copy: Path, tmp_path: Path) -> None:
    """The records live in the cache folder only: a read-only data root is read, never written."""
    raw = mnist_copy / "MNIST" / "raw"
    before = snapshot(mnist_copy)
    for path in [*raw.iterdir(), raw, raw.parent, mnist_copy]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        load_mnist(mnist_copy, download=False, cache_dir=tmp_path / "cache")
    finally:
        for path in [mnist_copy, raw.parent, raw]:
            path.chmod(0o755)
    assert snapshot(mnist_copy) == before
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4


def test_resolve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert resolve_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(CACHE_DIR_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "reweight"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "reweight"


def test_real_mnist_md5s_match_the_table(data_root: Path, tmp_path: Path) -> None:
    """The MD5 table of reweight.data.mnist (our own: torchvision only knows the archives')
    agrees with the real files: computed afresh here, with an empty record folder."""
    raw = data_root / "MNIST" / "raw"
    assert file_md5(raw / "train-images-idx3-ubyte") == IMAGES_MD5
    check_mnist_files(raw, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4
