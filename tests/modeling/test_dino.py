"""The full detector on tiny configs: shapes, routing tags, batch invariance, gradients, bf16."""

from __future__ import annotations

import pytest
import torch

from damex.config import AcceleratorConfig, BackboneConfig, DNConfig, ModelConfig, MoEConfig
from damex.errors import ConfigError
from damex.modeling import build_model
from damex.modeling.outputs import TokenKind
from damex.structures import Batch, Target

K, Q, Q2 = 5, 10, 6


def _cfg(**overrides) -> ModelConfig:
    base = dict(
        backbone=BackboneConfig(name="resnet18"),
        d_model=32,
        nheads=2,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=64,
        num_queries=Q,
        decoder_ffn=["moe", "dense"],
        dn=DNConfig(number=6),
    )
    base.update(overrides)
    return ModelConfig(**base)


def _moe_cfg(**overrides) -> MoEConfig:
    base = dict(num_experts=2, capacity_factor=1.25, capacity_group="image", drop_path=0.2)
    base.update(overrides)
    return MoEConfig(**base)


def _batch(sizes, targets, canvas=None, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ch = canvas[0] if canvas else max(h for h, _ in sizes)
    cw = canvas[1] if canvas else max(w for _, w in sizes)
    images = torch.zeros(len(sizes), 3, ch, cw)
    mask = torch.ones(len(sizes), ch, cw, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.rand(3, h, w, generator=g) * 255
        mask[b, :h, :w] = False
    n = len(sizes)
    hw = torch.tensor(sizes)
    return Batch(
        images=images,
        mask=mask,
        targets=targets,
        dataset_ids=torch.arange(n),
        expert_ids=torch.arange(n) % 2,
        image_ids=torch.arange(n),
        image_sizes=hw,
        orig_sizes=hw,
    )


def _targets():
    return [
        Target(torch.tensor([[0.5, 0.5, 0.3, 0.4]]), torch.tensor([1])),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]]), torch.tensor([0, 4])),
    ]


def _accel_cfg():
    return _cfg(accel=AcceleratorConfig(one_to_many=True, one_to_many_queries=Q2, dense_head=True))


def test_training_output_shapes_and_routing_tags():
    torch.manual_seed(0)
    model = build_model(_accel_cfg(), _moe_cfg(), K).train()
    batch = _batch([(64, 96), (96, 64), (64, 64)], _targets())
    out = model(batch)
    b = 3
    assert out.pred.logits.shape == (b, Q, K) and out.pred.boxes.shape == (b, Q, 4)
    assert len(out.aux) == 1 and out.aux[0].logits.shape == (b, Q, K)
    assert out.interm.logits.shape == (b, Q, K) and out.interm.boxes.shape == (b, Q, 4)
    meta = out.dn_meta
    assert meta.pad_size == 2 and meta.num_groups == 3 and meta.num_gt.tolist() == [1, 0, 2]
    ndn = meta.num_groups * 2 * meta.pad_size
    assert len(out.dn) == 2 and out.dn[0].logits.shape == (b, ndn, K)
    assert out.dn[1].boxes.shape == (b, ndn, 4)
    assert len(out.one_to_many) == 2 and out.one_to_many[0].logits.shape == (b, Q2, K)
    dense = out.dense
    s = sum(-(-96 // st) * -(-96 // st) for st in (8, 16, 32, 64))
    assert dense.logits.shape == (b, s, K) and dense.boxes.shape == (b, s, 4)
    assert dense.points.shape == (b, s, 2) and dense.strides.shape == (s,)
    assert dense.valid.shape == (b, s)
    assert dense.valid[2].sum() == sum((-(-64 // st)) ** 2 for st in (8, 16, 32, 64))
    for pred in [out.pred, *out.aux, out.interm, *out.dn, *out.one_to_many]:
        assert torch.isfinite(pred.logits).all() and torch.isfinite(pred.boxes).all()
        assert (pred.boxes >= 0).all() and (pred.boxes <= 1).all()
    # routing: one RoutingInfo for the single MoE layer, tokens batch-major with tags
    assert len(out.routing) == 1
    info = out.routing[0]
    n = ndn + Q + Q2
    assert info.logits.shape == (b * n, 2)
    assert info.token_image.tolist() == [i for i in range(b) for _ in range(n)]
    kind = info.token_kind.view(b, n)
    assert (kind == TokenKind.MATCHING).sum() == b * Q
    assert (kind == TokenKind.ONE_TO_MANY).sum() == b * Q2
    dn_real = meta.num_groups * 2 * meta.num_gt  # real DN tokens per image
    assert (kind == TokenKind.DN).sum(1).tolist() == dn_real.tolist()
    assert (kind == TokenKind.DN_PAD).sum(1).tolist() == (ndn - dn_real).tolist()
    query = info.token_query.view(b, n)
    assert query[:, ndn : ndn + Q].tolist() == [list(range(Q))] * b
    assert (query[kind != TokenKind.MATCHING] == -1).all()


def test_eval_has_no_training_branches():
    torch.manual_seed(0)
    model = build_model(_accel_cfg(), _moe_cfg(), K).eval()
    with torch.no_grad():
        out = model(_batch([(64, 96), (96, 64)], _targets()[:2]))
    assert out.dn == [] and out.dn_meta is None and out.one_to_many == [] and out.dense is None
    info = out.routing[0]
    assert info.noisy_logits is None or torch.equal(info.noisy_logits, info.logits)
    assert (info.token_kind == TokenKind.MATCHING).sum() == 2 * Q
    assert info.token_query.tolist() == list(range(Q)) * 2


def test_batch_of_two_equals_two_batches_of_one_in_eval():
    torch.manual_seed(0)
    model = build_model(_cfg(enc_layers=2), _moe_cfg(), K).eval()
    targets = _targets()[:2]
    sizes = [(64, 96), (80, 56)]
    pair = _batch(sizes, targets)
    with torch.no_grad():
        out = model(pair)
        for b, (h, w) in enumerate(sizes):
            single = _batch([(h, w)], [targets[b]])
            single.images[0] = pair.images[b, :, :h, :w]
            one = model(single)
            torch.testing.assert_close(out.pred.logits[b], one.pred.logits[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(out.pred.boxes[b], one.pred.boxes[0], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(
                out.interm.boxes[b], one.interm.boxes[0], atol=2e-4, rtol=1e-4
            )
            assert torch.equal(
                out.routing[0].expert.view(2, Q, -1)[b], one.routing[0].expert.view(Q, -1)
            )
    # garbage in the padded pixels changes nothing
    noisy = _batch(sizes, targets)
    noisy.images[noisy.mask[:, None].expand_as(noisy.images)] = 1000.0
    with torch.no_grad():
        torch.testing.assert_close(model(noisy).pred.boxes, out.pred.boxes)


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(_accel_cfg(), _moe_cfg(fc2_bias=False), K).train()
    out = model(_batch([(64, 96), (96, 64), (64, 64)], _targets()))
    total = sum(p.logits.sum() + p.boxes.sum() for p in [out.pred, *out.aux, out.interm])
    total = total + sum(p.logits.sum() + p.boxes.sum() for p in [*out.dn, *out.one_to_many])
    total = total + out.dense.logits.sum() + out.dense.boxes.sum()
    total = total + sum(r.logits.sum() for r in out.routing)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("backbone.body.layer1") for n in frozen)
    assert any(n.startswith("backbone.body.conv1") for n in frozen)
    assert all(model.get_parameter(n).grad is None for n in frozen)
    assert all(n.startswith("backbone.") for n in frozen)


def test_bf16_autocast_forward_is_finite():
    torch.manual_seed(0)
    model = build_model(_accel_cfg(), _moe_cfg(), K).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch([(64, 96), (64, 64)], [_targets()[0], _targets()[2]]))
    for pred in [out.pred, out.interm, *out.dn, *out.one_to_many]:
        assert (
            torch.isfinite(pred.logits.float()).all() and torch.isfinite(pred.boxes.float()).all()
        )
    assert torch.isfinite(out.dense.boxes.float()).all()


def test_no_encoder_no_two_stage_dense_only_and_no_gt_batch():
    torch.manual_seed(0)
    cfg = _cfg(enc_layers=0, two_stage=False, decoder_ffn=["dense", "dense"], num_feature_levels=3)
    model = build_model(cfg, _moe_cfg(), K).train()
    out = model(_batch([(64, 64), (48, 64)], [_targets()[1], _targets()[1]]))
    assert out.interm is None and out.routing == [] and out.dn == [] and out.dn_meta is None
    assert out.pred.boxes.shape == (2, Q, 4)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(decoder_ffn=["dense"]), "model.decoder_ffn"),
        (dict(decoder_ffn=["dense", "sparse"]), "model.decoder_ffn"),
        (dict(d_model=48, nheads=2), "model.d_model"),
        (dict(num_feature_levels=2), "model.num_feature_levels"),
        (dict(backbone=BackboneConfig(name="resnet7")), "model.backbone"),
    ],
)
def test_build_model_rejects_bad_config(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_model(_cfg(**overrides), _moe_cfg(), K)


def test_dense_head_fcos_decoding():
    from damex.modeling.dense_head import DenseHead

    head = DenseHead(d_model=8, num_classes=K, strides=[8, 16])
    with torch.no_grad():
        head.reg.layers[-1].bias.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    shapes = [(2, 3), (1, 2)]
    memory = torch.randn(1, 8, 8)
    valid_hw = torch.tensor([[16, 20]])  # h, w in pixels
    mask = torch.zeros(1, 8, dtype=torch.bool)
    out = head(memory, mask, shapes, valid_hw)
    assert out.strides.tolist() == [8.0] * 6 + [16.0] * 2
    # level-0 location (row 1, col 2): centre (20, 12) px; ltrb = (1, 2, 3, 4) * 8 px
    torch.testing.assert_close(out.points[0, 5], torch.tensor([20 / 20, 12 / 16]))
    x1, y1, x2, y2 = 20 - 8, 12 - 16, 20 + 24, 12 + 32
    cx, cy, bw, bh = (x1 + x2) / 2 / 20, (y1 + y2) / 2 / 16, (x2 - x1) / 20, (y2 - y1) / 16
    expected = torch.tensor([cx, cy, bw, bh])
    torch.testing.assert_close(out.boxes[0, 5], expected)
    assert out.logits.shape == (1, 8, K) and out.valid.all()
