"""damex extend: growing a trained model by one dataset (expert, router row, label block)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_fixtures import REF, TRAIN_SETS, tiny_config_dict

import damex
from damex.config import config_from_dict
from damex.engine import checkpoint as ckpt
from damex.engine.extend import ExtendOptions, extend, grow_state_dict
from damex.errors import ConfigError
from damex.modeling import build_model

NEW = "syn_faces"


def _extend_config(synthetic_root: Path, out: Path, **train):
    d = tiny_config_dict(synthetic_root, out, **{**REF, **train})
    d["data"]["train"] = [NEW]
    d["data"]["test"] = [*TRAIN_SETS, NEW]
    d["moe"]["num_experts"] = 3
    d["moe"]["expert_map"] = {"syn_photo": 0, "syn_signs": 1, NEW: 2}
    return config_from_dict(d)


@pytest.fixture(scope="module")
def extended_run(synthetic_root: Path, reference_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extend") / "run"
    cfg = _extend_config(synthetic_root, out, epochs=1, lr=1e-3, ema=False)
    result = extend(cfg, reference_run / "last.pth", ExtendOptions(init="mean"))
    assert result.iterations == 2 and result.final_results is not None
    assert set(result.final_results.datasets) == {*TRAIN_SETS, NEW}
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = ckpt.load_checkpoint(path)
    return state["ema"]["module"] if state.get("ema") else state["model"]


def test_frozen_parameters_are_bit_identical(reference_run: Path, extended_run: Path) -> None:
    old = _weights(reference_run / "last.pth")
    new = ckpt.load_checkpoint(extended_run / "last.pth")
    assert new["extended_from"].endswith("last.pth")
    assert new["config"]["moe"]["base_experts"] == 2
    grown = new["model"]
    changed = []
    for key, w in grown.items():
        if key not in old:
            assert ".experts.ffn.2." in key  # only the new expert is new
            continue
        o = old[key]
        rows = o.shape[0] - 1 if key == "label_embed.weight" else o.shape[0]
        assert torch.equal(w[:rows], o[:rows]), f"{key} changed"
        if w.shape != o.shape and not torch.equal(w[rows:], w[rows:] * 0):
            changed.append(key)
    # the trainable parts did train: the router's new row and the new label rows
    new_rows = [k for k in grown if k.endswith("router.weight") or "class_head" in k]
    assert any(k in changed for k in new_rows)
    ls = new["label_space"]
    assert [d["name"] for d in ls["datasets"]] == [*TRAIN_SETS, NEW]  # old slots first
    assert new["expert_map"] == {"syn_photo": 0, "syn_signs": 1, NEW: 2}


def test_old_predictions_unchanged_when_new_expert_unused(
    reference_run: Path, extended_run: Path, synthetic_root: Path
) -> None:
    before = damex.Predictor.from_checkpoint(reference_run / "last.pth")
    after = damex.Predictor.from_checkpoint(extended_run / "last.pth")
    k_old = before.label_space.num_classes
    assert after.label_space.names[:k_old] == before.label_space.names
    compared = 0
    for name in TRAIN_SETS:
        for path in sorted((synthetic_root / name / "images").glob("test_*"))[:3]:
            if int(after.routing_counts([path])[:, 2].sum()) > 0:
                continue  # a query chose the new expert: its output may differ
            with torch.no_grad():
                a = before.model(before._batch([damex.predictor.load_image(path)])).pred
                b = after.model(after._batch([damex.predictor.load_image(path)])).pred
            torch.testing.assert_close(b.logits[..., :k_old], a.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(b.boxes, a.boxes, rtol=0, atol=1e-6)
            compared += 1
    assert compared >= 1


def test_grow_state_dict_copies_the_routed_expert(synthetic_root: Path, tmp_path: Path) -> None:
    d = tiny_config_dict(synthetic_root, tmp_path)
    old_cfg = config_from_dict(d)
    torch.manual_seed(0)
    old = build_model(old_cfg.model, old_cfg.moe, 5).state_dict()
    d["moe"]["num_experts"] = 3
    d["moe"]["expert_map"] = {"syn_photo": 0, "syn_signs": 1}
    new_cfg = config_from_dict(d)
    new_model = build_model(new_cfg.model, new_cfg.moe, 7)
    prefix = "transformer.decoder.layers.0.ffn.moe."
    state, plan = grow_state_dict(
        old, new_model, old_experts=2, old_classes=5, source_expert={prefix: 1}
    )
    new_model.load_state_dict(state)  # every key, right shapes
    assert torch.equal(
        state[prefix + "experts.ffn.2.fc1.weight"], old[prefix + "experts.ffn.1.fc1.weight"]
    )
    assert torch.equal(state[prefix + "router.weight"][2], old[prefix + "router.weight"][1])
    assert torch.equal(state["label_embed.weight"][-1], old["label_embed.weight"][-1])
    assert plan.frozen_rows[prefix + "router.weight"] == 2
    assert plan.frozen_rows["label_embed.weight"] == 5
    mean, _ = grow_state_dict(old, new_model, old_experts=2, old_classes=5)
    want = (old[prefix + "experts.ffn.0.fc2.bias"] + old[prefix + "experts.ffn.1.fc2.bias"]) / 2
    torch.testing.assert_close(mean[prefix + "experts.ffn.2.fc2.bias"], want)


def test_extend_checks_the_expert_count(synthetic_root: Path, reference_run: Path, tmp_path):
    d = tiny_config_dict(synthetic_root, tmp_path / "x")
    d["data"]["train"] = [NEW]
    d["data"]["test"] = [*TRAIN_SETS, NEW]
    d["moe"]["expert_map"] = {"syn_photo": 0, "syn_signs": 1, NEW: 1}  # still 2 experts
    with pytest.raises(ConfigError, match="moe.num_experts must be 3"):
        extend(config_from_dict(d), reference_run / "last.pth")
    with pytest.raises(ConfigError, match="--train must be one of"):
        ExtendOptions(train="everything")
