"""Pascal VOC XML -> COCO JSON (VOC2007, VOC2012, Clipart1k, Watercolor2k, Comic2k, UODB).

One converter covers every VOC-layout release: ``ROOT/Annotations/<id>.xml``,
``ROOT/ImageSets/Main/<image_set>.txt`` and ``ROOT/JPEGImages/<id><ext>``. That is the layout of
VOC2007/VOC2012, of the cross-domain sets (naoto0804/cross-domain-detection: clipart,
watercolor, comic) and of UODB's own download, which shipped all 11 datasets this way.

Coordinate convention (VOC boxes are 1-based, inclusive pixel indices): the box that covers
pixels ``xmin..xmax`` is the continuous 0-based interval ``[xmin - 1, xmax)``, so we write
``bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``. This is the same box
UODB's loaders use (they subtract 1 from all four corners and measure ``x2 - x1 + 1``, i.e. in
pixel-index form) and the one COCO's own VOC conversions use. DAMEX's ``voc_to_coco.py``
wrote ``[xmin, ymin, xmax - xmin, ymax - ymin]`` instead (1 px to the right/bottom and 1 px
smaller); the difference is at most one pixel per side.

``<difficult>1`` objects become ignore regions (``iscrowd=1``) by default; ``difficult="drop"``
leaves them out and ``difficult="keep"`` writes them as ordinary boxes (what DAMEX did). A
missing ``<difficult>`` is 0, as in UODB's loaders. Class names are matched lower-cased and
stripped (UODB's loaders do the same).

Splits reproduced: VOC07 ``trainval`` -> train and ``test`` -> test; VOC12 ``train`` -> train;
Clipart1k / Watercolor2k / Comic2k ``train`` -> train and ``test`` -> test; UODB's own release:
the image sets its loaders name (``damex.data.converters.prepare``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
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
    XmlNode,
    check_choice,
    convert_records,
    parse_xml,
    read_image_size,
    read_text,
    split_builder,
)
from damex.errors import DatasetError

__all__ = ["parse_voc_xml", "read_image_set", "convert_voc", "UODB_KITTI_VOC_ALIASES"]

logger = logging.getLogger(__name__)

# UODB's KITTIVOC release names KITTI types in lower case and keeps the original types; DAMEX's
# voc_to_coco.py merged them like this (car/van/truck/tricycle -> vehicle, person_sitting ->
# pedestrian, dontcare dropped). ``None`` drops the object (counted as skipped).
UODB_KITTI_VOC_ALIASES: dict[str, str | None] = {
    "car": "vehicle",
    "van": "vehicle",
    "truck": "vehicle",
    "tricycle": "vehicle",
    "person_sitting": "pedestrian",
    "dontcare": None,
    "misc": None,
    "tram": None,
}


def _number(node_text: str | None, where: str, tag: str) -> float:
    if node_text is None or node_text == "":
        raise BadRecord(where, f"missing <{tag}>", "malformed XML")
    try:
        return float(node_text)
    except ValueError:
        raise BadRecord(
            where, f"<{tag}> must be a number, got {node_text!r}", "malformed XML"
        ) from None


def _image_size(path: Path, root: XmlNode, image_path: Path | None) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, or read from ``image_path`` when missing or zero."""
    width = height = 0
    size = root.find("size")
    if size is not None:
        where = f"{path}:{size.line} <size>"
        width = int(_number(size.findtext("width"), where, "width"))
        height = int(_number(size.findtext("height"), where, "height"))
    if width <= 0 or height <= 0:
        if image_path is None:
            raise BadRecord(
                f"{path}:{root.line}",
                f"<size> is missing or not positive (got {width}x{height}) and no image to read",
                "missing size",
            )
        width, height = read_image_size(image_path, where=f"{path}: <size> missing")
    return width, height


def _parse_object(
    path: Path,
    k: int,
    obj: XmlNode,
    *,
    class_to_id: Mapping[str, int],
    aliases: Mapping[str, str | None],
    difficult: FlagPolicy,
    offset: float,
    report: ConversionReport,
) -> ObjectRecord | None:
    """The ``k``-th ``<object>``, or None when it is dropped (counted as skipped in ``report``).

    Raises:
        BadRecord: a missing or malformed field, an unknown class.
    """
    where = f"{path}:{obj.line} <object> #{k}"
    raw = (obj.findtext("name") or "").strip()
    name = raw.lower()
    if not name:
        raise BadRecord(where, "missing <name>", "malformed XML")
    if name in aliases:
        target = aliases[name]
        if target is None:
            report.skip(f"class '{name}' not in UODB", where)
            return None
        name = target
    if name not in class_to_id:
        raise BadRecord(
            where,
            f"unknown class {raw!r}; expected one of {sorted(class_to_id)}",
            f"unknown class '{raw}'",
        )
    flag_text = obj.findtext("difficult")
    is_difficult = bool(int(_number(flag_text, where, "difficult"))) if flag_text else False
    if is_difficult and difficult == "drop":
        report.skip("difficult dropped", where)
        return None
    box = obj.find("bndbox")
    if box is None:
        raise BadRecord(where, "missing <bndbox>", "malformed XML")
    bwhere = f"{path}:{box.line} <bndbox> of <object> #{k}"
    xmin = _number(box.findtext("xmin"), bwhere, "xmin")
    ymin = _number(box.findtext("ymin"), bwhere, "ymin")
    xmax = _number(box.findtext("xmax"), bwhere, "xmax")
    ymax = _number(box.findtext("ymax"), bwhere, "ymax")
    return ObjectRecord(
        where=where,
        category_id=class_to_id[name],
        x0=xmin - offset,
        y0=ymin - offset,
        x1=xmax,
        y1=ymax,
        iscrowd=int(is_difficult and difficult == "ignore"),
    )


def parse_voc_xml(
    path: Path,
    *,
    class_to_id: Mapping[str, int],
    file_name: str,
    issues: Issues,
    aliases: Mapping[str, str | None] | None = None,
    difficult: FlagPolicy = "ignore",
    image_path: Path | None = None,
    one_based: bool = True,
) -> ImageRecord:
    """Parse one VOC-style annotation XML.

    Args:
        path: the XML file.
        class_to_id: lower-case class name -> native category id.
        file_name: the image's path relative to the output ``images/`` folder.
        issues: bad-sample policy; bad ``<object>`` s are handled here one by one.
        aliases: lower-case source name -> UODB class name, or None to drop the object.
        difficult: ``"ignore"`` | ``"drop"`` | ``"keep"`` for ``<difficult>1`` objects.
        image_path: read the size from this image when ``<size>`` is missing or zero.
        one_based: VOC's 1-based inclusive boxes (see module docstring); False reads
            ``xmin..xmax`` as continuous 0-based corners.

    Returns:
        The image and its objects (the objects' boxes are not validated yet).

    Raises:
        BadRecord: the file is empty, malformed, lacks ``<annotation>`` or a usable size.
    """
    aliases = aliases or {}
    root = parse_xml(path)
    if root.tag != "annotation":
        raise BadRecord(
            f"{path}:{root.line}", f"expected root <annotation>, got <{root.tag}>", "malformed XML"
        )
    width, height = _image_size(path, root, image_path)
    record = ImageRecord(where=str(path), file_name=file_name, width=width, height=height)
    offset = 1.0 if one_based else 0.0
    for k, obj in enumerate(root.findall("object"), start=1):
        try:
            parsed = _parse_object(
                path,
                k,
                obj,
                class_to_id=class_to_id,
                aliases=aliases,
                difficult=difficult,
                offset=offset,
                report=issues.report,
            )
        except BadRecord as bad:
            issues.handle(bad)
            continue
        if parsed is not None:
            record.objects.append(parsed)
    return record


def read_image_set(path: Path) -> list[str]:
    """Image ids of a VOC ``ImageSets/Main/<set>.txt`` (first token of each non-empty line)."""
    try:
        text = read_text(path)
    except BadRecord as bad:
        raise DatasetError(str(bad)) from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: image ids repeat ({len(ids) - len(set(ids))} duplicates)")
    return ids


@dataclass(frozen=True)
class _VocImageParser:
    """``parse`` for :func:`convert_records`: image id -> its :func:`parse_voc_xml` record.

    Checks that ``Annotations/<id>.xml`` exists and, with ``check_images``, the image too.
    """

    voc_root: Path
    class_to_id: Mapping[str, int]
    issues: Issues
    aliases: Mapping[str, str | None] | None
    image_ext: str
    file_name_fn: Callable[[str], str] | None
    difficult: FlagPolicy
    one_based: bool
    check_images: bool

    def __call__(self, image_id: str) -> ImageRecord:
        fn = self.file_name_fn
        file_name = fn(image_id) if fn else f"{image_id}{self.image_ext}"
        xml_path = self.voc_root / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise BadRecord(str(xml_path), "annotation file not found", "missing file")
        image_path = self.voc_root / "JPEGImages" / file_name
        if self.check_images and not image_path.is_file():
            raise BadRecord(
                str(xml_path),
                f"image not found: {image_path} (expected JPEGImages/<id>{self.image_ext}; "
                "--no-image-check converts the annotations without it)",
                "missing image",
            )
        return parse_voc_xml(
            xml_path,
            class_to_id=self.class_to_id,
            file_name=file_name,
            issues=self.issues,
            aliases=self.aliases,
            difficult=self.difficult,
            image_path=image_path,
            one_based=self.one_based,
        )


def convert_voc(
    voc_root: Path,
    image_set: str | Sequence[str],
    json_out: Path,
    *,
    classes: Sequence[str],
    dataset: str = "voc07",
    split: str = "train",
    aliases: Mapping[str, str | None] | None = None,
    image_ext: str = ".jpg",
    file_name_fn: Callable[[str], str] | None = None,
    difficult: FlagPolicy = "ignore",
    one_based: bool = True,
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    check_images: bool = True,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert one image set of a VOC-layout release to a COCO JSON.

    Args:
        voc_root: folder with ``Annotations/``, ``ImageSets/Main/`` and ``JPEGImages/``.
        image_set: a set name (reads ``ImageSets/Main/<name>.txt``) or an explicit id list.
        json_out: the COCO JSON to write.
        classes: class names; native ids are ``1..C`` in this order.
        dataset: dataset name for the report.
        split: split name for the report (``"train"``/``"test"``).
        aliases: lower-case source name -> class name, or None to drop (e.g. UODB's KITTI).
        image_ext: image extension; ``file_name = <id><image_ext>`` as in UODB's loaders.
        file_name_fn: overrides the file name given the id.
        difficult: ``"ignore"`` (iscrowd=1, default) | ``"drop"`` | ``"keep"``.
        one_based: see :func:`parse_voc_xml`.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        check_images: every image must exist under ``JPEGImages/`` (a missing one is bad input:
            an error, or a counted skip with ``on_bad_sample="skip"``); False skips the check
            (``--no-image-check``), e.g. to convert annotations before the images arrive.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input with ``on_bad_sample="error"`` (the message names the file and
            the line of the ``<object>``), a missing image set file.
    """
    check_choice("difficult", difficult, FLAG_POLICIES)
    voc_root = Path(voc_root)
    if isinstance(image_set, str):
        set_file = voc_root / "ImageSets" / "Main" / f"{image_set}.txt"
        ids, source = read_image_set(set_file), str(set_file)
    else:
        ids, source = list(image_set), f"{voc_root} (explicit id list)"
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=list(enumerate(classes, start=1)),
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from VOC XML ({voc_root})",
    )
    parse = _VocImageParser(
        voc_root=voc_root,
        class_to_id={name.lower(): i for i, name in enumerate(classes, start=1)},
        issues=builder.issues,
        aliases=aliases,
        image_ext=image_ext,
        file_name_fn=file_name_fn,
        difficult=difficult,
        one_based=one_based,
        check_images=check_images,
    )
    return convert_records(
        builder, ids, parse, json_out, progress=progress, source=source, allow_empty=allow_empty
    )
