"""Tiny configs for the engine tests (imported by the test modules and conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAIN_SETS = ["syn_photo", "syn_signs"]
# the shared reference run: 3 epochs x 2 optimizer steps (data.epoch_size 4, batch 2)
REF: dict[str, Any] = {"epochs": 3, "ema": True, "warmup_iters": 2}
REF_ITERS = 6


def tiny_config_dict(synthetic_root: Path, out_dir: Path, **train: Any) -> dict[str, Any]:
    """A DAMEX config small enough for CPU tests (resnet18 frozen, d=32, 1+2 layers, 10 queries).

    ``train`` entries override the ``train`` section.
    """
    return {
        "data": {
            "root": str(synthetic_root),
            "train": list(TRAIN_SETS),
            "synthetic": {"root": str(synthetic_root), "scale": 0.05, "image_size": 96},
            "scales": [64],
            "max_size": 96,
            "crop": False,
            "num_workers": 0,
            "epoch_size": 4,
        },
        "model": {
            "backbone": {"name": "resnet18", "frozen_stages": 4},
            "d_model": 32,
            "nheads": 2,
            "enc_layers": 1,
            "dec_layers": 2,
            "dim_feedforward": 64,
            "num_queries": 10,
            "num_feature_levels": 3,
            "enc_n_points": 2,
            "dec_n_points": 2,
            "decoder_ffn": ["moe", "dense"],
            "dn": {"number": 4},
        },
        "moe": {"num_experts": 2, "expert_map": {"syn_photo": 0, "syn_signs": 1}},
        "train": {
            "epochs": 2,
            "batch_size": 2,
            "lr": 1e-4,
            "lr_backbone": 1e-5,
            "log_every": 1,
            "eval_every": 0,
            "checkpoint_every": 0,
            "device": "cpu",
            **train,
        },
        "eval": {"num_select": 20},
        "output": {"dir": str(out_dir), "tensorboard": False},
    }


def tiny_config(synthetic_root: Path, out_dir: Path, **train: Any):  # -> Config
    from damex.config import config_from_dict

    return config_from_dict(tiny_config_dict(synthetic_root, out_dir, **train))
