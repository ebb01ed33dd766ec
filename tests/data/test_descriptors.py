"""propose_mapping on the built-in benchmark: image statistics recover the domains."""

from __future__ import annotations

from pathlib import Path

import torch

from damex.config import DataConfig, SyntheticConfig
from damex.data.catalog import DatasetSpec, build_catalog
from damex.data.coco import CocoDetection
from damex.data.descriptors import dataset_descriptors, image_descriptor
from damex.data.label_space import build_label_space
from damex.data.synthetic import SYNTHETIC_DATASETS, ensure_benchmark
from damex.moe.mapping import propose_mapping


def test_image_descriptor_values() -> None:
    red = torch.zeros(3, 8, 8, dtype=torch.uint8)
    red[0] = 255
    d = image_descriptor(red, bins=2)
    assert d.shape == (2**3 + 4,)
    assert d[4].item() == 1.0  # (r=1, g=0, b=0) -> bin 4 holds every pixel
    assert torch.allclose(d[8:], torch.tensor([1 / 3, 0.0, 0.0, 0.0]), atol=1e-6)  # flat: no gradient


def test_propose_mapping_pairs_the_halves_of_each_synthetic_dataset(tmp_path: Path) -> None:
    root = ensure_benchmark(
        SyntheticConfig(root=str(tmp_path), scale=0.2, image_size=96), progress=False
    )
    names = list(SYNTHETIC_DATASETS)

    catalog = build_catalog(
        DataConfig(root=str(tmp_path), synthetic=SyntheticConfig(root=str(root)))
    )
    label_space = build_label_space(catalog, names, policy="disjoint")
    features: dict[str, torch.Tensor] = {}
    for d, name in enumerate(names):
        spec: DatasetSpec = catalog.get(name)
        ds = CocoDetection.from_spec(spec, "train", dataset_id=d, label_space=label_space)
        desc = dataset_descriptors(ds, max_images=16)
        half = max(1, len(desc) // 2)
        features[f"{name}/a"] = desc[:half]
        features[f"{name}/b"] = desc[half:]
    mapping = propose_mapping(features, num_experts=len(names), seed=0)
    # 12 pseudo-datasets, 6 experts: each domain's two halves share an expert, domains differ
    assert all(mapping[f"{n}/a"] == mapping[f"{n}/b"] for n in names), mapping
    assert len({mapping[f"{n}/a"] for n in names}) == len(names), mapping
