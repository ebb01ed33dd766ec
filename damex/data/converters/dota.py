"""DOTA v1.0 ``labelTxt`` polygons -> COCO JSON with axis-aligned boxes (15 classes).

Format (CAPTAIN-WHU DOTA_devkit): optional header lines ``imagesource:...`` and ``gsd:...``
(``gsd:null`` happens; some versions have no header), then one object per line ``x1 y1 x2 y2
x3 y3 x4 y4 category difficult`` -- a quadrilateral in 0-based (possibly float) pixels. CRLF
line endings are normal. The horizontal box is the min/max of the 8 coordinates; objects with
``difficult=1`` become ignore regions (``iscrowd=1``) by default. A polygon that leaves the
image (objects cut by the border) is clipped and counted.

Split reproduced: DOTA v1.0 ``train`` -> train, ``val`` -> test (UODB's ``dota_train`` /
``dota_val``; the test set has no public labels). UODB distributed DOTA re-encoded as JPEG and,
judging by its image counts, cut into patches; that cropping is not reproduced here: the
full-size images are used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from damex.data.converters.common import (
    FLAG_POLICIES,
    BadRecord,
    ConversionReport,
    FlagPolicy,
    ImageRecord,
    Issues,
    ObjectRecord,
    OnBadSample,
    OutOfBounds,
    check_choice,
    convert_records,
    read_image_size,
    read_text,
    split_builder,
)
from damex.data.uodb import UODB_CLASSES
from damex.errors import DatasetError

__all__ = ["convert_dota", "parse_dota_label"]

logger = logging.getLogger(__name__)

_HEADER_PREFIXES = ("imagesource:", "gsd:")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_dota_label(
    label_path: Path,
    *,
    file_name: str,
    width: int,
    height: int,
    class_to_id: dict[str, int],
    difficult: FlagPolicy,
    issues: Issues,
) -> ImageRecord:
    """Parse one ``labelTxt/<id>.txt`` file (boxes not yet validated).

    Raises:
        BadRecord: the file is missing or empty.
    """
    text = read_text(label_path)
    record = ImageRecord(where=str(label_path), file_name=file_name, width=width, height=height)
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.lower().startswith(_HEADER_PREFIXES):
            continue
        where = f"{label_path}:{lineno}"
        tokens = stripped.split()
        try:
            if len(tokens) != 10:
                raise BadRecord(
                    where,
                    "expected 10 space-separated fields 'x1 y1 x2 y2 x3 y3 x4 y4 category "
                    f"difficult', got {len(tokens)}: {stripped!r}",
                    "malformed line",
                )
            try:
                coords = [float(t) for t in tokens[:8]]
                is_difficult = int(tokens[9]) != 0
            except ValueError:
                raise BadRecord(
                    where,
                    f"coordinates and difficult must be numbers: {stripped!r}",
                    "malformed line",
                ) from None
            category = tokens[8]
            if category not in class_to_id:
                raise BadRecord(
                    where,
                    f"unknown class {category!r}; expected one of {sorted(class_to_id)}",
                    f"unknown class '{category}'",
                )
        except BadRecord as bad:
            issues.handle(bad)
            continue
        if is_difficult and difficult == "drop":
            issues.report.skip("difficult dropped", where)
            continue
        xs, ys = coords[0::2], coords[1::2]
        record.objects.append(
            ObjectRecord(
                where=where,
                category_id=class_to_id[category],
                x0=min(xs),
                y0=min(ys),
                x1=max(xs),
                y1=max(ys),
                iscrowd=int(is_difficult and difficult == "ignore"),
            )
        )
    return record


def _find_image(image_dir: Path, stem: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        candidate = image_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class _DotaLabelParser:
    """``parse`` for :func:`convert_records`: label file -> its :func:`parse_dota_label` record.

    Finds ``<id>`` in ``image_dir`` (first of ``image_exts``) and reads its size.
    """

    image_dir: Path
    image_exts: Sequence[str]
    file_name_prefix: str
    class_to_id: dict[str, int]
    difficult: FlagPolicy
    issues: Issues

    def __call__(self, label_path: Path) -> ImageRecord:
        image_path = _find_image(self.image_dir, label_path.stem, self.image_exts)
        if image_path is None:
            exts = ",".join(self.image_exts)
            raise BadRecord(
                str(label_path),
                f"image not found: {self.image_dir / label_path.stem}{{{exts}}}",
                "missing image",
            )
        width, height = read_image_size(image_path, where=str(label_path))
        return parse_dota_label(
            label_path,
            file_name=f"{self.file_name_prefix}{image_path.name}",
            width=width,
            height=height,
            class_to_id=self.class_to_id,
            difficult=self.difficult,
            issues=self.issues,
        )


def convert_dota(
    label_dir: Path,
    image_dir: Path,
    json_out: Path,
    *,
    classes: Sequence[str] | None = None,
    difficult: FlagPolicy = "ignore",
    image_exts: Sequence[str] = _IMAGE_EXTS,
    file_name_prefix: str = "",
    dataset: str = "dota",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert a DOTA ``labelTxt`` folder to a COCO JSON.

    Args:
        label_dir: ``<split>/labelTxt`` (one ``<id>.txt`` per image).
        image_dir: ``<split>/images`` (sizes are read from the image headers).
        json_out: the COCO JSON to write.
        classes: default ``UODB_CLASSES["dota"]``; native ids ``1..15`` in that order.
        difficult: ``"ignore"`` (iscrowd=1, default) | ``"drop"`` | ``"keep"``.
        image_exts: extensions tried for ``<id>`` in ``image_dir``, in order.
        file_name_prefix: prepended to the image's name in ``file_name``.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input (the message names the label file and line, or the missing
            image).
    """
    check_choice("difficult", difficult, FLAG_POLICIES)
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    classes = list(classes or UODB_CLASSES["dota"])
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=list(enumerate(classes, start=1)),
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from DOTA labelTxt ({label_dir})",
    )
    parse = _DotaLabelParser(
        image_dir=image_dir,
        image_exts=image_exts,
        file_name_prefix=file_name_prefix,
        class_to_id={name: i for i, name in enumerate(classes, start=1)},
        difficult=difficult,
        issues=builder.issues,
    )
    if not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: label folder not found (expected labelTxt/<id>.txt)")
    label_files = sorted(label_dir.glob("*.txt"))
    return convert_records(
        builder,
        label_files,
        parse,
        json_out,
        progress=progress,
        source=f"{label_dir} (*.txt label files)",
        allow_empty=allow_empty,
    )
