"""Inference over per-dataset test loaders: detections, COCO evaluation and routing statistics.

Every rank runs its shard of every loader (the test loaders hand out contiguous, disjoint rank
shards); detections are gathered on rank 0 by ``MultiDatasetEvaluator`` (which evaluates each
dataset against its own GT JSON in native category ids); routing statistics are summed over
ranks. The model runs in eval mode under ``torch.inference_mode``; the dataset identity of an
image is used only to pick its GT file and, for the oracle, to restrict scores to the dataset's
labels (docs/design.md §10: it never enters routing).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from damex.config import LabelMask, VOCMetric
from damex.data.label_space import LabelSpace
from damex.engine import distributed as dist_utils
from damex.engine.ema import unwrap_model
from damex.engine.expert_parallel import inference_lockstep
from damex.evaluation.coco_eval import EvalResults, MultiDatasetEvaluator
from damex.modeling.postprocess import (
    PostProcess,
    dataset_label_matrix,
    router_masked_detections,
)
from damex.modeling.token_selection import foreground_mask, select_tokens
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
    fg = None
    if tokens == "foreground":
        if matcher is None:
            raise ValueError("routing_tokens='foreground' needs a matcher (the criterion's)")
        indices = matcher(out.pred.logits, out.pred.boxes, batch.targets)
        fg = foreground_mask(indices, out.pred.logits.shape[1], device=out.pred.logits.device)
    return [select_tokens(info, tokens, fg) for info in out.routing]


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
    voc_metric: VOCMetric = "area",
    label_mask: LabelMask = "none",
) -> tuple[EvalResults | RawDetections | None, Any]:
    """Run the detector over every test loader and evaluate per dataset.

    Runs under ``torch.inference_mode`` (no autograd bookkeeping, the deformable attention's
    no-grad path); a loader without worker processes is read one batch ahead on a background
    thread, so that loading overlaps the forward.

    Args:
        model: the detector (a DDP wrapper is unwrapped); switched to eval mode and restored.
        postprocess: the protocol post-processor (unrestricted top-K).
        loaders: dataset name -> test loader (each rank its shard; ``eval.batch_size`` images
            per forward).
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
        voc_metric: interpolation of the VOC AP50 column (``eval.voc_metric``).
        label_mask: ``"router"`` keeps, per image, only the labels of the dataset(s) its router
            votes for (:func:`~damex.modeling.postprocess.router_label_mask`, no dataset id;
            needs ``expert_of_dataset``); ``"none"`` all labels (``eval.label_mask``).

    Returns:
        ``(results, routing)``: ``EvalResults`` on rank 0 (None on other ranks) or
        ``RawDetections`` (this rank's) without GT; routing statistics summed over ranks (None
        when not requested or the model has no MoE layer).
    """
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    sink = _Sink(label_space, routing_tokens, matcher, expert_of_dataset, routing_stats)
    sink.evaluator = _evaluator(loaders, label_space, gt, max_images, voc_metric)
    sink.main_pp, sink.oracle_pp = _postprocessors(postprocess, restrict)
    if label_mask == "router":
        sink.router_mask = _router_mask_inputs(label_space, expert_of_dataset)
    elif label_mask != "none":
        raise ValueError(f"label_mask must be 'none' or 'router', got {label_mask!r}")
    names = [
        n for n in loaders if sink.evaluator is None or n in sink.evaluator.datasets_to_evaluate
    ]
    bar = _progress_bar(sum(len(loaders[n]) for n in names), progress)
    device = next(net.parameters()).device
    try:
        with torch.inference_mode():
            for name in names:
                for batch in _batches(net, loaders[name], max_images, amp_dtype):
                    batch = batch_to_device(batch, device)
                    with torch.autocast(
                        device_type=device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None,
                    ):  # fmt: skip
                        out = net(batch)
                    sink.add(name, batch, out)
                    bar.update(1)
            stats = _reduce_stats(sink.stats, label_space) if routing_stats else sink.stats
            if sink.evaluator is None:
                return sink.raw, stats
            return sink.evaluator.evaluate(), stats
    finally:
        bar.close()
        net.train(was_training)


def _progress_bar(total: int, progress: bool) -> tqdm:
    """The evaluation bar over ``total`` batches (rank 0 only, and only with ``progress``)."""
    return tqdm(
        total=total,
        desc="eval",
        # True: off; None: on only when stderr is a terminal
        disable=True if not (progress and dist_utils.is_main_process()) else None,
        dynamic_ncols=True,
        leave=False,
    )


def _evaluator(
    loaders: Mapping[str, DataLoader],
    label_space: LabelSpace,
    gt: Mapping[str, str | os.PathLike[str]] | None,
    max_images: int,
    voc_metric: VOCMetric,
) -> MultiDatasetEvaluator | None:
    """The evaluator of the loaders' datasets with a GT JSON (``gt`` or the loaders' own);
    None when no GT is known."""
    gt_files = dict(gt) if gt is not None else gt_files_of(loaders)
    if gt_files is None:
        return None
    return MultiDatasetEvaluator(
        gt={n: gt_files[n] for n in loaders if n in gt_files},
        label_space=label_space,
        only_processed_images=max_images > 0 or _capped(loaders),
        voc_metric=voc_metric,
    )


def _router_mask_inputs(
    label_space: LabelSpace, expert_of_dataset: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_of_dataset [D], dataset_labels bool [D, K])`` for ``label_mask="router"``."""
    if expert_of_dataset is None or not bool((expert_of_dataset >= 0).all()):
        raise ValueError(
            "eval.label_mask=router needs an expert for every dataset of the label space "
            "(moe.expert_map)"
        )
    return expert_of_dataset.long().cpu(), dataset_label_matrix(label_space)


def _postprocessors(
    postprocess: PostProcess, restrict: bool
) -> tuple[PostProcess, PostProcess | None]:
    """(unrestricted protocol post-processor, dataset-restricted oracle or None)."""
    oracle_pp = None
    if restrict:
        oracle_pp = PostProcess(num_select=postprocess.num_select, restrict_to_dataset_labels=True)
    main_pp = postprocess
    if postprocess.restrict_to_dataset_labels:
        main_pp = PostProcess(num_select=postprocess.num_select, restrict_to_dataset_labels=False)
        oracle_pp = postprocess
    return main_pp, oracle_pp


def _batches(
    net: nn.Module, loader: DataLoader, max_images: int, amp_dtype: torch.dtype | None
) -> Iterator[Batch]:
    """The loader's batches (up to ``max_images`` images), in lockstep with expert parallelism
    (a rank out of batches still joins the others' all-to-alls); read one batch ahead on a
    thread when the loader has no worker processes."""
    seen = 0
    batches: Iterator[Batch] = iter(loader)
    if getattr(loader, "num_workers", 0) == 0:
        batches = _read_ahead(batches)
    try:
        while True:
            batch = next(batches, None) if max_images <= 0 or seen < max_images else None
            if not inference_lockstep(net, batch is not None, amp_dtype=amp_dtype):
                return
            if batch is None:
                continue
            seen += len(batch)
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _read_ahead(it: Iterator[Batch], depth: int = 1) -> Iterator[Batch]:
    """Iterate ``it`` on a daemon thread, ``depth`` items ahead (image decoding and resizing
    release the GIL, so they overlap the forward). Errors are re-raised here."""
    done = object()
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(_Failure(e))

    thread = threading.Thread(target=work, name="damex-eval-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


@dataclass
class _Failure:
    error: BaseException


@dataclass
class _Sink:
    """Where the detections and routing statistics of every batch go."""

    label_space: LabelSpace
    routing_tokens: str
    matcher: Callable[..., Any] | None
    expert_of_dataset: torch.Tensor | None
    routing_stats: bool
    evaluator: MultiDatasetEvaluator | None = None
    main_pp: PostProcess | None = None
    oracle_pp: PostProcess | None = None
    raw: RawDetections = field(default_factory=RawDetections)
    stats: RoutingStats | None = None
    router_mask: tuple[torch.Tensor, torch.Tensor] | None = None  # see _router_mask_inputs

    def add(self, name: str, batch: Batch, out: Any) -> None:
        if self.routing_stats and out.routing:
            self._add_routing(batch, out)
        assert self.main_pp is not None
        dets = [d.to("cpu") for d in self._detections(batch, out)]
        oracle = None
        if self.oracle_pp is not None:
            ls = self.label_space
            ds_slices = [torch.tensor(ls.dataset_slice(int(d))) for d in batch.dataset_ids.tolist()]
            oracle = self.oracle_pp(out.pred, batch.orig_sizes, ds_slices)
            oracle = [d.to("cpu") for d in oracle]
        if self.evaluator is not None:
            self.evaluator.process(batch.dataset_ids, batch.image_ids, dets, oracle)
            return
        ids = batch.image_ids.tolist()
        self.raw.detections.setdefault(name, []).extend(zip(ids, dets))
        if oracle is not None:
            self.raw.oracle.setdefault(name, []).extend(zip(ids, oracle))

    def _detections(self, batch: Batch, out: Any) -> list[Detections]:
        """The protocol detections: top-K over all labels, or over the router's voted labels."""
        assert self.main_pp is not None
        if self.router_mask is None:
            return self.main_pp(out.pred, batch.orig_sizes)
        experts, labels = self.router_mask
        return router_masked_detections(
            out,
            batch.orig_sizes,
            num_select=self.main_pp.num_select,
            expert_of_dataset=experts,
            dataset_labels=labels,
        )

    def _add_routing(self, batch: Batch, out: Any) -> None:
        if self.stats is None:
            emap = self.expert_of_dataset
            if emap is not None and not bool((emap >= 0).all()):
                emap = None
            # ordinary tensors (not inference tensors): callers may merge the stats in place
            with torch.inference_mode(False):
                self.stats = RoutingStats(
                    len(out.routing),
                    self.label_space.num_datasets,
                    out.routing[0].num_experts,
                    emap,
                )
        masks = _token_masks(out, batch, self.routing_tokens, self.matcher)
        self.stats.update(out.routing, batch.dataset_ids, masks)


def _reduce_stats(stats: RoutingStats | None, label_space: LabelSpace) -> RoutingStats | None:
    """Sum the routing statistics over ranks (a rank without any batch has none yet)."""
    if dist_utils.get_world_size() <= 1:
        return stats
    shapes = dist_utils.all_gather_object(
        None if stats is None else (stats.num_layers, stats.num_experts, stats.expert_map)
    )
    ref = next((s for s in shapes if s is not None), None)
    if ref is not None:
        if stats is None:
            with torch.inference_mode(False):
                stats = RoutingStats(ref[0], label_space.num_datasets, ref[1], ref[2])
        stats.all_reduce_()
    return stats


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
