"""The records of a run: ``metrics.csv`` (a Trainer callback keeps it equal to the history) and
``summary.json`` (strict JSON, NaN as null), each written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reweight.core.files import atomic_write_text

__all__ = ["MetricsCSV", "write_metrics_csv", "write_summary"]


# -- metrics.csv --------------------------------------------------------------------------------


def write_metrics_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (the Trainer's history) as CSV, atomically.

    Columns: ``step`` first, then every other key in the order it first appears (evaluation
    rows add the ``test_*`` columns); a row without a column leaves it empty.
    """
    columns: dict[str, None] = {"step": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(k, v) for k, v in row.items()})
    return atomic_write_text(path, out.getvalue())


def _csv_value(key: str, value: Any) -> Any:
    if key == "step" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class MetricsCSV:
    """A ``Trainer`` callback that rewrites ``metrics.csv`` with every row so far.

    The file is small (one row per ``log_every`` steps), so each row rewrites it whole and
    atomically: the header stays right when evaluation rows bring new columns, and a killed run
    leaves a complete file. With ``history`` (a callable returning the Trainer's history), the
    file follows that list instead of the rows seen by this callback, which keeps the rows from
    before a resume::

        metrics = MetricsCSV(run_dir / "metrics.csv", history=lambda: trainer.history)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        history: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self._history = history

    def __call__(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self.write()

    def write(self) -> Path:
        return write_metrics_csv(self.path, self._history() if self._history else self.rows)


# -- summary.json -------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and ±inf become None, tuples lists, paths strings, 0-d tensors
    (anything with ``.item()``) numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):
        return _jsonable(value.item())
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def write_summary(
    path: str | os.PathLike,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``metrics`` (and ``extra``, which wins on a shared key) as JSON, atomically.

    NaN and infinities are written as ``null`` (strict JSON); keys keep their order.
    """
    payload = _jsonable({**metrics, **(extra or {})})
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
