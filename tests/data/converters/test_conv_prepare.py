"""prepare_uodb over an ORIGINALS_DIR laid out from the real samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from uodb_sample_layout import SAMPLES, make_all, make_coco, make_kitchen, make_kitti, make_voc07

from damex.data.converters.common import stable_fraction
from damex.data.converters.prepare import PrepareOptions, format_summary, main, prepare_uodb
from damex.errors import DatasetError

PREPARED = ["coco", "voc07", "deeplesion", "dota", "kitchen", "kitti", "lisa", "widerface"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("uodb")
    src = make_all(root / "src")
    out = root / "out"
    # the LISA sample's two recordings both hash into train: its test split is empty
    reports = prepare_uodb(
        src, out, PREPARED, progress=False, options=PrepareOptions(allow_empty=True)
    )
    return src, out, reports


def test_prepare_writes_every_split_loadable_by_pycocotools(prepared) -> None:
    _, out, reports = prepared
    assert list(reports) == PREPARED
    for name in PREPARED:
        for split in ("train", "test"):
            path = out / name / "annotations" / f"{split}.json"
            coco = COCO(str(path))
            assert reports[name][split].json_path == path
            assert reports[name][split].images == len(coco.getImgIds())
            # every file_name resolves under images/ (images/ is a link or a written folder)
            for img in coco.loadImgs(coco.getImgIds()):
                if name == "kitchen":  # the kitchen layout has XMLs only
                    continue
                assert (out / name / "images" / img["file_name"]).is_file(), (name, img)


def test_prepare_by_hand_values(prepared) -> None:
    src, out, reports = prepared

    def load(name: str, split: str) -> dict:
        return json.loads((out / name / "annotations" / f"{split}.json").read_text())

    assert load("voc07", "test")["annotations"][0]["bbox"] == [47.0, 239.0, 148.0, 132.0]
    assert load("voc07", "train")["annotations"][0]["bbox"] == [138.0, 199.0, 69.0, 102.0]
    kitti_train = load("kitti", "train")  # splits/train.txt: 000000, 000001
    assert [i["file_name"] for i in kitti_train["images"]] == ["000000.png", "000001.png"]
    assert [387.63, 181.54, 36.18, 21.58] in [a["bbox"] for a in kitti_train["annotations"]]
    assert load("widerface", "train")["annotations"][0]["bbox"] == [449.0, 330.0, 122.0, 149.0]
    assert load("widerface", "train")["images"][0]["file_name"].startswith("WIDER_train/")
    dota_train = load("dota", "train")
    p1888 = next(i for i in dota_train["images"] if i["file_name"] == "train/P1888.png")
    first = next(a for a in dota_train["annotations"] if a["image_id"] == p1888["id"])
    assert first["bbox"] == [674.0, 375.0, 10.0, 20.0]
    assert reports["dota"]["test"].ignored == 17
    assert load("deeplesion", "train")["annotations"][0]["bbox"] == [
        132.977, 171.808, 32.962, 42.221,
    ]  # fmt: skip
    assert reports["deeplesion"]["test"].boxes == 6
    coco_test = load("coco", "test")
    assert {c["id"] for c in coco_test["categories"]} >= {1, 90}
    assert 900300255917 in {a["id"] for a in coco_test["annotations"]}
    # kitchen: 3 scenes, every third scene is a test scene
    assert {i["file_name"].split("/")[0] for i in load("kitchen", "test")["images"]} == {
        "gmu_scene_003"
    }
    lisa_files = [i["file_name"] for s in ("train", "test") for i in load("lisa", s)["images"]]
    assert len(lisa_files) == len(set(lisa_files)) == 3


def test_prepare_image_links(prepared) -> None:
    src, out, _ = prepared
    assert (out / "voc07/images").is_symlink()
    assert (out / "voc07/images").resolve() == (src / "voc07/VOC2007/JPEGImages").resolve()
    assert (out / "kitti/images").resolve() == (src / "kitti/training/image_2").resolve()
    assert (out / "coco/images").resolve() == (src / "coco/val2014").resolve()
    wider = out / "widerface/images"
    assert wider.is_dir() and not wider.is_symlink()
    assert (wider / "WIDER_val").resolve() == (src / "widerface/WIDER_val/images").resolve()
    assert (out / "dota/images/train").resolve() == (src / "dota/train/images").resolve()
    dl = out / "deeplesion/images"
    assert dl.is_dir() and not dl.is_symlink()
    assert (dl / "000089_01_01/037.png").is_file()


def test_prepare_summary_table(prepared) -> None:
    _, _, reports = prepared
    text = format_summary(reports)
    lines = text.splitlines()
    assert lines[0].split() == [
        "dataset",
        "split",
        "images",
        "boxes",
        "ignored",
        "clipped",
        "empty",
        "skipped",
    ]
    assert any(line.split()[:4] == ["dota", "test", "1", "141"] for line in lines)
    assert "KITTI type 'DontCare' not in UODB" in text


def test_prepare_missing_folder_is_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_voc07(src)
    with pytest.raises(DatasetError, match=r"kitti: dataset folder not found: .*src/kitti"):
        prepare_uodb(src, tmp_path / "out", ["voc07", "kitti"], progress=False)
    assert not (tmp_path / "out/voc07/annotations/test.json").exists()  # checked up front
    (src / "kitti/training/label_2").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"kitti: image folder not found: .*training/image_2"):
        prepare_uodb(src, tmp_path / "out", ["kitti"], progress=False)
    reports = prepare_uodb(
        src, tmp_path / "out", ["voc07", "dota"], skip_missing=True, progress=False
    )
    assert list(reports) == ["voc07"]


def test_prepare_default_splits_are_stable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_kitti(src, splits=False)
    out = tmp_path / "out"
    prepare_uodb(src, out, ["kitti"], progress=False)
    got = {
        s: [
            i["file_name"]
            for i in json.loads((out / f"kitti/annotations/{s}.json").read_text())["images"]
        ]
        for s in ("train", "test")
    }
    expected = {"train": [], "test": []}
    for stem in ("000000", "000001", "000002"):
        expected["test" if stable_fraction(stem) < 0.5 else "train"].append(f"{stem}.png")
    assert got == expected
    shutil.rmtree(out)
    with pytest.raises(DatasetError, match=r"label_2 \(ids\): no images for kitti/test"):
        prepare_uodb(
            src, out, ["kitti"], progress=False, options=PrepareOptions(kitti_test_fraction=0)
        )
    assert not out.exists() or not any(out.iterdir())  # nothing written, no staging left
    opts = PrepareOptions(kitti_test_fraction=0, allow_empty=True)
    prepare_uodb(src, out, ["kitti"], progress=False, options=opts)
    assert json.loads((out / "kitti/annotations/test.json").read_text())["images"] == []


def test_prepare_uodb_voc_layout_is_detected(tmp_path: Path) -> None:
    """UODB's own KITTIVOC-style release under src/kitti: VOC XML, lower-case names."""
    src = tmp_path / "src"
    voc = make_voc07(tmp_path / "tmp") / ""
    kitti = src / "kitti"
    shutil.copytree(voc, kitti)
    xml = kitti / "Annotations/000001.xml"
    xml.write_text(xml.read_text().replace(">dog<", ">car<").replace(">person<", ">pedestrian<"))
    xml = kitti / "Annotations/000002.xml"
    xml.write_text(xml.read_text().replace(">train<", ">cyclist<"))
    for stem in ("000001", "000002"):
        shutil.copyfile(voc / "JPEGImages" / f"{stem}.jpg", kitti / "JPEGImages" / f"{stem}.jpg")
    (kitti / "ImageSets/Main/trainval.txt").rename(kitti / "ImageSets/Main/train.txt")
    out = tmp_path / "out"
    reports = prepare_uodb(src, out, ["kitti"], progress=False)
    test = json.loads((out / "kitti/annotations/test.json").read_text())
    assert [(a["category_id"], a["bbox"]) for a in test["annotations"]] == [
        (3, [47.0, 239.0, 148.0, 132.0]),  # car -> vehicle
        (1, [7.0, 11.0, 345.0, 487.0]),
    ]
    assert reports["kitti"]["train"].boxes == 1
    assert (out / "kitti/images").resolve() == (kitti / "JPEGImages").resolve()


def test_prepare_coco_from_2014_val_and_2017_val(tmp_path: Path) -> None:
    src = tmp_path / "src"
    coco = make_coco(src)
    ann = coco / "annotations"
    sample = json.loads((SAMPLES / "coco/annotations/instances_val2017.json").read_text())
    (ann / "instances_valminusminival2014.json").unlink()
    (ann / "instances_minival2014.json").unlink()
    val2014 = json.loads(json.dumps(sample))
    val2014["images"].append(
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 100, "height": 80}
    )
    val2014["annotations"].append(
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12.0, "iscrowd": 0}
    )
    (ann / "instances_val2014.json").write_text(json.dumps(val2014))
    (ann / "instances_val2017.json").write_text(json.dumps(sample))
    out = tmp_path / "out"
    prepare_uodb(src, out, ["coco"], progress=False)
    train = json.loads((out / "coco/annotations/train.json").read_text())
    test = json.loads((out / "coco/annotations/test.json").read_text())
    assert [i["id"] for i in train["images"]] == [7]  # val2014 minus val2017 (= minival2014)
    assert [i["file_name"] for i in test["images"]] == [
        "COCO_val2014_000000255917.jpg", "COCO_val2014_000000000139.jpg",
    ]  # fmt: skip


def test_prepare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    make_kitchen(src, num_scenes=2)
    code = main(
        [
            "--src",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--datasets",
            "kitchen",
            "--no-progress",
            "--allow-empty",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    # 2 scenes: neither is a third scene, so all 4 frames (6 boxes) are train
    assert table.splitlines()[2].split()[:4] == ["kitchen", "train", "4", "6"]
    assert table.splitlines()[3].split()[:4] == ["kitchen", "test", "0", "0"]
    code = main(
        ["--src", str(src), "--out", str(tmp_path / "out"), "--datasets", "kitti", "--no-progress"]
    )
    assert code == 2
    assert "kitti: dataset folder not found" in capsys.readouterr().err
