"""The bad-input table: every row builds one bad input from real files, runs what a user runs,
and checks three things: the exit code (``damex ...``) or the exception type (library calls), a
message that names the culprit (file, key or line, and what was expected), and that nothing
was written (the folder holds exactly what it held before: no half-written output).

Rows marked ``skip=True`` are inputs whose documented behaviour is a counted skip (they must
show up in the counts, never silently). The README's "Troubleshooting" section lists this
table. Groups: config, coco (COCO JSON at load), original (original-format converters),
checkpoint, cli (every ``damex`` command).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from damex.cli import _COMMANDS, _DELEGATED, main
from damex.data.coco import CocoDetection
from damex.data.label_space import LabelSpace
from damex.errors import DamexError, DatasetError

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS / "data" / "converters"))
sys.path.insert(0, str(_TESTS / "faults"))
from fault_setup import fault_config_dict  # noqa: E402
from uodb_sample_layout import (  # noqa: E402
    LISA_HEADER,
    make_dota,
    make_kitti,
    make_lisa,
    make_voc07,
    make_widerface,
)

REPO = _TESTS.parent
SMALL = REPO / "configs" / "synthetic" / "damex_small.yaml"


# ----------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, Any]:
    """Bytes of every file, target of every symlink, under ``root`` (links not followed)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = (
                f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes() if p.is_file() else "/"
            )
    return out


@dataclass(frozen=True)
class Ctx:
    """What a row may use: its own folder and the session's tiny run."""

    tmp: Path
    synthetic: Path
    run: Path  # an uninterrupted tiny training run (last.pth, config)


@dataclass(frozen=True)
class Row:
    """One bad input.

    Attributes:
        id: short name.
        make: builds the bad input under ``ctx.tmp``; returns the command line (a list, run as
            ``damex ...`` in-process) or a zero-argument callable (a library call).
        expect: the exit code (command line) or the exception type (library call).
        culprit: substrings the message must contain (``{tmp}``, ``{run}`` are filled in).
        skip: a counted skip: ``make`` returns a callable that returns the counts, and
            ``culprit`` names the count that must be 1 (no exception).
    """

    id: str
    make: Callable[[Ctx], list[str] | Callable[[], Any]]
    expect: int | type[BaseException]
    culprit: tuple[str, ...]
    skip: bool = False
    pending: str = ""  # a known gap (its xfail is strict: the row fails once the gap is fixed)


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _yaml(ctx: Ctx, name: str, data: dict[str, Any]) -> str:
    return str(_write(ctx.tmp / name, yaml.safe_dump(data)))


# ------------------------------------------------------------------------------------ config
def _cfg(*overrides: str, config: str | None = None) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        return ["config", "-c", config.format(tmp=ctx.tmp) if config else str(SMALL), *overrides]

    return make


def _cfg_file(name: str, text: str) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        _write(ctx.tmp / name, text.format(small=SMALL, tmp=ctx.tmp))
        return ["config", "-c", str(ctx.tmp / name)]

    return make


def _unknown_dataset(ctx: Ctx) -> list[str]:
    cfg = fault_config_dict(ctx.synthetic, ctx.tmp / "out")
    cfg["data"]["train"] = ["syn_photo", "syn_nope"]
    cfg["moe"]["expert_map"] = {"syn_photo": 0, "syn_nope": 1}
    return ["train", "-c", _yaml(ctx, "unknown.yaml", cfg)]


CONFIG_ROWS = [
    Row("typo-override", _cfg("train.lrr=1"), 2, ("train.lrr", "did you mean 'train.lr'")),
    Row(
        "typo-in-file",
        _cfg_file("typo.yaml", "_base_: {small}\ntrain:\n  bach_size: 2\n"),
        2,
        ("typo.yaml", "train.bach_size", "train.batch_size"),
    ),
    Row("wrong-type", _cfg("train.lr=fast"), 2, ("train.lr", "'fast'")),
    Row("out-of-range", _cfg("train.max_iters=-1"), 2, ("train.max_iters", ">= 0", "-1")),
    Row("expert-id-range", _cfg("moe.expert_map.syn_photo=9"), 2, ("syn_photo", "[0,")),
    Row("dataset-without-expert", _cfg("data.train=[syn_photo,nope]"), 2, ("'nope'", "expert")),
    Row(
        "unknown-dataset",
        _unknown_dataset,
        2,
        ("data.train", "unknown dataset 'syn_nope'", "Known datasets"),
    ),
    Row(
        "stale-expert-map",
        _cfg_file(
            "stale.yaml",
            "_base_: {small}\n_replace_: [moe.expert_map]\n"
            "data:\n  train: [syn_photo, syn_signs]\n  test: [syn_photo]\n"
            "moe:\n  num_experts: 2\n  expert_map: {{syn_photo: 0, syn_signs: 1, syn_gone: 1}}\n",
        ),
        2,
        ("syn_gone", "stale.yaml"),
    ),
    Row(
        "base-cycle",
        lambda ctx: (
            _write(ctx.tmp / "a.yaml", "_base_: b.yaml\n"),
            _write(ctx.tmp / "b.yaml", "_base_: a.yaml\n"),
            ["config", "-c", str(ctx.tmp / "a.yaml")],
        )[-1],
        2,
        ("_base_ cycle", "a.yaml -> ", "b.yaml -> ", "a.yaml"),
    ),
    Row(
        "base-missing",
        _cfg_file("m.yaml", "_base_: nowhere.yaml\n"),
        2,
        ("m.yaml", "_base_ file not found", "nowhere.yaml"),
    ),
    Row("invalid-yaml", _cfg_file("bad.yaml", "train: [\n"), 2, ("bad.yaml:2", "invalid YAML")),
    Row("not-a-mapping", _cfg_file("list.yaml", "- 1\n- 2\n"), 2, ("list.yaml", "mapping")),
    Row("config-missing", _cfg(config="{tmp}/nope.yaml"), 2, ("nope.yaml", "not found")),
    Row("override-syntax", _cfg("train.lr"), 2, ("train.lr", "key=value")),
]


# ---------------------------------------------------------------------------- COCO JSON
W, H = 32, 24
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def _coco(ctx: Ctx, edit: Callable[[dict[str, Any], Path], Any] | None = None) -> Path:
    img = ctx.tmp / "img"
    img.mkdir(parents=True, exist_ok=True)
    for i in (1, 2):
        Image.new("RGB", (W, H), (40 * i, 90, 10)).save(img / f"{i}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2)],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]},
            {"id": 11, "image_id": 2, "category_id": 2, "bbox": [4, 6, 3, 2]},
        ],
        "categories": CATS,
    }
    if edit is not None:
        edit(data, img)
    return _write(ctx.tmp / "ann.json", json.dumps(data, indent=1))


def _coco_load(edit=None, *, raw: bytes | None = None, get: int | None = None, **kw):
    def make(ctx: Ctx) -> Callable[[], Any]:
        path = _coco(ctx, edit)
        if raw is not None:
            path.write_bytes(raw)
        space = LabelSpace.build([("toy", CATS, None)])

        def run() -> Any:
            ds = CocoDetection(path, ctx.tmp / "img", 0, space, **kw)
            if get is not None:
                ds[get]
            return ds.report()

        return run

    return make


def _set(where: str, key: str, value: Any):
    def edit(data: dict[str, Any], img: Path) -> None:
        section, index = where.split(".")
        data[section][int(index)][key] = value

    return edit


def _drop_key(section: str):
    return lambda data, img: data.pop(section)


def _dup(section: str):
    return lambda data, img: data[section].append(dict(data[section][0]))


def _image_bytes(fn: Callable[[bytes], bytes]):
    def edit(data: dict[str, Any], img: Path) -> None:
        (img / "2.png").write_bytes(fn((img / "2.png").read_bytes()))

    return edit


COCO_ROWS = [
    Row(
        "not-json",
        _coco_load(raw=b"{ images: [] }"),
        DatasetError,
        ("ann.json", "invalid JSON at line 1"),
    ),
    Row("zero-byte-json", _coco_load(raw=b""), DatasetError, ("ann.json", "empty")),
    Row("missing-key", _coco_load(_drop_key("images")), DatasetError, ("ann.json", "'images'")),
    Row(
        "json-wrong-type",
        _coco_load(lambda d, i: d.update(annotations={})),
        DatasetError,
        ("ann.json", "'annotations' must be a list", "dict"),
    ),
    Row(
        "missing-field",
        _coco_load(lambda d, i: d["images"][1].pop("file_name")),
        DatasetError,
        ("ann.json", "image id 2", "missing required field 'file_name'"),
    ),
    Row("dup-image-id", _coco_load(_dup("images")), DatasetError, ("duplicate image id 1",)),
    Row("dup-ann-id", _coco_load(_dup("annotations")), DatasetError, ("duplicate annotation id",)),
    Row(
        "unknown-category",
        _coco_load(_set("annotations.1", "category_id", 7)),
        DatasetError,
        ("ann.json", "11", "7"),
    ),
    Row(
        "bbox-wrong-type",
        _coco_load(_set("annotations.0", "bbox", "2 3 10 5")),
        DatasetError,
        ("ann.json", "10", "bbox"),
    ),
    Row(
        "box-outside",
        _coco_load(_set("annotations.0", "bbox", [30, 3, 10, 5]), out_of_bounds="error"),
        DatasetError,
        ("ann.json", "10", "32x24"),
    ),
    Row(
        "box-zero-area",
        _coco_load(_set("annotations.0", "bbox", [2, 3, 0, 5])),
        0,
        ("dropped_degenerate",),
        skip=True,
    ),
    Row(
        "image-missing",
        _coco_load(lambda d, img: (img / "2.png").unlink()),
        DatasetError,
        ("ann.json", "image id 2", "2.png", "not found"),
    ),
    Row(
        "image-corrupt",
        _coco_load(_image_bytes(lambda b: b[:60] + bytes(len(b) - 60)), get=1),
        DatasetError,
        ("ann.json", "image id 2", "2.png"),
    ),
    Row(
        "image-truncated",
        _coco_load(_image_bytes(lambda b: b[: len(b) // 2]), get=1),
        DatasetError,
        ("ann.json", "image id 2", "2.png"),
    ),
    Row(
        "image-zero-byte",
        _coco_load(_image_bytes(lambda b: b""), check_images="header"),
        DatasetError,
        ("ann.json", "image id 2", "2.png"),
    ),
    Row(
        "image-size-differs",
        _coco_load(_set("images.1", "width", 64), check_images="header"),
        DatasetError,
        ("ann.json", "image id 2", "32x24", "64x24"),
    ),
    Row(
        "image-skip-counted",
        _coco_load(lambda d, img: (img / "2.png").unlink(), on_bad_sample="skip"),
        0,
        ("skipped",),
        skip=True,
    ),
]


# ---------------------------------------------------------------------- original formats
def _prepare(
    builder: Callable[[Path], Path], edit: Callable[[Path], Any], name: str, *extra: str
) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        builder(ctx.tmp / "src")
        edit(ctx.tmp / "src")
        return [
            "prepare-uodb",
            "--src",
            str(ctx.tmp / "src"),
            "--out",
            str(ctx.tmp / "out"),
            "--datasets",
            name,
            "--no-progress",
            *extra,
        ]

    return make


def _line(path: str, lineno: int, fn: Callable[[str], str]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        p = root / path
        lines = p.read_text().splitlines()
        lines[lineno - 1] = fn(lines[lineno - 1])
        p.write_text("\n".join(lines) + "\n")

    return edit


def _fields(n: int) -> Callable[[str], str]:
    return lambda line: " ".join(line.split()[:n])


def _rm(*paths: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for p in paths:
            target = root / p
            if target.is_dir():
                for f in target.iterdir():
                    f.unlink()
            else:
                target.unlink()

    return edit


def _out_is(kind: str) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        make_voc07(ctx.tmp / "src")
        out = ctx.tmp / "out"
        target = {
            "out": out,
            "annotations": out / "voc07/annotations",
            "images": out / "voc07/images",
        }
        _write(target[kind], "a file")
        return ["prepare-uodb", "--src", str(ctx.tmp / "src"), "--out", str(out)] + [
            "--datasets",
            "voc07",
            "--no-progress",
        ]

    return make


DOTA_LABEL = "dota/val/labelTxt/P2709.txt"
ORIGINAL_ROWS = [
    Row(
        "dota-9-fields",
        _prepare(make_dota, _line(DOTA_LABEL, 4, _fields(9)), "dota"),
        2,
        ("P2709.txt:4", "expected 10 space-separated fields", "got 9"),
    ),
    Row(
        "dota-8-fields",
        _prepare(make_dota, _line(DOTA_LABEL, 4, _fields(8)), "dota"),
        2,
        ("P2709.txt:4", "expected 10", "got 8"),
    ),
    Row(
        "dota-unknown-class",
        _prepare(
            make_dota,
            _line(DOTA_LABEL, 4, lambda s: " ".join([*s.split()[:8], "zeppelin", *s.split()[9:]])),
            "dota",
        ),
        2,
        ("P2709.txt:4", "unknown class 'zeppelin'", "expected one of"),
    ),
    Row(
        "dota-empty-labeltxt",
        _prepare(make_dota, _rm("dota/val/labelTxt"), "dota"),
        2,
        ("val/labelTxt", "no images for dota/test", "--allow-empty"),
    ),
    Row(
        "lisa-header-only",
        _prepare(
            make_lisa, lambda r: (r / "lisa/allAnnotations.csv").write_text(LISA_HEADER), "lisa"
        ),
        2,
        ("allAnnotations.csv", "no images for lisa/train"),
    ),
    Row(
        "lisa-field-count",
        _prepare(make_lisa, _line("lisa/allAnnotations.csv", 3, lambda s: s + ";extra"), "lisa"),
        2,
        ("allAnnotations.csv:3", "expected 11 ';'-separated fields", "got 12"),
    ),
    Row(
        "voc-image-missing",
        _prepare(make_voc07, _rm("voc07/VOC2007/JPEGImages/000001.jpg"), "voc07"),
        2,
        ("000001.xml", "image not found", "000001.jpg", "--no-image-check"),
    ),
    Row(
        "voc-malformed-xml",
        _prepare(
            make_voc07,
            lambda r: (r / "voc07/VOC2007/Annotations/000002.xml").write_text("<annotation>"),
            "voc07",
        ),
        2,
        ("000002.xml:1", "malformed XML"),
    ),
    Row(
        "voc-unknown-class",
        _prepare(
            make_voc07,
            _line("voc07/VOC2007/Annotations/000002.xml", 21, lambda s: "<name>unicorn</name>"),
            "voc07",
        ),
        2,
        ("000002.xml", "unknown class 'unicorn'"),
    ),
    Row(
        "kitti-short-line",
        _prepare(make_kitti, _line("kitti/training/label_2/000001.txt", 1, _fields(7)), "kitti"),
        2,
        ("000001.txt:1", "expected 15 space-separated fields", "got 7"),
    ),
    Row(
        "kitti-no-labels",
        _prepare(make_kitti, _rm("kitti/training/label_2"), "kitti"),
        2,
        ("no label files", "label_2"),
    ),
    Row(
        "wider-truncated",
        _prepare(
            make_widerface,
            lambda r: _write(
                r / "widerface/wider_face_split/wider_face_val_bbx_gt.txt",
                "0--Parade/0_Parade_Parade_0_628.jpg\n3\n26 299 10 16 2 0 0 0 0 0\n",
            ),
            "widerface",
        ),
        2,
        ("wider_face_val_bbx_gt.txt:1", "announces 3 faces", "ends after 1"),
    ),
    Row(
        "wider-bad-count",
        _prepare(
            make_widerface,
            _line("widerface/wider_face_split/wider_face_val_bbx_gt.txt", 2, lambda s: "two"),
            "widerface",
        ),
        2,
        ("wider_face_val_bbx_gt.txt:2", "expected the face count", "'two'"),
    ),
    Row(
        "wider-only-test-archive",
        _prepare(
            make_widerface,
            _rm("widerface/wider_face_split/wider_face_train_bbx_gt.txt"),
            "widerface",
        ),
        2,
        ("wider_face_train_bbx_gt.txt", "--splits test"),
    ),
    Row("out-is-a-file", _out_is("out"), 2, ("--out", "is a file; expected a folder")),
    Row("annotations-is-a-file", _out_is("annotations"), 2, ("voc07/annotations is a file",)),
    Row("images-is-a-file", _out_is("images"), 2, ("voc07/images is a file",)),
    Row(
        "src-missing",
        lambda ctx: ["prepare-uodb", "--src", str(ctx.tmp / "nope"), "--out", str(ctx.tmp / "o")],
        2,
        ("originals folder not found", "nope"),
    ),
]


# --------------------------------------------------------------------------------- checkpoints
def _ckpt(damage: Callable[[Path, Ctx], Any], *, command: str = "evaluate", **cfg_edit: Any):
    def make(ctx: Ctx) -> list[str]:
        cfg = fault_config_dict(ctx.synthetic, ctx.tmp / "out")
        for section, values in cfg_edit.items():
            cfg[section].update(values)
        config = _yaml(ctx, "cfg.yaml", cfg)
        path = ctx.tmp / "ck" / "last.pth"
        path.parent.mkdir()
        path.write_bytes((ctx.run / "last.pth").read_bytes())
        damage(path, ctx)
        if command == "train":
            cfg["output"]["dir"] = str(path.parent)
            return ["train", "-c", _yaml(ctx, "cfg.yaml", cfg), "--resume"]
        return [command, "-c", config, "--checkpoint", str(path), "--out", str(ctx.tmp / "res")]

    return make


def _truncate(path: Path, ctx: Ctx) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, ctx: Ctx) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_state(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Ctx], None]:
    def damage(path: Path, ctx: Ctx) -> None:
        state = torch.load(path, weights_only=True)
        fn(state)
        torch.save(state, path)

    return damage


def _other_label_space(state: dict[str, Any]) -> None:
    cats = [{"id": 1, "name": "thing"}]
    state["label_space"] = LabelSpace.build([("syn_other", cats, None)]).state_dict()


CHECKPOINT_ROWS = [
    Row("ckpt-truncated", _ckpt(_truncate), 2, ("last.pth is truncated", "bytes")),
    Row("ckpt-corrupt", _ckpt(_flip), 2, ("last.pth is corrupt",)),
    Row("ckpt-empty", _ckpt(lambda p, c: p.write_bytes(b"")), 2, ("last.pth is empty",)),
    Row("ckpt-not-torch", _ckpt(lambda p, c: p.write_text("hello")), 2, ("last.pth is truncated",)),
    Row(
        "ckpt-missing-keys",
        _ckpt(_edit_state(lambda s: s.pop("label_space"))),
        2,
        ("last.pth lacks keys ['label_space']",),
    ),
    Row(
        "ckpt-wrong-model",
        _ckpt(lambda p, c: None, model={"d_model": 64}),
        2,
        ("last.pth does not match the model", "shape"),
    ),
    Row(
        "ckpt-other-label-space",
        _ckpt(_edit_state(_other_label_space)),
        2,
        ("label space", "syn_other", "syn_photo"),
    ),
    Row(
        "ckpt-unsafe-pickle",
        _ckpt(lambda p, c: torch.save({"model": Path("x")}, p)),
        2,
        ("last.pth", "weights_only"),
    ),
    Row(
        "resume-truncated-no-previous",
        _ckpt(_truncate, command="train"),
        2,
        ("last.pth is truncated", "no previous checkpoint"),
    ),
]


# ------------------------------------------------------------------------------------ cli
def _cli(*argv: str) -> Callable[[Ctx], list[str]]:
    def make(ctx: Ctx) -> list[str]:
        _write(ctx.tmp / "a_file", "x")
        return [a.format(tmp=ctx.tmp, run=ctx.run, small=SMALL) for a in argv]

    return make


CLI_ROWS = [
    Row("train-resume-missing", _cli("train", "--resume", "{tmp}/nope.pth"), 2, ("nope.pth",)),
    Row(
        "evaluate-checkpoint-missing",
        _cli("evaluate", "--checkpoint", "{tmp}/nope.pth"),
        2,
        ("nope.pth does not exist",),
    ),
    Row(
        "visualize-routing-not-a-checkpoint",
        _cli("visualize-routing", "--checkpoint", "{tmp}/a_file"),
        2,
        ("a_file is truncated or not a torch checkpoint",),
    ),
    Row(
        "demo-input-missing",
        _cli(
            "demo", "--checkpoint", "{run}/last.pth", "--input", "{tmp}/no.jpg", "--out", "{tmp}/o"
        ),
        2,
        ("no.jpg",),
    ),
    Row("config-bad-key", _cli("config", "model.nope=1"), 2, ("model.nope",)),
    Row(
        "make-synthetic-out-is-a-file",
        _cli("make-synthetic", "--out", "{tmp}/a_file"),
        2,
        ("a_file is a file; expected a folder",),
    ),
    Row(
        "benchmark-out-folder-missing",
        _cli("benchmark", "moe", "--out", "{tmp}/nowhere/t.md"),
        2,
        ("nowhere", "folder does not exist"),
    ),
    Row(
        "prepare-uodb-unknown-split-list",
        _cli("prepare-uodb", "--src", "{tmp}", "--out", "{tmp}/o", "--datasets", "dota"),
        2,
        ("dota: dataset folder not found",),
    ),
    Row(
        "make-subsets-root-missing",
        _cli("make-subsets", "--root", "{tmp}/nope", "--percent", "10"),
        2,
        ("nope", "annotation file not found"),
    ),
    Row(
        "extend-checkpoint-missing",
        _cli("extend", "-c", "{small}", "--checkpoint", "{tmp}/nope.pth"),
        2,
        ("nope.pth does not exist",),
    ),
    Row(
        "export-not-a-checkpoint",
        _cli("export", "--checkpoint", "{tmp}/a_file", "--out", "{tmp}/m.onnx"),
        2,
        ("a_file is truncated or not a torch checkpoint",),
    ),
    Row(
        "propose-map-zero-experts",
        _cli("propose-map", "--num-experts", "0", "data.root={tmp}", "data.synthetic.root={tmp}"),
        2,
        ("--num-experts must be >= 1, got 0",),
    ),
    Row(
        "experiments-spec-missing",
        _cli("experiments", "-c", "{tmp}/nope.yaml"),
        2,
        ("nope.yaml",),
    ),
]

TABLE = CONFIG_ROWS + COCO_ROWS + ORIGINAL_ROWS + CHECKPOINT_ROWS + CLI_ROWS


# ------------------------------------------------------------------------------------ tests
def test_table_size_and_cli_coverage(tmp_path: Path) -> None:
    assert len(TABLE) >= 40
    assert len({r.id for r in TABLE}) == len(TABLE)
    covered = {r.make(Ctx(tmp_path, tmp_path, tmp_path))[0] for r in CLI_ROWS}
    missing = (set(_COMMANDS) | set(_DELEGATED)) - covered
    assert not missing, f"damex commands without a bad-input row: {sorted(missing)}"


@pytest.fixture(scope="module")
def ctx_base(fault_synthetic_root: Path, fault_reference_run: Path) -> tuple[Path, Path]:
    return fault_synthetic_root, fault_reference_run


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=r.pending) if r.pending else ())
        for r in TABLE
    ],
    ids=[r.id for r in TABLE],
)
def test_bad_input(
    row: Row, tmp_path: Path, ctx_base: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    synthetic, run = ctx_base
    ctx = Ctx(tmp_path, synthetic, run)
    action = row.make(ctx)
    before = snapshot(tmp_path)
    run_before = snapshot(run)
    if isinstance(action, list):
        if action[0] not in _COMMANDS and action[0] not in _DELEGATED:
            pytest.skip(f"no '{action[0]}' command in this build")
        capsys.readouterr()
        code = main(action)
        err = capsys.readouterr().err
        assert code == row.expect, f"exit {code}, expected {row.expect}: {err}"
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in err, err
        message = lines[0]
    elif row.skip:
        counts = action()
        message = json.dumps(counts)
        assert counts[row.culprit[0]] == 1, counts
    else:
        assert isinstance(row.expect, type)
        with pytest.raises(row.expect) as info:
            action()
        assert isinstance(info.value, DamexError)
        message = str(info.value)
    for part in row.culprit:
        assert part.format(tmp=tmp_path, run=run) in message, (part, message)
    # nothing written, nothing half-written: the folder is byte for byte what it was
    assert snapshot(tmp_path) == before
    assert snapshot(run) == run_before


def test_console_script_prints_one_line_no_traceback(tmp_path: Path) -> None:
    """The installed entry point in a real process (not only main() in-process)."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "damex.cli", "config", "train.lrr=1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "damex config: error: command line: unknown key 'train.lrr'; did you mean 'train.lr'?"
    ]


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not a user error: it propagates (traceback), it is not turned into exit 2."""
    import damex.cli as cli

    def boom(args: Any) -> int:
        raise RuntimeError("a bug")

    def no_filename(args: Any) -> int:
        raise OSError(5, "I/O error")  # an OSError without a path is not a path error

    monkeypatch.setitem(cli._COMMANDS, "config", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["config"])
    monkeypatch.setitem(cli._COMMANDS, "config", no_filename)
    with pytest.raises(OSError):
        main(["config"])
