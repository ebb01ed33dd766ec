"""The CLI drivers: evaluate_checkpoint, visualize_routing (HTML report), run_demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from engine_fixtures import REF, TRAIN_SETS, tiny_config
from PIL import Image

from damex.engine.loading import evaluate
from damex.engine.report import evaluate_checkpoint, run_demo, visualize_routing


def test_evaluate_checkpoint_writes_results(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    res = evaluate_checkpoint(cfg, reference_run / "best.pth", out_dir=tmp_path, restrict=True)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["datasets"]) == set(TRAIN_SETS) and "oracle" in data
    assert data["mean"]["AP"] == res.mean_ap
    assert (tmp_path / "results.md").read_text().startswith("| dataset |")
    only = evaluate(cfg, reference_run / "best.pth", datasets=["syn_signs"])
    assert list(only.datasets) == ["syn_signs"]
    assert only.datasets["syn_signs"].ap == res.datasets["syn_signs"].ap


def test_visualize_routing_report(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    html = visualize_routing(cfg, reference_run / "last.pth", tmp_path, tokens="all")
    assert html.is_file() and "<html" in html.read_text()
    stats = json.loads((tmp_path / "routing_stats.json").read_text())
    assert stats["datasets"] == TRAIN_SETS and stats["tokens"] == "all"
    assert [layer["name"] for layer in stats["layers"]] == ["decoder.0"]
    # eval mode, no DN: every matching query of every test image is counted
    q = cfg.model.num_queries
    assert stats["layers"][0]["tokens"] == [q * 3, q * 2]  # 3 syn_photo, 2 syn_signs test images
    assert list(tmp_path.glob("routing_heatmap_*.png"))
    per_ds = cfg.eval.report_images
    for name, n_test in (("syn_photo", 3), ("syn_signs", 2)):
        assert len(list((tmp_path / "overlays" / name).glob("*.png"))) == min(per_ds, n_test)


def test_run_demo_draws_on_input_images(
    synthetic_root: Path, reference_run: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    src = sorted((synthetic_root / "syn_photo" / "images").iterdir())[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    written = run_demo(cfg, reference_run / "last.pth", tmp_path / "in", tmp_path / "out", 0.0)
    assert written == [tmp_path / "out" / f"{src.stem}.png"]
    with Image.open(src) as a, Image.open(written[0]) as b:
        assert a.size == b.size
        assert not np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
