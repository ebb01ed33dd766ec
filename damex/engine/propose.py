"""A dataset -> expert map from the data: ``damex propose-map`` and ``moe.expert_map: auto``.

Every training dataset is summarised by the mean of per-image descriptors of up to
``images_per_dataset`` training images, and the datasets are grouped into ``E`` clusters by
:func:`damex.moe.mapping.propose_mapping` (Ward + seeded k-means restarts, lowest
within-cluster sum of squares). Descriptors:

* no model (``moe.expert_map: auto`` before training, or ``propose-map`` without
  ``--checkpoint``): :func:`damex.data.descriptors.image_descriptor`, a joint RGB histogram plus
  gray-level and gradient statistics of a 64x64 thumbnail — what a domain looks like (palette,
  texture, rendering), which is what separates the paper's sources (clipart vs photos vs
  aerial vs medical);
* a trained model (``--checkpoint``): its backbone's last feature map, mean-pooled.

When it groups datasets: only when there are more datasets than experts (with ``D <= E`` every
dataset gets its own expert). Then the datasets whose descriptors are closest share an expert
— e.g. two photo datasets before a photo and a clipart dataset — since an expert serving
look-alike inputs is asked for one transformation instead of two.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from damex.config import Config, config_from_dict, config_to_dict
from damex.data.catalog import DatasetCatalog, build_catalog
from damex.data.descriptors import image_descriptor
from damex.engine.run_data import _ensure_synthetic, _is_synthetic
from damex.errors import ConfigError, DatasetError
from damex.moe.mapping import propose_mapping
from damex.predictor import Predictor, load_image

__all__ = ["MapProposal", "dataset_features", "propose_expert_map", "resolve_auto_expert_map"]

logger = logging.getLogger(__name__)


@dataclass
class MapProposal:
    """A proposed map and the statistics behind it.

    Attributes:
        mapping: dataset name -> expert id.
        num_experts: ``E``.
        source: ``"appearance descriptors"`` or ``"backbone features of <checkpoint>"``.
        images: images used per dataset.
        centroids: dataset name -> mean descriptor ``[F]``.
        stats: dataset name -> a few readable statistics.
    """

    mapping: dict[str, int]
    num_experts: int
    source: str
    images: dict[str, int]
    centroids: dict[str, Tensor]
    stats: dict[str, dict[str, float]]

    def clusters(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name, e in self.mapping.items():
            out.setdefault(e, []).append(name)
        return dict(sorted(out.items()))

    def distances(self) -> tuple[list[str], Tensor]:
        """Euclidean distances between the dataset centroids, ``[D, D]``."""
        names = list(self.centroids)
        c = torch.stack([self.centroids[n] for n in names]).double()
        return names, torch.cdist(c, c)

    def report(self) -> str:
        lines = [
            f"dataset -> expert proposal from {self.source} ({self.num_experts} experts)",
            "",
            "| dataset | images | " + " | ".join(next(iter(self.stats.values()), {})) + " |",
        ]
        keys = list(next(iter(self.stats.values()), {}))
        lines.append("|---|---|" + "---|" * len(keys))
        for name, st in self.stats.items():
            vals = " | ".join(f"{st[k]:.3f}" for k in keys)
            lines.append(f"| {name} | {self.images[name]} | {vals} |")
        names, dist = self.distances()
        lines += ["", "distances between dataset centroids:", "", "| | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---|" * len(names))
        for i, n in enumerate(names):
            lines.append(f"| {n} | " + " | ".join(f"{float(v):.3f}" for v in dist[i]) + " |")
        lines += ["", "clusters:"]
        for e, members in self.clusters().items():
            lines.append(f"  expert {e}: {', '.join(members)}")
        unused = sorted(set(range(self.num_experts)) - set(self.mapping.values()))
        if unused:
            lines.append(f"  unused experts: {unused} (fewer datasets than experts)")
        return "\n".join(lines)

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            {"moe": {"num_experts": self.num_experts, "expert_map": dict(self.mapping)}},
            sort_keys=False,
        )


def _train_images(catalog: DatasetCatalog, name: str, split: str, limit: int) -> list[Path]:
    spec = catalog.get(name)
    if split not in spec.splits:
        raise DatasetError(f"dataset {name!r} has no {split!r} split (has {list(spec.splits)})")
    path = Path(spec.splits[split])
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the annotations ({exc})") from None
    images = gt.get("images") or []
    if not images:
        raise DatasetError(f"{path}: no images to describe dataset {name!r}")
    root = Path(spec.image_root)
    return [root / im["file_name"] for im in images[:limit]]


def dataset_features(
    cfg: Config,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    images_per_dataset: int = 32,
    catalog: DatasetCatalog | None = None,
) -> tuple[dict[str, Tensor], str]:
    """``[N_d, F]`` descriptors of the first training images of every ``data.train`` dataset.

    Returns:
        The features by dataset name and a description of their source.
    """
    if images_per_dataset < 1:
        raise ConfigError(f"--images must be >= 1, got {images_per_dataset}")
    catalog = catalog or build_catalog(cfg.data)
    files = {
        n: _train_images(catalog, n, cfg.data.train_split, images_per_dataset)
        for n in cfg.data.train
    }
    if checkpoint is None:
        feats = {
            n: torch.stack([image_descriptor(load_image(f)) for f in fs]) for n, fs in files.items()
        }
        return feats, "appearance descriptors (RGB histogram + gray/gradient statistics)"
    predictor = Predictor.from_checkpoint(checkpoint)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, fs in files.items():
            rows = []
            for f in fs:
                batch = predictor._batch([load_image(f)])
                maps = predictor.model.backbone(
                    (batch.images - predictor.model.pixel_mean) / predictor.model.pixel_std,
                    batch.mask,
                )
                rows.append(maps[-1].mean(dim=(2, 3))[0].cpu())  # [C]
            out[name] = torch.stack(rows)
    return out, f"backbone features of {checkpoint}"


def propose_expert_map(
    cfg: Config,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    num_experts: int | None = None,
    images_per_dataset: int = 32,
    catalog: DatasetCatalog | None = None,
) -> MapProposal:
    """Propose ``moe.expert_map`` for the config's training datasets (see the module doc)."""
    e = int(num_experts if num_experts is not None else cfg.moe.num_experts)
    if e < 1:
        raise ConfigError(f"--num-experts must be >= 1, got {e}")
    if not cfg.data.train:
        raise ConfigError("propose-map: data.train names no dataset")
    feats, source = dataset_features(
        cfg, checkpoint=checkpoint, images_per_dataset=images_per_dataset, catalog=catalog
    )
    mapping = propose_mapping(feats, e, seed=cfg.train.seed)
    stats: dict[str, dict[str, float]] = {}
    for name, f in feats.items():
        f = f.double()
        if checkpoint is None:  # the last 4 descriptor entries: gray mean/std, gradient mean/std
            g = f[:, -4:].mean(0)
            stats[name] = {
                "gray mean": float(g[0]),
                "gray std": float(g[1]),
                "gradient mean": float(g[2]),
                "gradient std": float(g[3]),
            }
        else:
            stats[name] = {
                "feature norm": float(f.mean(0).norm()),
                "spread (mean std)": float(f.std(0).mean()) if f.shape[0] > 1 else 0.0,
            }
    return MapProposal(
        mapping=mapping,
        num_experts=e,
        source=source,
        images={n: int(f.shape[0]) for n, f in feats.items()},
        centroids={n: f.double().mean(0) for n, f in feats.items()},
        stats=stats,
    )


def resolve_auto_expert_map(cfg: Config, catalog: DatasetCatalog | None = None) -> Config:
    """``cfg`` with ``moe.expert_map: auto`` replaced by :func:`propose_expert_map`'s map.

    Called once at the start of training; the resolved map is logged, written to the run's
    ``config.yaml`` and saved in every checkpoint. Deterministic for a config (seeded by
    ``train.seed``), so a resume resolves it to the same map. Any other config is returned as is.
    """
    if not (isinstance(cfg.moe.expert_map, str) and cfg.moe.expert_map == "auto"):
        return cfg
    catalog = catalog or build_catalog(cfg.data)
    if any(_is_synthetic(catalog, n, cfg) for n in cfg.data.train):
        _ensure_synthetic(cfg)  # the built-in benchmark is generated on first use
    proposal = propose_expert_map(cfg, catalog=catalog)
    logger.info("moe.expert_map: auto ->\n%s", proposal.report())
    data = config_to_dict(cfg)
    data["moe"]["expert_map"] = dict(proposal.mapping)
    return config_from_dict(data, source="moe.expert_map: auto")
