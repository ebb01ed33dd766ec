"""Inference over per-dataset test loaders: detections, COCO evaluation and routing statistics.

Every rank runs its shard of every loader (the test loaders hand out contiguous, disjoint rank
shards); detections are gathered on rank 0 by ``MultiDatasetEvaluator`` (which evaluates each
dataset against its own GT JSON in native category ids); routing statistics are summed over
ranks. The model runs in eval mode under ``torch.no_grad``; the dataset identity of an image is
used only to pick its GT file and, for the oracle, to restrict scores to the dataset's labels
(DESIGN.md §5: it never enters routing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from damex.data.label_space import LabelSpace
from damex.engine import distributed as dist_utils
from damex.engine.ema import unwrap_model
from damex.engine.expert_parallel import inference_lockstep
from damex.evaluation.coco_eval import EvalResults, MultiDatasetEvaluator
from damex.modeling.postprocess import PostProcess
from damex.moe.stats import RoutingStats
from damex.structures import Batch, Detections

__all__ = ["RawDetections", "run_inference", "gt_files_of"]

logger = logging.getLogger(__name__)


@dataclass
class RawDetections:
    """Detections without evaluation (no GT file known), on this rank.

    Attributes:
        detections: dataset name -> list of ``(image_id, Detections)`` (unified labels, boxes in
            original-image pixels), in loader order.
        oracle: the same for the dataset-restricted oracle, when requested.
    """

    detections: dict[str, list[tuple[int, Detections]]] = field(default_factory=dict)
    oracle: dict[str, list[tuple[int, Detections]]] = field(default_factory=dict)


def gt_files_of(loaders: Mapping[str, DataLoader]) -> dict[str, Path] | None:
    """The GT JSON of every loader's dataset (``loader.dataset.dataset.ann_file``), or None."""
    out: dict[str, Path] = {}
    for name, loader in loaders.items():
        ds: Any = loader.dataset
        inner = getattr(ds, "dataset", None)
        ann = getattr(ds, "ann_file", None) or getattr(inner, "ann_file", None)
        if ann is None:
            return None
        out[name] = Path(ann)
    return out


def _token_masks(
    out: Any, batch: Batch, tokens: str, matcher: Callable[..., Any] | None
) -> list[torch.Tensor]:
    """Per MoE layer, the tokens counted by the routing statistics (``eval.routing_tokens``)."""
    from damex.modeling.criterion import foreground_mask, select_tokens

    fg = None
    if tokens == "foreground":
        if matcher is None:
            raise ValueError("routing_tokens='foreground' needs a matcher (the criterion's)")
        indices = matcher(out.pred.logits, out.pred.boxes, batch.targets)
        fg = foreground_mask(indices, out.pred.logits.shape[1], device=out.pred.logits.device)
    return [select_tokens(info, tokens, fg) for info in out.routing]


@torch.no_grad()
def run_inference(
    model: nn.Module,
    postprocess: PostProcess,
    loaders: Mapping[str, DataLoader],
    label_space: LabelSpace,
    *,
    routing_stats: bool = True,
    restrict: bool = False,
    max_images: int = 0,
    gt: Mapping[str, str | os.PathLike[str]] | None = None,
    routing_tokens: str = "matching_only",
    expert_of_dataset: torch.Tensor | None = None,
    matcher: Callable[..., Any] | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[EvalResults | RawDetections | None, Any]:
    """Run the detector over every test loader and evaluate per dataset.

    Args:
        model: the detector (a DDP wrapper is unwrapped); switched to eval mode and restored.
        postprocess: the protocol post-processor (unrestricted top-K).
        loaders: dataset name -> test loader (each rank its shard).
        label_space: the run's label space (dataset ids, native ids, oracle slices).
        routing_stats: also accumulate dataset x expert routing statistics (MoE models).
        restrict: also compute the ``restrict_to_dataset_labels`` oracle (reported separately).
        max_images: > 0 caps the images per dataset on this rank (quick checks).
        gt: dataset name -> GT JSON; default: the loaders' datasets' ``ann_file``. With no GT
            known, raw detections are returned instead of ``EvalResults``.
        routing_tokens: which decoder tokens the routing statistics count (``all``,
            ``matching_only``, ``exclude_dn``, ``foreground``: matched by ``matcher``).
        expert_of_dataset: ``int64 [D]`` expert of every dataset id (routing accuracy); used
            only when every dataset has one.
        matcher: ``(logits, boxes, targets) -> indices`` for ``routing_tokens="foreground"``.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None.
        progress: show a tqdm bar on rank 0.

    Returns:
        ``(results, routing)``: ``EvalResults`` on rank 0 (None on other ranks) or
        ``RawDetections`` (this rank's) without GT; routing statistics summed over ranks (None
        when not requested or the model has no MoE layer).
    """
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    gt_files = dict(gt) if gt is not None else gt_files_of(loaders)
    evaluator = None
    raw = RawDetections()
    if gt_files is not None:
        evaluator = MultiDatasetEvaluator(
            gt={n: gt_files[n] for n in loaders if n in gt_files},
            label_space=label_space,
            only_processed_images=max_images > 0 or _capped(loaders),
        )
    oracle_pp = None
    if restrict:
        oracle_pp = PostProcess(num_select=postprocess.num_select, restrict_to_dataset_labels=True)
    main_pp = postprocess
    if postprocess.restrict_to_dataset_labels:
        main_pp = PostProcess(num_select=postprocess.num_select, restrict_to_dataset_labels=False)
        oracle_pp = postprocess
    stats = None
    slices = [torch.tensor(label_space.dataset_slice(i)) for i in range(label_space.num_datasets)]

    names = [n for n in loaders if evaluator is None or n in evaluator.datasets_to_evaluate]
    total = sum(len(loaders[n]) for n in names)
    bar = tqdm(
        total=total,
        desc="eval",
        # True: off; None: on only when stderr is a terminal
        disable=True if not (progress and dist_utils.is_main_process()) else None,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        for name in names:
            seen = 0
            batches = iter(loaders[name])
            while True:
                batch = next(batches, None) if max_images <= 0 or seen < max_images else None
                # expert parallelism: a rank out of batches still joins the others' all-to-alls
                if not inference_lockstep(net, batch is not None, amp_dtype=amp_dtype):
                    break
                if batch is None:
                    continue
                batch = batch.to(device)
                with torch.autocast(
                    device_type=device.type, dtype=amp_dtype or torch.float32,
                    enabled=amp_dtype is not None,
                ):  # fmt: skip
                    out = net(batch)
                if routing_stats and out.routing:
                    if stats is None:
                        emap = None
                        if expert_of_dataset is not None and bool((expert_of_dataset >= 0).all()):
                            emap = expert_of_dataset
                        stats = RoutingStats(
                            len(out.routing),
                            label_space.num_datasets,
                            out.routing[0].num_experts,
                            emap,
                        )
                    masks = _token_masks(out, batch, routing_tokens, matcher)
                    stats.update(out.routing, batch.dataset_ids, masks)
                dets = main_pp(out.pred, batch.orig_sizes)
                oracle = None
                if oracle_pp is not None:
                    ds_slices = [slices[int(d)] for d in batch.dataset_ids.tolist()]
                    oracle = oracle_pp(out.pred, batch.orig_sizes, ds_slices)
                dets = [d.to("cpu") for d in dets]
                oracle = None if oracle is None else [d.to("cpu") for d in oracle]
                if evaluator is not None:
                    evaluator.process(batch.dataset_ids, batch.image_ids, dets, oracle)
                else:
                    ids = batch.image_ids.tolist()
                    raw.detections.setdefault(name, []).extend(zip(ids, dets))
                    if oracle is not None:
                        raw.oracle.setdefault(name, []).extend(zip(ids, oracle))
                seen += len(batch)
                bar.update(1)
    finally:
        bar.close()
        net.train(was_training)
    if routing_stats and dist_utils.get_world_size() > 1:
        # a rank without any batch has no stats object: agree on the shape first
        shapes = dist_utils.all_gather_object(
            None if stats is None else (stats.num_layers, stats.num_experts, stats.expert_map)
        )
        ref = next((s for s in shapes if s is not None), None)
        if ref is not None:
            if stats is None:
                stats = RoutingStats(ref[0], label_space.num_datasets, ref[1], ref[2])
            stats.all_reduce_()
    if evaluator is None:
        return raw, stats
    return evaluator.evaluate(), stats


def _capped(loaders: Mapping[str, DataLoader]) -> bool:
    """True when a loader holds fewer images than its dataset (``eval.max_images``)."""
    for loader in loaders.values():
        ds: Any = loader.dataset
        inner = getattr(ds, "dataset", None)
        if inner is not None and hasattr(inner, "__len__") and len(ds) < len(inner):
            return True
    return False


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch.to(device, non_blocking=True)`` (pinned memory on CUDA)."""
    return batch.to(device, non_blocking=device.type == "cuda")
