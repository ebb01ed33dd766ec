"""DeepLesion ``DL_info.csv`` key slices -> 8-bit PNGs + COCO JSON (class lesion).

Format (NIH DeepLesion): a comma CSV with one row per lesion; multi-value fields are quoted
(``"x1, y1, x2, y2"``). Used columns: ``File_name`` (``000089_01_01_037.png`` = folder
``000089_01_01``, slice ``037.png`` under ``Images_png/``), ``Bounding_boxes`` (0-based float
``x1, y1, x2, y2``), ``Image_size`` (``w, h``), ``DICOM_windows`` (``low, high`` in HU),
``Possibly_noisy`` and ``Train_Val_Test`` (1 train, 2 val, 3 test). Rows are grouped by
``File_name``: one image per key slice, one box per row.

Images: the key slices are 16-bit PNGs storing ``HU + 32768``. Each is windowed with its row's
DICOM window to 8 bits, ``round(clip((HU - low) / (high - low), 0, 1) * 255)``, and written as
a grayscale PNG under ``out_image_dir/<folder>/<slice>.png`` (``file_name`` is that relative
path). With ``context_slices=True`` the neighbouring slices (``slice - 1``, ``slice + 1``, the
key slice itself where a neighbour is missing) become the R and B channels of an RGB PNG, the
3-slice input popularised by 3DCE; the default is the key slice alone.

Split reproduced: UODB's ``deeplesion_trainval`` (Train_Val_Test 1 and 2) -> train and
``deeplesion_test`` (3) -> test.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from damex.data.converters.common import (
    BadRecord,
    CocoBuilder,
    ConversionReport,
    ImageRecord,
    Issues,
    ObjectRecord,
    OnBadSample,
    OutOfBounds,
    convert_records,
    read_text,
    split_builder,
    write_bytes_atomic,
)
from damex.data.uodb import UODB_CLASSES
from damex.errors import DatasetError

__all__ = ["HU_OFFSET", "window_hu", "convert_deeplesion", "deeplesion_source_path"]

logger = logging.getLogger(__name__)

HU_OFFSET = 32768  # DeepLesion PNGs store HU + 32768 as uint16
_FILE_RE = re.compile(r"^(\d+_\d+_\d+)_(\d+)\.png$")
_REQUIRED = ("File_name", "Bounding_boxes", "Image_size", "DICOM_windows", "Train_Val_Test")


def window_hu(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """Window a DeepLesion slice to 8 bits.

    Args:
        raw: stored values (``HU + 32768``), any integer dtype, shape [H, W].
        low: window lower bound in HU (maps to 0).
        high: window upper bound in HU (maps to 255).

    Returns:
        uint8 array [H, W]: ``round(clip((HU - low) / (high - low), 0, 1) * 255)``.
    """
    if not high > low:
        raise ValueError(f"DICOM window must have high > low, got ({low}, {high})")
    hu = raw.astype(np.float64) - HU_OFFSET
    scaled = np.clip((hu - low) / (high - low), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def deeplesion_source_path(images_dir: Path, file_name: str) -> tuple[Path, str, int]:
    """``Images_png/<folder>/<slice>.png`` of a ``File_name``, the folder and the slice number.

    Raises:
        ValueError: ``file_name`` is not ``<patient>_<study>_<series>_<slice>.png``.
    """
    match = _FILE_RE.match(file_name)
    if match is None:
        raise ValueError(f"File_name must look like 000089_01_01_037.png, got {file_name!r}")
    folder, slice_str = match.groups()
    return Path(images_dir) / folder / f"{slice_str}.png", folder, int(slice_str)


def _floats(text: str, n: int, where: str, column: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise BadRecord(
            where, f"{column} must hold {n} comma-separated numbers, got {text!r}", "malformed row"
        )
    return values


def _read_slice(path: Path, where: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise BadRecord(
                    where,
                    f"{path}: expected a 16-bit grayscale PNG, got mode {im.mode}",
                    "bad image",
                )
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise BadRecord(where, f"image not found: {path}", "missing image") from None
    except OSError as exc:
        raise BadRecord(where, f"cannot read image {path}: {exc}", "bad image") from None


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


_Rows = list[tuple[int, dict[str, str]]]  # (CSV line, row) of one File_name


def _group_rows(
    csv_path: Path, subsets: Collection[int], drop_noisy: bool, builder: CocoBuilder
) -> dict[str, _Rows]:
    """Read ``DL_info.csv``: File_name -> its rows of the requested subsets, in file order.

    Malformed rows go to ``builder.issues``; ``Possibly_noisy`` rows dropped with
    ``drop_noisy`` are counted in ``builder.report``.
    """
    report, issues = builder.report, builder.issues
    try:
        text = read_text(csv_path)
    except BadRecord as bad:
        raise DatasetError(str(bad)) from None
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=False)
    header = reader.fieldnames or []
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}:1: header lacks columns {missing}; got {header}")

    groups: dict[str, _Rows] = {}
    for row in reader:
        lineno = reader.line_num
        where = f"{csv_path}:{lineno}"
        try:
            if None in row or any(v is None for v in row.values()):
                raise BadRecord(
                    where,
                    f"expected {len(header)} comma-separated fields like the header",
                    "malformed row",
                )
            try:
                subset = int(row["Train_Val_Test"])
            except ValueError:
                raise BadRecord(
                    where,
                    f"Train_Val_Test must be 1, 2 or 3, got {row['Train_Val_Test']!r}",
                    "malformed row",
                ) from None
        except BadRecord as bad:
            issues.handle(bad)
            continue
        if subset not in subsets:
            continue
        if drop_noisy and row.get("Possibly_noisy", "0").strip() == "1":
            report.skip("possibly noisy", where)
            continue
        groups.setdefault(row["File_name"].strip(), []).append((lineno, row))
    return groups


def _windowed_pixels(
    src: Path,
    slice_no: int,
    window: tuple[float, float],
    size: tuple[int, int],
    where: str,
    context_slices: bool,
) -> np.ndarray:
    """The 8-bit image of a key slice: ``[H, W]``, or ``[H, W, 3]`` with its neighbours.

    Args:
        src: the key slice's 16-bit PNG.
        slice_no: its slice number (the neighbours are ``slice_no -/+ 1`` in its folder).
        window: the row's DICOM window ``(low, high)`` in HU.
        size: ``(width, height)`` from ``Image_size``, checked against the PNG.
        where: ``csv:line`` for errors.
        context_slices: stack (slice - 1, slice, slice + 1) as RGB (a missing or differently
            sized neighbour is replaced by the key slice).
    """
    low, high = window
    width, height = size
    raw = _read_slice(src, where)
    if raw.shape != (height, width):
        raise BadRecord(
            where,
            f"{src}: image is {raw.shape[1]}x{raw.shape[0]}, Image_size says {width}x{height}",
            "size mismatch",
        )
    key = window_hu(raw, low, high)
    if not context_slices:
        return key  # [H, W]
    chans = []
    for offset in (-1, 1):
        neighbour = src.with_name(f"{slice_no + offset:03d}.png")
        if neighbour.is_file():
            data = _read_slice(neighbour, where)
            chans.append(window_hu(data, low, high) if data.shape == raw.shape else key)
        else:
            chans.append(key)
    return np.stack([chans[0], key, chans[1]], axis=-1)  # [H, W, 3]


def _lesion_boxes(csv_path: Path, rows: _Rows, issues: Issues) -> list[ObjectRecord]:
    """One lesion box per row; a malformed ``Bounding_boxes`` goes to ``issues``."""
    objects = []
    for lineno, row in rows:
        where = f"{csv_path}:{lineno}"
        try:
            x0, y0, x1, y1 = _floats(row["Bounding_boxes"], 4, where, "Bounding_boxes")
        except BadRecord as bad:
            issues.handle(bad)
            continue
        objects.append(ObjectRecord(where=where, category_id=1, x0=x0, y0=y0, x1=x1, y1=y1))
    return objects


@dataclass(frozen=True)
class _KeySliceParser:
    """``parse`` for :func:`convert_records`: one key slice -> its 8-bit PNG and its record.

    The PNG is written (under ``out_image_dir``) unless it exists already, here or in
    ``reuse_image_dir``, and ``overwrite_images`` is off.
    """

    csv_path: Path
    images_dir: Path
    out_image_dir: Path
    reuse_image_dir: Path | None
    overwrite_images: bool
    context_slices: bool
    groups: dict[str, _Rows]
    issues: Issues

    def __call__(self, file_name: str) -> ImageRecord:
        rows = self.groups[file_name]
        first = f"{self.csv_path}:{rows[0][0]}"
        try:
            src, folder, slice_no = deeplesion_source_path(self.images_dir, file_name)
        except ValueError as exc:
            raise BadRecord(first, str(exc), "malformed row") from None
        width, height = (int(v) for v in _floats(rows[0][1]["Image_size"], 2, first, "Image_size"))
        low, high = _floats(rows[0][1]["DICOM_windows"], 2, first, "DICOM_windows")
        if not high > low:
            raise BadRecord(
                first,
                f"DICOM_windows must have high > low, got ({low:g}, {high:g})",
                "malformed row",
            )
        rel = f"{folder}/{src.name}"
        dst = self.out_image_dir / rel
        reuse = self.reuse_image_dir
        done = dst.is_file() or (reuse is not None and (reuse / rel).is_file())
        if self.overwrite_images or not done:
            pixels = _windowed_pixels(
                src, slice_no, (low, high), (width, height), first, self.context_slices
            )
            write_bytes_atomic(dst, _encode_png(pixels))
        record = ImageRecord(where=first, file_name=rel, width=width, height=height)
        record.objects.extend(_lesion_boxes(self.csv_path, rows, self.issues))
        return record


def convert_deeplesion(
    csv_path: Path,
    images_dir: Path,
    out_image_dir: Path,
    json_out: Path,
    *,
    subsets: Collection[int] = (1, 2),
    classes: Sequence[str] | None = None,
    context_slices: bool = False,
    drop_noisy: bool = False,
    overwrite_images: bool = False,
    reuse_image_dir: Path | None = None,
    dataset: str = "deeplesion",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert DeepLesion key slices of some ``Train_Val_Test`` subsets to PNGs + COCO JSON.

    Args:
        csv_path: ``DL_info.csv``.
        images_dir: ``Images_png`` (16-bit slices).
        out_image_dir: where the 8-bit PNGs go (the dataset's ``images/`` folder).
        json_out: the COCO JSON to write.
        subsets: ``Train_Val_Test`` values kept: ``(1, 2)`` for UODB's trainval, ``(3,)`` test.
        classes: default ``UODB_CLASSES["deeplesion"]`` (``["lesion"]``).
        context_slices: write RGB = (slice - 1, slice, slice + 1) instead of the key slice.
        drop_noisy: skip rows with ``Possibly_noisy = 1`` (counted).
        overwrite_images: rewrite PNGs that already exist (default: keep them; they are only
            ever written whole, so an existing one is complete).
        reuse_image_dir: another image folder (an earlier output's) whose existing PNGs count
            as already written (default: only ``out_image_dir`` is checked).
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input (the message names the CSV and its line, or the missing slice).
    """
    csv_path, images_dir, out_image_dir = Path(csv_path), Path(images_dir), Path(out_image_dir)
    classes = list(classes or UODB_CLASSES["deeplesion"])
    if len(classes) != 1:
        raise ValueError(f"DeepLesion has one class, got classes={classes}")
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=[(1, classes[0])],
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from {csv_path.name} (subsets {sorted(subsets)})",
    )
    groups = _group_rows(csv_path, subsets, drop_noisy, builder)

    parse = _KeySliceParser(
        csv_path=csv_path,
        images_dir=images_dir,
        out_image_dir=out_image_dir,
        reuse_image_dir=reuse_image_dir,
        overwrite_images=overwrite_images,
        context_slices=context_slices,
        groups=groups,
        issues=builder.issues,
    )
    return convert_records(
        builder,
        sorted(groups),
        parse,
        json_out,
        progress=progress,
        source=f"{csv_path} (rows with Train_Val_Test in {sorted(subsets)})",
        allow_empty=allow_empty,
    )
