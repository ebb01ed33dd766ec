"""MoEFFN end to end: dense equivalence, top-k reference, gradcheck, RoutingInfo, router."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from damex.moe import MoEFFN, RoutingInfo, TopKRouter


def test_single_expert_no_drop_equals_dense_ffn() -> None:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    moe = MoEFFN(d_model=16, hidden_dim=32, num_experts=1, capacity_factor=0.0, gate_noise=1.0)
    moe.experts.load_dense_(fc1, fc2)
    x = torch.randn(50, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, info = moe(x, torch.arange(50) // 10)
    ref = fc2(nn.functional.gelu(fc1(x_ref)))
    assert torch.equal(info.gate, torch.ones(50, 1))
    assert info.kept.all()
    assert torch.equal(y, ref)  # same GEMMs on the same rows: bitwise equal
    g = torch.randn(50, 16)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        moe.experts[0].fc1.weight.grad, fc1.weight.grad, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(moe.experts[0].fc2.bias.grad, fc2.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize_gate", [False, True])
@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
def test_top2_combine_matches_per_token_loop(normalize_gate: bool, capacity_factor: float) -> None:
    torch.manual_seed(0)
    moe = MoEFFN(
        d_model=8,
        hidden_dim=12,
        num_experts=4,
        top_k=2,
        capacity_factor=capacity_factor,
        normalize_gate=normalize_gate,
    )
    x = torch.randn(30, 8) * 2
    token_image = torch.arange(30) // 15
    y, info = moe(x, token_image)
    if capacity_factor > 0:
        assert (~info.kept).any()
    else:
        assert info.kept.all()
    noisy = info.noisy_logits
    assert noisy is not None  # training mode adds noise
    probs = torch.softmax(noisy, -1)
    for t in range(30):
        ref = torch.zeros(8)
        chosen = probs[t].topk(2)
        gates = chosen.values / chosen.values.sum() if normalize_gate else chosen.values
        assert info.expert[t].tolist() == chosen.indices.tolist()
        torch.testing.assert_close(info.gate[t], gates)
        for j in range(2):
            if info.kept[t, j]:
                e = int(chosen.indices[j])
                ref += gates[j] * moe.experts[e](x[t : t + 1])[0]
        torch.testing.assert_close(y[t], ref, rtol=1e-5, atol=1e-6)


def test_gradcheck_tiny_layer_float64() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(d_model=4, hidden_dim=6, num_experts=3, top_k=2, capacity_factor=1.0)
    moe = moe.double().eval()
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    token_image = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in moe.parameters())
    _, info = moe(x, token_image)
    assert (~info.kept).any()  # dropped tokens are part of the checked function

    def fn(x, *ps):
        return functional_call(moe, dict(zip(names, ps)), (x, token_image))[0]

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_routing_info_contents() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(d_model=8, hidden_dim=8, num_experts=4, top_k=2)
    x = torch.randn(10, 8)
    y, info = moe(x)
    assert isinstance(info, RoutingInfo)
    assert info.logits.shape == (10, 4) and info.noisy_logits.shape == (10, 4)
    assert info.expert.shape == (10, 2) and info.expert.dtype == torch.long
    assert info.gate.shape == (10, 2) and info.kept.dtype == torch.bool
    assert torch.equal(info.token_image, torch.zeros(10, dtype=torch.long))
    assert info.logits.requires_grad and info.gate.requires_grad
    # the clean logits are the router's W x, the noise has std gate_noise / E
    torch.testing.assert_close(info.logits, x @ moe.router.weight.t())
    moe.eval()
    _, info_eval = moe(x)
    assert info_eval.noisy_logits is None
    assert torch.equal(info_eval.expert, torch.softmax(info_eval.logits, -1).topk(2).indices)


def test_router_noise_scale() -> None:
    torch.manual_seed(0)
    router = TopKRouter(d_model=4, num_experts=8, gate_noise=2.0)
    out = router(torch.randn(20000, 4))
    noise = out.noisy_logits - out.logits
    assert abs(noise.std().item() - 2.0 / 8) < 0.01
    assert abs(noise.mean().item()) < 0.01


def test_cosine_router_trains() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(d_model=8, hidden_dim=8, num_experts=4, router="cosine")
    y, info = moe(torch.randn(12, 8))
    # cosine logits are bounded by the temperature scale exp(log 2) = 2
    assert info.logits.abs().max() <= 2.0 + 1e-5
    (y.sum() + info.logits.sum()).backward()
    assert moe.router.temperature.grad is not None and moe.router.projection.weight.grad is not None


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(d_model=8, hidden_dim=8, num_experts=4, capacity_factor=0.0)
    y, _ = moe(torch.randn(64, 8) * 3)
    y.pow(2).sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_layer() -> None:
    torch.manual_seed(0)
    moe = MoEFFN(d_model=16, hidden_dim=32, num_experts=4, capacity_factor=0.0).eval()
    x = torch.randn(40, 16, requires_grad=True)
    ref, ref_info = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, info = moe(x)
    assert y.dtype == torch.bfloat16 and info.logits.dtype == torch.float32
    assert torch.equal(info.expert, ref_info.expert)  # routing stays in float32
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert moe.router.weight.grad is not None


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="capacity_group"):
        MoEFFN(d_model=4, hidden_dim=4, num_experts=2, capacity_group="dataset")
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN(d_model=4, hidden_dim=4, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="router kind"):
        MoEFFN(d_model=4, hidden_dim=4, num_experts=2, router="hash")
    moe = MoEFFN(d_model=4, hidden_dim=4, num_experts=2)
    with pytest.raises(ValueError, match=r"\[T, 4\]"):
        moe(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="token_image"):
        moe(torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


def test_empty_input() -> None:
    moe = MoEFFN(d_model=4, hidden_dim=4, num_experts=2)
    y, info = moe(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, 4) and info.kept.shape == (0, 1)
