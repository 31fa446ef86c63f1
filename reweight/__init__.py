"""reweight: meta-learned per-example weights for noisy and imbalanced labels."""

from reweight.meta import MetaModule, to_meta

__all__ = ["MetaModule", "to_meta"]
__version__ = "0.1.0"
