"""damex: Dataset-aware Mixture-of-Experts (DAMEX, NeurIPS 2023) on a pure-PyTorch DINO detector."""

from damex.errors import CheckpointError, ConfigError, DamexError, DatasetError

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DamexError",
    "DatasetError",
    "Predictor",
    "__version__",
]


def __getattr__(name: str):  # PEP 562
    # ``damex.Predictor`` imports torch and the model (~3 s of CPU); ``import damex`` (and so
    # ``damex --help``) stays instant. The one deferred name.
    if name == "Predictor":
        from damex.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'damex' has no attribute {name!r}")
