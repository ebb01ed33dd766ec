"""The domain-conflict benchmark: same shapes, disjoint label blocks, distinct styles, loadable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from damex.cli import main as cli_main
from damex.config import load_config
from damex.data.catalog import build_catalog
from damex.data.label_space import build_label_space
from damex.data.loader import build_test_loaders, build_train_loader
from damex.data.synthetic import SPLITS, SYNTHETIC_DATASETS
from damex.data.synthetic_alt import ALT_DATASETS
from damex.data.synthetic_conflict import (
    CONFLICT_DATASETS,
    CONFLICT_SHAPES,
    _layout,
    _render,
    conflict_groups,
    conflict_split_sizes,
    ensure_conflict_benchmark,
    generate_conflict_benchmark,
)

REPO = Path(__file__).resolve().parents[2]
SCALE, SIZE = 0.05, 96  # 3-8 images per split, 96 px: the whole benchmark in ~1 s


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("conflict") / "synthetic_conflict"
    return root, generate_conflict_benchmark(root, seed=3, scale=SCALE, image_size=SIZE)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".damex_synthetic_conflict.json"
    }


def test_same_seed_same_bytes_other_seed_other_images(bench, tmp_path: Path) -> None:
    root, summary = bench
    again = generate_conflict_benchmark(tmp_path / "b", seed=3, scale=SCALE, image_size=SIZE)
    assert again["datasets"] == summary["datasets"]
    first, second = _files(root), _files(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) > 3 * len(SPLITS)
    assert all(first[k] == second[k] for k in first)
    other = _files(Path(ensure_conflict_benchmark(tmp_path / "c", seed=4, scale=SCALE,
                                                  image_size=SIZE)))  # fmt: skip
    pngs = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != other[k] for k in pngs) == len(pngs)


def test_coco_json_loads_with_pycocotools_and_boxes_are_valid(bench) -> None:
    root, summary = bench
    for name, classes in CONFLICT_DATASETS.items():
        for split, n in conflict_split_sizes(name, SCALE).items():
            coco = COCO(str(root / name / "annotations" / f"{split}.json"))
            assert len(coco.getImgIds()) == n == summary["datasets"][name][split]["images"]
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes
            assert len(coco.getAnnIds()) == summary["datasets"][name][split]["boxes"]
            for ann in coco.loadAnns(coco.getAnnIds()):
                img = coco.imgs[ann["image_id"]]
                x, y, w, h = ann["bbox"]
                assert w >= 3 and h >= 3 and x >= 0 and y >= 0
                assert x + w <= img["width"] and y + h <= img["height"]
                assert 1 <= ann["category_id"] <= len(classes)
            img = coco.imgs[coco.getImgIds()[0]]
            pixels = np.asarray(Image.open(root / name / "images" / img["file_name"]))
            assert pixels.shape == (img["height"], img["width"], 3)
        assert sum(s["boxes"] for s in summary["datasets"][name].values()) > 0


def test_conflicting_datasets_share_shapes_under_disjoint_labels() -> None:
    assert conflict_groups() == [["conf_paint", "conf_sketch"]]
    paint, sketch = CONFLICT_DATASETS["conf_paint"], CONFLICT_DATASETS["conf_sketch"]
    assert CONFLICT_SHAPES["conf_paint"] == CONFLICT_SHAPES["conf_sketch"]
    assert not set(paint) & set(sketch)
    # the control draws shapes of its own
    assert not set(CONFLICT_SHAPES["conf_neon"]) & set(CONFLICT_SHAPES["conf_paint"])
    names = [c for cs in CONFLICT_DATASETS.values() for c in cs]
    assert len(names) == len(set(names))  # disjoint under the merged label policy too
    assert not set(CONFLICT_DATASETS) & (set(SYNTHETIC_DATASETS) | set(ALT_DATASETS))
    assert conflict_split_sizes("conf_paint") == conflict_split_sizes("conf_sketch")

    # one layout generator: the same layout draw gives the same objects in both datasets,
    # rendered in different styles: same classes, same boxes (+- the stroke), other pixels
    for i in range(4):
        a_img, a_obj = _render("conf_paint", _rng(i, 0), _rng(i, 1), 128)
        b_img, b_obj = _render("conf_sketch", _rng(i, 0), _rng(i, 2), 128)
        assert [c for c, _ in a_obj] == [c for c, _ in b_obj] and a_obj
        for (_, a), (_, b) in zip(a_obj, b_obj):
            assert _iou(a, b) > 0.75, (a, b)
        assert np.abs(a_img.astype(int) - b_img.astype(int)).mean() > 50
    assert _layout(_rng(0, 0), 3, 128, 96, 0.5) == _layout(_rng(0, 0), 3, 128, 96, 0.5)


def test_styles_differ_in_brightness_and_colour() -> None:
    stats = {}
    for name in CONFLICT_DATASETS:
        images = [_render(name, _rng(i, 0), _rng(i, 1), 128)[0] for i in range(4)]
        arr = np.stack(images).astype(np.float32)  # [4, H, W, 3]
        stats[name] = (arr.mean(), arr.std(axis=-1).mean())  # brightness, colourfulness
    (paint, paint_col), (sketch, sketch_col), (neon, _) = (
        stats[n] for n in ("conf_paint", "conf_sketch", "conf_neon")
    )
    assert sketch > 215 and 70 < paint < 190 and neon < 60, stats
    assert sketch - paint > 50 and paint - neon > 50, stats
    assert sketch_col == 0.0 and paint_col > 10, stats  # pencil on paper is gray


def test_splits_are_disjoint(bench) -> None:
    root, _ = bench
    for name in CONFLICT_DATASETS:
        seen: dict[str, str] = {}
        for split in SPLITS:
            coco = json.loads((root / name / "annotations" / f"{split}.json").read_text())
            for img in coco["images"]:
                assert img["file_name"].startswith(f"{split}_")
                digest = hashlib.sha1((root / name / "images" / img["file_name"]).read_bytes())
                assert seen.setdefault(digest.hexdigest(), split) == split


def test_config_resolves_and_its_loaders_build(bench) -> None:
    root, _ = bench
    cfg = load_config(
        REPO / "configs" / "synthetic_conflict" / "damex_small.yaml",
        [f"data.root={root.parent}", "data.num_workers=0", "train.batch_size=3",
         "data.scales=[64]", "data.max_size=96", "data.test_scale=64"],
    )  # fmt: skip
    names = list(CONFLICT_DATASETS)
    assert cfg.data.train == names and cfg.moe.num_experts == len(names)
    assert dict(cfg.moe.expert_map) == {n: i for i, n in enumerate(names)}
    catalog = build_catalog(cfg.data)
    assert catalog["conf_sketch"].ann_file("val") == root / "conf_sketch/annotations/val.json"
    label_space = build_label_space(catalog, names)
    experts = torch.tensor([cfg.moe.expert_map[n] for n in names])
    loader, sampler, datasets = build_train_loader(cfg, catalog, label_space, experts)
    assert [len(d) for d in datasets] == [conflict_split_sizes(n, SCALE)["train"] for n in names]
    sampler.set_epoch(0)
    batch = next(iter(loader))
    assert len(batch) == 3 and torch.equal(batch.expert_ids, experts[batch.dataset_ids])
    for i, t in enumerate(batch.targets):
        assert set(t.labels.tolist()) <= set(label_space.dataset_slice(int(batch.dataset_ids[i])))
    tests = build_test_loaders(cfg, catalog, label_space)
    assert list(tests) == names


def test_cli_make_synthetic_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = ["make-synthetic", "--conflict", "--out", str(out), "--scale", "0.01"]
    assert cli_main([*args, "--image-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["datasets"].keys() == CONFLICT_DATASETS.keys()
    assert (out / "conf_neon" / "annotations" / "test.json").is_file()


def _rng(i: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([11, i, stream])


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area
