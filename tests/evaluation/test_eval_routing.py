"""Routing tables: share rows sum to 1, accuracy / drop / entropy equal hand counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from damex.evaluation.routing import (
    LayerRouting,
    routing_accuracy,
    routing_markdown,
    share_matrix,
    summarize_layers,
)

NAMES = ["coco", "voc07", "kitti"]
EMAP = {"coco": 0, "voc07": 2}  # kitti unmapped


def _layers() -> list[LayerRouting]:
    # hand-made counts: rows = datasets, columns = 3 experts
    c0 = np.array([[6, 3, 1], [0, 1, 3], [0, 0, 0]])  # kitti: no tokens in this layer
    c1 = np.array([[2, 2, 0], [1, 0, 9], [5, 5, 5]])
    return [
        LayerRouting("decoder.0", c0, np.array([1, 2, 0]), np.array([5.0, 2.0, 0])),
        LayerRouting("decoder.1", c1),
    ]


def test_share_rows_sum_to_one_and_accuracy_matches_hand_count() -> None:
    s = summarize_layers(_layers(), dataset_names=NAMES, expert_map=EMAP)
    json.dumps(s)  # JSON-able
    l0, l1 = s["layers"]
    share0 = np.asarray(l0["share"])
    np.testing.assert_allclose(share0.sum(1), [1.0, 1.0, 0.0])  # no tokens -> zero row
    np.testing.assert_allclose(np.asarray(l1["share"]).sum(1), 1.0)
    np.testing.assert_allclose(share0[0], [0.6, 0.3, 0.1])
    # accuracy: coco -> E0: 6/10; voc07 -> E2: 3/4; kitti has no map entry
    assert l0["accuracy"] == pytest.approx([0.6, 0.75, None])
    assert l1["accuracy"] == pytest.approx([0.5, 0.9, None])
    assert l0["mean_accuracy"] == pytest.approx((0.6 + 0.75) / 2)
    assert s["mean_accuracy"] == pytest.approx(((0.6 + 0.75) / 2 + (0.5 + 0.9) / 2) / 2)
    assert l0["tokens"] == [10, 4, 0]
    assert l0["drop_rate"] == pytest.approx([0.1, 0.5, None])
    assert l0["entropy"] == pytest.approx([0.5, 0.5, None])
    assert l1["drop_rate"] is None and l1["mean_entropy"] is None
    assert l0["expert_load"] == pytest.approx([6 / 14, 4 / 14, 4 / 14])
    assert s["max_entropy"] == pytest.approx(math.log(3))
    assert s["expert_map"] == EMAP


def test_without_map_accuracy_is_undefined() -> None:
    s = summarize_layers(_layers(), dataset_names=NAMES)
    assert s["layers"][0]["accuracy"] is None and s["mean_accuracy"] is None
    assert "| - |" in routing_markdown(s)


def test_markdown_marks_mapped_cells() -> None:
    md = routing_markdown(summarize_layers(_layers(), dataset_names=NAMES, expert_map=EMAP))
    assert "| coco | **60.0** | 30.0 | 10.0 | 10 | 60.0 | 10.0 | 0.500 |" in md
    assert "| voc07 | 0.0 | 25.0 | **75.0** | 4 | 75.0 | 50.0 | 0.500 |" in md
    assert "| decoder.1 | 70.0 |" in md


def test_validation() -> None:
    with pytest.raises(ValueError, match="outside"):
        summarize_layers(_layers(), dataset_names=NAMES, expert_map={"coco": 3})
    with pytest.raises(ValueError, match="counts must be"):
        summarize_layers(_layers(), dataset_names=NAMES[:2])
    with pytest.raises(ValueError, match="non-negative"):
        share_matrix([[1, -1]])
    assert routing_accuracy([[1, 3], [2, 2]], [1, -1]) == [0.75, None]


def test_routing_summary_from_routing_stats_matches_hand_count() -> None:
    import torch

    from damex.evaluation.routing import routing_summary
    from damex.moe.stats import RoutingStats
    from damex.moe.types import RoutingInfo

    # 2 images (datasets 0 and 1), 4 tokens each, E = 3, one layer
    expert = torch.tensor([0, 0, 1, 0, 2, 2, 1, 2]).unsqueeze(1)  # [T, 1]
    kept = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool).unsqueeze(1)
    info = RoutingInfo(
        logits=torch.zeros(8, 3),  # uniform router: entropy log 3 per token
        noisy_logits=None,
        expert=expert,
        gate=torch.ones(8, 1),
        kept=kept,
        token_image=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
    )
    stats = RoutingStats(1, 2, 3, expert_map=[0, 2])
    stats.update([info], torch.tensor([0, 1]))
    s = routing_summary(stats, dataset_names=["a", "b"], layer_names=["dec.1"])
    layer = s["layers"][0]
    assert s["expert_map"] == {"a": 0, "b": 2}  # taken from the stats
    assert layer["counts"] == [[3, 1, 0], [0, 1, 3]]
    assert layer["accuracy"] == pytest.approx([0.75, 0.75])  # a: 3/4 on E0, b: 3/4 on E2
    assert layer["accuracy"] == pytest.approx(stats.accuracy_per_dataset()[0].tolist())
    np.testing.assert_allclose(layer["share"], stats.fractions()[0].numpy())
    assert layer["drop_rate"] == pytest.approx([0.25, 0.0])
    assert layer["entropy"] == pytest.approx([math.log(3)] * 2)
    assert json.loads(json.dumps(s))["raw"]["top1"] == stats.top1.tolist()
    # the to_dict() form gives the same summary; an explicit map overrides the stats' one
    again = routing_summary(stats.to_dict(), dataset_names=["a", "b"], expert_map={"a": 1})
    assert again["layers"][0]["accuracy"] == pytest.approx([0.25, None])
    assert again["layers"][0]["name"] == "moe.0"


def test_order_free_metrics_in_summary_and_markdown_ignore_expert_order() -> None:
    counts = np.array([[0, 9, 1], [8, 1, 1], [1, 0, 9]])
    layer = LayerRouting("decoder.0", counts)
    s = summarize_layers([layer], dataset_names=NAMES, expert_map={"coco": 0, "voc07": 1})
    renumbered = summarize_layers(
        [LayerRouting("decoder.0", counts[:, [2, 0, 1]])], dataset_names=NAMES
    )
    l0, r0 = s["layers"][0], renumbered["layers"][0]
    assert l0["mean_accuracy"] == pytest.approx((0 + 0.1) / 2)  # the map is wrong
    assert l0["best_accuracy"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)
    assert l0["best_assignment"] == [1, 0, 2]
    for key in ("best_accuracy", "nmi", "mean_routing_entropy", "active_experts"):
        assert l0[key] == pytest.approx(r0[key]), key
    assert s["mean_best_accuracy"] == pytest.approx(l0["best_accuracy"])
    md = routing_markdown(s)
    assert "best-assignment accuracy %" in md and "| 86.7 |" in md
