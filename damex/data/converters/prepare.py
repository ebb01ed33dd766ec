"""Rebuild UODB from the original releases: ``prepare_uodb(src, out, datasets)`` and its CLI.

For every dataset ``NAME`` of ``damex.data.uodb.UODB_DATASETS`` this writes
``OUT/NAME/annotations/{train,test}.json`` (COCO; voc12 has only ``train``) and
``OUT/NAME/images`` (a symlink to the original image folder, a folder of symlinks when a
dataset keeps its splits' images apart, or converted images for DeepLesion); every
``file_name`` is relative to ``OUT/NAME/images``.

Expected layout under ``SRC`` (``docs/preparing_uodb.md`` says where each one comes from)::

    coco/        annotations/instances_valminusminival2014.json   (train)
                 annotations/instances_minival2014.json           (test)
                 val2014/                                         (images)
                 -- or annotations/instances_val2014.json + instances_val2017.json
    voc07/       VOC2007/{Annotations,ImageSets/Main/{trainval,test}.txt,JPEGImages}
                 (VOCdevkit/VOC2007/... also accepted)
    voc12/       VOC2012/{Annotations,ImageSets/Main/train.txt,JPEGImages}
    clipart/     {Annotations,ImageSets/Main/{train,test}.txt,JPEGImages}
    watercolor/  same as clipart
    comic/       same as clipart
    kitti/       training/{label_2,image_2}                 [splits/{train,test}.txt]
    lisa/        allAnnotations.csv + the frame folders it names  [splits/...]
    widerface/   wider_face_split/wider_face_{train,val}_bbx_gt.txt
                 WIDER_train/images/  WIDER_val/images/
    dota/        train/{labelTxt,images}  val/{labelTxt,images}
    kitchen/     gmu_scene_00N/{Annotations,Images}         [splits/{train,test}.txt]
    deeplesion/  DL_info.csv  Images_png/<patient>_<study>_<series>/<slice>.png

Any dataset folder may instead hold UODB's own VOC-layout release of that dataset
(``Annotations/``, ``ImageSets/Main/<set>.txt``, ``JPEGImages/``); ``layout="auto"`` detects it.

Default splits where UODB's lists were never published (not UODB's exact splits):

* kitti: ``stable_fraction(id) < 0.5`` -> test (about half of the 7,481 labelled images);
* lisa: by recording (``lisa_group``), ``stable_fraction(group) < 0.2`` -> test;
* kitchen: whole scenes, every third scene in sorted order (3, 6, 9) -> test.

A ``splits/train.txt`` + ``splits/test.txt`` pair in the dataset folder overrides them (one
key a line: KITTI image id, LISA ``Filename``, Kitchen scene folder name).

Writing is all or nothing: every requested dataset and split is built in a hidden staging folder
next to its output (``OUT/.NAME.<random>.partial``) and moved into place only once every split
of every dataset has converted. On any error the staging folders are removed and the previous
output is untouched. ``PrepareOptions.splits`` converts some splits only (e.g. ``("test",)``
when only the test archive was downloaded); the other split's files of an earlier run stay.
A split without images is an error unless ``allow_empty``; VOC-layout images must exist
unless ``check_images=False`` (``--no-image-check``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from damex.config import BadSamplePolicy, OutOfBoundsPolicy, choices
from damex.data.converters.coco import coco2014_val_name, convert_coco, load_coco_json
from damex.data.converters.common import (
    FLAG_POLICIES,
    ConversionReport,
    FlagPolicy,
    OnBadSample,
    OutOfBounds,
    check_choice,
    stable_fraction,
)
from damex.data.converters.deeplesion import convert_deeplesion
from damex.data.converters.dota import convert_dota
from damex.data.converters.kitchen import convert_kitchen, list_kitchen_scenes
from damex.data.converters.kitti import convert_kitti, list_kitti_ids
from damex.data.converters.lisa import convert_lisa, lisa_group
from damex.data.converters.voc import UODB_KITTI_VOC_ALIASES, convert_voc
from damex.data.converters.widerface import convert_widerface
from damex.data.uodb import UODB_CLASSES, UODB_DATASETS
from damex.errors import DatasetError

__all__ = [
    "Layout",
    "PrepareOptions",
    "SPLITS",
    "UODB_VOC_IMAGE_SETS",
    "prepare_uodb",
    "format_summary",
    "main",
]

logger = logging.getLogger(__name__)

Layout = Literal["auto", "original", "uodb-voc"]
_DOC = "docs/preparing_uodb.md"
SPLITS: tuple[str, ...] = ("train", "test")

# UODB's own VOC-layout release: the image sets its loaders used (uodb-code
# lib/datasets/datasets_info.py) -> our (train, test) splits, and the image extension.
UODB_VOC_IMAGE_SETS: dict[str, tuple[str, str | None, str]] = {
    "voc07": ("trainval", "test", ".jpg"),
    "voc12": ("train", None, ".jpg"),
    "clipart": ("train", "test", ".jpg"),
    "watercolor": ("train", "test", ".jpg"),
    "comic": ("train", "test", ".jpg"),
    "kitti": ("train", "test", ".jpg"),
    "widerface": ("train", "val", ".jpg"),
    "lisa": ("train", "test", ".png"),
    "dota": ("train", "val", ".jpg"),
    "kitchen": ("train", "test", ".png"),
    "deeplesion": ("trainval", "test", ".png"),
}


@dataclass(frozen=True)
class PrepareOptions:
    """Conversion options shared by all datasets.

    Attributes:
        on_bad_sample: ``"error"`` (default) or ``"skip"`` (count and go on).
        out_of_bounds: ``"clip"`` (default, counted) or ``"error"``.
        difficult: VOC/DOTA/Kitchen difficult objects and WIDER invalid faces:
            ``"ignore"`` (iscrowd=1, default) | ``"drop"`` | ``"keep"``.
        layout: ``"auto"`` | ``"original"`` | ``"uodb-voc"``.
        kitti_test_fraction: default KITTI split (see module docstring).
        lisa_test_fraction: default LISA split.
        kitchen_test_every: every n-th scene (sorted) is a test scene.
        deeplesion_context_slices: write (slice-1, slice, slice+1) RGB PNGs.
        overwrite_images: rewrite converted images (DeepLesion PNGs) that already exist;
            needed after changing ``deeplesion_context_slices``.
        splits: the splits to convert (default None: every split the dataset has); a
            requested split the dataset does not have is an error.
        allow_empty: write a split without images instead of failing.
        check_images: VOC-layout datasets check that every image file exists.
    """

    on_bad_sample: OnBadSample = "error"
    out_of_bounds: OutOfBounds = "clip"
    difficult: FlagPolicy = "ignore"
    layout: Layout = "auto"
    kitti_test_fraction: float = 0.5
    lisa_test_fraction: float = 0.2
    kitchen_test_every: int = 3
    deeplesion_context_slices: bool = False
    overwrite_images: bool = False
    splits: tuple[str, ...] | None = None
    allow_empty: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        if self.splits is not None:
            if not self.splits:
                raise ValueError(f"splits must name at least one of {SPLITS}, got ()")
            for split in self.splits:
                check_choice("splits", split, SPLITS)
        check_choice("on_bad_sample", self.on_bad_sample, choices(BadSamplePolicy))
        check_choice("out_of_bounds", self.out_of_bounds, choices(OutOfBoundsPolicy))
        check_choice("difficult", self.difficult, FLAG_POLICIES)
        check_choice("layout", self.layout, ("auto", "original", "uodb-voc"))
        for name in ("kitti_test_fraction", "lisa_test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.kitchen_test_every < 1:
            raise ValueError(f"kitchen_test_every must be >= 1, got {self.kitchen_test_every}")

    @property
    def common(self) -> dict[str, str | bool]:
        """Keyword arguments every converter takes."""
        return {
            "on_bad_sample": self.on_bad_sample,
            "out_of_bounds": self.out_of_bounds,
            "allow_empty": self.allow_empty,
        }

    @property
    def wanted(self) -> tuple[str, ...]:
        """The splits to convert (all by default)."""
        return self.splits or SPLITS


# A job converts one split: job(json_out, progress) -> report.
_Job = Callable[[Path, bool], ConversionReport]


@dataclass
class _Plan:
    """What to do for one dataset: image links and one job per split."""

    jobs: dict[str, _Job]
    image_link: Path | None = None  # images -> this folder
    image_sublinks: dict[str, Path] = field(default_factory=dict)  # images/<name> -> folder
    writes_images: bool = False  # images/ is a real folder the jobs write into


def _missing(name: str, path: Path, what: str, split: str | None = None) -> DatasetError:
    hint = ""
    if split is not None:
        other = [s for s in SPLITS if s != split]
        hint = f"; to convert only the other split, pass --splits {' '.join(other)}"
    return DatasetError(
        f"{name}: {what} not found: {path} (expected layout for '{name}': see {_DOC} or "
        f"damex.data.converters.prepare){hint}"
    )


def _require_dir(name: str, path: Path, what: str, split: str | None = None) -> Path:
    if not path.is_dir():
        raise _missing(name, path, what, split)
    return path


def _require_file(name: str, path: Path, what: str, split: str | None = None) -> Path:
    if not path.is_file():
        raise _missing(name, path, what, split)
    return path


def _is_voc_dir(path: Path) -> bool:
    return (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir()


def _read_split_lists(name: str, root: Path) -> dict[str, set[str]] | None:
    split_dir = root / "splits"
    if not split_dir.is_dir():
        return None
    lists = {}
    for split in ("train", "test"):
        path = _require_file(name, split_dir / f"{split}.txt", f"split list ({split})")
        lists[split] = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    both = lists["train"] & lists["test"]
    if both:
        raise DatasetError(
            f"{split_dir}: {len(both)} keys are in both train.txt and test.txt, "
            f"e.g. {sorted(both)[:3]}"
        )
    return lists


def _assign(key: str, lists: dict[str, set[str]] | None, test_fraction: float) -> str | None:
    if lists is not None:
        return "train" if key in lists["train"] else "test" if key in lists["test"] else None
    return "test" if stable_fraction(key) < test_fraction else "train"


# --------------------------------------------------------------------------------------------
# per-dataset plans


def _plan_uodb_voc(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    train_set, test_set, ext = UODB_VOC_IMAGE_SETS[name]
    jpeg = _require_dir(name, root / "JPEGImages", "JPEGImages folder")
    aliases = UODB_KITTI_VOC_ALIASES if name == "kitti" else None
    jobs: dict[str, _Job] = {}
    for split, image_set in (("train", train_set), ("test", test_set)):
        if image_set is None or split not in opts.wanted:
            continue
        _require_file(
            name, root / "ImageSets" / "Main" / f"{image_set}.txt", f"{split} image set", split
        )
        jobs[split] = _voc_job(name, split, root, image_set, ext, aliases, opts)
    return _Plan(jobs=jobs, image_link=jpeg)


def _voc_job(
    name: str,
    split: str,
    root: Path,
    image_set: str,
    ext: str,
    aliases: dict[str, str | None] | None,
    opts: PrepareOptions,
) -> _Job:
    def job(json_out: Path, progress: bool) -> ConversionReport:
        return convert_voc(
            root,
            image_set,
            json_out,
            classes=UODB_CLASSES[name],
            dataset=name,
            split=split,
            aliases=aliases,
            image_ext=ext,
            difficult=opts.difficult,
            check_images=opts.check_images,
            progress=progress,
            **opts.common,
        )

    return job


def _plan_voc(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    year = {"voc07": "VOC2007", "voc12": "VOC2012"}.get(name)
    candidates = [root / year, root / "VOCdevkit" / year, root] if year else [root]
    voc_dir = next((c for c in candidates if _is_voc_dir(c)), None)
    if voc_dir is None:
        raise _missing(name, candidates[0], "VOC folder with Annotations/ and ImageSets/Main/")
    return _plan_uodb_voc(name, voc_dir, images, opts)


def _plan_coco(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    ann = _require_dir(name, root / "annotations", "annotations folder")
    val2014 = _require_dir(name, root / "val2014", "val2014 image folder")
    minival = ann / "instances_minival2014.json"
    val2017 = ann / "instances_val2017.json"
    if minival.is_file():
        test_json, rename = minival, None
    elif val2017.is_file():  # val2017 == minival2014 (same images), named the 2017 way
        test_json, rename = val2017, coco2014_val_name
    else:
        raise _missing(name, minival, "test annotations (or instances_val2017.json)")
    vmm = ann / "instances_valminusminival2014.json"
    if vmm.is_file():
        train_json, exclude_from = vmm, None
    else:
        train_json = _require_file(
            name,
            ann / "instances_val2014.json",
            "train annotations instances_valminusminival2014.json (or instances_val2014.json)",
        )
        exclude_from = test_json

    def train(json_out: Path, progress: bool) -> ConversionReport:
        exclude: set[int] = set()
        if exclude_from is not None:
            exclude = {int(img["id"]) for img in load_coco_json(exclude_from)["images"]}
        return convert_coco(
            train_json,
            json_out,
            exclude_image_ids=exclude,
            dataset=name,
            split="train",
            progress=progress,
            **opts.common,
        )

    def test(json_out: Path, progress: bool) -> ConversionReport:
        return convert_coco(
            test_json,
            json_out,
            file_name_fn=rename,
            dataset=name,
            split="test",
            progress=progress,
            **opts.common,
        )

    return _Plan(jobs={"train": train, "test": test}, image_link=val2014)


def _plan_kitti(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    label_dir = _require_dir(name, root / "training" / "label_2", "label folder")
    image_dir = _require_dir(name, root / "training" / "image_2", "image folder")
    lists = _read_split_lists(name, root)
    ids = list_kitti_ids(label_dir)
    if not ids:
        raise DatasetError(f"{name}: no label files (*.txt) in {label_dir}")
    by_split: dict[str, list[str]] = {"train": [], "test": []}
    for image_id in ids:
        split = _assign(image_id, lists, opts.kitti_test_fraction)
        if split is not None:
            by_split[split].append(image_id)
    jobs = {
        split: partial(_kitti_job, label_dir, image_dir, split, ids_, opts)
        for split, ids_ in by_split.items()
    }
    return _Plan(jobs=jobs, image_link=image_dir)


def _kitti_job(
    label_dir: Path,
    image_dir: Path,
    split: str,
    ids: list[str],
    opts: PrepareOptions,
    json_out: Path,
    progress: bool,
) -> ConversionReport:
    return convert_kitti(
        label_dir, image_dir, json_out, image_ids=ids, split=split, progress=progress, **opts.common
    )


def _plan_source_folders(
    locate: Callable[[str], tuple[Path, Path, str]],
    convert: Callable[..., ConversionReport],
    flag_arg: str,
    opts: PrepareOptions,
) -> _Plan:
    """Train from the source split ``train``, test from ``val``, each with its image folder.

    ``locate(source)`` checks and returns ``(annotations, image folder, folder name)``; the
    image folder is linked as ``images/<folder name>``, which prefixes every ``file_name``.
    ``flag_arg`` is the converter's name for the difficult/invalid policy.
    """
    jobs: dict[str, _Job] = {}
    sublinks: dict[str, Path] = {}
    for split, source in (("train", "train"), ("test", "val")):
        if split not in opts.wanted:
            continue
        annotations, image_dir, folder = locate(source)
        sublinks[folder] = image_dir
        jobs[split] = partial(
            _source_folder_job, convert, annotations, image_dir, folder, split, flag_arg, opts
        )
    return _Plan(jobs=jobs, image_sublinks=sublinks)


def _source_folder_job(
    convert: Callable[..., ConversionReport],
    annotations: Path,
    image_dir: Path,
    folder: str,
    split: str,
    flag_arg: str,
    opts: PrepareOptions,
    json_out: Path,
    progress: bool,
) -> ConversionReport:
    return convert(
        annotations,
        image_dir,
        json_out,
        file_name_prefix=f"{folder}/",
        split=split,
        progress=progress,
        **{flag_arg: opts.difficult},
        **opts.common,
    )


def _plan_widerface(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    split_dir = _require_dir(name, root / "wider_face_split", "wider_face_split folder")

    def locate(source: str) -> tuple[Path, Path, str]:
        split = "train" if source == "train" else "test"
        gt = _require_file(
            name, split_dir / f"wider_face_{source}_bbx_gt.txt", "annotation file", split
        )
        folder = f"WIDER_{source}"
        return gt, _require_dir(name, root / folder / "images", "image folder", split), folder

    return _plan_source_folders(locate, convert_widerface, "invalid", opts)


def _plan_dota(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    def locate(source: str) -> tuple[Path, Path, str]:
        split = "train" if source == "train" else "test"
        base = _require_dir(name, root / source, f"{source} folder", split)
        label_candidates = [
            base / "labelTxt",
            base / "labelTxt-v1.0" / "labelTxt",
            base / "labelTxt-v1.0",
        ]
        label_dir = next((c for c in label_candidates if c.is_dir()), None)
        if label_dir is None:
            raise _missing(name, label_candidates[0], "labelTxt folder", split)
        return label_dir, _require_dir(name, base / "images", "image folder", split), source

    return _plan_source_folders(locate, convert_dota, "difficult", opts)


def _plan_lisa(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    csv_path = _require_file(name, root / "allAnnotations.csv", "allAnnotations.csv")
    lists = _read_split_lists(name, root)

    def select(split: str, row: dict[str, str]) -> bool:
        key = row["Filename"] if lists is not None else lisa_group(row)
        return _assign(key, lists, opts.lisa_test_fraction) == split

    def make(split: str) -> _Job:
        def job(json_out: Path, progress: bool) -> ConversionReport:
            return convert_lisa(
                csv_path,
                root,
                json_out,
                include=partial(select, split),
                split=split,
                progress=progress,
                **opts.common,
            )

        return job

    return _Plan(jobs={s: make(s) for s in ("train", "test")}, image_link=root)


def _plan_kitchen(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    scenes = list_kitchen_scenes(root)
    if not scenes:
        raise _missing(name, root / "gmu_scene_001" / "Annotations", "scene folders")
    lists = _read_split_lists(name, root)
    if lists is not None:
        by_split = {s: [sc for sc in scenes if sc in lists[s]] for s in ("train", "test")}
    else:
        k = opts.kitchen_test_every
        test = [sc for i, sc in enumerate(scenes) if i % k == k - 1]
        by_split = {"train": [sc for sc in scenes if sc not in test], "test": test}

    def make(split: str) -> _Job:
        def job(json_out: Path, progress: bool) -> ConversionReport:
            return convert_kitchen(
                root,
                by_split[split],
                json_out,
                difficult=opts.difficult,
                split=split,
                progress=progress,
                **opts.common,
            )

        return job

    return _Plan(jobs={s: make(s) for s in ("train", "test")}, image_link=root)


def _plan_deeplesion(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    csv_path = _require_file(name, root / "DL_info.csv", "DL_info.csv")
    png_dir = _require_dir(name, root / "Images_png", "Images_png folder")

    def make(split: str, subsets: tuple[int, ...]) -> _Job:
        def job(json_out: Path, progress: bool) -> ConversionReport:
            # json_out is <staging>/annotations/<split>.json: the PNGs go to <staging>/images,
            # and those an earlier run wrote to the real images/ are reused, not rewritten.
            return convert_deeplesion(
                csv_path,
                png_dir,
                json_out.parent.parent / "images",
                json_out,
                reuse_image_dir=images,
                subsets=subsets,
                split=split,
                context_slices=opts.deeplesion_context_slices,
                overwrite_images=opts.overwrite_images,
                progress=progress,
                **opts.common,
            )

        return job

    return _Plan(
        jobs={"train": make("train", (1, 2)), "test": make("test", (3,))}, writes_images=True
    )


_ORIGINAL_PLANS: dict[str, Callable[[str, Path, Path, PrepareOptions], _Plan]] = {
    "coco": _plan_coco,
    "voc07": _plan_voc,
    "voc12": _plan_voc,
    "clipart": _plan_voc,
    "watercolor": _plan_voc,
    "comic": _plan_voc,
    "deeplesion": _plan_deeplesion,
    "dota": _plan_dota,
    "kitchen": _plan_kitchen,
    "kitti": _plan_kitti,
    "lisa": _plan_lisa,
    "widerface": _plan_widerface,
}


def _make_plan(name: str, root: Path, images: Path, opts: PrepareOptions) -> _Plan:
    use_uodb_voc = name in UODB_VOC_IMAGE_SETS and (
        opts.layout == "uodb-voc" or (opts.layout == "auto" and _is_voc_dir(root))
    )
    if use_uodb_voc:
        if not _is_voc_dir(root):
            raise _missing(name, root / "Annotations", "UODB VOC-layout folder (Annotations/)")
        return _plan_uodb_voc(name, root, images, opts)
    return _ORIGINAL_PLANS[name](name, root, images, opts)


# --------------------------------------------------------------------------------------------
# image folders


def _copy_tree(target: Path, link: Path) -> None:
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(target, link, copy_function=link_or_copy)


def _link_dir(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` (replacing an old symlink), else a copy."""
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return
        link.unlink()
    elif link.exists():
        logger.warning("%s exists and is not a symlink; leaving it as it is", link)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError as exc:
        logger.warning(
            "cannot symlink %s -> %s (%s); copying (hard links where possible)", link, target, exc
        )
        _copy_tree(target, link)


def _prepare_images(plan: _Plan, images: Path) -> None:
    if plan.image_link is not None:
        _link_dir(images, plan.image_link)
        return
    if images.is_symlink():  # left by an earlier run with another layout
        images.unlink()
    images.mkdir(parents=True, exist_ok=True)
    for sub, target in plan.image_sublinks.items():
        _link_dir(images / sub, target)


# --------------------------------------------------------------------------------------------
# all-or-nothing output: staging folders, checked up front, moved into place at the end


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _check_output(out: Path, names: Sequence[str]) -> None:
    """Fail before converting anything if the output paths cannot be written as folders."""
    existing = out
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "--out" if existing == out else f"--out {out}: its parent"
        raise DatasetError(
            f"{what} {existing} is a file; expected a folder (or a path that does not exist yet)"
        )
    for name in names:
        folder = out / name
        if folder.exists() and not folder.is_dir():
            raise DatasetError(
                f"{folder} is a file; expected the dataset folder '{name}' (move the file away)"
            )
        ann = folder / "annotations"
        if ann.exists() and not ann.is_dir():
            raise DatasetError(
                f"{ann} is a file; expected a folder holding {{train,test}}.json (move it away)"
            )
        for split in SPLITS:
            if (ann / f"{split}.json").is_dir():
                raise DatasetError(f"{ann / f'{split}.json'} is a folder; expected a JSON file")
        images = folder / "images"
        if images.exists() and not images.is_dir():
            raise DatasetError(
                f"{images} is a file; expected the image folder or a symlink to it (move it away)"
            )


def _remove_stale_staging(out: Path, name: str) -> None:
    for stale in out.glob(f".{name}.*.partial"):
        logger.warning("removing %s, left by an interrupted prepare run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _commit(staged: Path, final: Path) -> None:
    """Move what ``staged`` holds to ``final``; files already in ``final`` but not staged stay.

    A new dataset folder appears with a single rename. Into an existing one, every staged
    file replaces its namesake with :func:`os.replace` (subset files, the other split's JSON
    of an earlier ``--splits`` run, reused DeepLesion PNGs are kept).
    """
    if not final.exists() and not final.is_symlink():
        os.replace(staged, final)
        return
    for entry in sorted(staged.iterdir()):
        target = final / entry.name
        if _is_real_dir(entry) and _is_real_dir(target):
            _commit(entry, target)
            continue
        if entry.is_symlink() and _is_real_dir(target):
            logger.warning("%s exists and is not a symlink; leaving it as it is", target)
            continue
        if _is_real_dir(entry) and target.is_symlink():
            target.unlink()  # an image link of an earlier run with another layout
        os.replace(entry, target)


# --------------------------------------------------------------------------------------------
# entry points


def _make_plans(
    src: Path, out: Path, names: Sequence[str], opts: PrepareOptions, *, skip_missing: bool
) -> dict[str, _Plan]:
    """One plan per dataset (in ``names`` order, repeats once), with the wanted splits only."""
    plans: dict[str, _Plan] = {}
    for name in dict.fromkeys(names):
        root = src / name
        if not root.is_dir():
            if skip_missing:
                logger.warning("%s: %s not found; skipped", name, root)
                continue
            raise _missing(name, root, "dataset folder")
        plan = _make_plan(name, root, out / name / "images", opts)
        plan.jobs = {s: job for s, job in plan.jobs.items() if s in opts.wanted}
        absent = [s for s in opts.splits or () if s not in plan.jobs]
        if absent:
            raise DatasetError(
                f"{name}: has no {absent[0]} split (requested with splits / --splits)"
            )
        plans[name] = plan
    return plans


def _new_staging_dir(out: Path, name: str) -> Path:
    """A fresh ``out/.NAME.*.partial`` folder (stale ones of interrupted runs removed first)."""
    _remove_stale_staging(out, name)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out))
    except OSError as exc:
        raise DatasetError(f"cannot write into {out}: {exc.strerror}") from None


def _convert_dataset(
    name: str,
    plan: _Plan,
    stage: Path,
    out: Path,
    bar: tqdm,
    progress: bool,
) -> dict[str, ConversionReport]:
    """Run every split job of ``plan`` into ``stage``; returns split -> report.

    The reports name the final JSON paths under ``out``, where :func:`_commit` moves them.
    """
    if plan.writes_images:
        (stage / "images").mkdir()
    reports: dict[str, ConversionReport] = {}
    for split, job in plan.jobs.items():
        bar.set_postfix_str(f"{name}/{split}")
        report = job(stage / "annotations" / f"{split}.json", progress)
        report.dataset = name
        report.json_path = out / name / "annotations" / f"{split}.json"
        reports[split] = report
        logger.info(
            "%s/%s: %d images, %d boxes, %d ignored, %d skipped",
            name,
            split,
            report.images,
            report.boxes,
            report.ignored,
            report.num_skipped,
        )
        bar.update(1)
    if not plan.writes_images:
        _prepare_images(plan, stage / "images")
    return reports


def prepare_uodb(
    src: Path | str,
    out: Path | str,
    datasets: Sequence[str] | None = None,
    *,
    options: PrepareOptions | None = None,
    skip_missing: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, ConversionReport]]:
    """Convert the original releases under ``src`` into UODB's COCO layout under ``out``.

    Args:
        src: ORIGINALS_DIR, one folder per dataset name (layout in the module docstring).
        out: output root; writes ``out/NAME/annotations/{train,test}.json`` and
            ``out/NAME/images``.
        datasets: names from ``UODB_DATASETS`` (default: all, in that order).
        options: conversion options (default :class:`PrepareOptions`).
        skip_missing: leave out datasets whose folder under ``src`` does not exist (logged)
            instead of failing.
        progress: show tqdm progress bars.

    Returns:
        ``{dataset: {split: ConversionReport}}``.

    Raises:
        DatasetError: a missing folder or file (named, with the expected layout), an output
            path that is a file, an empty split (unless ``allow_empty``), or bad input with
            ``on_bad_sample="error"``. All layouts are checked before anything is converted,
            and nothing under ``out`` changes unless every split converts.
    """
    src, out = Path(src), Path(out)
    opts = options or PrepareOptions()
    names = list(UODB_DATASETS if datasets is None else datasets)
    unknown = [n for n in names if n not in UODB_DATASETS]
    if unknown:
        raise DatasetError(f"unknown dataset(s) {unknown}; expected some of {UODB_DATASETS}")
    if not src.is_dir():
        raise DatasetError(f"originals folder not found: {src}")
    _check_output(out, names)
    plans = _make_plans(src, out, names, opts, skip_missing=skip_missing)

    created_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the output folder {out}: {exc.strerror}") from None
    reports: dict[str, dict[str, ConversionReport]] = {}
    staged: dict[str, Path] = {}
    total = sum(len(p.jobs) for p in plans.values())
    committed = False
    try:
        with tqdm(total=total, desc="UODB", unit="split", disable=not progress) as bar:
            for name, plan in plans.items():
                staged[name] = stage = _new_staging_dir(out, name)
                reports[name] = _convert_dataset(name, plan, stage, out, bar, progress)
        # Every split of every dataset converted: only now does anything under out change.
        committed = True
        for name, stage in staged.items():
            _commit(stage, out / name)
            logger.info("%s: written to %s", name, out / name)
    finally:
        for stage in staged.values():
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        if created_out and not committed:
            try:
                out.rmdir()  # the output folder this run created, empty again
            except OSError:
                pass
    return reports


def format_summary(reports: dict[str, dict[str, ConversionReport]]) -> str:
    """A plain-text table of the counts, then the skip reasons."""
    head = ("dataset", "split", "images", "boxes", "ignored", "clipped", "empty", "skipped")
    rows = [head]
    reasons: list[str] = []
    for name, splits in reports.items():
        for split, r in splits.items():
            rows.append(
                (
                    name,
                    split,
                    str(r.images),
                    str(r.boxes),
                    str(r.ignored),
                    str(r.clipped),
                    str(r.empty_images),
                    str(r.num_skipped),
                )
            )
            for reason, count in sorted(r.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
                example = r.examples.get(reason, [""])[0]
                reasons.append(f"  {name}/{split}: {count} x {reason} (first: {example})")
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if reasons:
        lines += ["", "skipped records:", *reasons]
    return "\n".join(lines)


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Rebuild UODB (COCO JSON per dataset split) from the original releases. "
        f"Expected layout under --src: {_DOC}.",
    )
    parser.add_argument("--src", required=True, type=Path, help="ORIGINALS_DIR")
    parser.add_argument("--out", required=True, type=Path, help="output root, e.g. data/uodb")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=UODB_DATASETS,
        default=None,
        metavar="NAME",
        help=f"subset of {UODB_DATASETS} (default: all)",
    )
    parser.add_argument("--on-bad-sample", choices=choices(BadSamplePolicy), default="error")
    parser.add_argument("--out-of-bounds", choices=choices(OutOfBoundsPolicy), default="clip")
    parser.add_argument(
        "--difficult",
        choices=FLAG_POLICIES,
        default="ignore",
        help="VOC/DOTA difficult objects and WIDER invalid faces",
    )
    parser.add_argument("--layout", choices=("auto", "original", "uodb-voc"), default="auto")
    parser.add_argument("--deeplesion-context-slices", action="store_true")
    parser.add_argument(
        "--overwrite-images",
        action="store_true",
        help="rewrite converted images (DeepLesion PNGs) that already exist",
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out datasets whose folder is missing instead of failing",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=SPLITS,
        default=None,
        help="convert only these splits (default: all); e.g. --splits test when only the test "
        "archive is there. Files of the other split from an earlier run are kept",
    )
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="write a split that has no images instead of failing (an empty split is usually a "
        "wrong path or an empty source folder)",
    )
    parser.add_argument(
        "--no-image-check",
        action="store_true",
        help="do not require every VOC-layout image (JPEGImages/<id>.jpg) to exist, e.g. to "
        "convert the annotations before the images are unpacked",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _options_from_args(args: argparse.Namespace) -> PrepareOptions:
    return PrepareOptions(
        on_bad_sample=args.on_bad_sample,
        out_of_bounds=args.out_of_bounds,
        difficult=args.difficult,
        layout=args.layout,
        deeplesion_context_slices=args.deeplesion_context_slices,
        overwrite_images=args.overwrite_images,
        splits=tuple(dict.fromkeys(args.splits)) if args.splits else None,
        allow_empty=args.allow_empty,
        check_images=not args.no_image_check,
    )


def main(argv: Sequence[str] | None = None, prog: str = "prepare_uodb") -> int:
    """CLI: ``python tools/prepare_uodb.py --src ORIGINALS_DIR --out data/uodb [...]``.

    Returns 0, or 2 with one ``error:`` line on stderr for bad input (as ``damex`` does).
    """
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    options = _options_from_args(args)
    try:
        reports = prepare_uodb(
            args.src,
            args.out,
            args.datasets,
            options=options,
            skip_missing=args.skip_missing,
            progress=not args.no_progress,
        )
    except DatasetError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(reports))
    return 0
