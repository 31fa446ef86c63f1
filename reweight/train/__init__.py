"""The training loop and what only it uses: ``Trainer`` (``fit → train_step → bookkeeping``), its
config, the batch streams, signals, checkpoints, evaluation metrics, weight statistics, the
loggers and the files a run writes while it trains.

Example (plain Python objects, no Hydra):
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import TensorDataset
    >>> from reweight import Trainer, TrainerConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(200, 2, generator=g), torch.randint(0, 2, (200,), generator=g)
    >>> train, meta = TensorDataset(x[:180], y[:180]), TensorDataset(x[180:], y[180:])
    >>> trainer = Trainer(nn.Linear(2, 2), train, meta, meta, method="l2rw",
    ...                   optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    ...                   config=TrainerConfig(max_steps=5, batch_size=20, progress=False))
    >>> result = trainer.fit()
    >>> result.metrics["steps"], 0 <= result.metrics["test_accuracy"] <= 1
    (5, True)
"""

from reweight.train.config import TrainerConfig
from reweight.train.trainer import FitResult, Trainer

__all__ = ["FitResult", "Trainer", "TrainerConfig"]
