"""LabelSpace: the paper's 178-way UODB layout, round trips, merged policy, checks, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from damex.data.label_space import LabelSpace
from damex.data.uodb import COCO_CATEGORY_IDS, UODB_CLASSES, UODB_DATASETS, UODB_NUM_SLOTS
from damex.errors import DatasetError


def _cats(names: list[str], ids: list[int] | None = None) -> list[dict]:
    ids = ids if ids is not None else list(range(1, len(names) + 1))
    return [{"id": i, "name": n} for i, n in zip(ids, names)]


def _uodb_entries(order: list[str] = UODB_DATASETS) -> list[tuple]:
    out = []
    for name in order:
        ids = COCO_CATEGORY_IDS if name == "coco" else None
        out.append((name, _cats(UODB_CLASSES[name], ids), UODB_NUM_SLOTS.get(name)))
    return out


# The paper's block starts (docs/design.md §4.2, clean 0-based index = start + local_id - 1).
PAPER_STARTS = {
    "coco": 0, "voc07": 91, "voc12": 91, "clipart": 111, "watercolor": 131, "comic": 137,
    "deeplesion": 143, "dota": 144, "kitchen": 159, "kitti": 170, "lisa": 173, "widerface": 177,
}  # fmt: skip


def test_uodb_twelve_sources_give_the_papers_178_slots() -> None:
    ls = LabelSpace.build(_uodb_entries())
    assert ls.num_classes == 178
    assert ls.share_groups == [("voc07", "voc12")]
    for d, name in enumerate(UODB_DATASETS):
        first_native = ls.native_ids(d)[0]
        start = PAPER_STARTS[name]
        offset = first_native - 1  # slot = start + native_id - 1
        assert ls.to_unified(d, first_native) == start + offset, name
    coco = ls.dataset_index("coco")
    for cid in COCO_CATEGORY_IDS:  # COCO keeps native ids: slot = id - 1
        assert ls.to_unified(coco, cid) == cid - 1
    assert ls.to_unified(ls.dataset_index("widerface"), 1) == 177
    assert ls.names[0] == "coco/person"
    assert ls.names[11] == "coco/<unused:12>" and ls.to_native(11) == []
    assert ls.names[91] == "voc07+voc12/aeroplane"
    assert ls.names[177] == "widerface/face"
    v07, v12 = ls.dataset_index("voc07"), ls.dataset_index("voc12")
    assert ls.dataset_slice(v07) == ls.dataset_slice(v12) == list(range(91, 111))
    assert ls.to_native(91) == [(v07, 1), (v12, 1)]
    ls.check_labels(torch.tensor([0, 89, 177]))  # the head's last slot is valid


def test_without_sharing_voc_gets_two_blocks() -> None:
    ls = LabelSpace.build(_uodb_entries(), share=[])
    assert ls.num_classes == 198
    assert ls.to_unified(ls.dataset_index("widerface"), 1) == 197
    assert ls.dataset_slice(1) == list(range(91, 111))
    assert ls.dataset_slice(2) == list(range(111, 131))


def test_shared_block_sits_at_first_member_even_when_not_adjacent() -> None:
    order = ["voc12", "clipart", "voc07"]
    ls = LabelSpace.build(_uodb_entries(order))
    assert ls.num_classes == 40
    assert ls.dataset_slice(0) == ls.dataset_slice(2) == list(range(0, 20))
    assert ls.dataset_slice(1) == list(range(20, 40))
    assert ls.names[0] == "voc12+voc07/aeroplane"


def test_share_group_with_different_categories_is_rejected() -> None:
    entries = [("voc07", _cats(["cat", "dog"]), None), ("voc12", _cats(["cat", "cow"]), None)]
    with pytest.raises(DatasetError, match="share a label block"):
        LabelSpace.build(entries)


@pytest.mark.parametrize("policy", ["disjoint", "merged"])
def test_round_trips(policy: str) -> None:
    ls = LabelSpace.build(_uodb_entries(), policy=policy)
    seen: set[int] = set()
    for d in range(ls.num_datasets):
        table = ls.native_table(d)
        assert len(table) == ls.num_classes
        for cid in ls.native_ids(d):
            u = ls.to_unified(d, cid)
            assert (d, cid) in ls.to_native(u)
            assert ls.native_id(d, u) == cid
            assert table[u] == cid
            seen.add(u)
        assert ls.dataset_slice(d) == sorted(ls.native_to_unified(d).values())
        assert sum(v >= 0 for v in table) == len(ls.native_ids(d))
    if policy == "merged":
        assert seen == set(range(ls.num_classes))  # merged has no unused slots


def test_merged_policy_merges_names_case_insensitively() -> None:
    entries = [
        ("a", _cats(["car", "person"], [3, 7]), None),
        ("b", _cats(["Car", "tree"]), None),
        ("c", _cats(["PERSON"]), 5),  # num_slots is a disjoint-only notion
    ]
    ls = LabelSpace.build(entries, policy="merged")
    assert ls.names == ["car", "person", "tree"]
    assert ls.to_unified(0, 3) == ls.to_unified(1, 1) == 0
    assert ls.to_unified(2, 1) == ls.to_unified(0, 7) == 1
    assert ls.to_native(0) == [(0, 3), (1, 1)]
    assert ls.native_id(2, 0) is None
    assert ls.native_table(1) == [1, -1, 2]
    assert ls.dataset_slice(2) == [1]
    disjoint = LabelSpace.build(entries)
    assert disjoint.num_classes == 2 + 2 + 5
    assert disjoint.names[:4] == ["a/car", "a/person", "b/Car", "b/tree"]


def test_merged_rejects_two_same_named_categories_in_one_dataset() -> None:
    with pytest.raises(DatasetError, match="two categories named"):
        LabelSpace.build([("a", _cats(["car", "CAR"]), None)], policy="merged")


def test_compact_blocks_follow_sorted_native_ids_or_configured_classes() -> None:
    cats = [{"id": 9, "name": "z"}, {"id": 2, "name": "y"}, {"id": 5, "name": "x"}]
    ls = LabelSpace.build([("d", cats, None)])
    assert [ls.to_unified(0, c) for c in (2, 5, 9)] == [0, 1, 2]
    ordered = LabelSpace.build([("d", cats, None, ["x", "z", "y"])])
    assert [ordered.to_unified(0, c) for c in (5, 9, 2)] == [0, 1, 2]
    assert ordered.names == ["d/x", "d/z", "d/y"]
    with pytest.raises(DatasetError, match="configured classes"):
        LabelSpace.build([("d", cats, None, ["x", "y", "w"])])


def test_num_slots_requires_ids_in_range() -> None:
    with pytest.raises(DatasetError, match=r"outside 1\.\.3"):
        LabelSpace.build([("d", _cats(["a", "b"], [1, 4]), 3)])
    with pytest.raises(DatasetError, match=r"outside 1\.\.3"):
        LabelSpace.build([("d", _cats(["a"], [0]), 3)])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="label policy"):
        LabelSpace.build([("d", _cats(["a"]), None)], policy="union")
    with pytest.raises(ValueError, match="duplicate dataset names"):
        LabelSpace.build([("d", _cats(["a"]), None), ("d", _cats(["b"]), None)])
    with pytest.raises(DatasetError, match="duplicate category ids"):
        LabelSpace.build([("d", _cats(["a", "b"], [1, 1]), None)])
    ls = LabelSpace.build([("d", _cats(["a", "b"]), None)])
    with pytest.raises(DatasetError, match=r"category_id 7 not in categories \[1, 2\]"):
        ls.to_unified(0, 7)
    with pytest.raises(IndexError):
        ls.to_native(2)
    with pytest.raises(IndexError):
        ls.dataset_slice(1)


def test_check_labels() -> None:
    ls = LabelSpace.build(_uodb_entries())
    ls.check_labels(torch.zeros(0, dtype=torch.long))
    ls.check_labels([0, 177])
    ls.check_labels(np.array([5, 6]))
    with pytest.raises(DatasetError, match=r"label 178 >= num_classes 178 \(widerface\)"):
        ls.check_labels(torch.tensor([3, 178]), where="widerface")
    with pytest.raises(DatasetError, match="negative label -1"):
        ls.check_labels([-1, 2])


def test_state_dict_is_json_and_round_trips() -> None:
    ls = LabelSpace.build(_uodb_entries(), policy="disjoint")
    state = json.loads(json.dumps(ls.state_dict()))
    back = LabelSpace.from_state_dict(state)
    assert back == ls
    assert back.names == ls.names and back.num_classes == 178
    assert back.to_unified(11, 1) == 177
    merged = LabelSpace.build(_uodb_entries(), policy="merged")
    assert LabelSpace.from_state_dict(json.loads(json.dumps(merged.state_dict()))) == merged
    assert merged != ls
    state["names"][0] = "coco/cat"
    with pytest.raises(DatasetError, match="inconsistent"):
        LabelSpace.from_state_dict(state)
    with pytest.raises(DatasetError, match="missing key"):
        LabelSpace.from_state_dict({"version": 1})
