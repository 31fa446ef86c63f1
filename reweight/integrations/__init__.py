"""Reweighting inside other people's training loops: thin adapters over ``reweight.Reweighter``.

- ``huggingface``: ``ReweightingTrainer``, a ``transformers.Trainer`` (the ``nlp`` extra);
- ``lightning``: ``ReweightingModule``, a ``LightningModule`` (the ``lightning`` extra).

Each is imported on its own (``from reweight.integrations.huggingface import ...``), so that
the package never needs the library it adapts.
"""

__all__: list[str] = []
