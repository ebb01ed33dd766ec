"""Dataset catalog: built-in UODB and synthetic entries, config overrides, lookup errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from damex.config import DataConfig, DatasetEntry, SyntheticConfig, config_from_dict
from damex.data.catalog import DatasetCatalog, DatasetSpec, build_catalog, uodb_train_scales
from damex.data.synthetic import SPLITS, SYNTHETIC_DATASETS
from damex.data.synthetic_alt import ALT_DATASETS
from damex.data.synthetic_conflict import CONFLICT_DATASETS
from damex.data.uodb import UODB_CLASSES, UODB_DATASETS, UODB_TEST_SCALES
from damex.errors import ConfigError, DatasetError


def _cfg(tmp_path: Path, **datasets: DatasetEntry) -> DataConfig:
    return DataConfig(
        root=str(tmp_path / "data"),
        synthetic=SyntheticConfig(root=str(tmp_path / "syn")),
        datasets=dict(datasets),
    )


def test_builtin_uodb_entries(tmp_path: Path) -> None:
    cat = build_catalog(_cfg(tmp_path))
    assert cat.names()[:12] == UODB_DATASETS
    root = tmp_path / "data" / "uodb"
    for name in UODB_DATASETS:
        spec = cat.get(name)
        assert spec.image_root == root / name / "images"
        assert spec.ann_file("train") == root / name / "annotations" / "train.json"
        assert spec.classes == UODB_CLASSES[name]
        assert spec.test_scale == UODB_TEST_SCALES[name]
        assert spec.scales is not None and spec.scales[0] == 480
    assert cat.get("coco").num_slots == 91
    assert all(cat.get(n).num_slots is None for n in UODB_DATASETS if n != "coco")
    assert cat.get("coco").ann_file("test") == root / "coco" / "annotations" / "test.json"
    assert not cat.get("voc12").has_split("test")  # UODB evaluates VOC on voc07's test set
    with pytest.raises(DatasetError, match=r"'voc12' has no split 'test'; it has \['train'\]"):
        cat.get("voc12").ann_file("test")
    # the official single-dataset train scales (docs/design.md §4.5)
    assert cat.get("clipart").scales == [480, 512, 544, 576, 608]
    assert cat.get("kitti").scales == [480, 512, 544, 576]
    assert cat.get("deeplesion").scales == [480, 512]
    assert cat.get("coco").scales == list(range(480, 801, 32))
    assert uodb_train_scales(480) == [480]


def test_builtin_synthetic_entries(tmp_path: Path) -> None:
    cat = build_catalog(_cfg(tmp_path))
    assert cat.names()[12 : 12 + len(SYNTHETIC_DATASETS)] == list(SYNTHETIC_DATASETS)
    for name, classes in SYNTHETIC_DATASETS.items():
        spec = cat.get(name)
        assert spec.classes == classes
        assert set(spec.splits) == set(SPLITS)
        assert spec.images_dir("val") == tmp_path / "syn" / name / "images"
        assert spec.ann_file("val") == tmp_path / "syn" / name / "annotations" / "val.json"


def test_unknown_name_lists_known_and_closest(tmp_path: Path) -> None:
    cat = build_catalog(_cfg(tmp_path))
    with pytest.raises(DatasetError) as err:
        cat.get("widerfce")
    msg = str(err.value)
    assert "unknown dataset 'widerfce'; did you mean 'widerface'?" in msg
    assert "coco" in msg and "syn_medical" in msg
    with pytest.raises(DatasetError, match="Known datasets"):
        cat["nothing_like_it_at_all_xyz"]
    builtin = (
        len(UODB_DATASETS) + len(SYNTHETIC_DATASETS) + len(ALT_DATASETS) + len(CONFLICT_DATASETS)
    )
    assert "coco" in cat and "cocoo" not in cat and len(cat) == builtin


def test_config_overrides_and_extends(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "val.json"
    cfg = _cfg(
        tmp_path,
        coco=DatasetEntry(splits={"train": "mycoco/train.json"}, expert=3),
        mine=DatasetEntry(
            image_root="mine/img",
            splits={"train": "mine/train.json", "val": str(absolute)},
            image_roots={"val": "mine/val_img"},
            classes=["b", "a"],
            scales=[320, 352],
            test_scale=352,
            max_size=600,
        ),
    )
    cat = build_catalog(cfg)
    root = tmp_path / "data"
    coco = cat.get("coco")
    assert coco.ann_file("train") == root / "mycoco" / "train.json"
    assert coco.ann_file("test") == root / "uodb" / "coco" / "annotations" / "test.json"  # kept
    assert coco.num_slots == 91 and coco.expert == 3  # unset fields keep the built-in value
    mine = cat.get("mine")
    assert cat.names()[-1] == "mine"
    assert mine.ann_file("val") == absolute
    assert mine.images_dir("train") == root / "mine" / "img"
    assert mine.images_dir("val") == root / "mine" / "val_img"
    assert (mine.classes, mine.scales, mine.test_scale, mine.max_size) == (
        ["b", "a"],
        [320, 352],
        352,
        600,
    )
    # a plain mapping (e.g. from YAML) is accepted too
    cat2 = build_catalog(_cfg(tmp_path, other={"image_root": "o", "splits": {"test": "o.json"}}))
    assert cat2.get("other").ann_file("test") == root / "o.json"


def test_new_entries_need_images_and_splits(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.datasets\.x\.splits"):
        build_catalog(_cfg(tmp_path, x=DatasetEntry(image_root="x")))
    with pytest.raises(ConfigError, match=r"data\.datasets\.x\.image_root"):
        build_catalog(_cfg(tmp_path, x=DatasetEntry(splits={"train": "t.json"})))
    with pytest.raises(ConfigError, match=r"'data\.datasets\.coco\.num_slots' must be >= 1"):
        config_from_dict({"data": {"train": ["coco"], "datasets": {"coco": {"num_slots": 0}}}})
    with pytest.raises(ConfigError, match=r"data\.datasets\.y"):
        build_catalog(_cfg(tmp_path, y={"image_root": "y", "split": {"train": "t.json"}}))


def test_catalog_is_a_checked_mapping() -> None:
    spec = DatasetSpec(name="a", image_root=Path("img"), splits={"train": Path("t.json")})
    cat = DatasetCatalog({"a": spec})
    assert cat.names() == ["a"] and list(cat) == ["a"] and cat["a"] is spec
    bigger = cat.with_spec(DatasetSpec(name="b", image_root=Path("img")))
    assert bigger.names() == ["a", "b"] and cat.names() == ["a"]
    with pytest.raises(ValueError, match="differs"):
        DatasetCatalog({"x": spec})
