"""Limited-data subsets (docs/design.md §4.7): seeded image-level P% subsets of a COCO JSON.

DAMEX's ``--fs P`` swapped the train JSON of watercolor, comic, deeplesion and kitti for a file
with the ``fsPerc{P}_`` prefix; those files were never released. :func:`make_subset` rebuilds
such a file: it keeps ``k = max(1, round(N * P / 100))`` of the N images, with all of their
annotations, and every category.

Which images: the ``k`` with the smallest ``SHA-256(f"{seed}:{image_id}")``. That depends only
on the seed and the image ids (not on file order, platform or Python version), and for one seed
a smaller percentage is always a subset of a larger one.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damex.data.coco_json import load_coco_json
from damex.data.converters.common import write_json_atomic
from damex.errors import DatasetError

__all__ = [
    "LIMITED_DATASETS",
    "SubsetResult",
    "subset_size",
    "select_subset",
    "subset_file_name",
    "make_subset",
    "main",
]

logger = logging.getLogger(__name__)

# The datasets DAMEX's --fs option shrinks (docs/design.md §4.7).
LIMITED_DATASETS: tuple[str, ...] = ("watercolor", "comic", "deeplesion", "kitti")


@dataclass(frozen=True)
class SubsetResult:
    """What :func:`make_subset` wrote."""

    json_path: Path
    images_in: int
    images_out: int
    annotations_out: int


def _check_percent(percent: float) -> float:
    percent = float(percent)
    if not 0.0 < percent <= 100.0:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    return percent


def subset_size(num_images: int, percent: float) -> int:
    """``max(1, round(num_images * percent / 100))``, at most ``num_images``."""
    percent = _check_percent(percent)
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return max(1, min(num_images, round(num_images * percent / 100.0)))


def _rank_key(seed: int, image_id: Any) -> bytes:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()


def select_subset(image_ids: Sequence[Any], percent: float, seed: int) -> set[Any]:
    """The image ids kept by a seeded ``percent``% subset (see module docstring).

    Args:
        image_ids: all image ids (unique).
        percent: in ``(0, 100]``.
        seed: the subset seed.

    Returns:
        ``subset_size(len(image_ids), percent)`` ids.
    """
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique")
    k = subset_size(len(image_ids), percent)
    ranked = sorted(image_ids, key=lambda i: _rank_key(seed, i))
    return set(ranked[:k])


def subset_file_name(percent: float, split: str = "train") -> str:
    """DAMEX's name for a subset file: ``fsPerc{P}_{split}.json`` (``P`` without ``.0``)."""
    return f"fsPerc{_check_percent(percent):g}_{split}.json"


def make_subset(
    json_in: Path | str, json_out: Path | str, percent: float, seed: int = 0
) -> SubsetResult:
    """Write a seeded image-level ``percent``% subset of a COCO JSON.

    Args:
        json_in: the full COCO JSON.
        json_out: where the subset goes (written atomically).
        percent: in ``(0, 100]``.
        seed: the subset seed.

    Returns:
        Counts of what was written.

    Raises:
        DatasetError: the input is not a COCO JSON or has no images.
        ValueError: ``percent`` out of range.
    """
    json_in, json_out = Path(json_in), Path(json_out)
    percent = _check_percent(percent)
    data = load_coco_json(json_in)
    try:
        ids = [img["id"] for img in data["images"]]
    except (KeyError, TypeError):
        raise DatasetError(f"{json_in}: every images[] entry needs an 'id'") from None
    if not ids:
        raise DatasetError(f"{json_in}: no images to take a subset of")
    try:
        keep = select_subset(ids, percent, seed)
    except ValueError as exc:
        raise DatasetError(f"{json_in}: {exc}") from None
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    info = dict(out.get("info") or {})
    info["subset"] = {
        "source": json_in.name,
        "percent": percent,
        "seed": seed,
        "images": len(keep),
        "of": len(ids),
    }
    out["info"] = info
    out["images"] = [img for img in data["images"] if img["id"] in keep]
    out["annotations"] = [a for a in data["annotations"] if a.get("image_id") in keep]
    out["categories"] = data["categories"]
    write_json_atomic(json_out, out)
    logger.info(
        "%s: kept %d of %d images (%g%%, seed %d) -> %s",
        json_in,
        len(keep),
        len(ids),
        percent,
        seed,
        json_out,
    )
    return SubsetResult(
        json_path=json_out,
        images_in=len(ids),
        images_out=len(keep),
        annotations_out=len(out["annotations"]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``--root data/uodb --percent P [P ...]`` or ``--json-in X --json-out Y --percent P``."""
    parser = argparse.ArgumentParser(
        prog="make_subsets",
        description="Seeded image-level P%% subsets of COCO JSONs (DAMEX's fsPerc{P}_ files).",
    )
    parser.add_argument("--root", type=Path, help="UODB root (OUT of prepare_uodb)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(LIMITED_DATASETS),
        help=f"with --root (default: {' '.join(LIMITED_DATASETS)})",
    )
    parser.add_argument("--split", default="train", help="with --root: which JSON to shrink")
    parser.add_argument("--json-in", type=Path, help="a single COCO JSON")
    parser.add_argument("--json-out", type=Path, help="with --json-in: where to write")
    parser.add_argument("--percent", type=float, nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    jobs: list[tuple[Path, Path, float]] = []
    if args.json_in is not None:
        if args.root is not None:
            parser.error("give either --root or --json-in, not both")
        if args.json_out is None or len(args.percent) != 1:
            parser.error("--json-in needs --json-out and exactly one --percent")
        jobs.append((args.json_in, args.json_out, args.percent[0]))
    elif args.root is not None:
        for name in args.datasets:
            ann = args.root / name / "annotations"
            for p in args.percent:
                jobs.append((ann / f"{args.split}.json", ann / subset_file_name(p, args.split), p))
    else:
        parser.error("give --root or --json-in")
    try:
        for src, dst, p in jobs:
            r = make_subset(src, dst, p, args.seed)
            print(f"{dst}: {r.images_out}/{r.images_in} images, {r.annotations_out} annotations")
    except (DatasetError, ValueError) as exc:
        print(f"damex make-subsets: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
