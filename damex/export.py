"""ONNX export of a trained detector: normalized image -> boxes, scores, labels, experts.

The exported graph is the inference path of :class:`~damex.modeling.dino.DINO` (backbone, neck,
encoder, two-stage query selection, decoder) followed by DINO's top-K post-processing:

* input ``images``: ``float32 [B, 3, H, W]``, RGB, already normalized
  (``(pixels - model.pixel_mean) / model.pixel_std``, pixels in ``[0, 255]``), no padding;
* outputs ``boxes`` ``[B, K, 4]`` ``xyxy`` in pixels of the input, ``scores`` ``[B, K]``
  (sigmoid), ``labels`` ``int64 [B, K]`` (unified label indices; ``damex.Predictor`` and the
  label space in the checkpoint name them), and ``experts`` ``int64 [B, Q, L]``: the top-1 expert
  of every matching query in each of the ``L`` MoE layers (``query`` ``int64 [B, K]`` says which
  query made each detection).

Exportable MoE: the training/inference layer (:class:`~damex.moe.layer.MoEFFN`) sorts tokens
by expert and runs one GEMM per expert with data-dependent sizes, which a static graph cannot
express. :class:`StaticMoE` computes the same function with static shapes: the same router
(softmax, top-k, gates), the same capacity rule (per image, batch-prioritized: a token keeps its
slot when fewer than ``C`` tokens of its image with a higher gate — earlier on ties, and all
earlier choices — went to the same expert), and every expert applied to every token, masked by
the routing. ``E`` times the expert FLOPs, identical results (``tests/engine/test_export.py``
checks boxes/scores to 1e-4 and identical expert choices with onnxruntime).

Deformable attention is exported in its ``grid_sample`` form (the CPU default is a sparse
matrix product that gives the same values but cannot be traced): ``grid_sample`` (bilinear,
zeros padding, ``align_corners=False``) is an ONNX operator since opset 16; the default opset is
18 (the torch exporter's own; converting down to 17 fails in onnxscript's version converter).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from damex.config import load_config
from damex.engine.report import IMAGE_SUFFIXES
from damex.errors import DamexError
from damex.modeling import build_model
from damex.modeling.backbone import valid_sizes_from_mask
from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.postprocess import PostProcess
from damex.moe.layer import MoEFFN
from damex.moe.types import RoutingInfo
from damex.predictor import Predictor, query_routing
from damex.structures import Batch

__all__ = [
    "ExportableDetector",
    "ExportError",
    "ExportReport",
    "StaticMoE",
    "export_onnx",
    "onnx_parity",
    "reference_outputs",
]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("boxes", "scores", "labels", "query", "experts")
MIN_OPSET = 16  # grid_sample


class ExportError(DamexError):
    """The model or the export settings cannot be exported (the message says why)."""


class StaticMoE(nn.Module):
    """:class:`MoEFFN`'s inference function with static shapes (shares the layer's parameters).

    Args:
        layer: the trained MoE layer (all experts local; eval mode).
        tokens_per_image: ``N`` tokens of every image (the decoder's queries); the capacity
            group of a token is its image, as in ``moe.capacity_group: image``.
    """

    def __init__(self, layer: MoEFFN, tokens_per_image: int) -> None:
        super().__init__()
        if layer.expert_parallel_group is not None:
            raise ExportError("export needs all experts in one process (no expert parallelism)")
        if layer.experts.num_experts != layer.num_experts:
            raise ExportError(
                f"the MoE layer holds {layer.experts.num_experts} of {layer.num_experts} experts"
            )
        self.router = layer.router
        self.experts = layer.experts
        self.shared = layer.shared
        self.unit_gate = bool(layer.unit_gate)
        self.router_context = bool(layer.router_context)
        self.num_experts = layer.num_experts
        self.top_k = layer.top_k
        self.tokens_per_image = int(tokens_per_image)
        self.capacity_group = layer.capacity_group
        cf = abs(layer.capacity_factor)
        capacity_experts = layer.router.base_experts or self.num_experts  # as MoEFFN
        self.capacity: int | None = None
        if cf > 0:
            if layer.capacity_group != "image":
                raise ExportError(
                    "export supports capacity per image (moe.capacity_group: image) or no "
                    f"capacity limit (moe.capacity_factor: 0); got capacity_group="
                    f"{layer.capacity_group!r} with capacity_factor={layer.capacity_factor}"
                )
            # dispatch.capacity_per_group for a group of N tokens
            self.capacity = max(
                1, int(np.floor(tokens_per_image * cf * self.top_k / capacity_experts + 1e-9))
            )

    def _kept(self, expert: Tensor, gate: Tensor) -> Tensor:
        """``bool [T, k]``: the assignments inside their (image, expert) capacity."""
        if self.capacity is None:
            return torch.ones_like(expert, dtype=torch.bool)
        n, k = self.tokens_per_image, self.top_k
        e = expert.reshape(-1, n, k)  # [B, N, k]
        g = gate.reshape(-1, n, k)
        idx = torch.arange(n, device=expert.device)
        earlier = idx[None, :] < idx[:, None]  # [N, N]: token t' before token t
        slots = []
        for j in range(k):
            same = e[:, :, j, None] == e[:, None, :, j]  # [B, N, N] same expert, choice j
            gj, gi = g[:, None, :, j], g[:, :, j, None]
            ahead = (gj > gi) | ((gj == gi) & earlier[None])
            slot = (same & ahead).sum(-1)  # [B, N]
            for jj in range(j):  # every earlier choice into the same expert comes first
                slot = slot + (e[:, :, j, None] == e[:, None, :, jj]).sum(-1)
            slots.append(slot)
        return (torch.stack(slots, -1) < self.capacity).reshape(-1, k)

    def forward(
        self, x: Tensor, token_image: Tensor | None = None, context_mask: Tensor | None = None
    ) -> tuple[Tensor, RoutingInfo]:
        # context_mask (MoEBlock's matching-query mask) is all True at inference: no DN queries
        rx = x
        if self.router_context:  # inference: every token is a matching query of its image
            per_image = x.view(-1, self.tokens_per_image, x.shape[-1])
            ctx = per_image.mean(1, keepdim=True).expand_as(per_image).reshape(x.shape)
            rx = torch.cat([x, ctx], dim=-1)
        route = self.router(rx)  # the layer's own router (eval: no noise)
        expert, gate = route.expert, route.gate  # [T, k]
        kept = self._kept(expert, gate)
        combine = torch.ones_like(gate) if self.unit_gate else gate
        weight = (combine * kept).to(x.dtype)  # [T, k]
        y = torch.zeros_like(x)
        for e, ffn in enumerate(self.experts.ffn.values()):
            w = (weight * (expert == e)).sum(-1, keepdim=True)  # [T, 1]
            y = y + w * ffn(x)
        if self.shared is not None:
            y = y + self.shared(x)
        if token_image is None:
            token_image = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        info = RoutingInfo(
            logits=route.logits,
            noisy_logits=None,
            expert=expert,
            gate=gate,
            kept=kept,
            token_image=token_image,
        )
        return y, info


class ExportableDetector(nn.Module):
    """The exported function: normalized images -> boxes, scores, labels, query, experts.

    Args:
        model: a trained ``DINO`` (deep-copied; its MoE layers become :class:`StaticMoE`).
        num_select: detections per image (DINO's top-K over queries x classes).
    """

    def __init__(self, model: nn.Module, num_select: int) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        num_queries = int(model.num_queries)
        self.num_moe_layers = 0
        for module in list(model.modules()):
            if isinstance(module, MSDeformAttn):
                module.impl = "grid_sample"  # the sparse CPU kernel does not trace; same values
            for child_name, child in list(module.named_children()):
                if isinstance(child, MoEFFN):
                    setattr(module, child_name, StaticMoE(child, num_queries))
                    self.num_moe_layers += 1
        self.model = model
        self.num_queries = num_queries
        k = model.num_classes * num_queries
        self.num_select = min(int(num_select), k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        bsz, _, h, w = images.shape
        mask = torch.zeros_like(images[:, 0], dtype=torch.bool)  # [B, H, W]: no padding
        valid_hw = valid_sizes_from_mask(mask)
        feats = m.backbone(images, None)  # no padding: nothing to mask
        srcs, masks = m.neck(feats, valid_hw)
        out = m.transformer(srcs, masks, dn=None, one_to_many=False)
        dec = out.decoder
        logits = dec.logits[-1][:, : self.num_queries]  # [B, Q, K] (no DN in eval)
        boxes = dec.boxes[-1][:, : self.num_queries]  # [B, Q, 4] cxcywh normalized
        num_classes = logits.shape[-1]
        scores = logits.float().sigmoid().flatten(1)  # [B, Q*K]
        top_scores, top_idx = scores.topk(self.num_select, dim=1)
        query = torch.div(top_idx, num_classes, rounding_mode="floor")
        labels = top_idx % num_classes
        sel = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
        cx, cy, bw, bh = sel.unbind(-1)
        size = torch.stack(
            [torch.ones_like(cx) * w, torch.ones_like(cx) * h] * 2, -1
        )  # [B, K, 4] (w, h, w, h)
        xyxy = torch.stack((cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh), -1)
        xyxy = torch.minimum((xyxy * size).clamp(min=0), size)
        experts = []
        for info in dec.routing:
            # tokens are batch-major [B * Q] in eval (no DN, no one-to-many queries)
            experts.append(info.expert[:, 0].reshape(bsz, self.num_queries))
        if experts:
            expert_out = torch.stack(experts, -1)  # [B, Q, L]
        else:
            expert_out = torch.zeros(bsz, self.num_queries, 0, dtype=torch.long)
        return xyxy, top_scores, labels, query, expert_out


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        image_size: ``(H, W)`` of the example input (the fixed size unless ``dynamic``).
        dynamic: batch, height and width are dynamic axes.
        opset: the ONNX opset.
        num_select: detections per image.
        num_moe_layers: ``L`` (width of the ``experts`` output).
        seconds: export time.
        parity: :func:`onnx_parity` of the export check, or None.
    """

    path: Path
    image_size: tuple[int, int]
    dynamic: bool
    opset: int
    num_select: int
    num_moe_layers: int
    seconds: float
    parity: dict[str, Any] | None = None

    def summary(self) -> str:
        h, w = self.image_size
        lines = [
            f"wrote {self.path} (opset {self.opset}, input [B, 3, {h}, {w}]"
            f"{' dynamic' if self.dynamic else ''}, {self.num_select} detections per image, "
            f"{self.num_moe_layers} MoE layer(s), {self.seconds:.1f} s)"
        ]
        if self.parity is not None:
            p = self.parity
            lines.append(
                f"onnxruntime vs PyTorch on {p['images']} image(s): max |box diff| "
                f"{p['max_box_diff']:.2e} px, max |score diff| {p['max_score_diff']:.2e}, "
                f"expert mismatches {p['expert_mismatches']}, unmatched detections "
                f"{p['unmatched_detections']}"
            )
        return "\n".join(lines)


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'damex[export]'")


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike[str],
    *,
    image_size: tuple[int, int],
    num_select: int = 100,
    dynamic: bool = False,
    opset: int = 18,
    batch_size: int = 1,
) -> ExportReport:
    """Export a trained ``DINO`` to ONNX (see the module docstring for inputs and outputs).

    Args:
        model: the detector (weights loaded).
        out: the ``.onnx`` path (parent folders created; written via a temporary file).
        image_size: ``(H, W)`` of the example input; the graph's fixed size unless ``dynamic``.
        num_select: detections per image.
        dynamic: make batch, height and width dynamic axes.
        opset: ONNX opset, ``>= 16`` (``grid_sample``).
        batch_size: batch of the example input.

    Raises:
        ExportError: missing packages, an unsupported setting or an exporter failure.
    """
    _require_onnx()
    if opset < MIN_OPSET:
        raise ExportError(f"opset must be >= {MIN_OPSET} (grid_sample), got {opset}")
    h, w = (int(v) for v in image_size)
    if h < 32 or w < 32:
        raise ExportError(f"--image-size must be at least 32 x 32, got {h} x {w}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableDetector(model.cpu(), num_select).eval()
    example = torch.randn(batch_size, 3, h, w)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        dynamic_shapes = {"images": {0: dim("batch", min=1, max=64), 2: dim.AUTO, 3: dim.AUTO}}
    tmp = path.with_name(path.name + ".tmp")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                optimize=True,
            )
        os.replace(tmp, path)
    except DamexError:
        raise
    except Exception as exc:  # the exporter raises many types; name the setting that failed
        raise ExportError(
            f"ONNX export failed (image {h}x{w}, dynamic={dynamic}, opset={opset}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    logger.info("exported %s in %.1f s", path, seconds)
    return ExportReport(
        path, (h, w), dynamic, opset, wrapper.num_select, wrapper.num_moe_layers, seconds
    )


@torch.no_grad()
def reference_outputs(model: nn.Module, images: Tensor, num_select: int) -> dict[str, np.ndarray]:
    """PyTorch eager outputs of the trained model for normalized ``images`` ``[B, 3, H, W]``:
    ``DINO.forward`` (the real MoE layers) + ``PostProcess`` + the routing of every query, in
    the exported graph's output layout (the parity reference)."""
    model = model.eval()
    bsz, _, h, w = images.shape
    raw = images * model.pixel_std + model.pixel_mean  # DINO normalizes inside its forward
    sizes = torch.tensor([[h, w]] * bsz, dtype=torch.long)
    batch = Batch(
        images=raw,
        mask=torch.zeros(bsz, h, w, dtype=torch.bool),
        targets=[],
        dataset_ids=torch.zeros(bsz, dtype=torch.long),
        expert_ids=torch.full((bsz,), -1, dtype=torch.long),
        image_ids=torch.arange(bsz),
        image_sizes=sizes,
        orig_sizes=sizes,
    )
    out = model(batch)
    dets = PostProcess(num_select=num_select)(out.pred, sizes)
    nq = int(out.pred.logits.shape[1])
    experts = [query_routing(out.routing, image_index=b, num_queries=nq)[0] for b in range(bsz)]
    return {
        "boxes": torch.stack([d.boxes for d in dets]).numpy(),
        "scores": torch.stack([d.scores for d in dets]).numpy(),
        "labels": torch.stack([d.labels for d in dets]).numpy(),
        "query": torch.stack([d.query_index for d in dets]).numpy(),
        "experts": torch.stack(experts).numpy(),
    }


def onnx_parity(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    images: Sequence[Tensor],
    num_select: int,
) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime and the model eagerly on each normalized image.

    Detections are compared by (query, label) pair, so two detections whose scores tie and swap
    places do not count as a difference.

    Returns:
        ``{"images", "max_box_diff", "max_score_diff", "expert_mismatches",
        "unmatched_detections"}``.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst_box = worst_score = 0.0
    mismatched = unmatched = 0
    for img in images:
        x = img[None] if img.ndim == 3 else img
        got = dict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), {"images": x.numpy()})))
        ref = reference_outputs(model, x, num_select)
        mismatched += int((got["experts"] != ref["experts"]).sum())
        for b in range(x.shape[0]):
            index = {
                (int(q), int(lab)): i
                for i, (q, lab) in enumerate(zip(ref["query"][b], ref["labels"][b]))
            }
            for i, (q, lab) in enumerate(zip(got["query"][b], got["labels"][b])):
                j = index.get((int(q), int(lab)))
                if j is None:
                    unmatched += 1
                    continue
                worst_box = max(
                    worst_box, float(np.abs(got["boxes"][b, i] - ref["boxes"][b, j]).max())
                )
                worst_score = max(
                    worst_score, float(abs(got["scores"][b, i] - ref["scores"][b, j]))
                )
    return {
        "images": len(images),
        "max_box_diff": worst_box,
        "max_score_diff": worst_score,
        "expert_mismatches": mismatched,
        "unmatched_detections": unmatched,
    }


def normalized_images(
    files: Sequence[str | os.PathLike[str]], image_size: tuple[int, int], model: nn.Module
) -> list[Tensor]:
    """Image files resized to ``image_size`` (bilinear) and normalized as the exported graph
    expects: ``(pixels - model.pixel_mean) / model.pixel_std``, ``[3, H, W]`` each."""
    from PIL import Image

    h, w = image_size
    out = []
    for f in files:
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()
        out.append((x - model.pixel_mean.cpu()) / model.pixel_std.cpu())
    return out


def export_checkpoint(
    cfg: Any,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | None = None,
    dynamic: bool = False,
    opset: int = 18,
    check_images: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """``damex export``: load a checkpoint (via :class:`damex.Predictor`), export, check.

    The check runs the file with onnxruntime on ``check_images`` (an image or a folder;
    default one random input) and compares with PyTorch eager (:func:`onnx_parity`).
    """
    predictor = Predictor.from_checkpoint(checkpoint, config=cfg)
    if image_size is None:
        side = int(cfg.data.test_scale) or max(cfg.data.scales)
        image_size = (side, min(int(cfg.data.max_size), side))
    report = export_onnx(
        predictor.model,
        out,
        image_size=image_size,
        num_select=predictor.postprocess.num_select,
        dynamic=dynamic,
        opset=opset,
    )
    if check_images is not None:
        src = Path(check_images)
        if src.is_dir():
            files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif src.is_file():
            files = [src]
        else:
            raise ExportError(f"--check-images {src} does not exist")
        if not files:
            raise ExportError(f"--check-images {src}: no image ({', '.join(IMAGE_SUFFIXES)})")
        images = normalized_images(files, report.image_size, predictor.model)
    else:
        images = [torch.randn(3, *report.image_size)]
    report.parity = onnx_parity(report.path, predictor.model, images, report.num_select)
    return report


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def benchmark_latency(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    image_size: tuple[int, int],
    *,
    num_select: int,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Median latency (ms, batch 1) of PyTorch eager (``DINO.forward`` + top-K, no grad) and of
    the ONNX file in onnxruntime (CPU provider), measured interleaved in one process."""
    import onnxruntime as ort

    h, w = image_size
    x = torch.randn(1, 3, h, w)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    eager = lambda: reference_outputs(model, x, num_select)  # noqa: E731
    ort_run = lambda: sess.run(None, feed)  # noqa: E731
    for _ in range(warmup):
        eager()
        ort_run()
    eager_ms, ort_ms = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load
        eager_ms.append(_median_ms(eager, 1))
        ort_ms.append(_median_ms(ort_run, 1))
    return {
        "pytorch_ms": float(np.median(eager_ms)),
        "onnxruntime_ms": float(np.median(ort_ms)),
        "threads": float(torch.get_num_threads()),
    }


def bench_main(argv: Sequence[str]) -> int:
    """``tools/benchmark.py onnx``: latency of the exported model beside PyTorch eager."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(
        prog="benchmark.py onnx",
        description="Export a model to ONNX and time it (onnxruntime, CPU) beside PyTorch eager, "
        "batch 1, interleaved; prints a Markdown row. Without --checkpoint the config's model "
        "is randomly initialised (latency does not depend on the weights).",
    )
    p.add_argument("-c", "--config", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--image-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--onnx", default=None, help="time this exported file (default: export now)")
    args = p.parse_args(list(argv))
    cfg = load_config(args.config)
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, config=cfg)
        model, num_select = predictor.model, predictor.postprocess.num_select
    else:
        torch.manual_seed(0)
        model, num_select = build_model(cfg.model, cfg.moe, 20).eval(), cfg.eval.num_select
    side = int(cfg.data.test_scale) or max(cfg.data.scales)
    size = tuple(args.image_size) if args.image_size else (side, min(int(cfg.data.max_size), side))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.onnx) if args.onnx else Path(tmp) / "m.onnx"
        if not args.onnx:
            export_onnx(model, path, image_size=size, num_select=num_select)
        lat = benchmark_latency(model, path, size, num_select=num_select, repeats=args.repeats)
    h, w = size
    print("| model | image | threads | PyTorch eager ms | onnxruntime ms | speed-up |")
    print("|---|---|---|---|---|---|")
    name = Path(args.config).stem if args.config else "damex_small"
    print(
        f"| {name} | {h}x{w} | {int(lat['threads'])} | {lat['pytorch_ms']:.1f} | "
        f"{lat['onnxruntime_ms']:.1f} | {lat['pytorch_ms'] / lat['onnxruntime_ms']:.2f}x |"
    )
    return 0
