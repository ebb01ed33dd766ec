"""collate, train / test loaders on tiny real COCO datasets written to tmp_path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from damex.config import Config, DataConfig, EvalConfig, TrainConfig
from damex.data.catalog import DatasetCatalog, DatasetSpec
from damex.data.label_space import build_label_space
from damex.data.loader import build_test_loaders, build_train_loader, collate
from damex.data.subsets import select_subset
from damex.errors import DatasetError
from damex.structures import Batch, Sample, box_cxcywh_to_xyxy

SHAPES = [(40, 50), (50, 40), (36, 60), (44, 44)]  # (height, width) cycled over images


def _write_dataset(root: Path, name: str, num_images: int, num_classes: int) -> DatasetSpec:
    """A COCO JSON with ``num_images`` PNGs, 1-2 boxes each; train and test share the file."""
    images_dir = root / name / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    images, anns = [], []
    for i in range(num_images):
        h, w = SHAPES[i % len(SHAPES)]
        fname = f"{name}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images_dir / fname)
        images.append({"id": 100 + i, "file_name": fname, "height": h, "width": w})
        for j in range(1 + i % 2):
            x, y = 2 + 10 * j, 3 + 5 * j
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "bbox": [x, y, 15, 12],
                    "category_id": 1 + (i + j) % num_classes,
                    "iscrowd": 0,
                    "area": 180,
                }
            )
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)]
    ann = root / name / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return DatasetSpec(name=name, image_root=images_dir, splits={"train": ann, "test": ann})


@pytest.fixture()
def world(tmp_path):
    specs = {
        "big": _write_dataset(tmp_path, "big", 12, 3),
        "small": _write_dataset(tmp_path, "small", 4, 2),
    }
    catalog = DatasetCatalog(specs)
    label_space = build_label_space(catalog, ["big", "small"])
    cfg = Config(
        data=DataConfig(
            train=["big", "small"],
            scales=[32, 40],
            max_size=64,
            crop_scales=[40],
            crop_size=[24, 40],
            num_workers=0,
        ),
        train=TrainConfig(batch_size=2, seed=3),
        eval=EvalConfig(batch_size=3),
    )
    return cfg, catalog, label_space


def _with_data(cfg: Config, **changes) -> Config:
    return replace(cfg, data=replace(cfg.data, **changes))


def _same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.image_ids, y.image_ids) and torch.equal(x.images, y.images)
        for tx, ty in zip(x.targets, y.targets):
            assert torch.equal(tx.boxes, ty.boxes) and torch.equal(tx.labels, ty.labels)


# ---------------------------------------------------------------------------------- collate
def test_collate_padding_mask_and_normalized_boxes_by_hand():
    a = Sample(
        image=torch.full((3, 3, 4), 7, dtype=torch.uint8),
        boxes=torch.tensor([[0.0, 0.0, 2.0, 3.0]]),
        labels=torch.tensor([5]),
        dataset_id=1,
        image_id=11,
        orig_size=(30, 40),
    )
    b = Sample(
        image=torch.full((3, 2, 6), 9, dtype=torch.uint8),
        boxes=torch.tensor([[1.0, 0.5, 4.0, 1.5], [0.0, 0.0, 6.0, 2.0]]),
        labels=torch.tensor([0, 2]),
        dataset_id=0,
        image_id=12,
        orig_size=(20, 60),
    )
    batch = collate([a, None, b], torch.tensor([4, 2]), size_divisibility=4)
    assert batch.images.shape == (2, 3, 4, 8) and batch.images.dtype == torch.float32
    assert bool((batch.images[0, :, :3, :4] == 7).all()) and batch.images[0].sum() == 7 * 36
    assert bool((batch.images[1, :, :2, :6] == 9).all()) and batch.images[1].sum() == 9 * 36
    expected_mask = torch.ones(2, 4, 8, dtype=torch.bool)
    expected_mask[0, :3, :4] = False
    expected_mask[1, :2, :6] = False
    assert torch.equal(batch.mask, expected_mask)
    # cxcywh normalized by the UNPADDED size: a is 3x4, b is 2x6
    torch.testing.assert_close(batch.targets[0].boxes, torch.tensor([[1 / 4, 1.5 / 3, 2 / 4, 1.0]]))
    torch.testing.assert_close(
        batch.targets[1].boxes,
        torch.tensor([[2.5 / 6, 1.0 / 2, 3 / 6, 1 / 2], [3 / 6, 1 / 2, 1.0, 1.0]]),
    )
    assert batch.targets[1].labels.tolist() == [0, 2]
    assert batch.dataset_ids.tolist() == [1, 0] and batch.expert_ids.tolist() == [2, 4]
    assert batch.image_ids.tolist() == [11, 12]
    assert batch.image_sizes.tolist() == [[3, 4], [2, 6]]
    assert batch.orig_sizes.tolist() == [[30, 40], [20, 60]]
    plain = collate([a, b])
    assert plain.images.shape == (2, 3, 3, 6) and plain.expert_ids.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="expert_of_dataset"):
        collate([a], torch.tensor([0]))
    with pytest.raises(ValueError, match="no samples"):
        collate([None])


# ------------------------------------------------------------------------------ train loader
def test_train_loader_epoch_contents(world):
    cfg, catalog, ls = world
    experts = torch.tensor([1, 0])
    loader, sampler, datasets = build_train_loader(cfg, catalog, ls, experts)
    assert [len(d) for d in datasets] == [12, 4] and len(loader) == len(sampler) == 8
    sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 8
    seen = []
    for batch in batches:
        assert len(batch) == 2
        assert torch.equal(batch.expert_ids, experts[batch.dataset_ids])
        for i in range(2):
            h, w = batch.image_sizes[i].tolist()
            assert min(h, w) in (32, 40) or max(h, w) <= 64
            assert (
                not batch.mask[i, :h, :w].any()
                and batch.mask[i].sum() == batch.mask[i].numel() - h * w
            )
            t = batch.targets[i]
            xyxy = box_cxcywh_to_xyxy(t.boxes)
            assert bool((xyxy >= -1e-5).all() and (xyxy <= 1 + 1e-5).all())
            assert t.labels.dtype == torch.int64
            labels_ok = ls.dataset_slice(int(batch.dataset_ids[i]))
            assert set(t.labels.tolist()) <= set(labels_ok)
            seen.append((int(batch.dataset_ids[i]), int(batch.image_ids[i])))
    # proportional sampler: one epoch = every image of both datasets once
    assert sorted(seen) == sorted(
        [(0, 100 + i) for i in range(12)] + [(1, 100 + i) for i in range(4)]
    )


def test_worker_stream_equals_main_process_and_resume_is_exact(world):
    cfg, catalog, ls = world
    ref_loader, ref_sampler, _ = build_train_loader(cfg, catalog, ls)
    ref_sampler.set_epoch(2)
    ref = list(ref_loader)
    cfg1 = _with_data(cfg, num_workers=1)
    loader, sampler, _ = build_train_loader(cfg1, catalog, ls)
    sampler.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]  # the worker prefetched further than this
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["global_batches_consumed"] == 3
    del it
    loader2, sampler2, _ = build_train_loader(cfg1, catalog, ls)
    sampler2.load_state_dict(state)
    sampler2.set_epoch(2)
    tail = list(loader2)
    _same_batches(head + tail, ref)  # identical images (augmentations) and targets
    sampler2.set_epoch(3)  # the persistent worker picks up the new epoch's order and seeds
    other = list(loader2)
    assert not all(torch.equal(x.image_ids, y.image_ids) for x, y in zip(other, ref))
    ref_sampler.set_epoch(3)
    _same_batches(other, list(ref_loader))


def test_homogeneous_batches_through_loader(world):
    cfg, catalog, ls = world
    cfg = _with_data(cfg, homogeneous_batches=True, sampler="uniform", epoch_size=16)
    loader, sampler, _ = build_train_loader(cfg, catalog, ls)
    batches = list(loader)
    assert len(batches) == 8
    assert all(len(set(b.dataset_ids.tolist())) == 1 for b in batches)
    assert sum(int(b.dataset_ids[0]) == 1 for b in batches) == 4  # uniform: half from "small"


def test_limited_subset(world):
    cfg, catalog, ls = world
    loader, sampler, datasets = build_train_loader(
        _with_data(cfg, limited={"big": 25.0}), catalog, ls
    )
    assert loader.dataset.sizes == [3, 4] and len(datasets[0]) == 12
    kept = {datasets[0].image_info(k).image_id for k in loader.dataset.subsets[0]}
    seen = {int(i) for b in loader for i, d in zip(b.image_ids, b.dataset_ids) if d == 0}
    assert seen <= kept and len(kept) == 3
    # the same images as the fsPerc JSON that tools/make_subsets.py writes (seed 0)
    all_ids = [datasets[0].image_info(k).image_id for k in range(len(datasets[0]))]
    assert kept == select_subset(all_ids, 25.0, seed=0)
    again, _, _ = build_train_loader(_with_data(cfg, limited={"big": 25.0}), catalog, ls)
    assert again.dataset.subsets == loader.dataset.subsets
    # a data.limited name that is not trained: refused by damex.config (tests/test_config.py)


def _corrupt(catalog: DatasetCatalog, name: str, index: int) -> str:
    spec = catalog[name]
    fname = f"{name}_{index:03d}.png"
    (Path(spec.image_root) / fname).write_bytes(b"this is not a png")
    return fname


def test_worker_error_names_the_file(world):
    cfg, catalog, ls = world
    fname = _corrupt(catalog, "small", 2)
    loader, sampler, _ = build_train_loader(_with_data(cfg, num_workers=1), catalog, ls)
    with pytest.raises(DatasetError, match=fname) as info:
        for _ in loader:
            pass
    last = str(info.value).strip().splitlines()[-1]  # the worker's own exception line
    assert "DatasetError" in last and fname in last and "ann.json" in last


def test_augmentation_error_is_wrapped_with_the_file(world):
    cfg, catalog, ls = world
    loader, _, _ = build_train_loader(cfg, catalog, ls)

    def broken(sample, rng):
        raise RuntimeError("boom")

    loader.dataset.transforms[1] = broken
    with pytest.raises(DatasetError, match=r"small_00\d\.png.*augmentation failed.*boom"):
        for _ in loader:
            pass


def test_skip_mode_counts_bad_images(world):
    cfg, catalog, ls = world
    _corrupt(catalog, "small", 2)
    cfg = _with_data(cfg, on_bad_sample="skip", num_workers=1)
    loader, sampler, _ = build_train_loader(cfg, catalog, ls)
    batches = list(loader)
    assert len(batches) == 8 and all(len(b) == 2 for b in batches)  # substituted, not dropped
    assert loader.skipped_counts() == {"big": 0, "small": 1}
    tests = build_test_loaders(cfg, catalog, ls)
    ids = [int(i) for b in tests["small"] for i in b.image_ids]
    assert sorted(ids) == [100, 101, 103]  # the bad image is dropped, not evaluated twice
    assert tests["small"].skipped_counts() == {"small": 1}


# ------------------------------------------------------------------------------- test loaders
def test_test_loaders_exact_sizes_shards_and_cap(world):
    cfg, catalog, ls = world
    cfg = _with_data(cfg, test_scale=30)
    all_ids = {}
    for rank in range(2):
        loaders = build_test_loaders(cfg, catalog, ls, rank=rank, world_size=2)
        assert list(loaders) == ["big", "small"]
        for name, loader in loaders.items():
            for batch in loader:
                assert len(batch) <= 3
                for (h, w), (oh, ow) in zip(batch.image_sizes.tolist(), batch.orig_sizes.tolist()):
                    short, long_ = min(oh, ow), max(oh, ow)
                    assert min(h, w) == 30 and max(h, w) == long_ * 30 // short
                all_ids.setdefault(name, []).extend(batch.image_ids.tolist())
    assert sorted(all_ids["big"]) == list(range(100, 112))  # each image once over the ranks
    assert sorted(all_ids["small"]) == list(range(100, 104))
    capped = build_test_loaders(
        replace(cfg, eval=EvalConfig(batch_size=2, max_images=5)), catalog, ls
    )
    assert sum(len(b) for b in capped["big"]) == 5
