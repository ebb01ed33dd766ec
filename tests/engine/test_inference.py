"""run_inference: per-dataset evaluation, the restricted oracle, routing statistics, caps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import TRAIN_SETS, tiny_config

from damex.data.loader import build_test_loaders
from damex.engine.inference import run_inference
from damex.engine.run_data import build_run_data
from damex.modeling import build_model
from damex.modeling.postprocess import build_postprocess


@pytest.fixture(scope="module")
def parts(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = tiny_config(synthetic_root, tmp_path_factory.mktemp("inf") / "run")
    data = build_run_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe, data.label_space.num_classes)
    loaders = build_test_loaders(cfg, data.catalog, data.label_space)
    return cfg, data, model, loaders


def test_evaluation_oracle_and_routing_counts(parts) -> None:
    cfg, data, model, loaders = parts
    model.train()
    results, stats = run_inference(
        model,
        build_postprocess(cfg),
        loaders,
        data.label_space,
        restrict=True,
        routing_tokens="matching_only",
        expert_of_dataset=data.expert_of_dataset,
        progress=False,
    )
    assert model.training  # the mode is restored
    assert set(results.datasets) == set(TRAIN_SETS) and set(results.oracle) == set(TRAIN_SETS)
    n_images = {n: len(loaders[n].dataset) for n in TRAIN_SETS}
    for name in TRAIN_SETS:
        assert results.datasets[name].num_images == n_images[name]
        # the oracle never spends a detection on another dataset's classes
        assert results.oracle[name].num_foreign == 0
        assert results.datasets[name].num_detections + results.datasets[name].num_foreign > 0
    # every matching query of every image is counted once per MoE layer (1 layer here)
    q = cfg.model.num_queries
    ids = [data.label_space.dataset_index(n) for n in TRAIN_SETS]
    assert stats.num_layers == 1 and stats.num_experts == cfg.moe.num_experts
    assert stats.tokens[0, ids].tolist() == [q * n_images[n] for n in TRAIN_SETS]
    assert torch.equal(stats.top1.sum(-1), stats.tokens)
    assert stats.expert_map.tolist() == data.expert_of_dataset.tolist()


def test_max_images_and_deterministic_detections(parts) -> None:
    cfg, data, model, loaders = parts
    pp = build_postprocess(cfg)
    a, _ = run_inference(
        model, pp, loaders, data.label_space, max_images=1, routing_stats=False, progress=False
    )
    assert all(m.num_images == 1 for m in a.datasets.values())
    b, stats = run_inference(
        model, pp, loaders, data.label_space, max_images=1, routing_stats=False, progress=False
    )
    assert stats is None and set(a.detections) == set(b.detections)
    for name, dets in a.detections.items():  # eval mode: no routing noise, no DN queries
        assert np.array_equal(np.asarray(dets), np.asarray(b.detections[name]))


def test_read_ahead_keeps_order_and_reraises_loader_errors():
    from damex.engine.inference import _read_ahead

    assert list(_read_ahead(iter(range(7)))) == list(range(7))

    def broken():
        yield 1
        raise ValueError("bad image 3.jpg")

    it = _read_ahead(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad image"):
        next(it)


def test_router_label_mask_in_evaluation_matches_a_direct_computation(parts) -> None:
    """eval.label_mask=router: each image keeps the labels of the dataset its router votes for."""
    from damex.modeling.postprocess import PostProcess, router_label_mask

    cfg, data, model, loaders = parts
    results, _ = run_inference(
        model,
        build_postprocess(cfg),
        loaders,
        data.label_space,
        routing_stats=False,
        expert_of_dataset=data.expert_of_dataset,
        label_mask="router",
        progress=False,
    )
    ls = data.label_space
    dataset_labels = torch.zeros(ls.num_datasets, ls.num_classes, dtype=torch.bool)
    for d in range(ls.num_datasets):
        dataset_labels[d, ls.dataset_slice(d)] = True
    pp = PostProcess(num_select=cfg.eval.num_select, restrict_to_dataset_labels=True)
    model.eval()
    for name in TRAIN_SETS:
        own = dataset_labels[ls.dataset_index(name)]
        expected_foreign = expected_kept = 0
        with torch.inference_mode():
            for batch in loaders[name]:
                out = model(batch)
                masks = router_label_mask(
                    out.routing, data.expert_of_dataset, dataset_labels, batch_size=len(batch)
                )
                for mask, det in zip(masks, pp(out.pred, batch.orig_sizes, list(masks))):
                    k_own = int(own.sum())  # one dataset's block, the other's, or all (a tie)
                    assert int(mask.sum()) in (k_own, ls.num_classes - k_own, ls.num_classes)
                    is_own = own[det.labels]
                    expected_kept += int(is_own.sum())
                    expected_foreign += int((~is_own).sum())
        assert results.datasets[name].num_foreign == expected_foreign
        assert results.datasets[name].num_detections == expected_kept
    with pytest.raises(ValueError, match="an expert for every dataset"):
        run_inference(
            model, build_postprocess(cfg), loaders, ls, label_mask="router", progress=False
        )
