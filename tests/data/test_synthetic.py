"""The synthetic benchmark: determinism, the stated statistics, and that everything loads."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from damex.config import DataConfig, SyntheticConfig
from damex.data.catalog import build_catalog
from damex.data.coco import CocoDetection
from damex.data.label_space import build_label_space
from damex.data.synthetic import (
    GENERATOR_VERSION,
    MARKER_FILE,
    SPLITS,
    SYNTHETIC_DATASETS,
    ensure_benchmark,
    generate_benchmark,
    main,
    split_sizes,
)

SCALE = 0.1  # ~110 images: about a second


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn")
    return out, generate_benchmark(out, seed=3, scale=SCALE, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_FILE
    }


def test_same_seed_gives_identical_files(bench: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = bench
    again = generate_benchmark(tmp_path / "a", seed=3, scale=SCALE, progress=False)
    first, second = _files(root), _files(tmp_path / "a")
    assert first.keys() == second.keys() and len(first) > 100
    assert first == second  # byte-identical JSON and image files
    assert again["datasets"] == json.loads((root / MARKER_FILE).read_text())["datasets"]
    other = generate_benchmark(tmp_path / "b", seed=4, scale=SCALE, progress=False)
    assert other["datasets"] != again["datasets"] or _files(tmp_path / "b") != first


def test_output_does_not_depend_on_worker_count(tmp_path: Path) -> None:
    generate_benchmark(tmp_path / "one", seed=1, scale=0.03, progress=False)
    generate_benchmark(tmp_path / "two", seed=1, scale=0.03, progress=False, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_stated_statistics(bench: tuple[Path, dict]) -> None:
    root, summary = bench
    assert len(SYNTHETIC_DATASETS) >= 6
    train = {n: d["splits"]["train"]["images"] for n, d in summary["datasets"].items()}
    assert max(train.values()) >= 10 * min(train.values())
    full = {n: split_sizes(n)["train"] for n in SYNTHETIC_DATASETS}
    assert max(full.values()) == 300 and min(full.values()) == 30
    assert sum(len(c) == 1 for c in SYNTHETIC_DATASETS.values()) >= 2  # faces, lesion
    names = [c for cs in SYNTHETIC_DATASETS.values() for c in cs]
    assert names.count("car") >= 2 and names.count("person") >= 2  # shared across datasets
    counts, sides, shapes = {}, {}, set()
    for name, classes in SYNTHETIC_DATASETS.items():
        for split in SPLITS:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints
                coco = COCO(str(root / name / "annotations" / f"{split}.json"))
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes
            assert len(coco.getImgIds()) == split_sizes(name, SCALE)[split]
            for img in coco.loadImgs(coco.getImgIds()):
                assert max(img["width"], img["height"]) <= 256
                shapes.add((img["width"], img["height"]))
                anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
                assert 1 <= len(anns) <= 12
                counts.setdefault(name, []).append(len(anns))
                for a in anns:
                    x, y, w, h = a["bbox"]
                    assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
                    sides.setdefault(name, []).append(max(w, h))
    assert any(w != h for w, h in shapes)  # non-square images exercise padding
    assert min(sides["syn_aerial"]) >= 8
    assert np.mean(sides["syn_aerial"]) < 0.5 * np.mean(sides["syn_photo"])  # small objects
    assert np.mean(counts["syn_aerial"]) > 2 * np.mean(counts["syn_medical"])  # crowded scenes


def test_real_images_match_the_json_and_domains_differ(bench: tuple[Path, dict]) -> None:
    root, _ = bench
    stats = {}
    for name in SYNTHETIC_DATASETS:
        data = json.loads((root / name / "annotations" / "test.json").read_text())
        img = data["images"][0]
        with Image.open(root / name / "images" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
            if name == "syn_medical":
                assert im.mode == "L"  # grayscale scans
        stats[name] = np.concatenate([arr.mean((0, 1)), arr.std((0, 1))])
    # every pair of domains differs visibly in global colour statistics
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(stats[a] - stats[b]).max() > 8, (a, b)


def test_every_split_loads_through_catalog_and_label_space(bench: tuple[Path, dict]) -> None:
    root, _ = bench
    cfg = DataConfig(synthetic=SyntheticConfig(root=str(root)))
    catalog = build_catalog(cfg)
    names = list(SYNTHETIC_DATASETS)
    ls = build_label_space(catalog, names, policy="disjoint")
    assert ls.num_classes == sum(len(c) for c in SYNTHETIC_DATASETS.values())
    merged = build_label_space(catalog, names, policy="merged")
    assert merged.num_classes < ls.num_classes  # "car" and "person" merge
    for d, name in enumerate(names):
        for split in SPLITS:
            ds = CocoDetection.from_spec(catalog.get(name), split, dataset_id=d, label_space=ls)
            rep = ds.report()
            assert rep["dropped_degenerate"] == rep["clipped"] == rep["skipped"] == 0
        sample = ds[0]
        assert sample.image.shape[0] == 3 and sample.labels.numel() >= 1
        assert set(sample.labels.tolist()) <= set(ls.dataset_slice(d))


def test_ensure_benchmark_generates_once_and_regenerates_stale(tmp_path: Path) -> None:
    cfg = SyntheticConfig(root=str(tmp_path / "syn"), seed=0, scale=0.03)
    root = ensure_benchmark(cfg, progress=False)
    marker = json.loads((root / MARKER_FILE).read_text())
    assert marker["generator_version"] == GENERATOR_VERSION and marker["seed"] == 0
    sentinel = root / "syn_faces" / "images" / "sentinel"
    sentinel.write_text("x")
    assert ensure_benchmark(cfg, progress=False) == root and sentinel.exists()  # reused
    ensure_benchmark(SyntheticConfig(root=cfg.root, seed=1, scale=0.03), progress=False)
    assert not sentinel.exists()  # another seed: regenerated, not silently reused
    assert json.loads((root / MARKER_FILE).read_text())["seed"] == 1
    sentinel.write_text("x")
    stale = json.loads((root / MARKER_FILE).read_text())
    stale["generator_version"] = GENERATOR_VERSION - 1
    (root / MARKER_FILE).write_text(json.dumps(stale))
    ensure_benchmark(SyntheticConfig(root=cfg.root, seed=1, scale=0.03), progress=False)
    assert not sentinel.exists()  # an older generator's output is regenerated too


def test_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "c"), "--scale", "0.02", "--image-size", "128"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image_size"] == 128
    img = json.loads((tmp_path / "c" / "syn_photo" / "annotations" / "train.json").read_text())
    assert max(img["images"][0]["width"], img["images"][0]["height"]) == 128
