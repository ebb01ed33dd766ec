"""Data: the dataset catalog, the unified label space, COCO-JSON datasets, the synthetic benchmark.

The public names below are imported lazily (PEP 562), so ``import damex.data.synthetic`` or
reading the catalog does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from damex.data.catalog import DatasetCatalog, DatasetSpec, build_catalog
    from damex.data.coco import CocoDetection, ImageInfo, load_coco_json, read_categories
    from damex.data.label_space import LabelSpace, build_label_space
    from damex.data.synthetic import (
        SYNTHETIC_DATASETS,
        ensure_benchmark,
        generate_benchmark,
    )

__all__ = [
    "DatasetCatalog",
    "DatasetSpec",
    "build_catalog",
    "LabelSpace",
    "build_label_space",
    "CocoDetection",
    "ImageInfo",
    "load_coco_json",
    "read_categories",
    "SYNTHETIC_DATASETS",
    "generate_benchmark",
    "ensure_benchmark",
]

_WHERE = {
    "DatasetCatalog": "catalog",
    "DatasetSpec": "catalog",
    "build_catalog": "catalog",
    "LabelSpace": "label_space",
    "build_label_space": "label_space",
    "CocoDetection": "coco",
    "ImageInfo": "coco",
    "load_coco_json": "coco",
    "read_categories": "coco",
    "SYNTHETIC_DATASETS": "synthetic",
    "generate_benchmark": "synthetic",
    "ensure_benchmark": "synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"damex.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'damex.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
