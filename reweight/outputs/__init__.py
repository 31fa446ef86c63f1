"""What a run leaves on disk, and the table of a sweep: pure file I/O, no Hydra.

- the names of the files a run writes, re-exported from ``reweight.core.files`` (where the
  atomic writer they all go through lives).

- ``MetricsCSV``: a ``Trainer`` callback that keeps ``metrics.csv`` equal to the history so far.
- ``write_summary``: ``summary.json``, atomically, NaN written as ``null``.
- ``plot_learning_curves`` / ``plot_weight_histogram``: PNGs (matplotlib, imported lazily; should
  it fail to import, one warning and ``None``).
- ``aggregate_sweep``: mean ± std of the final test accuracy per configuration of a sweep, from
  each job's ``summary.json`` and ``.hydra/overrides.yaml``, into ``results.csv`` and
  ``results.md``. From the shell: ``python -m reweight.outputs <sweep_dir>``.

Example:
    >>> import json, math, tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> for seed, acc in [(0, 0.90), (1, 0.92)]:
    ...     job = d / str(seed)
    ...     (job / ".hydra").mkdir(parents=True)
    ...     _ = (job / ".hydra" / "overrides.yaml").write_text(f"- method=l2rw\\n- seed={seed}\\n")
    ...     _ = write_summary(job / "summary.json", {"test_accuracy": acc, "test_loss": math.nan})
    >>> rows = aggregate_sweep(d)
    >>> rows[0]["method"], rows[0]["n"], round(rows[0]["test_accuracy_mean"], 2)
    ('l2rw', 2, 0.91)
    >>> print((d / "results.md").read_text().splitlines()[2])
    | method | n | test accuracy (%) | balanced accuracy (%) | val accuracy (%) |
"""

from reweight.core.files import (
    CHECKPOINT,
    CURVES_PNG,
    HISTOGRAM_PNG,
    HYDRA_DIR,
    INFO_FILE,
    LABELS_FILE,
    LOGGER_FILES,
    METRICS,
    OVERRIDES,
    RESOLVED_CONFIG,
    RESULTS_CSV,
    RESULTS_MD,
    SUMMARY,
    SUSPECTS,
    SUSPECTS_PNG,
    SUSPECTS_SCATTER_PNG,
    WEIGHTS,
    atomic_write,
    atomic_write_text,
)
from reweight.outputs.plots import plot_learning_curves, plot_weight_histogram
from reweight.outputs.records import MetricsCSV, write_metrics_csv, write_summary
from reweight.outputs.sweeps import aggregate_sweep, main, record_job

__all__ = [
    "CHECKPOINT",
    "CURVES_PNG",
    "HISTOGRAM_PNG",
    "HYDRA_DIR",
    "INFO_FILE",
    "LABELS_FILE",
    "LOGGER_FILES",
    "METRICS",
    "OVERRIDES",
    "RESOLVED_CONFIG",
    "RESULTS_CSV",
    "RESULTS_MD",
    "SUMMARY",
    "SUSPECTS",
    "SUSPECTS_PNG",
    "SUSPECTS_SCATTER_PNG",
    "WEIGHTS",
    "MetricsCSV",
    "aggregate_sweep",
    "atomic_write",
    "atomic_write_text",
    "main",
    "plot_learning_curves",
    "plot_weight_histogram",
    "record_job",
    "write_metrics_csv",
    "write_summary",
]
