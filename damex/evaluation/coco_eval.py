"""Per-dataset COCO box evaluation, the mean over datasets, and result tables (docs/design.md §5).

Protocol (official DAMEX ``engine.py`` / ``datasets/coco_eval.py``, docs/design.md §5):

- every dataset's test set is evaluated on its own with COCOeval (bbox, ``useCats=True``,
  maxDets 1/10/100) against that dataset's GT JSON, in the dataset's NATIVE category ids;
- the top-K detections are taken over the whole unified label space (no restriction); detections
  whose label belongs to another dataset cannot be written as a native category of this dataset
  and are dropped here. COCOeval would ignore them anyway (it evaluates only the categories of the
  GT JSON), so the numbers are the same; we count them and report their share ("foreign");
- the headline numbers are AP@[.5:.95] (``stats[0]``) and AP50 (``stats[1]``) per dataset and
  their means over datasets; a dataset whose test JSON is another's (voc12 -> voc07) is counted
  once;
- beside them, UODB's protocol: the VOC mean AP at IoU 0.5 of each dataset and their mean
  (``voc_ap50``; ``damex.evaluation.voc_eval``);
- the ``restrict_to_dataset_labels`` oracle (scores restricted to the dataset's slice before
  top-K) uses the dataset identity, so it is evaluated from a second detection set and reported
  in separate columns.

COCO's own sentinel is kept: a metric is ``-1`` when the GT has no object in its area range (or
no object of the category, for per-category AP). Tables print it as ``-`` and means skip it.

Backends: ``faster`` (faster-coco-eval, ~6x faster) and ``pycocotools`` (the reference). They give
identical numbers (tested); pycocotools' ``loadRes([])`` raises, so an empty detection set is
evaluated against an empty result object built directly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from damex.data.coco_json import (
    check_top_level,
    load_coco_json,
    parse_annotations,
    parse_categories,
    parse_images,
)
from damex.data.label_space import LabelSpace
from damex.evaluation.voc_eval import VOCMetric, voc_eval
from damex.structures import Detections

__all__ = [
    "STAT_NAMES",
    "DatasetMetrics",
    "EvalResults",
    "MultiDatasetEvaluator",
    "detections_to_coco",
    "evaluate_dataset",
    "load_coco_gt",
]

logger = logging.getLogger(__name__)

Backend = Literal["faster", "pycocotools"]

# COCOeval ``stats`` order for bbox with maxDets (1, 10, max_dets); AR100 is AR@max_dets.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
_STAT_FIELDS: tuple[str, ...] = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip
# columns of the markdown table (display name, DatasetMetrics attribute)
_TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75"), ("APs", "ap_small"),
    ("APm", "ap_medium"), ("APl", "ap_large"), ("AR100", "ar100"), ("VOC AP50", "voc_ap50"),
)  # fmt: skip


@dataclass(frozen=True)
class DatasetMetrics:
    """COCO box metrics of one dataset (fractions in [0, 1]; ``-1`` = undefined, COCO's sentinel).

    Attributes:
        ap .. ar_large: COCOeval ``stats[0..11]`` (``ar100`` is AR at ``max_dets``).
        per_category_ap: AP@[.5:.95] per native category name (GT JSON order by id).
        per_category_ap50: AP@.5 per native category name.
        num_images: images in the GT JSON.
        num_detections: detections evaluated (native categories of this dataset).
        num_foreign: detections dropped because their unified label belongs to another dataset.
        max_dets: COCOeval's last maxDets value.
        voc_ap50: UODB's protocol beside COCO's: VOC mean AP at IoU 0.5 over the categories
            (``damex.evaluation.voc_eval``; ignore regions neither positives nor penalised).
        voc_ap50_per_category: the VOC AP50 per native category name.
        voc_metric: ``"area"`` (all-point interpolation) or ``"11point"`` (VOC2007).
    """

    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    per_category_ap: dict[str, float] = field(default_factory=dict)
    per_category_ap50: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    num_foreign: int = 0
    max_dets: int = 100
    voc_ap50: float = -1.0
    voc_ap50_per_category: dict[str, float] = field(default_factory=dict)
    voc_metric: str = "area"

    @property
    def stats(self) -> list[float]:
        """The 12 COCOeval numbers in ``STAT_NAMES`` order."""
        return [getattr(self, f) for f in _STAT_FIELDS]

    @property
    def foreign_share(self) -> float:
        """Share of this dataset's raw detections whose label belongs to another dataset."""
        total = self.num_detections + self.num_foreign
        return self.num_foreign / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``-1`` kept as COCO's sentinel)."""
        d = asdict(self)
        d["foreign_share"] = self.foreign_share
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetMetrics:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# single dataset
# --------------------------------------------------------------------------------------------


def load_coco_gt(gt: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Load a COCO GT JSON (path or dict) into a validated copy COCOeval accepts.

    The file (or dict) is checked by the package's one COCO-JSON reader
    (``damex.data.coco_json``: the same errors as the datasets). Missing ``iscrowd`` is set to
    0 and missing ``area`` to ``w * h`` (COCOeval reads both); in a dict, a missing annotation
    ``id`` is numbered from 1.

    Raises:
        DatasetError: unreadable file or a malformed record (the file and record are named).
    """
    if isinstance(gt, (str, os.PathLike)):
        source: str = os.fspath(gt)
        data = load_coco_json(source)
    elif isinstance(gt, Mapping):
        source = "<COCO GT dict>"
        data = check_top_level(dict(gt), source)
        data["annotations"] = [
            {"id": i + 1, **a} if isinstance(a, Mapping) else a
            for i, a in enumerate(data["annotations"])
        ]
    else:
        raise TypeError(f"gt must be a path or a COCO dict, got {type(gt).__name__}")
    categories = parse_categories(source, data["categories"])
    images = parse_images(source, data["images"])
    parse_annotations(source, data["annotations"], images, [c["id"] for c in categories])
    anns = []
    for a in data["annotations"]:
        x, y, w, h = (float(v) for v in a["bbox"])
        a = {**a, "bbox": [x, y, w, h], "iscrowd": int(a.get("iscrowd", 0))}
        a.setdefault("area", w * h)
        anns.append(a)
    out = {k: v for k, v in data.items() if k != "annotations"}
    out["images"] = [dict(im) for im in data["images"]]
    out["categories"] = [dict(c) for c in data["categories"]]
    out["annotations"] = anns
    return out


def _subset(gt: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    missing = image_ids - {int(im["id"]) for im in gt["images"]}
    if missing:
        raise ValueError(f"image ids {sorted(missing)[:10]} are not images of the GT JSON")
    return {
        **gt,
        "images": [im for im in gt["images"] if int(im["id"]) in image_ids],
        "annotations": [a for a in gt["annotations"] if int(a["image_id"]) in image_ids],
    }


def _check_detections(detections: Sequence[Mapping[str, Any]], image_ids: set[int]) -> list[dict]:
    out = []
    for i, d in enumerate(detections):
        try:
            rec = {
                "image_id": int(d["image_id"]),
                "category_id": int(d["category_id"]),
                "bbox": [float(v) for v in d["bbox"]],
                "score": float(d["score"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"detection #{i} must have image_id, category_id, bbox [x, y, w, h] and score, "
                f"got {d!r} ({e})"
            ) from e
        if len(rec["bbox"]) != 4:
            raise ValueError(f"detection #{i}: bbox must have 4 numbers, got {rec['bbox']}")
        if rec["image_id"] not in image_ids:
            raise ValueError(
                f"detection #{i}: image_id {rec['image_id']} is not an image of the GT JSON"
            )
        out.append(rec)
    return out


def _run_cocoeval(gt: dict, dets: list[dict], backend: Backend, max_dets: int) -> Any:
    """Run evaluate/accumulate; returns the COCOeval object."""
    if backend == "faster":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        coco_gt = FasterCOCO(gt)
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=logger.debug)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        return ev
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        buf = io.StringIO()  # pycocotools prints; keep it out of CLI output
        with contextlib.redirect_stdout(buf):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # loadRes([]) raises IndexError (docs/design.md T6)
                coco_dt = COCO()
                coco_dt.dataset = {
                    "images": gt["images"],
                    "categories": gt["categories"],
                    "annotations": [],
                }
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        logger.debug("%s", buf.getvalue())
        return ev
    raise ValueError(f"backend must be 'faster' or 'pycocotools', got {backend!r}")


def _summary_stats(ev: Any) -> list[float]:
    """COCOeval's 12 bbox ``stats``: ``COCOeval.summarize()`` with maxDets (1, 10, 100).

    For any other ``max_dets`` the same formula (mean over the entries > -1 of the slice) is
    computed here from the ``precision``/``recall`` arrays, because pycocotools' ``summarize``
    hard-codes maxDets=100 (``stats[0]`` and the AR100 entries become -1).
    """
    if list(ev.params.maxDets) == [1, 10, 100]:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints the table
            ev.summarize()
        return [float(v) for v in ev.stats]
    return _stats_from_arrays(ev)  # evaluate_dataset(max_dets=...) other than 100


def _stats_from_arrays(ev: Any) -> list[float]:
    """``COCOeval.summarize``'s 12 bbox ``stats`` for any maxDets (1, 10, ``max_dets``)."""
    p = ev.params
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    recall = np.asarray(ev.eval["recall"])  # [T, K, A, M]
    iou_thrs = np.asarray(p.iouThrs)
    max_dets = list(p.maxDets)

    def mean(arr: np.ndarray) -> float:
        valid = arr[arr > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    def ap(iou: float | None = None, area: str = "all") -> float:
        s = precision if iou is None else precision[np.where(iou == iou_thrs)[0]]
        return mean(s[:, :, :, p.areaRngLbl.index(area), -1])

    def ar(m: int, area: str = "all") -> float:
        return mean(recall[:, :, p.areaRngLbl.index(area), max_dets.index(m)])

    last = max_dets[-1]
    return [
        ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
        ar(1), ar(10), ar(last), ar(last, "small"), ar(last, "medium"), ar(last, "large"),
    ]  # fmt: skip


def _category_ap(precision: np.ndarray, k: int, iou_index: int | None) -> float:
    """AP of category ``k`` from ``precision[T, R, K, A, M]`` (area all, last maxDets)."""
    p = precision[:, :, k, 0, -1] if iou_index is None else precision[iou_index, :, k, 0, -1]
    p = p[p > -1]
    return float(p.mean()) if p.size else -1.0


def evaluate_dataset(
    gt: str | os.PathLike[str] | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    backend: Backend = "faster",
    max_dets: int = 100,
    image_ids: Sequence[int] | None = None,
    voc_metric: VOCMetric = "area",
) -> DatasetMetrics:
    """COCO box metrics of one dataset, and UODB's VOC AP50 beside them.

    Args:
        gt: the dataset's COCO GT JSON (path or dict); not modified.
        detections: ``{"image_id", "category_id" (NATIVE id), "bbox" [x, y, w, h] pixels,
            "score"}`` records; image ids must be images of ``gt``. Categories absent from ``gt``
            are ignored by COCOeval.
        backend: ``"faster"`` (faster-coco-eval) or ``"pycocotools"``; same numbers.
        max_dets: COCOeval's last maxDets (detections kept per image and category), >= 10.
        image_ids: evaluate only these images of ``gt`` (quick checks on a subset); default all.
        voc_metric: the VOC AP's interpolation, ``"area"`` (all-point) or ``"11point"``.

    Returns:
        The metrics; all 0 (or ``-1`` where COCO leaves a metric undefined) without detections.
    """
    if max_dets < 10:  # COCO's AR1 / AR10 need maxDets (1, 10, max_dets) in order
        raise ValueError(f"max_dets must be >= 10, got {max_dets}")
    gt_dict = load_coco_gt(gt)
    if image_ids is not None:
        gt_dict = _subset(gt_dict, {int(i) for i in image_ids})
    all_ids = {int(im["id"]) for im in gt_dict["images"]}
    dets = _check_detections(detections, all_ids)
    ev = _run_cocoeval(gt_dict, dets, backend, max_dets)
    stats = _summary_stats(ev)
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
    cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_dict["categories"]}
    iou50 = int(np.argmin(np.abs(np.asarray(ev.params.iouThrs) - 0.5)))
    per_ap: dict[str, float] = {}
    per_ap50: dict[str, float] = {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = cat_names.get(int(cat_id), str(cat_id))
        per_ap[name] = _category_ap(precision, k, None)
        per_ap50[name] = _category_ap(precision, k, iou50)
    voc = voc_eval(gt_dict, dets, iou_threshold=0.5, metric=voc_metric)
    return DatasetMetrics(
        **dict(zip(_STAT_FIELDS, stats)),
        per_category_ap=per_ap,
        per_category_ap50=per_ap50,
        num_images=len(all_ids),
        num_detections=len(dets),
        max_dets=max_dets,
        voc_ap50=voc.ap,
        voc_ap50_per_category=voc.per_category,
        voc_metric=voc_metric,
    )


# --------------------------------------------------------------------------------------------
# unified labels -> native ids
# --------------------------------------------------------------------------------------------


def _as_int_list(values: Sequence[int] | Tensor) -> list[int]:
    if isinstance(values, Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


def _convert(
    dets: Sequence[Detections],
    image_ids: Sequence[int] | Tensor,
    native_table: Tensor,
) -> list[tuple[int, np.ndarray, int]]:
    """Per image: (image_id, ``[n, 7]`` result array, number of foreign detections).

    ``native_table`` is ``LabelSpace.native_table(dataset_id)`` as an ``int64`` ``[C]`` tensor:
    the native id of every unified label, ``-1`` where the label is not the dataset's. The
    result rows are COCO's numpy result layout ``(image_id, x, y, w, h, score, category_id)``
    in float64 (exact for ids and float32 scores; ~56 bytes per detection instead of a dict).
    """
    ids = _as_int_list(image_ids)
    if len(ids) != len(dets):
        raise ValueError(f"got {len(dets)} Detections but {len(ids)} image ids")
    num_classes = native_table.numel()
    out = []
    for image_id, det in zip(ids, dets):
        labels = det.labels.detach().cpu().long()  # [N]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"image {image_id}: detection labels must be in [0, {num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        native = native_table[labels]  # [N]
        keep = native >= 0
        boxes = det.boxes.detach().cpu().double().reshape(-1, 4)[keep]  # [n, 4] xyxy
        arr = torch.cat(
            (
                torch.full((boxes.shape[0], 1), float(image_id), dtype=torch.float64),
                boxes[:, :2],
                boxes[:, 2:] - boxes[:, :2],  # xyxy -> xywh
                det.scores.detach().cpu().double()[keep, None],
                native[keep, None].double(),
            ),
            dim=1,
        )  # [n, 7]
        out.append((image_id, arr.numpy(), int((~keep).sum())))
    return out


def _records(arr: np.ndarray) -> list[dict[str, Any]]:
    """``[N, 7]`` result array -> COCO result records."""
    return [
        {
            "image_id": int(row[0]),
            "category_id": int(row[6]),
            "bbox": [float(v) for v in row[1:5]],
            "score": float(row[5]),
        }
        for row in arr.tolist()
    ]


def _table(label_space: LabelSpace, dataset_id: int) -> Tensor:
    return torch.tensor(label_space.native_table(dataset_id), dtype=torch.long)  # [C]


def detections_to_coco(
    dets: Sequence[Detections],
    image_ids: Sequence[int] | Tensor,
    dataset_id: int,
    label_space: LabelSpace,
) -> list[dict[str, Any]]:
    """Convert per-image ``Detections`` (unified labels, xyxy px) to COCO result records.

    Detections whose label is not one of ``dataset_id``'s categories are dropped (COCOeval would
    ignore them; ``MultiDatasetEvaluator`` counts them as "foreign").

    Args:
        dets: one ``Detections`` per image (boxes xyxy in original-image pixels).
        image_ids: ``[B]`` the images' ids in the dataset's GT JSON.
        dataset_id: index of the dataset in the label space.
        label_space: the run's label space.

    Returns:
        ``{"image_id", "category_id" (native), "bbox" [x, y, w, h], "score"}`` records.
    """
    table = _table(label_space, dataset_id)
    return [r for _, arr, _ in _convert(dets, image_ids, table) for r in _records(arr)]


# --------------------------------------------------------------------------------------------
# results over datasets
# --------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    """Mean of the defined values (COCO's ``-1`` skipped); -1 when none is defined."""
    vals = [v for v in values if v is not None and v >= 0 and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else -1.0


def _fmt(v: float | None) -> str:
    return "-" if v is None or v < 0 or math.isnan(v) else f"{100.0 * v:.2f}"


@dataclass
class EvalResults:
    """Per-dataset metrics and their means.

    Attributes:
        datasets: evaluated dataset name -> metrics (unrestricted top-K: the protocol).
        oracle: dataset name -> metrics of the ``restrict_to_dataset_labels`` oracle, or None.
        skipped: dataset name -> reason (e.g. its test set is another dataset's).
        backend: COCO evaluation backend used.
        detections: dataset name -> ``[N, 7]`` float64 native-id results
            ``(image_id, x, y, w, h, score, category_id)`` (written as JSON records by ``write``).
        oracle_detections: the same for the oracle.
    """

    datasets: dict[str, DatasetMetrics]
    oracle: dict[str, DatasetMetrics] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str = "faster"
    detections: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    oracle_detections: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def mean(self, attr: str = "ap", *, oracle: bool = False) -> float:
        """Mean of a ``DatasetMetrics`` field over the evaluated datasets (undefined skipped)."""
        src = self.oracle if oracle else self.datasets
        if not src:
            return -1.0
        return _mean([getattr(m, attr) for m in src.values()])

    @property
    def mean_ap(self) -> float:
        return self.mean("ap")

    @property
    def mean_ap50(self) -> float:
        return self.mean("ap50")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (fractions; ``-1`` = undefined)."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "datasets": {k: m.to_dict() for k, m in self.datasets.items()},
            "mean": {"AP": self.mean_ap, "AP50": self.mean_ap50, "VOC_AP50": self.mean("voc_ap50")},
            "skipped": dict(self.skipped),
        }
        if self.oracle is not None:
            out["oracle"] = {
                "datasets": {k: m.to_dict() for k, m in self.oracle.items()},
                "mean": {
                    "AP": self.mean("ap", oracle=True),
                    "AP50": self.mean("ap50", oracle=True),
                },
            }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResults:
        oracle = d.get("oracle")
        return cls(
            datasets={k: DatasetMetrics.from_dict(v) for k, v in d["datasets"].items()},
            oracle=(
                {k: DatasetMetrics.from_dict(v) for k, v in oracle["datasets"].items()}
                if oracle
                else None
            ),
            skipped=dict(d.get("skipped", {})),
            backend=str(d.get("backend", "faster")),
        )

    def table_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows (datasets, then the mean) of the results table, values in percent."""
        header = (
            ["dataset"] + [name for name, _ in _TABLE_COLUMNS] + ["images", "dets", "foreign %"]
        )
        if self.oracle is not None:
            header += ["oracle AP", "oracle AP50"]
        rows: list[list[str]] = []
        for name, m in self.datasets.items():
            row = [name] + [_fmt(getattr(m, attr)) for _, attr in _TABLE_COLUMNS]
            row += [str(m.num_images), str(m.num_detections), f"{100.0 * m.foreign_share:.1f}"]
            if self.oracle is not None:
                om = self.oracle.get(name)
                row += [_fmt(om.ap if om else None), _fmt(om.ap50 if om else None)]
            rows.append(row)
        mean_row = ["mean"] + [_fmt(self.mean(attr)) for _, attr in _TABLE_COLUMNS]
        n_img = sum(m.num_images for m in self.datasets.values())
        n_det = sum(m.num_detections for m in self.datasets.values())
        mean_row += [str(n_img), str(n_det), ""]
        if self.oracle is not None:
            mean_row += [_fmt(self.mean("ap", oracle=True)), _fmt(self.mean("ap50", oracle=True))]
        rows.append(mean_row)
        return header, rows

    def to_markdown(self) -> str:
        """A datasets x metrics table (percent) with a mean row; skipped datasets listed below."""
        header, rows = self.table_rows()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        notes = [
            "",
            "AP = AP@[.5:.95], percent; '-' = undefined (no GT in that range). VOC AP50 = "
            "UODB's protocol: VOC mean AP at IoU 0.5 over the categories (ignore regions are "
            "neither positives nor false positives).",
        ]
        if self.oracle is not None:
            notes.append(
                "oracle = scores restricted to the dataset's labels before top-K "
                "(uses the dataset identity; not the protocol)."
            )
        for name, reason in self.skipped.items():
            notes.append(f"skipped {name}: {reason}")
        return "\n".join(lines + notes) + "\n"

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write results.json, results.md and detections_<dataset>.json (native ids).

        Returns:
            name -> path of every file written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"results.json": out / "results.json", "results.md": out / "results.md"}
        written["results.json"].write_text(self.to_json() + "\n", encoding="utf-8")
        written["results.md"].write_text(self.to_markdown(), encoding="utf-8")
        for suffix, dets in (("", self.detections), ("_oracle", self.oracle_detections)):
            for name, arr in dets.items():
                fname = f"detections_{name}{suffix}.json"
                with open(out / fname, "w", encoding="utf-8") as f:  # streamed: can be large
                    f.write("[")
                    for i, rec in enumerate(_records(arr)):
                        f.write((",\n" if i else "\n") + json.dumps(rec))
                    f.write("\n]\n")
                written[fname] = out / fname
        logger.info("evaluation results written to %s", out)
        return written


class MultiDatasetEvaluator:
    """Accumulates detections of several datasets and evaluates each against its own GT.

    Usage: ``process`` every batch (per-image dataset ids, so mixed batches work), then
    ``evaluate()`` (gathers to rank 0 when ``torch.distributed`` is initialized; other ranks get
    None). Images seen twice (distributed sampler padding) are counted once.

    Args:
        gt: dataset name -> COCO GT JSON (path or dict) of its test split; datasets not named
            here are not evaluated.
        label_space: maps unified labels to (dataset, native id); its ``dataset_names`` order
            defines ``dataset_id``.
        backend: ``"faster"`` or ``"pycocotools"``.
        max_dets: COCOeval's last maxDets.
        count_shared_test_sets_once: a dataset whose GT is the same file (or the same dict
            object) as an earlier dataset's is skipped (docs/design.md §5: voc12 is evaluated as
        voc07).
        only_processed_images: evaluate each dataset on the images that were processed only
            (``eval.max_images`` quick checks); default: on every GT image (the protocol), so an
            image never processed counts as all-missed.
        voc_metric: interpolation of the VOC AP50 reported beside COCO's metrics
            (``"area"`` all-point, or ``"11point"`` VOC2007).
    """

    def __init__(
        self,
        *,
        gt: Mapping[str, str | os.PathLike[str] | Mapping[str, Any]],
        label_space: LabelSpace,
        backend: Backend = "faster",
        max_dets: int = 100,
        count_shared_test_sets_once: bool = True,
        only_processed_images: bool = False,
        voc_metric: VOCMetric = "area",
    ) -> None:
        if voc_metric not in ("area", "11point"):
            raise ValueError(f"voc_metric must be 'area' or '11point', got {voc_metric!r}")
        if backend not in ("faster", "pycocotools"):
            raise ValueError(f"backend must be 'faster' or 'pycocotools', got {backend!r}")
        self.dataset_names = list(label_space.dataset_names)
        unknown = [n for n in gt if n not in self.dataset_names]
        if unknown:
            raise ValueError(
                f"gt names datasets {unknown} that are not in the label space {self.dataset_names}"
            )
        self.gt = dict(gt)
        self.label_space = label_space
        self.backend: Backend = backend
        self.max_dets = max_dets
        self.voc_metric: VOCMetric = voc_metric
        self.only_processed_images = only_processed_images
        self.skipped: dict[str, str] = {}
        seen: dict[Any, str] = {}
        for name in self.dataset_names:
            if name not in self.gt:
                continue
            g = self.gt[name]
            key = os.path.realpath(os.fspath(g)) if isinstance(g, (str, os.PathLike)) else id(g)
            if count_shared_test_sets_once and key in seen:
                self.skipped[name] = f"same test set as {seen[key]}"
            else:
                seen.setdefault(key, name)
        self._tables = {
            i: _table(label_space, i) for i, n in enumerate(self.dataset_names) if n in self.gt
        }
        self.reset()

    @property
    def datasets_to_evaluate(self) -> list[str]:
        """Datasets that need inference (those with a GT and not skipped), in order."""
        return [n for n in self.dataset_names if n in self.gt and n not in self.skipped]

    def reset(self) -> None:
        # per set ("main"/"oracle") -> dataset name -> image id -> ([n, 7] results, num_foreign)
        self._store: dict[str, dict[str, dict[int, tuple[np.ndarray, int]]]] = {
            "main": {},
            "oracle": {},
        }

    def process(
        self,
        dataset_ids: Sequence[int] | Tensor,
        image_ids: Sequence[int] | Tensor,
        detections: Sequence[Detections],
        oracle_detections: Sequence[Detections] | None = None,
    ) -> None:
        """Add the predictions of a batch.

        Args:
            dataset_ids: ``[B]`` dataset index of every image.
            image_ids: ``[B]`` image id in that dataset's GT JSON.
            detections: ``B`` Detections (unrestricted top-K; the protocol).
            oracle_detections: ``B`` Detections of the ``restrict_to_dataset_labels`` oracle.
        """
        ds_ids = _as_int_list(dataset_ids)
        im_ids = _as_int_list(image_ids)
        if not len(ds_ids) == len(im_ids) == len(detections):
            raise ValueError(
                f"dataset_ids ({len(ds_ids)}), image_ids ({len(im_ids)}) and detections "
                f"({len(detections)}) must have the same length"
            )
        sets = [("main", detections)]
        if oracle_detections is not None:
            if len(oracle_detections) != len(detections):
                raise ValueError(
                    f"oracle_detections has {len(oracle_detections)} images, expected "
                    f"{len(detections)}"
                )
            sets.append(("oracle", oracle_detections))
        for d, im, *dets in zip(ds_ids, im_ids, *[s for _, s in sets]):
            if not 0 <= d < len(self.dataset_names):
                raise ValueError(f"dataset id {d} out of range [0, {len(self.dataset_names)})")
            name = self.dataset_names[d]
            if d not in self._tables or name in self.skipped:
                continue
            for (set_name, _), det in zip(sets, dets):
                ((_, arr, n_foreign),) = _convert([det], [im], self._tables[d])
                self._store[set_name].setdefault(name, {}).setdefault(im, (arr, n_foreign))

    def merge_(self, other: MultiDatasetEvaluator | Mapping[str, Any]) -> MultiDatasetEvaluator:
        """Add another evaluator's (or ``state_dict``'s) detections; first occurrence wins."""
        store = other._store if isinstance(other, MultiDatasetEvaluator) else other
        for set_name, per_ds in store.items():
            mine = self._store.setdefault(set_name, {})
            for name, per_img in per_ds.items():
                target = mine.setdefault(name, {})
                for im, val in per_img.items():
                    target.setdefault(int(im), (np.asarray(val[0]), int(val[1])))
        return self

    def state_dict(self) -> dict[str, Any]:
        """The accumulated detections (picklable)."""
        return copy.deepcopy(self._store)

    def synchronize(self) -> bool:
        """Gather every rank's detections on rank 0; returns True on the rank that evaluates."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return True
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._store)
        if dist.get_rank() != 0:
            return False
        self.reset()
        for st in gathered:
            self.merge_(st)
        return True

    def evaluate(self) -> EvalResults | None:
        """Evaluate every dataset (on rank 0; None on other ranks)."""
        if not self.synchronize():
            return None
        datasets, dets_out = self._evaluate_set("main")
        oracle = oracle_dets = None
        if self._store.get("oracle"):
            oracle, oracle_dets = self._evaluate_set("oracle")
        res = EvalResults(
            datasets=datasets,
            oracle=oracle,
            skipped=dict(self.skipped),
            backend=self.backend,
            detections=dets_out,
            oracle_detections=oracle_dets or {},
        )
        logger.info("mean AP %.4f, mean AP50 %.4f", res.mean_ap, res.mean_ap50)
        return res

    def _evaluate_set(
        self, set_name: str
    ) -> tuple[dict[str, DatasetMetrics], dict[str, np.ndarray]]:
        metrics: dict[str, DatasetMetrics] = {}
        all_results: dict[str, np.ndarray] = {}
        for name in self.datasets_to_evaluate:
            per_img = self._store[set_name].get(name, {})
            if not per_img:
                logger.warning("dataset %s: no image was processed (%s)", name, set_name)
            results = np.concatenate(
                [np.zeros((0, 7))] + [per_img[im][0] for im in sorted(per_img)]
            )  # [N, 7]
            n_foreign = sum(v[1] for v in per_img.values())
            m = evaluate_dataset(
                self.gt[name],
                _records(results),
                backend=self.backend,
                max_dets=self.max_dets,
                image_ids=sorted(per_img) if self.only_processed_images else None,
                voc_metric=self.voc_metric,
            )
            metrics[name] = replace(m, num_foreign=n_foreign)
            all_results[name] = results
            logger.info(
                "%s%s: AP %.4f AP50 %.4f (%d images processed, %d dets, %.1f%% foreign)",
                name,
                " (oracle)" if set_name == "oracle" else "",
                m.ap,
                m.ap50,
                len(per_img),
                m.num_detections,
                100.0 * metrics[name].foreign_share,
            )
        return metrics, all_results
