"""What a run is built from: its datasets, label space, dataset -> expert table and model parts.

Shared by training (:mod:`damex.engine.trainer`) and inference-time loading
(:mod:`damex.engine.loading`), so both build the same label space and expert table from a
config (and, for a checkpoint, from the label space saved in it).

The built-in synthetic benchmark is generated here on first use (rank 0; the others wait).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damex.config import Config
from damex.data.catalog import build_catalog
from damex.data.label_space import LabelSpace, build_label_space
from damex.data.loader import build_test_loaders
from damex.data.synthetic import ensure_benchmark
from damex.engine import distributed as dist_utils
from damex.errors import CheckpointError, ConfigError, DamexError
from damex.modeling import build_model
from damex.modeling.criterion import build_criterion
from damex.modeling.postprocess import build_postprocess
from damex.moe.mapping import ExpertMap

__all__ = [
    "RunData",
    "run_dataset_names",
    "build_expert_map",
    "build_run_data",
    "build_model_parts",
    "amp_dtype",
]

logger = logging.getLogger(__name__)

_AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class RunData:
    """The data tables of a run.

    Attributes:
        catalog: the dataset catalog of ``cfg.data``.
        label_space: the unified label space (the checkpoint's when loading one).
        expert_map: the run's dataset -> expert map (``NO_EXPERT`` = -1: none).
        expert_of_dataset: ``[num datasets]`` int64, the expert of each label-space dataset.
    """

    catalog: Any
    label_space: LabelSpace
    expert_map: ExpertMap
    expert_of_dataset: torch.Tensor

    def test_loaders(self, cfg: Config, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """One evaluation loader per ``cfg.eval_datasets`` entry (this rank's shard)."""
        return build_test_loaders(
            cfg,
            self.catalog,
            self.label_space,
            None,
            rank,
            world_size,
            expert_of_dataset=self.expert_of_dataset,
        )


def run_dataset_names(cfg: Config) -> list[str]:
    """Datasets of the label space: ``data.train`` then evaluation datasets not trained on."""
    names = list(cfg.data.train)
    names += [n for n in cfg.eval_datasets if n not in names]
    return names


def build_expert_map(cfg: Config, catalog: Any, names: list[str]) -> ExpertMap:
    """The run's dataset -> expert map: ``moe.expert_map`` first, then the catalog's default.

    Datasets with neither (evaluated only) map to ``NO_EXPERT`` (-1). The one map of the run:
    the loss table, inference statistics, reports and checkpoints all read it.

    Raises:
        ConfigError: an expert id outside ``[0, moe.num_experts)``, or ``auto`` not resolved.
    """
    defaults = {name: catalog.get(name).expert for name in names}
    try:
        return ExpertMap.build(names, cfg.moe.expert_map, cfg.moe.num_experts, defaults=defaults)
    except ValueError as e:
        raise ConfigError(f"moe.expert_map: {e}") from None


def build_run_data(cfg: Config, *, label_space_state: dict[str, Any] | None = None) -> RunData:
    """Catalog, label space (or the checkpoint's) and dataset -> expert table of a run.

    Args:
        cfg: the run config.
        label_space_state: a checkpoint's ``label_space`` (its head was trained for it); None
            builds the label space from the config's datasets.

    Raises:
        CheckpointError: the checkpoint's label space lacks a dataset the config needs.
        ConfigError: a bad expert id, or the synthetic benchmark cannot be generated.
    """
    catalog = build_catalog(cfg.data)
    names = run_dataset_names(cfg)
    if any(_is_synthetic(catalog, n, cfg) for n in names):
        _ensure_synthetic(cfg)
    if label_space_state is not None:
        label_space = LabelSpace.from_state_dict(label_space_state)
        missing = [n for n in names if n not in label_space.dataset_names]
        if missing:
            raise CheckpointError(
                f"the checkpoint's label space has datasets {label_space.dataset_names}; the "
                f"config also needs {missing}"
            )
    else:
        label_space = build_label_space(catalog, names, policy=cfg.data.label_policy)
    expert_map = build_expert_map(cfg, catalog, label_space.dataset_names)
    return RunData(catalog, label_space, expert_map, expert_map.as_tensor())


def _is_synthetic(catalog: Any, name: str, cfg: Config) -> bool:
    spec = catalog.get(name)
    root = Path(cfg.data.synthetic.root).resolve()
    try:
        Path(spec.image_root).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _ensure_synthetic(cfg: Config) -> None:
    """Generate the built-in benchmark on first use (rank 0; the others wait)."""
    err = None
    if dist_utils.is_main_process():
        try:
            ensure_benchmark(cfg.data.synthetic)
        except (DamexError, OSError) as e:
            root = cfg.data.synthetic.root
            err = f"data.synthetic: cannot generate the benchmark under {root}: {e}"
    err = dist_utils.broadcast_object(err)
    if err:
        raise ConfigError(err)
    dist_utils.barrier()


def build_model_parts(cfg: Config, num_classes: int) -> tuple[nn.Module, nn.Module, Any]:
    """The detector, its criterion and its postprocess for ``num_classes`` unified labels."""
    model = build_model(cfg.model, cfg.moe, num_classes)
    model.transformer.encoder.grad_checkpoint = cfg.train.grad_checkpoint
    criterion = build_criterion(cfg, num_classes)
    postprocess = build_postprocess(cfg)
    return model, criterion, postprocess


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (None: full precision)."""
    return _AMP_DTYPES[amp]
