"""Inference-time loading of a trained run: :func:`load_for_inference` and :func:`evaluate`.

The label space comes from the checkpoint (the head was trained for it); the model is built from
the config and must match the checkpoint's weights. Used by ``damex evaluate`` and the report
drivers (:mod:`damex.engine.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damex.config import Config, config_from_dict, config_to_dict
from damex.engine import checkpoint as ckpt
from damex.engine import distributed as dist_utils
from damex.engine import expert_parallel
from damex.engine.inference import run_inference
from damex.engine.run_data import RunData, amp_dtype, build_model_parts, build_run_data
from damex.errors import ConfigError

__all__ = ["load_for_inference", "evaluate"]

logger = logging.getLogger(__name__)


def with_saved_expert_map(cfg: Config, state: dict[str, Any], path: Path) -> Config:
    """``cfg`` with ``moe.expert_map: auto`` replaced by the map the run computed and saved.

    ``auto`` is resolved once, at the start of training, from the data; every checkpoint keeps
    the result (``expert_map``). Evaluating with the run's config must use that map, not
    propose a new one.
    """
    if not (isinstance(cfg.moe.expert_map, str) and cfg.moe.expert_map == "auto"):
        return cfg
    saved = state.get("expert_map")
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(
            f"{path}: moe.expert_map is 'auto' but the checkpoint has no saved map; "
            f"give the map the run used as moe.expert_map"
        )
    data = config_to_dict(cfg)
    data["moe"]["expert_map"] = {str(k): int(v) for k, v in saved.items() if int(v) >= 0}
    return config_from_dict(data, source=f"{path}: the saved expert_map")


def load_for_inference(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    *,
    device: torch.device | None = None,
    use_ema: bool | None = None,
) -> tuple[nn.Module, Any, RunData, dict[str, Any]]:
    """Model (eval mode, weights loaded), postprocess, run data and the checkpoint dict.

    Args:
        cfg: the config (model / moe sections must be the training ones).
        checkpoint: ``last.pth``, ``best.pth`` or ``epoch_XXXX.pth``.
        device: default: ``train.device``.
        use_ema: load the EMA weights when the checkpoint has them (default: yes).
    """
    path = Path(checkpoint)
    state = ckpt.load_checkpoint(path, required_keys=("model", "label_space"))
    cfg = with_saved_expert_map(cfg, state, path)
    data = build_run_data(cfg, label_space_state=state["label_space"])
    model, _, postprocess = build_model_parts(cfg, data.label_space.num_classes)
    weights = state["model"]
    if state.get("ema") and use_ema is not False:
        weights = state["ema"]["module"]
        logger.info("evaluating the EMA weights of %s", path)
    # the single-process layout of any run; under torchrun an expert-parallel rank keeps its own
    expert_parallel.load_model_state(model, weights, path=path)
    dev = device or dist_utils.resolve_device(cfg.train.device)
    model.to(dev).eval()
    return model, postprocess, data, state


def evaluate(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    datasets: list[str] | None = None,
    restrict: bool = False,
) -> Any:
    """Per-dataset COCO AP of a checkpoint on the evaluation datasets.

    Args:
        cfg: the run config (``eval`` section: batch size, ``max_images``, ``num_select``).
        checkpoint: a checkpoint written by :func:`damex.engine.train`.
        datasets: subset of the evaluation datasets (default ``cfg.eval_datasets``).
        restrict: also compute the ``restrict_to_dataset_labels`` oracle.

    Returns:
        ``EvalResults`` on rank 0 (None on other ranks under torchrun).
    """
    info = dist_utils.init_distributed(cfg.train.device)
    if datasets:
        unknown = [d for d in datasets if d not in cfg.eval_datasets + cfg.data.train]
        if unknown:
            raise ConfigError(
                f"--datasets {unknown} are not evaluation datasets of the config "
                f"({cfg.eval_datasets})"
            )
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, datasets=list(datasets)))
    model, postprocess, data, _ = load_for_inference(cfg, checkpoint, device=info.device)
    loaders = data.test_loaders(cfg, info.rank, info.world_size)
    results, _ = run_inference(
        model,
        postprocess,
        loaders,
        data.label_space,
        routing_stats=False,
        restrict=restrict or cfg.eval.restrict_to_dataset_labels,
        amp_dtype=amp_dtype(cfg.train.amp),
        voc_metric=cfg.eval.voc_metric,
        expert_of_dataset=data.expert_of_dataset,
        label_mask=cfg.eval.label_mask,
    )
    return results
