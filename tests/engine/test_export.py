"""ONNX export: onnxruntime reproduces PyTorch's boxes, scores and expert choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import REF, TRAIN_SETS, tiny_config

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'damex[export]'")

from damex.cli import main  # noqa: E402
from damex.export import (  # noqa: E402
    OUTPUT_NAMES,
    ExportError,
    StaticMoE,
    export_checkpoint,
    normalized_images,
)
from damex.predictor import Predictor  # noqa: E402


def _test_images(synthetic_root: Path) -> list[Path]:
    files = []
    for name in TRAIN_SETS:
        gt = json.loads((synthetic_root / name / "annotations" / "test.json").read_text())
        files += [synthetic_root / name / "images" / im["file_name"] for im in gt["images"]]
    return files


@pytest.fixture(scope="module")
def exported(reference_run: Path, synthetic_root: Path, tmp_path_factory) -> tuple[Path, object]:
    cfg = tiny_config(synthetic_root, reference_run, **REF)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_checkpoint(cfg, reference_run / "best.pth", out, image_size=(64, 96))
    return out, report


def test_onnx_matches_pytorch_on_the_test_images(
    exported, reference_run: Path, synthetic_root: Path
) -> None:
    from damex.export import onnx_parity

    path, report = exported
    assert path.is_file() and report.opset >= 16 and report.num_moe_layers == 1
    predictor = Predictor.from_checkpoint(reference_run / "best.pth")
    # the tiny config keeps the default capacity (1.25 per image): the capacity rule is exported
    assert predictor.cfg.moe.capacity_factor == 1.25
    files = _test_images(synthetic_root)
    images = normalized_images(files, (64, 96), predictor.model)
    parity = onnx_parity(path, predictor.model, images, report.num_select)
    assert parity["images"] == len(files) == 5
    assert parity["unmatched_detections"] == 0
    assert parity["max_box_diff"] <= 1e-4 and parity["max_score_diff"] <= 1e-4
    assert parity["expert_mismatches"] == 0


def test_onnx_outputs_and_shapes(exported) -> None:
    import onnxruntime as ort

    path, report = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    boxes, scores, labels, query, experts = sess.run(None, {"images": x})
    k = report.num_select
    assert boxes.shape == (1, k, 4) and scores.shape == (1, k) and labels.shape == (1, k)
    assert experts.shape == (1, 10, 1) and query.max() < 10  # tiny config: 10 queries, 1 MoE
    assert (np.diff(scores[0]) <= 0).all()  # sorted
    assert (boxes[..., 0] <= boxes[..., 2]).all() and boxes.max() <= 96


def test_static_moe_drops_what_the_layer_drops() -> None:
    """Capacity with ties and a full expert: the static rule equals the sorted dispatch."""
    from damex.moe.layer import MoEFFN

    torch.manual_seed(0)
    layer = MoEFFN(d_model=8, hidden_dim=16, num_experts=3, capacity_factor=0.5).eval()
    static = StaticMoE(layer, tokens_per_image=12).eval()
    x = torch.randn(24, 8)
    x[5] = x[3]  # a tie in gate score
    image = torch.arange(2).repeat_interleave(12)
    y_ref, info_ref = layer(x, image)
    y, info = static(x, image)
    assert torch.equal(info.kept, info_ref.kept) and not bool(info.kept.all())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)


def test_static_moe_router_context_equals_the_layer() -> None:
    """The static graph's per-image context (a reshape mean) routes like MoEFFN's index_add."""
    from damex.moe.layer import MoEFFN

    torch.manual_seed(0)
    layer = MoEFFN(
        d_model=8, hidden_dim=16, num_experts=3, capacity_factor=0.0, router_context=True
    ).eval()
    static = StaticMoE(layer, tokens_per_image=12).eval()
    x = torch.randn(24, 8)
    x[12:] += 3.0  # the two images' contexts differ
    image = torch.arange(2).repeat_interleave(12)
    y_ref, info_ref = layer(x, image)
    y, info = static(x, image)
    torch.testing.assert_close(info.logits, info_ref.logits, rtol=0, atol=1e-6)
    assert torch.equal(info.expert, info_ref.expert)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)


def test_router_context_model_exports_with_parity(synthetic_root: Path, tmp_path: Path) -> None:
    """A whole detector whose router reads the image context: ONNX equals eager end to end."""
    from engine_fixtures import tiny_config_dict

    from damex.config import config_from_dict
    from damex.engine.trainer import train
    from damex.export import onnx_parity

    d = tiny_config_dict(synthetic_root, tmp_path / "run", epochs=1)
    d["moe"].update(router_context=True, router_detach=True, capacity_factor=0.0)
    cfg = config_from_dict(d)
    train(cfg)
    out = tmp_path / "context.onnx"
    report = export_checkpoint(cfg, tmp_path / "run" / "last.pth", out, image_size=(64, 96))
    predictor = Predictor.from_checkpoint(tmp_path / "run" / "last.pth")
    from damex.moe.layer import MoEFFN

    moes = [m for m in predictor.model.modules() if isinstance(m, MoEFFN)]
    assert len(moes) == 1 and moes[0].router_context
    images = normalized_images(_test_images(synthetic_root), (64, 96), predictor.model)
    parity = onnx_parity(out, predictor.model, images, report.num_select)
    assert parity["images"] == 5 and parity["unmatched_detections"] == 0
    assert parity["max_box_diff"] <= 1e-4 and parity["max_score_diff"] <= 1e-4
    assert parity["expert_mismatches"] == 0


def test_export_cli_help_and_errors(capsys, reference_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--image-size" in text and "--dynamic" in text and "onnxruntime" in text
    with pytest.raises(ExportError, match="opset must be >= 16"):
        from damex.export import export_onnx

        export_onnx(torch.nn.Identity(), tmp_path / "x.onnx", image_size=(64, 64), opset=13)
