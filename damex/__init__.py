"""damex: Dataset-aware Mixture-of-Experts (DAMEX, NeurIPS 2023) on a pure-PyTorch DINO detector."""

from damex.errors import CheckpointError, ConfigError, DamexError, DatasetError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DamexError", "DatasetError", "__version__"]
