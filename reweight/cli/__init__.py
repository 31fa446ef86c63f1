"""The command line, ``python -m reweight [KEY=VALUE ...]``: the only part of reweight that uses
Hydra. The library (Trainer, methods, data, models) works without it.

- ``job``: ``train(cfg)``, a plain function from a composed config to the final objective, and
  ``validate(cfg)``, the checks before any work;
- ``app``: ``main()``, the ``@hydra.main`` wrapper that ``python -m reweight`` runs, and its
  callbacks (validation before Hydra makes a directory, a sweep's table at its end);
- ``schema``: the type of every config key, checked before any work;
- ``errors``: what the user is shown when something is wrong (one ``error:`` line, exit 2);
- ``run_dir``: what a run may find in its directory and when it writes there.
"""

from reweight.cli.app import CONFIG_PATH, AggregateSweep, ValidateConfig, main
from reweight.cli.job import train, validate

__all__ = ["CONFIG_PATH", "AggregateSweep", "ValidateConfig", "main", "train", "validate"]
