"""Recipe options of the MoE layer: shared expert, unit gate, identical experts, post-norm block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from damex.modeling.transformer import FFN, MoEBlock
from damex.moe import MoEFFN


def _layer(**kw: object) -> MoEFFN:
    args = dict(d_model=8, hidden_dim=16, num_experts=3, capacity_factor=0.0, gate_noise=0.0)
    args.update(kw)
    return MoEFFN(**args)  # type: ignore[arg-type]


def test_shared_expert_output_is_shared_plus_gate_times_expert() -> None:
    torch.manual_seed(0)
    moe = _layer(shared_expert=True)
    assert moe.shared is not None
    x = torch.randn(20, 8)
    y, info = moe(x)
    probs = torch.softmax(info.logits, -1)
    for t in range(20):
        e = int(info.expert[t, 0])
        ref = moe.shared(x[t : t + 1]) + probs[t, e] * moe.experts[e](x[t : t + 1])
        torch.testing.assert_close(y[t : t + 1], ref, rtol=1e-5, atol=1e-6)
    # the shared expert gets a gradient from every token, the routed ones from theirs
    y.sum().backward()
    assert moe.shared.fc1.weight.grad is not None
    assert moe.shared.fc1.weight.grad.abs().sum() > 0


def test_shared_expert_with_dropped_tokens_keeps_the_shared_path() -> None:
    torch.manual_seed(1)
    moe = _layer(shared_expert=True, capacity_factor=0.3)
    x = torch.randn(30, 8)
    y, info = moe(x)
    dropped = ~info.kept[:, 0]
    assert dropped.any()
    torch.testing.assert_close(y[dropped], moe.shared(x[dropped]), rtol=1e-5, atol=1e-6)


def test_shared_expert_off_keeps_the_routed_init() -> None:
    torch.manual_seed(3)
    a = _layer()
    torch.manual_seed(3)
    b = _layer(shared_expert=True)
    assert a.shared is None
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_unit_gate_value_one_gradient_of_gate() -> None:
    torch.manual_seed(0)
    moe = _layer(unit_gate=True)
    x = torch.randn(12, 8)
    y, info = moe(x)
    for t in range(12):
        e = int(info.expert[t, 0])
        torch.testing.assert_close(y[t], moe.experts[e](x[t : t + 1])[0], rtol=1e-5, atol=1e-6)
    # the router still learns from the detection loss (straight-through gradient)
    y.pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k=1"):
        _layer(unit_gate=True, top_k=2)


def test_identical_experts_start_equal_and_equal_the_dense_ffn() -> None:
    torch.manual_seed(0)
    moe = _layer(expert_init="identical", unit_gate=True)
    x = torch.randn(25, 8)
    ref = moe.experts[0](x)
    for e in range(1, 3):
        for name, p in moe.experts[e].named_parameters():
            assert torch.equal(p, dict(moe.experts[0].named_parameters())[name])
    y, info = moe(x)
    assert len(set(info.expert[:, 0].tolist())) > 1  # tokens spread, output still the FFN's
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expert_init"):
        _layer(expert_init="copy")


def test_zero_out_experts_start_as_the_shared_ffn_and_then_learn() -> None:
    torch.manual_seed(0)
    moe = _layer(expert_init="zero_out", shared_expert=True, unit_gate=True)
    x = torch.randn(25, 8)
    y, info = moe(x)
    assert len(set(info.expert[:, 0].tolist())) > 1
    # routed part exactly 0 at init: the layer is the shared FFN
    torch.testing.assert_close(y, moe.shared(x), rtol=0, atol=0)
    # fc2 of every chosen expert gets a gradient (fc1 none yet: it sits behind a zero fc2)
    y.pow(2).sum().backward()
    for e in set(info.expert[:, 0].tolist()):
        assert moe.experts[e].fc2.weight.grad.abs().sum() > 0
        assert moe.experts[e].fc1.weight.grad.abs().sum() == 0
    # the first experts' fc1 keep their independent random init
    assert not torch.equal(moe.experts[0].fc1.weight, moe.experts[1].fc1.weight)


def test_router_detach_keeps_routing_gradients_out_of_the_tokens() -> None:
    for detach in (False, True):
        torch.manual_seed(0)
        moe = _layer(router_detach=detach)
        x = torch.randn(10, 8, requires_grad=True)
        _, info = moe(x)
        info.logits.logsumexp(-1).sum().backward()  # a loss on the router's logits only
        assert moe.router.weight.grad.abs().sum() > 0
        assert (x.grad is not None and x.grad.abs().sum() > 0) != detach
    # the routing itself does not change
    torch.manual_seed(0)
    a = _layer()
    torch.manual_seed(0)
    b = _layer(router_detach=True)
    x = torch.randn(10, 8)
    torch.testing.assert_close(a(x)[0], b(x)[0])


def test_router_context_is_the_mean_of_the_images_masked_tokens() -> None:
    torch.manual_seed(0)
    moe = _layer(router_context=True, router_detach=True)
    assert tuple(moe.router.weight.shape) == (3, 16)  # [E, 2d]: token and image context
    with torch.no_grad():
        moe.router.weight[:, :8] = 0  # context half only: an image's tokens must agree
    x = torch.randn(12, 8)
    image = torch.tensor([0] * 5 + [1] * 7)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[3, 4, 10]] = False  # e.g. DN queries: not part of the context
    _, info = moe(x, image, context_mask=mask)
    for i in (0, 1):
        rows = info.logits[image == i]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows))
        mean = x[(image == i) & mask].mean(0)
        torch.testing.assert_close(rows[0], moe.router.weight[:, 8:] @ mean)
    # a masked token's features do not move any token's routing
    x2 = x.clone()
    x2[[3, 10]] += 5.0
    _, info2 = moe(x2, image, context_mask=mask)
    torch.testing.assert_close(info2.logits, info.logits)


def test_independent_experts_differ() -> None:
    torch.manual_seed(0)
    moe = _layer()
    assert not torch.equal(moe.experts[0].fc1.weight, moe.experts[1].fc1.weight)


def test_post_norm_block_equals_dense_ffn_block() -> None:
    torch.manual_seed(0)
    dense = FFN(d_model=8, hidden_dim=16)  # ReLU, post-norm
    moe = _layer(activation="relu", unit_gate=True)
    moe.experts.load_dense_(dense.linear1, dense.linear2)
    block = MoEBlock(moe=moe, d_model=8, norm="post").eval()
    block.norm.load_state_dict(dense.norm.state_dict())
    x = torch.randn(2, 5, 8)
    y, _ = block(x)
    torch.testing.assert_close(y, dense(x)[0], rtol=1e-5, atol=1e-6)
    pre = MoEBlock(moe=moe, d_model=8, norm="pre").eval()
    assert not torch.allclose(pre(x)[0], dense(x)[0], atol=1e-3)
    with pytest.raises(ValueError, match="norm"):
        MoEBlock(moe=moe, d_model=8, norm="sandwich")


def test_post_norm_block_output_is_normalized() -> None:
    torch.manual_seed(0)
    block = MoEBlock(moe=_layer(), d_model=8, norm="post")
    nn.init.ones_(block.norm.weight)
    y, _ = block(torch.randn(2, 4, 8) * 10)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)


def test_loss_weight_schedules() -> None:
    from damex.moe.losses import scheduled_weight

    assert [scheduled_weight(1.0, "constant", p) for p in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    ramp = [scheduled_weight(2.0, "ramp", p, ramp_frac=0.25) for p in (0, 0.125, 0.25, 0.9)]
    assert ramp == [0.0, 1.0, 2.0, 2.0]
    decay = [scheduled_weight(1.0, "decay", p, final=0.2) for p in (0, 0.5, 1, 1.5)]
    assert decay == pytest.approx([1.0, 0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match="schedule"):
        scheduled_weight(1.0, "cosine", 0.5)
    with pytest.raises(ValueError, match="ramp_frac"):
        scheduled_weight(1.0, "ramp", 0.5, ramp_frac=0.0)


def test_criterion_applies_the_schedule_to_the_moe_term() -> None:
    from damex.modeling.criterion import SetCriterion
    from damex.modeling.matcher import HungarianMatcher

    crit = SetCriterion(
        num_classes=3, matcher=HungarianMatcher(), moe_weight=1.0, moe_schedule="ramp",
        moe_ramp_frac=0.5,
    )  # fmt: skip
    assert crit.moe_weight == 0.0 and crit.weight_of("loss_moe") == 0.0
    assert crit.set_progress(0.25) == 0.5 and crit.weight_of("loss_moe") == 0.5
    assert crit.set_progress(1.0) == 1.0
    const = SetCriterion(num_classes=3, matcher=HungarianMatcher(), moe_weight=0.3)
    assert const.set_progress(0.7) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        SetCriterion(num_classes=3, matcher=HungarianMatcher(), moe_schedule="step")


def test_recipe_config_fields_reach_the_model_and_criterion(tmp_path) -> None:
    from damex.config import load_config
    from damex.errors import ConfigError
    from damex.modeling import build_model
    from damex.modeling.criterion import build_criterion

    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  train: [a]\nmodel:\n  decoder_ffn: [moe, dense, moe, dense, moe, dense]\n"
        "  backbone:\n    name: resnet18\nmoe:\n  expert_map: {a: 0}\n"
    )
    cfg = load_config(
        path,
        ["moe.shared_expert=true", "moe.norm=post", "moe.unit_gate=true", "moe.num_experts=2",
         "moe.expert_init=identical", "moe.loss_schedule=ramp", "moe.loss_weight=0.5",
         "moe.router_detach=true", "moe.router_context=true"],
    )  # fmt: skip
    block = build_model(cfg.model, cfg.moe, 3).transformer.decoder.layers[2].ffn
    assert isinstance(block, MoEBlock) and block.norm_position == "post"
    assert block.moe.shared is not None and block.moe.unit_gate and block.moe.router_detach
    assert block.moe.router_context
    assert torch.equal(block.moe.experts[0].fc1.weight, block.moe.experts[1].fc1.weight)
    crit = build_criterion(cfg, 3)
    assert crit.moe_schedule == "ramp" and crit.moe_weight == 0.0
    assert crit.set_progress(1.0) == 0.5
    with pytest.raises(ConfigError, match=r"moe\.norm"):
        load_config(path, ["moe.norm=sandwich"])
    with pytest.raises(ConfigError, match=r"moe\.unit_gate"):
        load_config(path, ["moe.unit_gate=true", "moe.top_k=2"])
    with pytest.raises(ConfigError, match=r"moe\.loss_ramp_frac"):
        load_config(path, ["moe.loss_ramp_frac=0"])
