"""Inference for users who embed a trained model: :class:`Predictor`.

``Predictor.from_run(run_dir)`` loads what a training run saved beside its weights — the
resolved ``config.yaml``, the checkpoint's label space and dataset -> expert map — and needs no
dataset on disk. ``predictor(image)`` accepts a file path, a PIL image, a numpy ``[H, W, 3]``
array or a ``[3, H, W]`` tensor and returns :class:`NativeDetections`: boxes in pixels of the
given image, scores, and labels in each dataset's **own** vocabulary (class name, native category
id, dataset name), plus the explanation of every detection (per MoE layer: the expert its query
was routed to, that expert's gate probability and the datasets mapped to it)::

    from damex import Predictor
    predictor = Predictor.from_run("runs/synthetic_damex_small")
    det = predictor("data/synthetic/syn_signs/images/test/000000.png")
    for record in det.records()[:3]:
        print(record["dataset"], record["label"], round(record["score"], 2), record["experts"])

Inference never sees a dataset id (docs/design.md §10): the label's dataset is the one that owns the
predicted slot of the unified label space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor, nn

from damex.config import Config, config_from_dict, load_config
from damex.data.label_space import LabelSpace
from damex.data.loader import collate
from damex.data.transforms import build_transforms
from damex.engine import checkpoint as ckpt
from damex.engine.distributed import resolve_device
from damex.errors import CheckpointError, ConfigError
from damex.modeling import build_model
from damex.modeling.outputs import TokenKind
from damex.modeling.postprocess import PostProcess, dataset_label_matrix, router_masked_detections
from damex.moe.types import RoutingInfo
from damex.structures import Batch, Detections, Sample

__all__ = [
    "ImageInput",
    "NativeDetections",
    "Predictor",
    "SlotInfo",
    "load_image",
    "moe_layer_names",
    "query_routing",
]

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | np.ndarray | Tensor | PILImage.Image

_CHECKPOINT_NAMES = ("best.pth", "last.pth")


def load_image(image: ImageInput) -> Tensor:
    """Any accepted image as an RGB ``uint8`` ``[3, H, W]`` tensor (a copy).

    Accepted: a path to an image file; a PIL image (any mode, converted to RGB); a numpy
    ``[H, W, 3]`` or ``[H, W]`` (gray) array, ``uint8`` in ``[0, 255]`` or float in ``[0, 1]``;
    a ``[3, H, W]`` tensor, ``uint8`` or float in ``[0, 1]`` (torchvision's convention).

    Raises:
        ValueError: an unsupported type, shape or value range, naming what was found.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        with PILImage.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if isinstance(image, PILImage.Image):
        arr = np.array(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"numpy image must be [H, W, 3] (RGB) or [H, W], got {arr.shape}")
        chw = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable copy
        return _to_uint8(chw, "numpy image")
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor image must be [3, H, W] (RGB), got {tuple(image.shape)}")
        return _to_uint8(image.detach().cpu(), "tensor image")
    raise ValueError(
        "image must be a file path, a PIL image, a numpy [H, W, 3] array or a [3, H, W] tensor, "
        f"got {type(image).__name__}"
    )


def _to_uint8(chw: Tensor, what: str) -> Tensor:
    if chw.dtype == torch.uint8:
        return chw.contiguous().clone()
    if not chw.dtype.is_floating_point:
        raise ValueError(f"{what} must be uint8 or float in [0, 1], got dtype {chw.dtype}")
    lo, hi = float(chw.min()), float(chw.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what}: float images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
            "pass uint8 for [0, 255] pixels"
        )
    return (chw.float() * 255.0).round().to(torch.uint8).contiguous()


@dataclass(frozen=True)
class SlotInfo:
    """What a unified label slot means to a user.

    Attributes:
        dataset: the dataset owning the slot (``"a+b"`` when datasets share it: merged labels).
        category_id: its native category id in that dataset's JSON (-1 if unused).
        name: its class name in that dataset.
    """

    dataset: str
    category_id: int
    name: str


def slot_table(label_space: LabelSpace) -> list[SlotInfo]:
    """:class:`SlotInfo` of every unified label of ``label_space``."""
    cat_names: list[dict[int, str]] = [
        {int(c["id"]): str(c["name"]) for c in label_space.categories(d)}
        for d in range(label_space.num_datasets)
    ]
    out = []
    for slot in range(label_space.num_classes):
        owners = label_space.to_native(slot)  # [(dataset_id, native_id)]
        if not owners:
            out.append(SlotInfo("", -1, f"unused_{slot}"))
            continue
        d0, c0 = owners[0]
        datasets = "+".join(label_space.dataset_names[d] for d, _ in owners)
        out.append(SlotInfo(datasets, int(c0), cat_names[d0].get(int(c0), str(c0))))
    return out


def moe_layer_names(cfg: Config) -> list[str]:
    """Names of the MoE layers, ``decoder.<i>``, in layer order (one ``RoutingInfo`` each)."""
    return [f"decoder.{i}" for i, kind in enumerate(cfg.model.decoder_ffn) if kind == "moe"]


def query_routing(
    routing: Sequence[RoutingInfo], *, image_index: int, num_queries: int
) -> tuple[Tensor, Tensor]:
    """Top-1 expert and its gate for every matching query of one image, per MoE layer.

    Returns:
        ``int64 [Q, L]`` experts (-1 where a layer holds no token of the query) and
        ``float32 [Q, L]`` gate probabilities (0 there).
    """
    experts = torch.full((num_queries, len(routing)), -1, dtype=torch.long)
    gates = torch.zeros(num_queries, len(routing), dtype=torch.float32)
    for layer, info in enumerate(routing):
        if info.token_query is None:
            raise ValueError("RoutingInfo.token_query is None: the detector must tag its tokens")
        sel = info.token_image == image_index
        if info.token_kind is not None:
            sel &= info.token_kind == int(TokenKind.MATCHING)
        sel &= (info.token_query >= 0) & (info.token_query < num_queries)
        q = info.token_query[sel].cpu().long()
        experts[q, layer] = info.expert[sel, 0].cpu().long()
        gates[q, layer] = info.gate[sel, 0].detach().cpu().float()
    return experts, gates


@dataclass
class NativeDetections(Detections):
    """:class:`~damex.structures.Detections` of one image with labels in native terms.

    ``boxes`` are ``xyxy`` pixels of the image as given; ``labels`` stay unified indices.

    Attributes:
        category_ids: ``int64 [N]`` native category id of each label in its dataset.
        names: class name of each detection in its dataset's own vocabulary.
        datasets: the dataset each label belongs to.
        experts: ``int64 [N, L]`` per MoE layer, the top-1 expert of the detection's query.
        gates: ``float32 [N, L]`` that expert's gate (softmax) probability.
        layer_names: the ``L`` MoE layers (``decoder.<i>``).
        expert_datasets: expert id -> the datasets mapped to it (the run's expert map).
        image_size: ``(height, width)`` of the image as given.
    """

    category_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    names: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    experts: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    gates: Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    layer_names: list[str] = field(default_factory=list)
    expert_datasets: dict[int, list[str]] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)

    def to(self, device: torch.device | str) -> NativeDetections:
        return NativeDetections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            self.query_index.to(device),
            self.category_ids.to(device),
            list(self.names),
            list(self.datasets),
            self.experts.to(device),
            self.gates.to(device),
            list(self.layer_names),
            dict(self.expert_datasets),
            self.image_size,
        )

    def select(self, index: Tensor) -> NativeDetections:
        """The detections at ``index`` (``int64`` indices or a ``bool [N]`` mask), in order."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().cpu()
        keep = idx.tolist()
        return NativeDetections(
            self.boxes[idx],
            self.scores[idx],
            self.labels[idx],
            self.query_index[idx] if self.query_index.numel() else self.query_index,
            self.category_ids[idx],
            [self.names[i] for i in keep],
            [self.datasets[i] for i in keep],
            self.experts[idx],
            self.gates[idx],
            list(self.layer_names),
            dict(self.expert_datasets),
            self.image_size,
        )

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per detection (best first).

        Keys: ``box`` ``[x1, y1, x2, y2]`` pixels, ``score``, ``label`` (native class name),
        ``category_id`` (native id), ``dataset``, ``label_index`` (unified), ``query``, and
        ``experts``: per MoE layer ``{"layer", "expert", "gate", "datasets"}``.
        """
        out = []
        boxes = self.boxes.tolist()
        scores = self.scores.tolist()
        for i in range(len(self)):
            experts = []
            for j, layer in enumerate(self.layer_names):
                e = int(self.experts[i, j])
                experts.append(
                    {
                        "layer": layer,
                        "expert": e,
                        "gate": round(float(self.gates[i, j]), 6),
                        "datasets": list(self.expert_datasets.get(e, [])),
                    }
                )
            out.append(
                {
                    "box": [round(float(v), 2) for v in boxes[i]],
                    "score": round(float(scores[i]), 6),
                    "label": self.names[i],
                    "category_id": int(self.category_ids[i]),
                    "dataset": self.datasets[i],
                    "label_index": int(self.labels[i]),
                    "query": int(self.query_index[i]) if self.query_index.numel() else -1,
                    "experts": experts,
                }
            )
        return out


def _find_checkpoint(run_dir: Path, checkpoint: str | os.PathLike[str] | None) -> Path:
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path if path.is_absolute() or path.exists() else run_dir / path
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    for name in _CHECKPOINT_NAMES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(
        f"run folder {run_dir} has no checkpoint ({' or '.join(_CHECKPOINT_NAMES)})"
    )


def _config_of(
    state: Mapping[str, Any], config: Config | str | os.PathLike[str] | None, where: Path
) -> Config:
    if isinstance(config, Config):
        return config
    if config is not None:
        return load_config(config)
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        raise CheckpointError(
            f"{where} holds no config; pass the training config (config=... / -c CONFIG)"
        )
    return config_from_dict(saved, source=f"{where} (saved config)")


class Predictor:
    """A trained detector for arbitrary images (single process, eval mode, no grad).

    Build it with :meth:`from_run` or :meth:`from_checkpoint`.

    Args:
        model: the detector with its weights loaded.
        cfg: the run config (test resize, ``eval.num_select``, MoE layers).
        label_space: the checkpoint's label space.
        expert_map: dataset name -> expert id (the run's map; -1: no expert).
        device: where the model runs.
        num_select: detections kept per image (default ``cfg.eval.num_select``).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        label_space: LabelSpace,
        expert_map: Mapping[str, int],
        *,
        device: torch.device | str = "cpu",
        num_select: int | None = None,
        label_mask: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.label_space = label_space
        self.expert_map = {str(k): int(v) for k, v in expert_map.items()}
        self.device = torch.device(device)
        self.postprocess = PostProcess(num_select=int(num_select or cfg.eval.num_select))
        self.transform = build_transforms(cfg.data, None, train=False)
        self.layer_names = moe_layer_names(cfg)
        self.slots = slot_table(label_space)
        self.expert_datasets: dict[int, list[str]] = {}
        for name, e in self.expert_map.items():
            if e >= 0:
                self.expert_datasets.setdefault(e, []).append(name)
        self.label_mask = label_mask or cfg.eval.label_mask
        self._router_mask: tuple[Tensor, Tensor] | None = None
        if self.label_mask == "router":
            experts = [self.expert_map.get(n, -1) for n in label_space.dataset_names]
            if not cfg.uses_moe or min(experts) < 0:
                raise ConfigError(
                    "label_mask='router' needs MoE layers and an expert for every dataset "
                    f"(expert map: {self.expert_map})"
                )
            self._router_mask = (torch.tensor(experts), dataset_label_matrix(label_space))
        elif self.label_mask != "none":
            raise ConfigError(f"label_mask must be 'none' or 'router', got {self.label_mask!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        use_ema: bool = True,
        num_select: int | None = None,
        label_mask: str | None = None,
    ) -> Predictor:
        """Load a run folder written by ``damex train`` (or ``damex extend``).

        Args:
            run_dir: the folder with ``config.yaml`` and ``best.pth`` / ``last.pth``.
            checkpoint: a checkpoint file (absolute, or relative to ``run_dir``); default
                ``best.pth``, else ``last.pth``.
            device: default ``cpu``.
            use_ema: use the EMA weights when the checkpoint has them (as evaluation does).
            num_select: detections per image (default: the run's ``eval.num_select``).
            label_mask: ``"router"``: each image keeps only the labels of the dataset(s) its
                router votes for (default: the run's ``eval.label_mask``).

        Raises:
            CheckpointError: no checkpoint, or weights that do not fit the config.
        """
        run = Path(run_dir)
        if not run.is_dir():
            raise CheckpointError(f"run folder {run} does not exist")
        path = _find_checkpoint(run, checkpoint)
        config_file = run / "config.yaml"
        return cls.from_checkpoint(
            path,
            config=config_file if config_file.is_file() else None,
            device=device,
            use_ema=use_ema,
            num_select=num_select,
            label_mask=label_mask,
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str],
        config: Config | str | os.PathLike[str] | None = None,
        *,
        device: torch.device | str | None = None,
        use_ema: bool = True,
        num_select: int | None = None,
        label_mask: str | None = None,
    ) -> Predictor:
        """Load a checkpoint with a config (default: the config saved in the checkpoint).

        The label space and the expert map always come from the checkpoint (the head and the
        router were trained for them); ``config`` gives the architecture and the test resize.
        """
        path = Path(checkpoint)
        state = ckpt.load_checkpoint(path, required_keys=("model", "label_space"))
        cfg = _config_of(state, config, path)
        label_space = LabelSpace.from_state_dict(state["label_space"])
        expert_map = state.get("expert_map")
        if not isinstance(expert_map, Mapping):
            expert_map = {k: int(v) for k, v in dict(cfg.moe.expert_map or {}).items()}
        model_cfg = cfg.model
        if model_cfg.backbone.weights:  # the checkpoint holds the trained backbone
            from dataclasses import replace

            model_cfg = replace(model_cfg, backbone=replace(model_cfg.backbone, weights=None))
        moe_cfg = cfg.moe
        saved_experts = _saved_num_experts(state)
        if saved_experts is not None and saved_experts != moe_cfg.num_experts:
            raise ConfigError(
                f"{path}: the checkpoint's MoE layers have {saved_experts} experts but the "
                f"config says moe.num_experts={moe_cfg.num_experts}"
            )
        model = build_model(model_cfg, moe_cfg, label_space.num_classes)
        weights = state["model"]
        if use_ema and state.get("ema"):
            weights = state["ema"]["module"]
        ckpt.load_model_state(model, weights, path=path)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if str(device) == "auto":
            dev = resolve_device("auto")
        model.to(dev)
        logger.info("predictor: %s (%d classes, map %s)", path, label_space.num_classes, expert_map)
        return cls(
            model,
            cfg,
            label_space,
            expert_map,
            device=dev,
            num_select=num_select,
            label_mask=label_mask,
        )

    # ------------------------------------------------------------------ inference
    def __call__(self, image: ImageInput) -> NativeDetections:
        """Detect objects in one image (see :func:`load_image` for the accepted inputs)."""
        return self.batch([image])[0]

    @torch.no_grad()
    def batch(self, images: Sequence[ImageInput], batch_size: int = 4) -> list[NativeDetections]:
        """Detect objects in several images (padded together ``batch_size`` at a time).

        Padding follows the evaluation loader; scores may differ from one-at-a-time calls by
        float rounding only.
        """
        if isinstance(images, (str, os.PathLike, np.ndarray, Tensor)):
            raise ValueError("Predictor.batch takes a list of images; call predictor(image)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[NativeDetections] = []
        items = list(images)
        for start in range(0, len(items), batch_size):
            chunk = [load_image(im) for im in items[start : start + batch_size]]
            out.extend(self._run(chunk))
        return out

    @torch.no_grad()
    def routing_counts(self, images: Sequence[ImageInput], batch_size: int = 4) -> Tensor:
        """How often each expert is the top-1 choice of a matching query, per MoE layer.

        Returns:
            ``int64 [L, E]`` over all matching queries of ``images`` (``[0, 0]`` without MoE).
        """
        num_experts = int(self.cfg.moe.num_experts) if self.layer_names else 0
        counts = torch.zeros(len(self.layer_names), num_experts, dtype=torch.long)
        items = list(images)
        for start in range(0, len(items), batch_size):
            chunk = [load_image(im) for im in items[start : start + batch_size]]
            out = self.model(self._batch(chunk))
            nq = int(out.pred.logits.shape[1])
            for b in range(len(chunk)):
                experts, _ = query_routing(out.routing, image_index=b, num_queries=nq)
                for layer in range(experts.shape[1]):
                    e = experts[:, layer]
                    counts[layer] += torch.bincount(e[e >= 0], minlength=num_experts)
        return counts

    def _batch(self, images: list[Tensor]) -> Batch:
        samples = []
        for i, img in enumerate(images):
            h, w = int(img.shape[1]), int(img.shape[2])
            sample = Sample(
                image=img,
                boxes=torch.zeros(0, 4),
                labels=torch.zeros(0, dtype=torch.long),
                dataset_id=0,  # unused at inference: routing never sees the dataset
                image_id=i,
                orig_size=(h, w),
            )
            samples.append(self.transform(sample))
        return collate(samples).to(self.device)

    def _run(self, images: list[Tensor]) -> list[NativeDetections]:
        batch = self._batch(images)
        out = self.model(batch)
        if self._router_mask is not None:  # each image: its router's dataset(s)' labels only
            experts, labels = self._router_mask
            dets = router_masked_detections(
                out,
                batch.orig_sizes,
                num_select=self.postprocess.num_select,
                expert_of_dataset=experts,
                dataset_labels=labels,
            )
        else:
            dets = self.postprocess(out.pred, batch.orig_sizes)
        num_queries = int(out.pred.logits.shape[1])
        results = []
        for b, det in enumerate(dets):
            det = det.to("cpu")
            if out.routing:
                experts, gates = query_routing(out.routing, image_index=b, num_queries=num_queries)
            else:
                experts = torch.zeros(num_queries, 0, dtype=torch.long)
                gates = torch.zeros(num_queries, 0)
            h, w = (int(v) for v in batch.orig_sizes[b].tolist())
            results.append(self._native(det, experts, gates, (h, w)))
        return results

    def _native(
        self, det: Detections, experts: Tensor, gates: Tensor, size: tuple[int, int]
    ) -> NativeDetections:
        slots = [self.slots[int(lab)] for lab in det.labels.tolist()]
        q = det.query_index.long()
        return NativeDetections(
            boxes=det.boxes.float(),
            scores=det.scores.float(),
            labels=det.labels.long(),
            query_index=q,
            category_ids=torch.tensor([s.category_id for s in slots], dtype=torch.long),
            names=[s.name for s in slots],
            datasets=[s.dataset for s in slots],
            experts=experts[q],
            gates=gates[q],
            layer_names=list(self.layer_names),
            expert_datasets={e: list(v) for e, v in self.expert_datasets.items()},
            image_size=size,
        )


def _saved_num_experts(state: Mapping[str, Any]) -> int | None:
    """Rows of the first router weight in the checkpoint's model weights (None: no MoE)."""
    weights = state.get("model")
    if not isinstance(weights, Mapping):
        return None
    for key, value in weights.items():
        if key.endswith("router.weight") and isinstance(value, Tensor):
            return int(value.shape[0])
    return None
