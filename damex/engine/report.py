"""Drivers behind ``damex evaluate`` / ``visualize-routing`` / ``demo`` (the CLI only wires).

* :func:`evaluate_checkpoint`: per-dataset COCO AP of a checkpoint, written as ``results.json``,
  ``results.md`` and per-dataset detections (native category ids).
* :func:`visualize_routing`: dataset x expert routing statistics over the test sets, heatmaps,
  per-image overlays (detections coloured by the expert of their query) and one
  self-contained HTML report (``damex.viz``).
* :func:`run_demo`: detections drawn on arbitrary images; :func:`run_explained_demo`
  (``demo --explain``): every detection explained (native label, dataset, expert and gate per
  MoE layer) in a JSON per image, and a readable overlay.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from damex.config import Config
from damex.data.loader import collate
from damex.data.transforms import build_transforms
from damex.engine import distributed as dist_utils
from damex.engine.inference import run_inference
from damex.engine.loading import evaluate, load_for_inference
from damex.errors import ConfigError
from damex.evaluation.routing import routing_markdown, routing_summary
from damex.modeling.criterion import build_criterion
from damex.predictor import NativeDetections, Predictor
from damex.structures import Detections, Sample
from damex.viz import (
    draw_boxes,
    draw_detections,
    draw_expert_overlay,
    legend_strip,
    palette,
    query_experts,
    save_png,
    save_routing_figures,
    write_routing_report,
)
from damex.viz.boxes import select_for_display, upscale_for_display

__all__ = [
    "evaluate_checkpoint",
    "visualize_routing",
    "run_demo",
    "run_explained_demo",
    "IMAGE_SUFFIXES",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    datasets: list[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    restrict: bool = False,
) -> Any:
    """Evaluate a checkpoint and write the results.

    Args:
        cfg: the run config.
        checkpoint: a ``.pth`` written by ``train``.
        datasets: subset of the evaluation datasets.
        out_dir: where to write (default ``<checkpoint dir>/eval_<checkpoint stem>``).
        restrict: also report the ``restrict_to_dataset_labels`` oracle.

    Returns:
        ``EvalResults`` on rank 0, None on the other ranks under ``torchrun``.
    """
    results = evaluate(cfg, checkpoint, datasets=datasets, restrict=restrict)
    if results is not None:
        ckpt_path = Path(checkpoint)
        out = Path(out_dir) if out_dir else ckpt_path.resolve().parent / f"eval_{ckpt_path.stem}"
        results.write(out)
    return results


def _moe_layer_names(cfg: Config) -> list[str]:
    return [f"decoder.{i}" for i, kind in enumerate(cfg.model.decoder_ffn) if kind == "moe"]


def _to_uint8_image(batch_image: torch.Tensor, size: torch.Tensor) -> np.ndarray:
    """The unpadded ``[3, H, W]`` float image of a batch as ``uint8`` ``[H, W, 3]``."""
    h, w = (int(v) for v in size.tolist())
    img = batch_image[:, :h, :w].clamp(0, 255).round().to(torch.uint8)  # [3, h, w]
    return img.permute(1, 2, 0).cpu().numpy()


def _scaled(det: Detections, orig_size: torch.Tensor, size: torch.Tensor) -> Detections:
    """Detections in original-image pixels -> pixels of the resized (batch) image."""
    oh, ow = (float(v) for v in orig_size.tolist())
    h, w = (float(v) for v in size.tolist())
    scale = det.boxes.new_tensor([w / ow, h / oh, w / ow, h / oh])
    return Detections(det.boxes * scale, det.scores, det.labels, det.query_index)


def _eval_with_routing(
    cfg: Config,
    model: torch.nn.Module,
    postprocess: Any,
    data: Any,
    loaders: dict[str, Any],
    tokens: str,
    precomputed: tuple[Any, Any] | None,
) -> tuple[Any, Any]:
    """``(EvalResults, RoutingStats)``: ``precomputed`` when it has routing, else inference."""
    if precomputed is not None and precomputed[1] is not None:
        return precomputed
    criterion = build_criterion(cfg, data.label_space.num_classes)
    return run_inference(
        model,
        postprocess,
        loaders,
        data.label_space,
        routing_stats=True,
        routing_tokens=tokens,
        expert_of_dataset=data.expert_of_dataset,
        matcher=criterion.matcher,
        voc_metric=cfg.eval.voc_metric,
        label_mask=cfg.eval.label_mask,
    )


def _draw_overlays(
    model: torch.nn.Module,
    postprocess: Any,
    loaders: dict[str, Any],
    device: torch.device,
    out: Path,
    *,
    per_dataset: int,
    layer: int,
    layer_name: str,
    num_experts: int,
    class_names: list[str],
) -> dict[str, list[Path]]:
    """Up to ``per_dataset`` overlays per test dataset: detections coloured by their expert.

    The expert of each query is its top-1 in MoE layer ``layer``; the images are written to
    ``out/overlays/<dataset>/<image id>_<layer_name>.png``.
    """
    overlays: dict[str, list[Path]] = {}
    for name, loader in loaders.items():
        drawn = 0
        for batch in loader:
            if drawn >= per_dataset:
                break
            batch = batch.to(device)
            pred = model(batch)
            dets = postprocess(pred.pred, batch.orig_sizes)
            for b in range(len(batch)):
                if drawn >= per_dataset:
                    break
                experts = query_experts(
                    pred.routing[layer], image_index=b, num_queries=pred.pred.logits.shape[1]
                )
                det = _scaled(dets[b].to("cpu"), batch.orig_sizes[b], batch.image_sizes[b])
                img = draw_expert_overlay(
                    _to_uint8_image(batch.images[b], batch.image_sizes[b]),
                    det,
                    experts,
                    num_experts=num_experts,
                    class_names=class_names,
                )
                image_id = int(batch.image_ids[b])
                path = out / "overlays" / name / f"{image_id}_{layer_name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                overlays.setdefault(name, []).append(save_png(img, path))
                drawn += 1
    return overlays


@torch.no_grad()
def visualize_routing(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokens: str | None = None,
    precomputed: tuple[Any, Any] | None = None,
) -> Path:
    """Routing statistics, figures and the HTML report of a MoE checkpoint (single process).

    Args:
        cfg: the run config (``eval.routing_tokens``, ``eval.report_images``,
            ``eval.max_images``).
        checkpoint: a ``.pth`` written by ``train``.
        out_dir: report folder (created).
        tokens: which decoder tokens to count (default ``eval.routing_tokens``).
        precomputed: ``(EvalResults, RoutingStats)`` of this checkpoint on the test sets (the
            trainer's final evaluation); skips the inference pass. Overlays are still drawn.

    Returns:
        The HTML report path.

    Raises:
        ConfigError: the model has no MoE layer.
    """
    if not cfg.uses_moe:
        raise ConfigError("visualize-routing: model.decoder_ffn has no 'moe' layer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = tokens or cfg.eval.routing_tokens
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = dist_utils.resolve_device(cfg.train.device, local_rank)
    model, postprocess, data, _ = load_for_inference(cfg, checkpoint, device=device)
    ls = data.label_space
    loaders = data.test_loaders(cfg)
    results, stats = _eval_with_routing(cfg, model, postprocess, data, loaders, tokens, precomputed)
    if stats is None:
        raise ConfigError(f"visualize-routing: the model of {checkpoint} returned no routing")
    emap = data.expert_map.to_dict()  # the datasets that have an expert
    summary = routing_summary(
        stats,
        dataset_names=ls.dataset_names,
        expert_map=emap,
        layer_names=_moe_layer_names(cfg),
    )
    summary["tokens"] = tokens
    (out / "routing.md").write_text(routing_markdown(summary), encoding="utf-8")
    figures = save_routing_figures(summary, out)

    layer = stats.num_layers - 1  # the last MoE layer: closest to the detections
    overlays = _draw_overlays(
        model,
        postprocess,
        loaders,
        device,
        out,
        per_dataset=max(int(cfg.eval.report_images), 0),
        layer=layer,
        layer_name=_moe_layer_names(cfg)[layer],
        num_experts=stats.num_experts,
        class_names=ls.names,
    )
    report = write_routing_report(
        out,
        summary,
        [*figures["heatmaps"], *figures["accuracy"]],
        overlays,
        eval_results=results,
    )
    if results is not None:
        results.write(out / "eval")
    return report


def _image_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return files
        raise ConfigError(f"demo: no image ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
    raise ConfigError(f"demo: input {path} does not exist")


@torch.no_grad()
def run_demo(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    score_threshold: float = 0.15,
) -> list[Path]:
    """Detect objects in an image or a folder of images and save annotated PNGs.

    Args:
        cfg: the run config (test resize, ``eval.num_select``).
        checkpoint: a ``.pth`` written by ``train``.
        input_path: an image file or a folder of images.
        out_dir: folder for ``<stem>.png`` results.
        score_threshold: minimum score drawn.

    Returns:
        The written files, in input order.
    """
    files = _image_files(Path(input_path))
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = dist_utils.resolve_device(cfg.train.device, local_rank)
    model, postprocess, data, _ = load_for_inference(cfg, checkpoint, device=device)
    transform = build_transforms(cfg.data, None, train=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
        h, w = rgb.shape[:2]
        sample = Sample(
            image=torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
            boxes=torch.zeros(0, 4),
            labels=torch.zeros(0, dtype=torch.long),
            dataset_id=0,
            image_id=i,
            orig_size=(h, w),
        )
        batch = collate([transform(sample)]).to(device)
        det = postprocess(model(batch).pred, batch.orig_sizes)[0].to("cpu")
        img = draw_detections(rgb, det, data.label_space.names, score_threshold=score_threshold)
        written.append(save_png(img, out / f"{f.stem}.png"))
        logger.info(
            "%s: %d detections >= %.2f",
            f,
            int((det.scores >= score_threshold).sum()),
            score_threshold,
        )
    return written


def _explained_doc(
    f: Path,
    det: NativeDetections,
    shown: torch.Tensor,
    checkpoint: str | os.PathLike[str],
    expert_map: dict[str, int],
    display: dict[str, Any],
) -> dict[str, Any]:
    """The ``<stem>.json`` of one image: every detection, ``shown`` marking the drawn ones."""
    records = det.records()
    for r in records:
        r["shown"] = False
    for i in shown.tolist():
        records[i]["shown"] = True
    return {
        "image": str(f),
        "size": list(det.image_size),
        "checkpoint": str(checkpoint),
        "moe_layers": list(det.layer_names),
        "expert_map": expert_map,
        "display": display,
        "detections": records,
    }


def _explained_overlay(
    f: Path, sub: NativeDetections, predictor: Predictor, num_experts: int, min_side: int
) -> np.ndarray:
    """The ``<stem>.png`` of one image: ``sub`` drawn and labelled, then the expert legend.

    The image is enlarged to ``min_side`` first; each box is labelled
    ``<class> <score> E<expert per layer>`` and coloured by its expert in the last MoE layer
    (by its label without MoE layers).
    """
    colors = palette(max(num_experts, 1))
    label_colors = palette(max(predictor.label_space.num_classes, 1))
    with Image.open(f) as im:
        rgb = np.asarray(im.convert("RGB"))
    canvas, boxes = upscale_for_display(rgb, sub.boxes, min_side=min_side)
    font = max(12, round(min(canvas.shape[:2]) / 36))
    texts, box_colors = [], []
    for i in range(len(sub)):
        experts = "/".join(f"E{int(e)}" for e in sub.experts[i].tolist())
        texts.append(f"{sub.names[i]} {float(sub.scores[i]):.2f} {experts}".strip())
        if num_experts:
            box_colors.append(colors[int(sub.experts[i, -1]) % len(colors)])
        else:
            box_colors.append(label_colors[int(sub.labels[i])])
    img = draw_boxes(canvas, boxes, colors=box_colors, texts=texts, width=3, font_size=font)
    if not num_experts:
        return img
    entries = [
        (f"E{e}: {', '.join(predictor.expert_datasets.get(e, [])) or '-'}", colors[e])
        for e in range(num_experts)
    ]
    layers = "/".join(predictor.layer_names)
    caption = [(f"E<a>/<b>: top-1 expert in {layers}; colour: the last", (255, 255, 255))]
    return np.concatenate(
        (
            img,
            legend_strip(img.shape[1], entries, font),
            legend_strip(img.shape[1], caption, font),
        ),
        0,
    )


def run_explained_demo(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    min_score: float = 0.15,
    top_n: int = 20,
    relative: float = 0.3,
    min_side: int = 512,
) -> list[Path]:
    """``damex demo --explain``: per image ``<stem>.json`` (every detection explained) and
    ``<stem>.png`` (the readable subset drawn with label, score and expert).

    The JSON lists every detection of the model (``eval.num_select``), best first, as
    :meth:`damex.predictor.NativeDetections.records` (box, score, native label, its dataset,
    per MoE layer the expert, its gate and the datasets mapped to it) with ``shown`` marking the
    boxes drawn. The overlay draws at most ``top_n`` boxes: one per query, scoring at least
    ``max(min_score, relative * best score of the image)``, after class-agnostic NMS; each box
    is coloured by the expert of its query in the last MoE layer and labelled
    ``<class> <score> E<expert per layer>``; a legend names the datasets of every expert; images
    whose shorter side is below ``min_side`` pixels are enlarged first.

    Returns:
        The written PNG files, in input order (each with its JSON beside it).
    """
    files = _image_files(Path(input_path))
    device = dist_utils.resolve_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    predictor = Predictor.from_checkpoint(checkpoint, config=cfg, device=device)
    num_experts = int(cfg.moe.num_experts) if predictor.layer_names else 0
    display = {"top_n": top_n, "min_score": min_score, "relative": relative}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        det = predictor(f)
        shown = select_for_display(det, top_n=top_n, min_score=min_score, relative=relative)
        doc = _explained_doc(f, det, shown, checkpoint, dict(predictor.expert_map), display)
        (out / f"{f.stem}.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        sub = det.select(shown)
        img = _explained_overlay(f, sub, predictor, num_experts, min_side)
        written.append(save_png(img, out / f"{f.stem}.png"))
        logger.info("%s: %d detections, %d drawn", f, len(det), len(sub))
    return written
