"""Dataset -> expert maps: validation, tensor view, automatic proposal."""

from __future__ import annotations

import pytest
import torch

from damex.moe import ExpertMap, propose_mapping, validate_expert_map
from damex.moe.mapping import NO_EXPERT

NAMES = ["clipart", "coco", "kitti", "lisa", "voc07"]


def test_validate_accepts_shared_experts() -> None:
    validate_expert_map({"clipart": 0, "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1}, NAMES, 3)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"clipart": 0, "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1, "dota": 0}, "'dota'"),
        ({"clipart": 0, "coco": 1, "kitti": 2, "lisa": 2}, "voc07"),
        ({"clipart": 0, "coco": 3, "kitti": 2, "lisa": 2, "voc07": 1}, "'coco' maps to expert 3"),
        (
            {"clipart": -1, "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1},
            "'clipart' maps to expert -1",
        ),
        ({"clipart": "0", "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1}, "'clipart' maps to '0'"),
        ({"clipart": True, "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1}, "'clipart'"),
    ],
)
def test_validate_names_the_offender(mapping: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_expert_map(mapping, NAMES, 3)


def test_expert_map_tensor_and_lookups() -> None:
    emap = ExpertMap.from_dict(
        {"voc07": 1, "coco": 1, "clipart": 0, "kitti": 2, "lisa": 2}, NAMES, 4
    )
    assert emap.as_tensor().tolist() == [0, 1, 2, 2, 1]
    dataset_ids = torch.tensor([4, 0, 2])
    assert emap.as_tensor()[dataset_ids].tolist() == [1, 0, 2]
    assert emap["kitti"] == 2 and emap.expert_of(1) == 1
    assert emap.datasets_of(1) == ["coco", "voc07"]
    assert emap.unused_experts() == [3]
    assert emap.to_dict() == {"clipart": 0, "coco": 1, "kitti": 2, "lisa": 2, "voc07": 1}
    with pytest.raises(KeyError, match="dota"):
        emap["dota"]


def _clustered(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=g) * 5
    groups = [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2", "c3", "c4"]]
    feats = {}
    for c, names in enumerate(groups):
        for name in names:
            n = int(torch.randint(5, 20, (1,), generator=g))
            feats[name] = centers[c] + torch.randn(n, 16, generator=g)
    # interleave the order so that clustering cannot rely on it
    order = ["c1", "a1", "b1", "c2", "a2", "c3", "b2", "a3", "c4"]
    return {n: feats[n] for n in order}, groups


def test_propose_mapping_recovers_known_clusters() -> None:
    feats, groups = _clustered()
    mapping = propose_mapping(feats, num_experts=3, seed=0)
    validate_expert_map(mapping, list(feats), 3)
    for names in groups:
        assert len({mapping[n] for n in names}) == 1, (names, mapping)
    assert len({mapping[names[0]] for names in groups}) == 3  # every expert used
    assert mapping["c1"] == 0  # ids by first appearance
    assert propose_mapping(feats, num_experts=3, seed=0) == mapping


def test_propose_mapping_more_experts_than_datasets_and_errors() -> None:
    feats, _ = _clustered()
    two = {k: feats[k] for k in ("a1", "b1")}
    assert propose_mapping(two, num_experts=4) == {"a1": 0, "b1": 1}
    # 9 datasets on 5 experts: all experts used
    assert sorted(set(propose_mapping(feats, num_experts=5).values())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="'bad'"):
        propose_mapping({"bad": torch.zeros(0, 3), "ok": torch.zeros(2, 3)}, 2)


def test_run_map_from_config_defaults_and_evaluation_only_datasets() -> None:
    names = ["coco", "voc07", "mydata", "held_out"]  # held_out: evaluated, never trained
    emap = ExpertMap.build(
        names, {"coco": 0, "voc07": 0}, 3, defaults={"mydata": 2, "held_out": None},
        required=["coco", "voc07", "mydata"],
    )  # fmt: skip
    assert dict(emap) == {"coco": 0, "voc07": 0, "mydata": 2, "held_out": NO_EXPERT}
    assert emap.as_tensor().tolist() == [0, 0, 2, -1]
    assert emap.to_dict() == {"coco": 0, "voc07": 0, "mydata": 2}  # what a checkpoint stores
    assert emap.unused_experts() == [1]
    # a checkpoint's map read back gives the same object
    again = ExpertMap.build(names, emap.to_dict(), 3)
    assert again == emap
    with pytest.raises(ValueError, match=r"\['held_out'\] have no expert"):
        ExpertMap.build(names, emap.to_dict(), 3, required=names)
    with pytest.raises(ValueError, match="'auto' must be resolved"):
        ExpertMap.build(names, "auto", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'mydata' maps to expert 3"):
        ExpertMap.build(names, {}, 3, defaults={"mydata": 3})
    with pytest.raises(ValueError, match="'coco' maps to expert 5"):
        ExpertMap(("coco",), (5,), 3)  # e.g. a checkpoint of another E
