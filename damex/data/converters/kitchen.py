"""GMU-Kitchen per-frame VOC-style XML -> COCO JSON (UODB's 11 product instances).

**Unverified format.** No GMU-Kitchen annotation file could be inspected; this follows the
layout that two independent public converters of the original release read:
``gmu_scene_00N/Images/rgb_<n>.png`` (1920x1080) and ``gmu_scene_00N/Annotations/rgb_<n>.xml``,
one Pascal-VOC-style XML per frame (``<size>``, ``<object><name><bndbox>``). Boxes use the VOC
1-based inclusive convention (see :mod:`damex.data.converters.voc`). When ``<size>`` is missing
the PNG header is read. Object names are BigBIRD instance names; a name outside UODB's 11 is
an unknown class (bad input), because UODB's release had exactly those 11.

Split: UODB's ``kitchen_train``/``kitchen_test`` lists were never published. The caller chooses
the scenes of each split (whole scenes, since frames of one scene are near-duplicates;
``damex.data.converters.prepare`` documents its default).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from damex.data.converters.common import (
    FLAG_POLICIES,
    BadRecord,
    ConversionReport,
    FlagPolicy,
    ImageRecord,
    OnBadSample,
    OutOfBounds,
    check_choice,
    convert_records,
    split_builder,
)
from damex.data.converters.voc import parse_voc_xml
from damex.data.uodb import UODB_CLASSES

__all__ = ["list_kitchen_scenes", "convert_kitchen"]

logger = logging.getLogger(__name__)

_SCENE_GLOB = "gmu_scene_*"


def _natural_key(path: Path) -> tuple[object, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def list_kitchen_scenes(root: Path) -> list[str]:
    """Scene folders (``gmu_scene_*`` with an ``Annotations`` folder) under ``root``, sorted."""
    return sorted(p.name for p in Path(root).glob(_SCENE_GLOB) if (p / "Annotations").is_dir())


def convert_kitchen(
    root: Path,
    scenes: Sequence[str],
    json_out: Path,
    *,
    classes: Sequence[str] | None = None,
    image_ext: str = ".png",
    difficult: FlagPolicy = "ignore",
    dataset: str = "kitchen",
    split: str = "train",
    on_bad_sample: OnBadSample = "error",
    out_of_bounds: OutOfBounds = "clip",
    progress: bool = False,
    allow_empty: bool = False,
) -> ConversionReport:
    """Convert the per-frame XMLs of some GMU-Kitchen scenes to one COCO JSON.

    Args:
        root: folder holding the ``gmu_scene_00N`` folders.
        scenes: scene folder names of this split.
        json_out: the COCO JSON to write.
        classes: default ``UODB_CLASSES["kitchen"]``; native ids ``1..11`` in that order.
        image_ext: frame extension; ``file_name = <scene>/Images/<xml stem><ext>``.
        difficult: policy for ``<difficult>1`` objects, if any.
        dataset: dataset name for the report.
        split: split name for the report.
        on_bad_sample: ``"error"`` | ``"skip"``.
        out_of_bounds: ``"clip"`` | ``"error"``.
        progress: show a tqdm bar.
        allow_empty: write a split without images instead of raising ``DatasetError``.

    Returns:
        The split's counts.

    Raises:
        DatasetError: bad input (the message names the XML file and line), a missing scene.
    """
    check_choice("difficult", difficult, FLAG_POLICIES)
    root = Path(root)
    classes = list(classes or UODB_CLASSES["kitchen"])
    class_to_id = {name.lower(): i for i, name in enumerate(classes, start=1)}
    builder = split_builder(
        dataset=dataset,
        split=split,
        categories=list(enumerate(classes, start=1)),
        on_bad_sample=on_bad_sample,
        out_of_bounds=out_of_bounds,
        description=f"{dataset} {split} converted from GMU-Kitchen XML (scenes {list(scenes)})",
    )
    xml_files: list[tuple[str, Path]] = []
    for scene in scenes:
        ann_dir = root / scene / "Annotations"
        if not ann_dir.is_dir():
            builder.issues.handle(
                BadRecord(str(ann_dir), "scene annotation folder not found", "missing scene")
            )
            continue
        xml_files += [(scene, p) for p in sorted(ann_dir.glob("*.xml"), key=_natural_key)]

    def parse(scene_xml: tuple[str, Path]) -> ImageRecord:
        scene, xml_path = scene_xml
        file_name = f"{scene}/Images/{xml_path.stem}{image_ext}"
        return parse_voc_xml(
            xml_path,
            class_to_id=class_to_id,
            file_name=file_name,
            issues=builder.issues,
            difficult=difficult,
            image_path=root / file_name,
        )

    return convert_records(
        builder,
        xml_files,
        parse,
        json_out,
        progress=progress,
        source=f"{root} (Annotations/*.xml of scenes {list(scenes)})",
        allow_empty=allow_empty,
    )
