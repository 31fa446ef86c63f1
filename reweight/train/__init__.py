"""The training loop and what only it uses: ``Trainer`` (``fit → train_step → bookkeeping``), its
config, the batch streams, signals, checkpoints, evaluation metrics, weight statistics, the
loggers, data-parallel and the files a run writes while it trains.
"""

from reweight.train.config import TrainerConfig
from reweight.train.trainer import FitResult, Trainer

__all__ = ["FitResult", "Trainer", "TrainerConfig"]
