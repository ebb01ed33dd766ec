"""Shared pieces of the UODB converters: reports, the bad-sample policy, the COCO builder.

Every converter parses one original annotation format and writes one COCO JSON per split
(``images[{id, file_name, width, height}]``, ``annotations[{id, image_id, category_id, bbox,
area, iscrowd}]``, ``categories[{id, name}]``; ``bbox`` is ``[x, y, w, h]`` in 0-based float
pixels, i.e. continuous coordinates where pixel ``i`` covers ``[i, i + 1)``).

Bad input either raises :class:`damex.errors.DatasetError` (``on_bad_sample="error"``, the
default) with a message that starts with the place (``file:line``, ``file <object> #k``,
``file row N``), or is skipped and counted under its reason (``on_bad_sample="skip"``).
Zero-area boxes are always skipped and counted (never an error); boxes that leave the image
are clipped and counted (``out_of_bounds="clip"``) or treated as bad input
(``out_of_bounds="error"``). A split without any image is an error unless ``allow_empty``
(:func:`check_not_empty`). Nothing is ever half-written: files go to a temporary file in
the destination folder and are moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
import xml.parsers.expat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from damex.config import BadSamplePolicy, OutOfBoundsPolicy, choices
from damex.errors import DatasetError

__all__ = [
    "OnBadSample",
    "OutOfBounds",
    "FlagPolicy",
    "FLAG_POLICIES",
    "BadRecord",
    "ConversionReport",
    "Issues",
    "ObjectRecord",
    "ImageRecord",
    "CocoBuilder",
    "split_builder",
    "progress_bar",
    "convert_records",
    "check_not_empty",
    "XmlNode",
    "parse_xml",
    "read_image_size",
    "read_text",
    "write_json_atomic",
    "write_bytes_atomic",
    "stable_fraction",
    "check_choice",
]

logger = logging.getLogger(__name__)

OnBadSample = BadSamplePolicy  # the config schema's choice types (data.on_bad_sample, ...)
OutOfBounds = OutOfBoundsPolicy
# What to do with objects a dataset flags as hard (VOC/DOTA ``difficult``, WIDER ``invalid``):
# "ignore" writes them as COCO ignore regions (iscrowd=1), "drop" leaves them out, "keep" writes
# them as ordinary boxes (what DAMEX's own voc_to_coco.py did: it never read <difficult>).
FlagPolicy = Literal["ignore", "drop", "keep"]
FLAG_POLICIES: tuple[str, ...] = ("ignore", "drop", "keep")

_T = TypeVar("_T")

_MAX_EXAMPLES = 3
# Coordinates are rounded to 6 decimals so that float noise (423.81 - 387.63 =
# 36.18000000000001) does not leak into the JSON; 1e-6 px is far below any annotation precision.
_DECIMALS = 6


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices`` (names the argument)."""
    allowed = tuple(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class BadRecord(Exception):
    """A bad record found while parsing; the converter turns it into an error or a skip.

    Args:
        where: the place, e.g. ``"label_2/000001.txt:3"``.
        message: what is wrong, with expected vs got.
        reason: a short category used to count skips (e.g. ``"malformed line"``).
    """

    def __init__(self, where: str, message: str, reason: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
        self.reason = reason


@dataclass
class ConversionReport:
    """Counts of one converted split.

    Attributes:
        dataset: UODB dataset name (``damex.data.uodb.UODB_DATASETS``).
        split: ``"train"`` or ``"test"``.
        json_path: the written JSON (None until written).
        images: images written.
        boxes: annotations written with ``iscrowd=0``.
        ignored: annotations written with ``iscrowd=1`` (ignore regions).
        clipped: boxes clipped to the image.
        empty_images: images written without any annotation.
        skipped: reason -> number of skipped records (boxes or whole images).
        examples: reason -> the first few places where that reason occurred.
    """

    dataset: str
    split: str
    json_path: Path | None = None
    images: int = 0
    boxes: int = 0
    ignored: int = 0
    clipped: int = 0
    empty_images: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped record under ``reason`` and remember where it was."""
        self.skipped[reason] += 1
        places = self.examples.setdefault(reason, [])
        if len(places) < _MAX_EXAMPLES:
            places.append(where)
        logger.debug("%s/%s: skipped (%s) at %s", self.dataset, self.split, reason, where)

    @property
    def num_skipped(self) -> int:
        """Total number of skipped records."""
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "json_path": str(self.json_path) if self.json_path else None,
            "images": self.images,
            "boxes": self.boxes,
            "ignored": self.ignored,
            "clipped": self.clipped,
            "empty_images": self.empty_images,
            "skipped": dict(self.skipped),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


class Issues:
    """Applies the ``on_bad_sample`` policy to :class:`BadRecord` s.

    Args:
        report: where skips are counted.
        on_bad_sample: ``"error"`` raises :class:`DatasetError`; ``"skip"`` counts and goes on.
    """

    def __init__(self, report: ConversionReport, on_bad_sample: OnBadSample) -> None:
        check_choice("on_bad_sample", on_bad_sample, choices(BadSamplePolicy))
        self.report = report
        self.on_bad_sample = on_bad_sample

    def handle(self, bad: BadRecord) -> None:
        """Raise ``DatasetError`` for ``bad`` or count it as skipped."""
        if self.on_bad_sample == "error":
            raise DatasetError(str(bad)) from None
        self.report.skip(bad.reason, bad.where)


@dataclass
class ObjectRecord:
    """One box of an image, in continuous 0-based xyxy pixels, before validation.

    Attributes:
        where: its place in the source (for messages).
        category_id: native category id.
        x0, y0, x1, y1: corners (``x1 >= x0`` expected).
        iscrowd: 1 for an ignore region.
    """

    where: str
    category_id: int
    x0: float
    y0: float
    x1: float
    y1: float
    iscrowd: int = 0


@dataclass
class ImageRecord:
    """One image and its boxes, as parsed from the source.

    Attributes:
        where: its place in the source (annotation file, record line, CSV row).
        file_name: path relative to the dataset's ``images/`` folder.
        width, height: image size in pixels.
        objects: its boxes.
    """

    where: str
    file_name: str
    width: int
    height: int
    objects: list[ObjectRecord] = field(default_factory=list)


def _r(value: float) -> float:
    out = round(float(value), _DECIMALS)
    return 0.0 if out == 0 else out  # no "-0.0" in the JSON


class CocoBuilder:
    """Accumulates a COCO detection JSON in memory and writes it atomically.

    Args:
        categories: ``(native id, name)`` pairs, written in this order.
        report: counts are added here.
        issues: the bad-sample policy.
        out_of_bounds: ``"clip"`` (clip and count) or ``"error"`` (bad record).
        description: stored under ``info.description``.
    """

    def __init__(
        self,
        *,
        categories: Sequence[tuple[int, str]],
        report: ConversionReport,
        issues: Issues,
        out_of_bounds: OutOfBounds = "clip",
        description: str = "",
    ) -> None:
        check_choice("out_of_bounds", out_of_bounds, choices(OutOfBoundsPolicy))
        self.categories = [{"id": int(i), "name": str(n)} for i, n in categories]
        self._category_ids = {c["id"] for c in self.categories}
        self.report = report
        self.issues = issues
        self.out_of_bounds = out_of_bounds
        self.description = description
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self._image_ids: set[int] = set()
        self._ann_ids: set[int] = set()
        self._file_names: set[str] = set()

    def add_image(
        self, *, file_name: str, width: int, height: int, image_id: int | None = None
    ) -> int:
        """Add an image; ids are 1, 2, ... unless ``image_id`` is given (COCO passthrough)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image {file_name}: size must be positive, got {width}x{height}")
        if file_name in self._file_names:
            raise DatasetError(
                f"image {file_name!r} appears twice in the {self.report.split} split"
            )
        if image_id is None:
            image_id = len(self.images) + 1
            while image_id in self._image_ids:
                image_id += 1
        elif image_id in self._image_ids:
            raise DatasetError(f"image id {image_id} ({file_name}) appears twice")
        self._image_ids.add(image_id)
        self._file_names.add(file_name)
        self.images.append(
            {
                "id": int(image_id),
                "file_name": file_name,
                "width": int(width),
                "height": int(height),
            }
        )
        self.report.images += 1
        return image_id

    def add_box(
        self,
        *,
        image_id: int,
        category_id: int,
        xyxy: tuple[float, float, float, float],
        image_size: tuple[int, int],
        where: str,
        iscrowd: int = 0,
        area: float | None = None,
        ann_id: int | None = None,
    ) -> bool:
        """Validate, clip and add one box.

        Args:
            image_id: id returned by :meth:`add_image`.
            category_id: a native id from ``categories``.
            xyxy: continuous 0-based corners ``(x0, y0, x1, y1)``.
            image_size: ``(width, height)`` of the image.
            where: the box's place in the source.
            iscrowd: 1 writes an ignore region.
            area: the annotation area to keep (COCO passthrough); default ``w * h``.
            ann_id: annotation id to keep (COCO passthrough); default 1, 2, ...

        Returns:
            True if written, False if skipped as zero-area (counted).

        Raises:
            BadRecord: non-finite or inverted box, unknown category, out of bounds with
                ``out_of_bounds="error"``.
        """
        x0, y0, x1, y1 = self._checked_corners(xyxy, image_size, category_id, where)
        w, h = _r(x1 - x0), _r(y1 - y0)
        if w <= 0 or h <= 0:
            self.report.skip("zero-area box", where)
            return False
        ann_id = self._claim_ann_id(ann_id, where)
        self.annotations.append(
            {
                "id": int(ann_id),
                "image_id": int(image_id),
                "category_id": int(category_id),
                "bbox": [_r(x0), _r(y0), w, h],
                "area": _r(w * h) if area is None else float(area),
                "iscrowd": int(bool(iscrowd)),
            }
        )
        if iscrowd:
            self.report.ignored += 1
        else:
            self.report.boxes += 1
        return True

    def _checked_corners(
        self,
        xyxy: tuple[float, float, float, float],
        image_size: tuple[int, int],
        category_id: int,
        where: str,
    ) -> tuple[float, float, float, float]:
        """``xyxy`` as floats, validated and clipped to the image (clipping is counted)."""
        x0, y0, x1, y1 = (float(v) for v in xyxy)
        width, height = image_size
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise BadRecord(where, f"non-finite box coordinates {xyxy}", "non-finite box")
        if category_id not in self._category_ids:
            raise BadRecord(
                where,
                f"category id {category_id} is not one of {sorted(self._category_ids)}",
                "unknown category id",
            )
        if x1 < x0 or y1 < y0:
            raise BadRecord(
                where,
                f"inverted box (x0, y0, x1, y1) = ({x0:g}, {y0:g}, {x1:g}, {y1:g}); "
                "expected x1 >= x0 and y1 >= y0",
                "inverted box",
            )
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            if self.out_of_bounds == "error":
                raise BadRecord(
                    where,
                    f"box (x0, y0, x1, y1) = ({x0:g}, {y0:g}, {x1:g}, {y1:g}) leaves the "
                    f"{width}x{height} image",
                    "box out of bounds",
                )
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
            self.report.clipped += 1
        return x0, y0, x1, y1

    def _claim_ann_id(self, ann_id: int | None, where: str) -> int:
        """Reserve ``ann_id``, or the next free id 1, 2, ... when it is None."""
        if ann_id is None:
            ann_id = len(self.annotations) + 1
            while ann_id in self._ann_ids:
                ann_id += 1
        elif ann_id in self._ann_ids:
            raise BadRecord(where, f"annotation id {ann_id} appears twice", "duplicate id")
        self._ann_ids.add(ann_id)
        return ann_id

    def add_record(self, record: ImageRecord) -> int:
        """Add an image and its boxes; bad boxes go through the bad-sample policy."""
        image_id = self.add_image(
            file_name=record.file_name, width=record.width, height=record.height
        )
        written = 0
        for obj in record.objects:
            try:
                written += self.add_box(
                    image_id=image_id,
                    category_id=obj.category_id,
                    xyxy=(obj.x0, obj.y0, obj.x1, obj.y1),
                    image_size=(record.width, record.height),
                    where=obj.where,
                    iscrowd=obj.iscrowd,
                )
            except BadRecord as bad:
                self.issues.handle(bad)
        if written == 0:
            self.report.empty_images += 1
        return image_id

    def to_dict(self) -> dict[str, Any]:
        """The COCO dictionary."""
        return {
            "info": {"description": self.description},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def write(self, path: Path) -> Path:
        """Write the JSON atomically and record its path in the report."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        self.report.json_path = path
        return path


def split_builder(
    *,
    dataset: str,
    split: str,
    categories: Sequence[tuple[int, str]],
    on_bad_sample: OnBadSample,
    out_of_bounds: OutOfBounds,
    description: str,
) -> CocoBuilder:
    """A :class:`CocoBuilder` for one split, with a fresh report and bad-sample policy.

    The report is ``builder.report`` and the policy ``builder.issues``.

    Args:
        dataset: dataset name for the report.
        split: split name for the report.
        categories: ``(native id, name)`` pairs, written in this order.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        description: stored under ``info.description``.
    """
    report = ConversionReport(dataset=dataset, split=split)
    return CocoBuilder(
        categories=categories,
        report=report,
        issues=Issues(report, on_bad_sample),
        out_of_bounds=out_of_bounds,
        description=description,
    )


def progress_bar(items: Iterable[_T], report: ConversionReport, progress: bool) -> Iterable[_T]:
    """``items`` behind a tqdm bar named ``<dataset>/<split>`` (shown only with ``progress``)."""
    return tqdm(items, desc=f"{report.dataset}/{report.split}", disable=not progress, leave=False)


def convert_records(
    builder: CocoBuilder,
    items: Iterable[_T],
    parse: Callable[[_T], ImageRecord],
    json_out: Path,
    *,
    progress: bool,
    source: str = "",
    allow_empty: bool = False,
) -> ConversionReport:
    """Parse every item into an image record, add it, and write the JSON.

    A :class:`BadRecord` raised by ``parse`` drops that item through ``builder.issues``.

    Args:
        builder: from :func:`split_builder`.
        items: one per image (ids, files, groups of rows), in output order.
        parse: item -> its image and boxes.
        json_out: the COCO JSON to write.
        progress: show a tqdm bar.
        source: the annotation file or folder read (named when the split is empty).
        allow_empty: write a split without images instead of raising (see
            :func:`check_not_empty`).

    Raises:
        DatasetError: bad input with ``on_bad_sample="error"``, or no image at all (unless
            ``allow_empty``); nothing is written then.

    Returns:
        ``builder.report``.
    """
    items = list(items)
    for item in progress_bar(items, builder.report, progress):
        try:
            record = parse(item)
        except BadRecord as bad:
            builder.issues.handle(bad)
            continue
        builder.add_record(record)
    check_not_empty(builder.report, source, len(items), allow_empty=allow_empty)
    builder.write(Path(json_out))
    return builder.report


def check_not_empty(
    report: ConversionReport, source: str, num_items: int, *, allow_empty: bool
) -> None:
    """Raise :class:`DatasetError` when a split ended up without a single image.

    An empty split is almost always a wrong path or an empty source (a ``labelTxt`` folder
    without label files, a CSV with only its header), so it is an error unless asked for.

    Args:
        report: the split's counts (``report.images`` is checked).
        source: what was read (a file or folder), named in the message.
        num_items: how many candidate images the source listed.
        allow_empty: write an empty split instead of raising.
    """
    if report.images > 0 or allow_empty:
        return
    if num_items == 0:
        found = "it lists no images"
    else:
        found = f"all {num_items} listed images were skipped ({dict(report.skipped)})"
    raise DatasetError(
        f"{source}: no images for {report.dataset}/{report.split}: {found}; expected at least "
        "one image (check the path, or pass allow_empty=True / --allow-empty to write an "
        "empty split)"
    )


# --------------------------------------------------------------------------------------------
# XML with line numbers (xml.etree drops them; messages must name the line)


@dataclass
class XmlNode:
    """A parsed XML element with the line it starts on."""

    tag: str
    line: int
    children: list[XmlNode] = field(default_factory=list)
    _text: list[str] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        """The element's own text, stripped."""
        return "".join(self._text).strip()

    def find(self, tag: str) -> XmlNode | None:
        """The first direct child called ``tag``."""
        for child in self.children:
            if child.tag == tag:
                return child
        return None

    def findall(self, tag: str) -> list[XmlNode]:
        """All direct children called ``tag``."""
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str) -> str | None:
        """Stripped text of the first child ``tag``, or None if there is no such child."""
        child = self.find(tag)
        return None if child is None else child.text


def parse_xml(path: Path) -> XmlNode:
    """Parse an XML file into :class:`XmlNode` s that know their line numbers.

    Raises:
        BadRecord: empty file (reason ``"empty annotation file"``) or malformed XML
            (``"malformed XML"``, the place is ``file:line``).
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise BadRecord(str(path), "empty annotation file", "empty annotation file")
    parser = xml.parsers.expat.ParserCreate()
    stack: list[XmlNode] = []
    roots: list[XmlNode] = []

    def start(tag: str, _attrs: Mapping[str, str]) -> None:
        node = XmlNode(tag=tag, line=parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1]._text.append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        msg = xml.parsers.expat.errors.messages[exc.code]
        raise BadRecord(
            f"{path}:{exc.lineno}", f"malformed XML ({msg}, column {exc.offset})", "malformed XML"
        ) from None
    return roots[0]


# --------------------------------------------------------------------------------------------
# files


def read_text(path: Path, *, where: str | None = None) -> str:
    """Read a UTF-8 text file (BOM tolerated); an empty file is a :class:`BadRecord`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BadRecord(where or str(path), "annotation file not found", "missing file") from None
    except UnicodeDecodeError as exc:
        raise BadRecord(
            where or str(path), f"not UTF-8 text ({exc.reason})", "malformed file"
        ) from None
    if not text.strip():
        raise BadRecord(where or str(path), "empty annotation file", "empty annotation file")
    return text


def read_image_size(path: Path, *, where: str) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (the pixels are not decoded).

    Raises:
        BadRecord: the image is missing (``"missing image"``) or unreadable (``"bad image"``).
    """
    try:
        with warnings.catch_warnings():
            # Only the header is read, so large aerial images are no decompression bomb.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except FileNotFoundError:
        raise BadRecord(where, f"image not found: {path}", "missing image") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BadRecord(where, f"cannot read image {path}: {exc}", "bad image") from None
    return int(width), int(height)


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as compact JSON, atomically (see :func:`write_bytes_atomic`)."""
    buf = io.StringIO()
    json.dump(obj, buf, separators=(",", ":"), ensure_ascii=False)
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


def stable_fraction(key: str) -> float:
    """A number in ``[0, 1)`` from ``key`` alone (SHA-1), the same on every machine and run.

    Used for default splits: an item goes to the test split when ``stable_fraction(key) <
    test_fraction``, independent of which other items exist.
    """
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
