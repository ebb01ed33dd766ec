"""A COCO-JSON detection dataset (every source is converted to COCO JSON; docs/design.md §9).

``CocoDetection`` reads one split of one dataset: it validates the whole annotation file at
construction (cheap, no image decoding), keeps the boxes as compact numpy arrays (no per-image
Python objects, so DataLoader workers do not copy the index on access), and decodes an image
only in ``__getitem__``. Every problem is either an error naming the file and the record, or
(``on_bad_sample="skip"`` / ``out_of_bounds="clip"``) a counted, reported correction; nothing
is dropped silently.

Dropped at load (counted in ``report()``): ``iscrowd`` annotations (COCO's training recipe;
evaluation still sees them in the GT file) and degenerate boxes (width or height <= 0,
before or after clipping to the image).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from damex.config import BadSamplePolicy, OutOfBoundsPolicy, choices
from damex.data.coco_json import (
    load_coco_json,
    parse_annotations,
    parse_categories,
    parse_images,
    read_categories,
)
from damex.data.label_space import LabelSpace
from damex.errors import DatasetError
from damex.structures import Sample

if TYPE_CHECKING:
    from damex.data.catalog import DatasetSpec

__all__ = [
    "CocoDetection",
    "ImageInfo",
    "load_coco_json",
    "read_categories",
    "OUT_OF_BOUNDS_POLICIES",
    "BAD_SAMPLE_POLICIES",
    "IMAGE_CHECKS",
]

logger = logging.getLogger(__name__)

OUT_OF_BOUNDS_POLICIES: tuple[str, ...] = choices(OutOfBoundsPolicy)
BAD_SAMPLE_POLICIES: tuple[str, ...] = choices(BadSamplePolicy)
IMAGE_CHECKS: tuple[str, ...] = ("none", "exists", "header")

# A box may stick out of the image by this many pixels before out_of_bounds="error" raises:
# converters round (VOC's 1-based pixels, COCO's float noise); it is still clipped and counted.
_OOB_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class ImageInfo:
    """Metadata of one image (from the JSON; no decoding).

    Attributes:
        image_id: the JSON image id.
        file_name: the JSON ``file_name`` (relative to the image root).
        height: image height in pixels (JSON).
        width: image width in pixels (JSON).
        path: the image file.
    """

    image_id: int
    file_name: str
    height: int
    width: int
    path: Path

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width


def _decode_image(path: Path) -> np.ndarray:
    """Decode an image file to ``uint8`` ``[H, W, 3]`` RGB (raises OSError/ValueError if bad)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit scans (e.g. CT PNGs): keep the top 8 bits; converters should window them.
            arr = np.asarray(im, dtype=np.int64)
            arr = np.clip(arr >> 8 if im.mode.startswith("I;16") else arr, 0, 255)
            return np.repeat(arr.astype(np.uint8)[:, :, None], 3, axis=2)
        return np.array(im.convert("RGB"), dtype=np.uint8)  # forces a full decode


class CocoDetection(torch.utils.data.Dataset):
    """One split of one COCO-JSON dataset, yielding :class:`damex.structures.Sample`.

    Args:
        ann_file: the split's COCO JSON file.
        image_root: folder the JSON ``file_name`` fields are relative to.
        dataset_id: the dataset's index in the run (and in ``label_space``).
        label_space: maps the JSON's category ids to unified labels; the JSON's categories
            must be the label space's categories of ``dataset_id``.
        transform: ``transform(sample) -> sample``, applied after loading.
        out_of_bounds: ``"clip"``: boxes outside the image are clipped to it and counted;
            ``"error"``: a box more than 1 px outside raises ``DatasetError``.
        on_bad_sample: ``"error"``: a missing or unreadable image raises ``DatasetError``;
            ``"skip"``: it is skipped, counted and listed in :meth:`report` (a missing file is
            found at construction and removed; an undecodable one is found when loaded and
            replaced by the next readable image).
        check_images: at construction, ``"exists"`` checks every image file exists, ``"header"``
            also reads its header and checks its size against the JSON, ``"none"`` defers all
            checks to loading.

    Yields:
        ``Sample(image uint8 [3, H, W] RGB, boxes float32 [N, 4] xyxy px, labels int64 [N]
        unified, dataset_id, image_id, orig_size (H, W))``.

    Raises:
        DatasetError: at construction, for any invalid annotation record (named by file, id and
            image), and at loading for an unreadable image in ``"error"`` mode.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        dataset_id: int,
        label_space: LabelSpace,
        transform: Callable[[Sample], Sample] | None = None,
        out_of_bounds: str = "clip",
        on_bad_sample: str = "error",
        check_images: str = "exists",
    ) -> None:
        if out_of_bounds not in OUT_OF_BOUNDS_POLICIES:
            raise ValueError(
                f"out_of_bounds must be one of {list(OUT_OF_BOUNDS_POLICIES)}, "
                f"got {out_of_bounds!r}"
            )
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"on_bad_sample must be one of {list(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}"
            )
        if check_images not in IMAGE_CHECKS:
            raise ValueError(
                f"check_images must be one of {list(IMAGE_CHECKS)}, got {check_images!r}"
            )
        if not 0 <= dataset_id < label_space.num_datasets:
            raise ValueError(
                f"dataset_id {dataset_id} is not in the label space {label_space.dataset_names}"
            )
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.dataset_id = int(dataset_id)
        self.label_space = label_space
        self.transform = transform
        self.out_of_bounds = out_of_bounds
        self.on_bad_sample = on_bad_sample
        self._counts = {
            "annotations": 0,
            "dropped_crowd": 0,
            "dropped_degenerate": 0,
            "clipped": 0,
        }
        self._skipped: list[dict[str, Any]] = []
        self._bad_at_load: set[int] = set()
        self._parse(load_coco_json(self.ann_file))
        if check_images != "none":
            self._check_image_files(header=check_images == "header")
        logger.info(
            "%s (%s): %d images, %d boxes (dropped %d crowd, %d degenerate; clipped %d)",
            self.name,
            self.ann_file,
            len(self),
            len(self._labels),
            self._counts["dropped_crowd"],
            self._counts["dropped_degenerate"],
            self._counts["clipped"],
        )

    @classmethod
    def from_spec(
        cls,
        spec: DatasetSpec,
        split: str,
        *,
        dataset_id: int,
        label_space: LabelSpace,
        **kwargs: Any,
    ) -> CocoDetection:
        """The dataset of a catalog entry's split (same keyword options as the constructor)."""
        return cls(
            spec.ann_file(split),
            spec.images_dir(split),
            dataset_id,
            label_space,
            **kwargs,
        )

    # --------------------------------------------------------------------------- parsing
    def _parse(self, data: dict[str, Any]) -> None:
        path = self.ann_file
        categories = parse_categories(path, data["categories"])
        self._check_categories(categories)
        records = parse_images(path, data["images"])  # sorted by id
        image_ids = list(records)
        anns = parse_annotations(path, data["annotations"], records, [c["id"] for c in categories])
        n_ann = len(anns.ids)
        to_unified = self.label_space.native_to_unified(self.dataset_id)
        index_of = {iid: k for k, iid in enumerate(image_ids)}
        ann_ids = anns.ids  # [A]
        ann_img = np.array([index_of[i] for i in anns.image_ids.tolist()], dtype=np.int64)  # [A]
        ann_lab = np.array([to_unified[c] for c in anns.category_ids.tolist()], dtype=np.int64)
        ann_box = anns.boxes_xywh  # [A, 4] xywh
        crowd = anns.crowd  # [A]
        self._counts["annotations"] = n_ann
        self._counts["dropped_crowd"] = int(crowd.sum())

        hw = np.array(
            [(records[iid].height, records[iid].width) for iid in image_ids], dtype=np.int64
        ).reshape(-1, 2)
        keep = ~crowd
        xyxy = ann_box.copy()
        xyxy[:, 2:] += xyxy[:, :2]  # [A, 4] xywh -> xyxy
        degenerate = (ann_box[:, 2] <= 0) | (ann_box[:, 3] <= 0)
        h_img = hw[ann_img, 0].astype(np.float64)
        w_img = hw[ann_img, 1].astype(np.float64)
        tol = _OOB_TOLERANCE_PX
        outside = (
            (
                (xyxy[:, 0] < -tol)
                | (xyxy[:, 1] < -tol)
                | (xyxy[:, 2] > w_img + tol)
                | (xyxy[:, 3] > h_img + tol)
            )
            & keep
            & ~degenerate
        )
        if self.out_of_bounds == "error" and outside.any():
            j = int(np.flatnonzero(outside)[0])
            k = int(ann_img[j])
            raise DatasetError(
                f"{path}: annotation id {int(ann_ids[j])} (image {image_ids[k]}): bbox "
                f"{data['annotations'][j]['bbox']} (xyxy {xyxy[j].round(2).tolist()}) is outside "
                f"the {int(hw[k, 1])}x{int(hw[k, 0])} image by more than {tol:g} px "
                f"({int(outside.sum())} such boxes; set data.out_of_bounds=clip to clip them)"
            )
        clipped = np.stack(
            [
                np.clip(xyxy[:, 0], 0, w_img),
                np.clip(xyxy[:, 1], 0, h_img),
                np.clip(xyxy[:, 2], 0, w_img),
                np.clip(xyxy[:, 3], 0, h_img),
            ],
            axis=1,
        )
        changed = (clipped != xyxy).any(axis=1) & keep & ~degenerate
        degenerate |= (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        self._counts["clipped"] = int((changed & ~degenerate).sum())
        self._counts["dropped_degenerate"] = int((degenerate & keep).sum())
        keep &= ~degenerate

        # CSR layout: boxes of image k are rows offsets[k]:offsets[k+1] (annotation order kept)
        order = np.argsort(ann_img[keep], kind="stable")
        self._boxes = clipped[keep][order].astype(np.float32)  # [A, 4] xyxy px
        self._labels = ann_lab[keep][order]  # [A]
        counts = np.bincount(ann_img[keep], minlength=len(image_ids))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [N+1]
        self._image_ids = np.array(image_ids, dtype=np.int64)  # [N]
        self._hw = hw  # [N, 2]
        self._file_names = np.array([records[i].file_name for i in image_ids], dtype=np.str_)
        self.label_space.check_labels(self._labels, where=str(path))

    def _check_categories(self, categories: list[dict[str, Any]]) -> None:
        expected = {c["id"]: c["name"] for c in self.label_space.categories(self.dataset_id)}
        got = {c["id"]: c["name"] for c in categories}
        if got != expected:
            extra = sorted(set(got) - set(expected))
            missing = sorted(set(expected) - set(got))
            renamed = sorted(i for i in set(got) & set(expected) if got[i] != expected[i])
            raise DatasetError(
                f"{self.ann_file}: categories differ from the label space of dataset "
                f"{self.name!r} (not in the label space: {extra}; missing: {missing}; renamed: "
                f"{[(i, expected[i], got[i]) for i in renamed]}); the label space must be built "
                "from the same categories (e.g. all splits of a dataset share them)"
            )

    def _check_image_files(self, *, header: bool) -> None:
        bad: list[tuple[int, str]] = []
        for k in range(len(self._image_ids)):
            path = self.image_root / str(self._file_names[k])
            reason = None
            if not os.path.isfile(path):
                reason = f"image file not found: {path}"
            elif header:
                reason = self._header_problem(k, path)
            if reason is not None:
                if self.on_bad_sample == "error":
                    raise DatasetError(f"{self.ann_file}: image id {self._image_ids[k]}: {reason}")
                bad.append((k, reason))
        if bad:
            for k, reason in bad:
                self._skipped.append({"image_id": int(self._image_ids[k]), "reason": reason})
            self._remove_images([k for k, _ in bad])
            logger.warning(
                "%s: skipped %d of %d images at load (e.g. %s); see report()",
                self.ann_file,
                len(bad),
                len(bad) + len(self),
                bad[0][1],
            )

    def _header_problem(self, k: int, path: Path) -> str | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return f"cannot read image {path}: {e}"
        eh, ew = (int(v) for v in self._hw[k])
        if (h, w) != (eh, ew):
            return f"image {path} is {w}x{h}, the JSON says {ew}x{eh}"
        return None

    def _remove_images(self, drop: list[int]) -> None:
        """Remove images (indices into the current arrays); used for skipped images."""
        mask = np.ones(len(self._image_ids), dtype=bool)
        mask[drop] = False
        counts = np.diff(self._offsets)
        rows = np.repeat(mask, counts)
        self._boxes = self._boxes[rows]
        self._labels = self._labels[rows]
        self._offsets = np.concatenate([[0], np.cumsum(counts[mask])]).astype(np.int64)
        self._image_ids = self._image_ids[mask]
        self._hw = self._hw[mask]
        self._file_names = self._file_names[mask]

    # ------------------------------------------------------------------------- metadata
    @property
    def name(self) -> str:
        """The dataset name (from the label space)."""
        return self.label_space.dataset_names[self.dataset_id]

    def __len__(self) -> int:
        return int(self._image_ids.shape[0])

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} with {n} images")
        return i % n

    def image_info(self, i: int) -> ImageInfo:
        """JSON metadata of the ``i``-th image (no decoding)."""
        k = self._index(i)
        fname = str(self._file_names[k])
        return ImageInfo(
            image_id=int(self._image_ids[k]),
            file_name=fname,
            height=int(self._hw[k, 0]),
            width=int(self._hw[k, 1]),
            path=self.image_root / fname,
        )

    def image_labels(self, i: int) -> list[int]:
        """Unified labels of the ``i``-th image's kept boxes, one per box (no decoding)."""
        k = self._index(i)
        return self._labels[self._offsets[k] : self._offsets[k + 1]].tolist()

    def image_boxes(self, i: int) -> np.ndarray:
        """``float32`` ``[N, 4]`` xyxy px of the ``i``-th image's kept boxes (a copy)."""
        k = self._index(i)
        return self._boxes[self._offsets[k] : self._offsets[k + 1]].copy()

    @property
    def image_ids(self) -> list[int]:
        """JSON image ids in dataset order."""
        return self._image_ids.tolist()

    @property
    def num_boxes(self) -> int:
        return int(self._labels.shape[0])

    @property
    def num_classes_present(self) -> int:
        """Number of distinct unified labels among the kept boxes."""
        return int(np.unique(self._labels).shape[0])

    def report(self) -> dict[str, Any]:
        """Counts of what was loaded, dropped, clipped and skipped.

        Keys: ``dataset``, ``file``, ``images``, ``images_without_boxes``, ``annotations`` (in
        the JSON), ``boxes`` (kept), ``dropped_crowd``, ``dropped_degenerate``, ``clipped``,
        ``skipped`` and ``skipped_images`` (``[{"image_id", "reason"}]``). Images skipped at
        loading time are recorded in the process that loaded them (a DataLoader worker keeps
        its own list).
        """
        counts = np.diff(self._offsets)
        return {
            "dataset": self.name,
            "file": str(self.ann_file),
            "images": len(self) - len(self._bad_at_load),
            "images_without_boxes": int((counts == 0).sum()),
            "annotations": self._counts["annotations"],
            "boxes": self.num_boxes,
            "dropped_crowd": self._counts["dropped_crowd"],
            "dropped_degenerate": self._counts["dropped_degenerate"],
            "clipped": self._counts["clipped"],
            "skipped": len(self._skipped),
            "skipped_images": [dict(s) for s in self._skipped],
        }

    # -------------------------------------------------------------------------- loading
    def _load(self, k: int) -> Sample:
        info = self.image_info(k)
        try:
            image = _decode_image(info.path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad files
            raise _BadImage(f"cannot read image {info.path}: {e}") from e
        h, w = image.shape[:2]
        if (h, w) != info.size:
            raise _BadImage(
                f"image {info.path} is {w}x{h}, the JSON says {info.width}x{info.height}"
            )
        lo, hi = self._offsets[k], self._offsets[k + 1]
        return Sample(
            image=torch.from_numpy(image).permute(2, 0, 1).contiguous(),  # [3, H, W] uint8
            boxes=torch.from_numpy(self._boxes[lo:hi].copy()),  # [N, 4] xyxy px
            labels=torch.from_numpy(self._labels[lo:hi].copy()),  # [N] unified
            dataset_id=self.dataset_id,
            image_id=info.image_id,
            orig_size=(h, w),
        )

    def __getitem__(self, i: int) -> Sample:
        k = self._index(i)
        n = len(self)
        for step in range(n):
            j = (k + step) % n
            if j in self._bad_at_load:
                continue
            try:
                sample = self._load(j)
            except _BadImage as e:
                image_id = int(self._image_ids[j])
                if self.on_bad_sample == "error":
                    raise DatasetError(
                        f"{self.ann_file}: image id {image_id}: {e}"
                    ) from e.__cause__
                self._bad_at_load.add(j)
                self._skipped.append({"image_id": image_id, "reason": str(e)})
                logger.warning("%s: skipping image id %d: %s", self.ann_file, image_id, e)
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise DatasetError(f"{self.ann_file}: no readable image left (all {n} skipped)")

    def __repr__(self) -> str:
        return (
            f"CocoDetection(name={self.name!r}, ann_file={str(self.ann_file)!r}, "
            f"images={len(self)}, boxes={self.num_boxes})"
        )


class _BadImage(Exception):
    """An image file that cannot be used (internal; becomes DatasetError or a skip)."""
