"""Sparse upcycling: a dense detector's checkpoint -> an MoE detector with the same outputs."""

from __future__ import annotations

import pytest
import torch

from damex.config import BackboneConfig, DNConfig, ModelConfig, MoEConfig
from damex.engine.checkpoint import save_checkpoint
from damex.engine.upcycle import upcycle_, upcycle_from_checkpoint
from damex.errors import CheckpointError
from damex.modeling import build_model
from damex.structures import Batch, Target

K = 4


def _model_cfg(ffn: list[str], hidden: int = 48) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name="resnet18"),
        d_model=32,
        nheads=2,
        enc_layers=1,
        dec_layers=3,
        dim_feedforward=hidden,
        num_queries=8,
        decoder_ffn=ffn,
        dn=DNConfig(number=4),
    )


def _dense_like_moe(**kw: object) -> MoEConfig:
    """The MoE block laid out like the dense FFN it replaces (see damex.engine.upcycle)."""
    base: dict[str, object] = dict(
        num_experts=3,
        capacity_factor=0.0,
        drop_path=0.1,
        activation="relu",
        norm="post",
        unit_gate=True,
    )
    base.update(kw)
    return MoEConfig(**base)  # type: ignore[arg-type]


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 80, generator=g) * 255
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True
    targets = [
        Target(torch.tensor([[0.5, 0.5, 0.3, 0.4]]), torch.tensor([1])),
        Target(torch.tensor([[0.3, 0.4, 0.2, 0.2]]), torch.tensor([3])),
    ]
    hw = torch.tensor([[64, 80], [64, 64]])
    return Batch(
        images=images,
        mask=mask,
        targets=targets,
        dataset_ids=torch.tensor([0, 1]),
        expert_ids=torch.tensor([0, 1]),
        image_ids=torch.arange(2),
        image_sizes=hw,
        orig_sizes=hw,
    )


def _pair(moe_cfg: MoEConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    dense = build_model(_model_cfg(["dense", "dense", "dense"]), MoEConfig(), K).eval()
    with torch.no_grad():  # a "trained" dense model: nothing left at a symmetric init
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.manual_seed(1)
    moe = build_model(_model_cfg(["moe", "dense", "moe"]), moe_cfg, K).eval()
    return dense, moe


@pytest.mark.parametrize("shared", [False, True])
def test_right_after_upcycling_the_moe_detector_equals_the_dense_one(shared: bool) -> None:
    dense, moe = _pair(_dense_like_moe(shared_expert=shared))
    batch = _batch()
    with torch.no_grad():
        before = moe(batch).pred.logits
        report = upcycle_(moe, dense.state_dict())
        ref, out = dense(batch), moe(batch)
    assert report.exact, report.reasons
    layers = "transformer.decoder.layers"
    assert report.upcycled_layers == [f"{layers}.0.ffn", f"{layers}.2.ffn"]
    assert not torch.allclose(before, ref.pred.logits, atol=1e-3)  # it was a different model
    # the routers are fresh and spread tokens over several experts, yet the output is the same
    assert len(set(out.routing[0].expert[:, 0].tolist())) > 1
    torch.testing.assert_close(out.pred.logits, ref.pred.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pred.boxes, ref.pred.boxes, rtol=1e-4, atol=1e-5)
    for a, b in zip(out.aux, ref.aux):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


def test_upcycling_leaves_the_router_fresh_and_copies_everything_else() -> None:
    dense, moe = _pair(_dense_like_moe())
    router = moe.transformer.decoder.layers[0].ffn.moe.router.weight.detach().clone()
    upcycle_(moe, dense.state_dict())
    assert torch.equal(moe.transformer.decoder.layers[0].ffn.moe.router.weight, router)
    d_state, m_state = dense.state_dict(), moe.state_dict()
    for key in ("backbone.body.conv1.weight", "transformer.decoder.layers.1.ffn.linear1.weight",
                "transformer.decoder.layers.0.ffn.norm.weight"):  # fmt: skip
        assert torch.equal(m_state[key], d_state[key]), key
    w1 = d_state["transformer.decoder.layers.2.ffn.linear1.weight"]
    prefix = "transformer.decoder.layers.2.ffn.moe.experts.ffn"
    for e in range(3):
        assert torch.equal(m_state[f"{prefix}.{e}.fc1.weight"], w1)


def test_noise_makes_experts_differ_and_is_not_exact() -> None:
    dense, moe = _pair(_dense_like_moe())
    gen = torch.Generator().manual_seed(0)
    report = upcycle_(moe, dense.state_dict(), noise=0.1, generator=gen)
    experts = moe.transformer.decoder.layers[0].ffn.moe.experts
    assert not report.exact and any("noise" in r for r in report.reasons)
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)
    w0, w1 = experts[0].fc1.weight.detach(), experts[1].fc1.weight.detach()
    rel = (w0 - w1).std() / w0.std()
    assert 0.05 < float(rel) < 0.3  # two independent draws of 0.1 x std: ~0.14


def test_official_layout_is_reported_not_exact() -> None:
    dense, moe = _pair(MoEConfig(num_experts=3, capacity_factor=1.25))  # pre-norm, gelu, prob gate
    report = upcycle_(moe, dense.state_dict())
    assert not report.exact
    text = " ".join(report.reasons)
    assert "pre-norm" in text and "gelu" in text and "unit_gate" in text and "capacity" in text


def test_from_checkpoint_file_and_clear_errors(tmp_path) -> None:
    dense, moe = _pair(_dense_like_moe())
    path = save_checkpoint(tmp_path / "dense.pth", {"model": dense.state_dict()})
    report = upcycle_from_checkpoint(moe, path)
    assert report.exact
    with pytest.raises(CheckpointError, match="does not exist"):
        upcycle_from_checkpoint(moe, tmp_path / "missing.pth")
    torch.manual_seed(0)
    wide = build_model(_model_cfg(["dense", "dense", "dense"], hidden=64), MoEConfig(), K)
    with pytest.raises(CheckpointError, match="dim_feedforward"):
        upcycle_(moe, wide.state_dict(), source="wide.pth")
    with pytest.raises(CheckpointError, match="no MoE decoder layer"):
        upcycle_(dense, dense.state_dict())


def test_chained_dense_then_upcycled_damex_ramped_loss(tmp_path, synthetic_root) -> None:
    """``moe.upcycle_from`` in a real run: the new run starts from the dense checkpoint, and the
    ramp schedule weights the DAMEX loss 0 at the first step and 1/2 of it at the second."""
    from engine_fixtures import tiny_config_dict

    from damex.config import config_from_dict
    from damex.engine.checkpoint import load_checkpoint
    from damex.engine.logging import read_jsonl
    from damex.engine.trainer import Trainer, train

    dense_cfg = tiny_config_dict(synthetic_root, tmp_path / "dense", epochs=1)
    dense_cfg["model"]["decoder_ffn"] = ["dense", "dense"]
    train(config_from_dict(dense_cfg))
    dense_ckpt = tmp_path / "dense" / "last.pth"

    moe_cfg = tiny_config_dict(synthetic_root, tmp_path / "moe", epochs=1)
    moe_cfg["moe"].update(
        upcycle_from=str(dense_ckpt), norm="post", activation="relu", unit_gate=True,
        capacity_factor=0.0, drop_path=0.0, loss="damex", loss_weight=0.8,
        loss_schedule="ramp", loss_ramp_frac=1.0,
    )  # fmt: skip
    trainer = Trainer(config_from_dict(moe_cfg), None)
    trainer.setup()
    dense_state = load_checkpoint(dense_ckpt)["model"]
    experts = trainer.model.transformer.decoder.layers[0].ffn.moe.experts
    w1 = dense_state["transformer.decoder.layers.0.ffn.linear1.weight"]
    assert all(torch.equal(experts[e].fc1.weight, w1) for e in range(2))
    assert torch.equal(
        trainer.model.backbone.body.conv1.weight, dense_state["backbone.body.conv1.weight"]
    )
    trainer.fit()
    records = [r for r in read_jsonl(tmp_path / "moe" / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iter"] for r in records] == [1, 2]
    first, second = records
    assert first["loss_moe"] == 0.0 and first["unweighted/loss_moe"] > 0
    assert second["loss_moe"] == pytest.approx(0.4 * second["unweighted/loss_moe"], rel=1e-4)
