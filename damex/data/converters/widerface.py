"""WIDER FACE ``wider_face_split/wider_face_{train,val}_bbx_gt.txt`` -> COCO JSON (class face).

Format: a record is an image path line (``0--Parade/0_Parade_marchingband_1_849.jpg``), a line
with the face count N, then N lines ``x1 y1 w h blur expression illumination invalid occlusion
pose`` (0-based integer pixels, xywh; lines may end with a space). An image with N = 0 still
has one line of ten zeros, which is consumed here. Faces flagged ``invalid=1`` become ignore
regions (``iscrowd=1``) by default (``invalid="drop"`` / ``"keep"`` as alternatives); faces
with ``w`` or ``h`` of 0 (present in the real files) are skipped and counted as
``"zero-area box"``.

A malformed face line is one bad record (skippable); a record whose count line is not an
integer, or a file that ends inside a record, cannot be resynchronised and always raises.

Split reproduced: WIDER FACE train -> train, val -> test (UODB's ``widerface_train`` /
``widerface_val``; the official test set has no public labels).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
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

__all__ = ["WiderFace", "WiderRecord", "iter_wider_records", "convert_widerface"]

logger = logging.getLogger(__name__)

_INVALID_FIELD = 7  # x1 y1 w h blur expression illumination *invalid* occlusion pose


@dataclass
class WiderFace:
    """One face line: ``(x, y, w, h)``, the invalid flag, and the line number."""

    x: float
    y: float
    w: float
    h: float
    invalid: bool
    line: int


@dataclass
class WiderRecord:
    """One image record: its relative path, the line of the path, and its faces."""

    path: str
    line: int
    faces: list[WiderFace]


def _is_numeric_line(line: str) -> bool:
    tokens = line.split()
    if not tokens:
        return False
    try:
        for t in tokens:
            float(t)
    except ValueError:
        return False
    return True


def iter_wider_records(gt_txt: Path, issues: Issues) -> Iterator[WiderRecord]:
    """Parse a ``*_bbx_gt.txt`` file record by record.

    Args:
        gt_txt: the annotation file.
        issues: bad-sample policy for malformed face lines.

    Yields:
        One record per image, in file order.

    Raises:
        DatasetError: empty file, a non-integer count, or a truncated record (always).
    """
    try:
        lines = read_text(gt_txt).splitlines()
    except BadRecord as bad:
        raise DatasetError(str(bad)) from None
    i, n = 0, len(lines)
    while i < n:
        if not lines[i].strip():
            i += 1
            continue
        path_line = i + 1
        path = lines[i].strip()
        if _is_numeric_line(path):
            raise DatasetError(f"{gt_txt}:{path_line}: expected an image path, got {path!r}")
        i += 1
        if i >= n:
            raise DatasetError(f"{gt_txt}:{path_line}: record of {path!r} has no face count line")
        try:
            count = int(lines[i].strip())
        except ValueError:
            raise DatasetError(
                f"{gt_txt}:{i + 1}: expected the face count of {path!r}, got {lines[i]!r}"
            ) from None
        if count < 0:
            raise DatasetError(f"{gt_txt}:{i + 1}: negative face count {count}")
        i += 1
        faces: list[WiderFace] = []
        if count == 0:
            # A 0-face image is followed by one line of zeros that is not a face.
            if i < n and _is_numeric_line(lines[i]):
                i += 1
            yield WiderRecord(path=path, line=path_line, faces=faces)
            continue
        if i + count > n:
            raise DatasetError(
                f"{gt_txt}:{path_line}: record of {path!r} announces {count} faces but the file "
                f"ends after {n - i}"
            )
        for lineno in range(i + 1, i + count + 1):
            tokens = lines[lineno - 1].split()
            where = f"{gt_txt}:{lineno}"
            try:
                if len(tokens) not in (4, 10):
                    raise BadRecord(
                        where,
                        "expected 10 fields 'x1 y1 w h blur expression illumination invalid "
                        f"occlusion pose' (or 4: x1 y1 w h), got {len(tokens)}: "
                        f"{lines[lineno - 1]!r}",
                        "malformed line",
                    )
                try:
                    values = [float(t) for t in tokens]
                except ValueError:
                    raise BadRecord(
                        where,
                        f"fields must be numbers, got {lines[lineno - 1]!r}",
                        "malformed line",
                    ) from None
            except BadRecord as bad:
                issues.handle(bad)
                continue
            invalid = len(values) > _INVALID_FIELD and values[_INVALID_FIELD] != 0
            faces.append(WiderFace(*values[:4], invalid=invalid, line=lineno))
        i += count
        yield WiderRecord(path=path, line=path_line, faces=faces)


@dataclass(frozen=True)
class _WiderImageParser:
    """``parse`` for :func:`convert_records`: :class:`WiderRecord` -> :class:`ImageRecord`.

    Reads the image's size and applies the ``invalid`` policy to its faces.
    """

    gt_txt: Path
    image_dir: Path
    file_name_prefix: str
    invalid: FlagPolicy
    report: ConversionReport

    def __call__(self, rec: WiderRecord) -> ImageRecord:
        where = f"{self.gt_txt}:{rec.line}"
        width, height = read_image_size(self.image_dir / rec.path, where=where)
        record = ImageRecord(
            where=where, file_name=f"{self.file_name_prefix}{rec.path}", width=width, height=height
        )
        for face in rec.faces:
            fwhere = f"{self.gt_txt}:{face.line}"
            if face.invalid and self.invalid == "drop":
                self.report.skip("invalid face dropped", fwhere)
                continue
            record.objects.append(
                ObjectRecord(
                    where=fwhere,
                    category_id=1,
                    x0=face.x,
                    y0=face.y,
                    x1=face.x + face.w,
                    y1=face.y + face.h,
                    iscrowd=int(face.invalid and self.invalid == "ignore"),
                )
            )
        return record


def convert_widerface(
    gt_txt: Path,
    image_dir: Path,
    json_out: Path,
    *,
    classes: Sequence[str] | None = None,
    invalid: FlagPolicy = "ignore",
    file_name_prefix: str = "",
    dataset: str = "widerface",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert one WIDER FACE ground-truth file to a COCO JSON.

    Args:
        gt_txt: ``wider_face_split/wider_face_{train,val}_bbx_gt.txt``.
        image_dir: ``WIDER_{train,val}/images`` (sizes are read from the JPEG headers).
        json_out: the COCO JSON to write.
        classes: default ``UODB_CLASSES["widerface"]`` (``["face"]``).
        invalid: ``"ignore"`` (iscrowd=1, default) | ``"drop"`` | ``"keep"`` for invalid faces.
        file_name_prefix: prepended to the record's relative path in ``file_name``.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input (message names the file and line; a missing image names it).
    """
    check_choice("invalid", invalid, FLAG_POLICIES)
    gt_txt, image_dir = Path(gt_txt), Path(image_dir)
    classes = list(classes or UODB_CLASSES["widerface"])
    if len(classes) != 1:
        raise ValueError(f"WIDER FACE has one class, got classes={classes}")
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=[(1, classes[0])],
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from {gt_txt.name}",
    )
    records = list(iter_wider_records(gt_txt, builder.issues))
    parse = _WiderImageParser(
        gt_txt=gt_txt,
        image_dir=image_dir,
        file_name_prefix=file_name_prefix,
        invalid=invalid,
        report=builder.report,
    )

    return convert_records(
        builder,
        records,
        parse,
        json_out,
        progress=progress,
        source=str(gt_txt),
        allow_empty=allow_empty,
    )
