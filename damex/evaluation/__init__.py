"""Evaluation: per-dataset COCO AP (``coco_eval``) and routing statistics (``routing``)."""

from damex.evaluation.coco_eval import (
    STAT_NAMES,
    DatasetMetrics,
    EvalResults,
    MultiDatasetEvaluator,
    detections_to_coco,
    evaluate_dataset,
    load_coco_gt,
)
from damex.evaluation.routing import (
    LayerRouting,
    routing_accuracy,
    routing_markdown,
    routing_summary,
    share_matrix,
    summarize_layers,
)

__all__ = [
    "STAT_NAMES",
    "DatasetMetrics",
    "EvalResults",
    "MultiDatasetEvaluator",
    "detections_to_coco",
    "evaluate_dataset",
    "load_coco_gt",
    "LayerRouting",
    "routing_accuracy",
    "routing_markdown",
    "routing_summary",
    "share_matrix",
    "summarize_layers",
]
