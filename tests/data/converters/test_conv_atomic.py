"""prepare_uodb writes all or nothing; one split alone; empty inputs and bad output paths.

Every failure below is checked the same way: the exit code / exception, a message that names
the culprit, and an output tree that is byte for byte what it was before (no staging folder
left, no new JSON beside an old one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from uodb_sample_layout import (
    LISA_HEADER,
    make_dota,
    make_kitti,
    make_lisa,
    make_voc07,
    make_widerface,
)

from damex.data.converters.prepare import PrepareOptions, main, prepare_uodb
from damex.errors import DatasetError


def snapshot(root: Path) -> dict[str, str | bytes]:
    """Every file's bytes and every symlink's target under ``root`` (links not followed)."""
    out: dict[str, str | bytes] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_file():
                out[rel] = path.read_bytes()
            else:
                out[rel] = "dir"
    return out


def run_cli(src: Path, out: Path, *args: str) -> int:
    return main(["--src", str(src), "--out", str(out), "--no-progress", *args])


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    make_voc07(root)
    make_dota(root)
    make_widerface(root)
    return root


def test_failing_second_split_leaves_previous_output_untouched(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli(src, out, "--datasets", "voc07", "dota") == 0
    (out / "voc07/annotations/fsPerc10_train.json").write_text("{}")  # a user's subset file
    before = snapshot(out)
    assert "dota/annotations/test.json" in before and "voc07/images" in before
    # the val split (our test split, converted second) gets a 9-field line
    label = src / "dota/val/labelTxt/P2709.txt"
    lines = label.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:9])
    label.write_text("\n".join(lines) + "\n")
    # train converts fine and would change: one image fewer
    (src / "dota/train/labelTxt/P0770.txt").unlink()
    capsys.readouterr()
    assert run_cli(src, out, "--datasets", "voc07", "dota") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "P2709.txt:4: expected 10 space-separated fields" in err and "got 9" in err
    assert snapshot(out) == before  # voc07 (converted first) and dota/train unchanged too
    assert not list(out.glob(".*.partial"))


def test_first_run_failure_leaves_no_dataset_folder(src: Path, tmp_path: Path) -> None:
    (src / "voc07/VOC2007/JPEGImages/000002.jpg").unlink()
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"000002\.xml: image not found: .*JPEGImages/000002"):
        prepare_uodb(src, out, ["dota", "voc07"], progress=False)
    assert snapshot(out) == {}  # dota converted before voc07 failed: not written either
    reports = prepare_uodb(
        src, out, ["voc07"], progress=False, options=PrepareOptions(check_images=False)
    )
    assert reports["voc07"]["train"].images == 1
    assert (
        json.loads((out / "voc07/annotations/train.json").read_text())["images"][0]["file_name"]
        == "000002.jpg"
    )


def test_interrupted_run_cleans_up_and_stale_staging_is_removed(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    import damex.data.converters.prepare as prepare

    real = prepare.convert_dota

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "convert_dota", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_uodb(src, out, ["dota"], progress=False)
    assert snapshot(out) == {}
    monkeypatch.undo()
    (out / ".dota.abc123.partial/annotations").mkdir(parents=True)  # as left by kill -9
    prepare_uodb(src, out, ["dota"], progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["dota"]


@pytest.mark.parametrize("name", ["voc07", "widerface", "dota"])
def test_one_split_alone(name: str, src: Path, tmp_path: Path) -> None:
    """Only the test archive: train's files are gone; --splits test converts it."""
    root = src / name
    if name == "voc07":
        (root / "VOC2007/ImageSets/Main/trainval.txt").unlink()
        missing = "train image set not found"
    elif name == "widerface":
        (root / "wider_face_split/wider_face_train_bbx_gt.txt").unlink()
        shutil.rmtree(root / "WIDER_train")
        missing = "annotation file not found"
    else:
        shutil.rmtree(root / "train")
        missing = "train folder not found"
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=rf"{name}: {missing}.*--splits test"):
        prepare_uodb(src, out, [name], progress=False)
    assert snapshot(out) == {}
    reports = prepare_uodb(
        src, out, [name], progress=False, options=PrepareOptions(splits=("test",))
    )
    assert list(reports[name]) == ["test"]
    assert sorted(p.name for p in (out / name / "annotations").iterdir()) == ["test.json"]
    data = json.loads((out / name / "annotations/test.json").read_text())
    assert len(data["images"]) == reports[name]["test"].images > 0
    for img in data["images"]:
        assert (out / name / "images" / img["file_name"]).is_file()


def test_splits_test_keeps_the_earlier_train_split(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_uodb(src, out, ["dota"], progress=False)
    train_before = (out / "dota/annotations/train.json").read_bytes()
    label = src / "dota/val/labelTxt/P2709.txt"
    label.write_text("\n".join(label.read_text().splitlines()[:4]) + "\n")  # 2 objects left
    assert run_cli(src, out, "--datasets", "dota", "--splits", "test") == 0
    assert (out / "dota/annotations/train.json").read_bytes() == train_before
    test = json.loads((out / "dota/annotations/test.json").read_text())
    assert len(test["annotations"]) == 2
    assert (out / "dota/images/train").is_symlink() and (out / "dota/images/val").is_symlink()


def test_voc12_has_no_test_split(tmp_path: Path) -> None:
    voc = make_voc07(tmp_path / "tmp")
    src = tmp_path / "src"
    shutil.copytree(voc, src / "voc12" / "VOC2012", symlinks=True)
    (src / "voc12/VOC2012/ImageSets/Main/test.txt").rename(
        src / "voc12/VOC2012/ImageSets/Main/train.txt"
    )
    with pytest.raises(DatasetError, match=r"voc12: has no test split \(requested"):
        prepare_uodb(src, tmp_path / "out", ["voc12"], options=PrepareOptions(splits=("test",)))


def test_empty_dota_label_folder(src: Path, tmp_path: Path) -> None:
    for label in (src / "dota/val/labelTxt").iterdir():
        label.unlink()
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"val/labelTxt \(\*\.txt label files\): no images"):
        prepare_uodb(src, out, ["dota"], progress=False)
    assert snapshot(out) == {}
    reports = prepare_uodb(
        src, out, ["dota"], progress=False, options=PrepareOptions(allow_empty=True)
    )
    assert reports["dota"]["test"].images == 0
    assert json.loads((out / "dota/annotations/test.json").read_text())["images"] == []


def test_header_only_lisa_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    make_lisa(src)
    (src / "lisa/allAnnotations.csv").write_text(LISA_HEADER + "\n")
    out = tmp_path / "out"
    assert run_cli(src, out, "--datasets", "lisa") == 2
    err = capsys.readouterr().err
    assert "allAnnotations.csv (rows selected for train): no images for lisa/train" in err
    assert "--allow-empty" in err
    assert snapshot(out) == {}


def test_kitti_empty_label_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_kitti(src, splits=False)
    for label in (src / "kitti/training/label_2").iterdir():
        label.unlink()
    with pytest.raises(DatasetError, match=r"kitti: no label files \(\*\.txt\) in .*label_2"):
        prepare_uodb(src, tmp_path / "out", ["kitti"], progress=False)


def test_bad_output_paths(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert run_cli(src, out, "--datasets", "voc07") == 2
    assert f"--out {out} is a file; expected a folder" in capsys.readouterr().err
    assert run_cli(src, out / "deeper", "--datasets", "voc07") == 2
    assert f"its parent {out} is a file" in capsys.readouterr().err
    out.unlink()
    (out / "voc07").mkdir(parents=True)
    (out / "voc07/annotations").write_text("oops")
    assert run_cli(src, out, "--datasets", "voc07") == 2
    assert f"{out / 'voc07/annotations'} is a file; expected a folder" in capsys.readouterr().err
    (out / "voc07/annotations").unlink()
    (out / "voc07/images").write_text("oops")
    assert run_cli(src, out, "--datasets", "voc07") == 2
    assert f"{out / 'voc07/images'} is a file; expected the image folder" in capsys.readouterr().err
    assert snapshot(out) == {"voc07": "dir", "voc07/images": b"oops"}
    (out / "voc07/images").unlink()
    (out / "voc07/annotations/test.json").mkdir(parents=True)
    assert run_cli(src, out, "--datasets", "voc07") == 2
    assert "test.json is a folder; expected a JSON file" in capsys.readouterr().err
