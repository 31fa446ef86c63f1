"""MD5 verification of raw dataset files, recorded so that it runs once per file.

A damaged data file (a failed copy, flipped bytes on a bad disk) would otherwise train without a
word: torchvision checks MNIST's MD5s only while downloading the archives. :func:`verify_md5`
compares a file with its known MD5 the first time it is seen and records the verdict in a user
cache folder (never in the data root, which may be read-only or shared), keyed by the file's
absolute path, size, mtime and ctime: a file that is replaced or edited is checked again, an
unchanged one costs a ``stat`` and the read of a small record.
If the record cannot be written, the check simply runs again next time; it never fails a run.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> _ = (folder / "f").write_bytes(b"abc")
    >>> abc = "900150983cd24fb0d6963f7d28e17f72"
    >>> verify_md5(folder / "f", abc, fix="replace it", cache_dir=folder / "cache")  # recorded
    >>> _ = (folder / "f").write_bytes(b"abcd")  # changed: checked again
    >>> verify_md5(folder / "f", abc, fix="replace it", cache_dir=folder / "cache")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: file .../f is damaged: its MD5 is ... (4 bytes), expected 9001...: replace it
    >>> tmp.cleanup()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from reweight.core.files import atomic_write

__all__ = ["CACHE_DIR_ENV", "file_md5", "resolve_cache_dir", "verify_md5"]

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "REWEIGHT_CACHE_DIR"
"""Environment variable naming the folder of the MD5 records (see :func:`resolve_cache_dir`)."""

_RECORDS = "md5-verified"  # sub-folder of the cache folder, one small JSON file per verified file


def resolve_cache_dir() -> Path:
    """``$REWEIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/reweight``, else ``~/.cache/reweight``
    (empty variables count as unset). Never creates the folder."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "reweight"


def file_md5(path: str | os.PathLike) -> str:
    """The MD5 of a file's content (hex), read in 1 MiB chunks (about 0.1 s for MNIST's 55 MB)."""
    h = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: FIPS builds allow it
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _record_key(path: Path, expected: str) -> dict[str, object]:
    st = path.stat()
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,  # cannot be set back by hand, unlike mtime
        "md5": expected,
    }


def _record_path(cache_dir: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / _RECORDS / f"{digest}.json"


def _is_recorded(record: Path, key: dict[str, object]) -> bool:
    try:
        return json.loads(record.read_text()) == key
    except (OSError, ValueError):  # no record, unreadable, or half-written by a foreign tool
        return False


def _write_record(record: Path, key: dict[str, object]) -> None:
    text = json.dumps(key, sort_keys=True).encode()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(record, lambda f: f.write(text))  # a reader never sees half a record
    except OSError as err:  # read-only home, full disk: the check just runs again next time
        logger.debug("could not record the MD5 check of %s in %s: %s", key["path"], record, err)


def verify_md5(
    path: str | os.PathLike,
    expected: str,
    *,
    fix: str,
    what: str = "file",
    cache_dir: Path | None = None,
) -> None:
    """Check that the file ``path`` has the MD5 ``expected`` (lower-case hex), unless a record in
    ``cache_dir`` (default :func:`resolve_cache_dir`) says this very file (same absolute path,
    size, mtime and ctime) already passed. A mismatch raises ``ValueError`` naming the file, its
    MD5 and size, the expected MD5 and then ``fix`` (what to do about it), e.g. ``MNIST file
    /data/MNIST/raw/x is damaged: its MD5 is ... (47040016 bytes), expected ...: delete it ...``
    with ``what="MNIST file"``; a match is recorded.
    """
    path = Path(path).resolve()
    key = _record_key(path, expected)
    record = _record_path(resolve_cache_dir() if cache_dir is None else cache_dir, key)
    if _is_recorded(record, key):
        return
    actual = file_md5(path)
    if actual != expected:
        raise ValueError(
            f"{what} {path} is damaged: its MD5 is {actual} ({key['size']} bytes), "
            f"expected {expected}: {fix}"
        )
    if _record_key(path, expected) == key:  # not changed while it was read
        _write_record(record, key)
