"""Data: dataset catalog, unified label space, COCO-JSON datasets, the synthetic benchmark."""

from __future__ import annotations

from damex.data.catalog import DatasetCatalog, DatasetSpec, build_catalog
from damex.data.coco import CocoDetection, ImageInfo
from damex.data.coco_json import load_coco_json, read_categories
from damex.data.label_space import LabelSpace, build_label_space
from damex.data.synthetic import SYNTHETIC_DATASETS, ensure_benchmark, generate_benchmark

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
