"""Batched experts: the hand-written backward, threading, dropout, init, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from damex.moe import Experts, expert_ffn
from damex.moe.experts import _plan_items


@pytest.fixture
def two_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def _params(num_experts: int, d: int, h: int, dtype=torch.float64, bias2: bool = True):
    g = torch.Generator().manual_seed(0)

    def mk(*shape: int) -> list[torch.Tensor]:
        return [
            (torch.randn(*shape, generator=g, dtype=dtype) * 0.5).requires_grad_()
            for _ in range(num_experts)
        ]

    return mk(h, d), mk(h), mk(d, h), (mk(d) if bias2 else None)


def test_plan_items_splits_rows_evenly() -> None:
    parts = _plan_items([5, 0, 3, 4], 2)
    assert parts == [[(0, 0, 5, True), (2, 5, 6, False)], [(2, 6, 8, False), (3, 8, 12, True)]]
    assert _plan_items([0, 0], 2) == [[], []]


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_gradcheck_expert_ffn(threaded: bool, activation: str, two_threads) -> None:
    counts = [3, 0, 4, 2]  # the threaded split cuts expert 2 in two
    w1, b1, w2, b2 = _params(4, 3, 5)
    x = torch.randn(sum(counts), 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        w1, b1, w2, b2 = ps[:4], ps[4:8], ps[8:12], ps[12:]
        return expert_ffn(x, counts, w1, b1, w2, b2, activation=activation, threaded=threaded)

    assert torch.autograd.gradcheck(fn, (x, *w1, *b1, *w2, *b2))


def test_gradcheck_without_fc2_bias_and_partial_grads(two_threads) -> None:
    counts = [2, 5]
    w1, b1, w2, _ = _params(2, 3, 4, bias2=False)
    w1, b1 = [w.detach() for w in w1], [b.detach() for b in b1]
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *w2):
        return expert_ffn(x, counts, w1, b1, w2, None, threaded=True)

    assert torch.autograd.gradcheck(fn, (x, *w2))


@pytest.mark.parametrize("threaded", [False, True])
def test_matches_reference_per_expert(threaded: bool, two_threads) -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=6, hidden_dim=10, cpu_threads=threaded)
    counts = [4, 7, 2]
    x = torch.randn(13, 6)
    y = experts(x, counts)
    starts = [0, 4, 11, 13]
    for e in range(3):
        ref = experts[e](x[starts[e] : starts[e + 1]])
        torch.testing.assert_close(y[starts[e] : starts[e + 1]], ref)


def test_threaded_equals_serial_including_grads(two_threads) -> None:
    torch.manual_seed(0)
    counts = [40, 3, 0, 57]
    serial = Experts(num_experts=4, d_model=16, hidden_dim=32, cpu_threads=False)
    threaded = Experts(num_experts=4, d_model=16, hidden_dim=32, cpu_threads=True)
    threaded.load_state_dict(serial.state_dict())
    x = torch.randn(100, 16)
    gy = torch.randn(100, 16)
    outs = []
    for m in (serial, threaded):
        xi = x.clone().requires_grad_()
        m(xi, counts).backward(gy)
        outs.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_uses_one_mask_drawn_on_the_calling_thread(two_threads) -> None:
    p, counts = 0.25, [5, 7]
    w1, b1, w2, b2 = ([t.detach().float() for t in ts] for ts in _params(2, 4, 6))
    x = torch.randn(12, 4)
    torch.manual_seed(7)
    y = expert_ffn(x, counts, w1, b1, w2, b2, dropout=p, training=True, threaded=True)
    torch.manual_seed(7)
    mask = torch.empty(12, 6).bernoulli_(1 - p).bool()
    expected = []
    for e, (s, t) in enumerate([(0, 5), (5, 12)]):
        hid = torch.nn.functional.gelu(x[s:t] @ w1[e].t() + b1[e]) * mask[s:t] / (1 - p)
        expected.append(hid @ w2[e].t() + b2[e])
    torch.testing.assert_close(y, torch.cat(expected))
    # eval mode: no dropout at all
    y_eval = expert_ffn(x, counts, w1, b1, w2, b2, dropout=p, training=False)
    assert not torch.allclose(y_eval, y)


def test_init_like_nn_linear_and_xavier_per_expert() -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=4, d_model=64, hidden_dim=256)
    bound1, bound2 = 1 / math.sqrt(64), 1 / math.sqrt(256)
    for e in range(4):
        fc1, fc2 = experts[e].fc1, experts[e].fc2
        assert fc1.weight.abs().max() <= bound1 and fc1.bias.abs().max() <= bound1
        assert fc2.weight.abs().max() <= bound2 and fc2.bias.abs().max() <= bound2
        assert fc1.weight.abs().max() > 0.9 * bound1  # the full nn.Linear range
    assert not torch.equal(experts[0].fc1.weight, experts[1].fc1.weight)
    assert experts.expert_ids == [0, 1, 2, 3]
    assert "ffn.3.fc2.bias" in dict(experts.named_parameters())
    experts.reset_parameters("xavier")
    xavier = math.sqrt(6 / (64 + 256))
    assert 0.9 * xavier < experts[2].fc1.weight.abs().max() <= xavier
    assert experts[2].fc2.bias.abs().max() == 0 and experts[2].fc1.bias.abs().max() == 0


def test_keep_shard_uses_global_ids() -> None:
    torch.manual_seed(0)
    full = Experts(num_experts=4, d_model=4, hidden_dim=8)
    shard = Experts(num_experts=4, d_model=4, hidden_dim=8)
    shard.load_state_dict(full.state_dict())
    shard.keep_([2, 3])
    assert shard.num_experts == 2 and shard.expert_ids == [2, 3]
    assert torch.equal(shard[0].fc1.weight, full[2].fc1.weight)
    assert set(shard.state_dict()) < set(full.state_dict())
    with pytest.raises(ValueError, match=r"\[0\]"):
        shard.keep_([0])


def test_load_dense_copies_into_chosen_experts() -> None:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    experts = Experts(num_experts=3, d_model=8, hidden_dim=16)
    before = experts[0].fc1.weight.clone()
    experts.load_dense_(fc1, fc2, experts=[1, 2])
    x = torch.randn(5, 8)
    dense = fc2(nn.functional.gelu(fc1(x)))
    y = experts(torch.cat([x, x]), [0, 5, 5])
    torch.testing.assert_close(y, torch.cat([dense, dense]))
    assert torch.equal(experts[0].fc1.weight, before)
    with pytest.raises(ValueError, match="fc1 weight must be"):
        experts.load_dense_(nn.Linear(8, 12), fc2)


def test_bf16_autocast_cpu() -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=2, d_model=16, hidden_dim=32)
    x = torch.randn(20, 16, requires_grad=True)
    ref = experts(x, [12, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, [12, 8])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert experts[0].fc1.weight.grad.dtype == torch.float32
    assert experts[1].fc1.weight.grad.abs().sum() > 0


def test_validation_errors() -> None:
    experts = Experts(num_experts=2, d_model=4, hidden_dim=8)
    with pytest.raises(ValueError, match="counts sum"):
        experts(torch.randn(5, 4), [2, 2])
    with pytest.raises(ValueError, match="for 2 experts"):
        experts(torch.randn(5, 4), [5])
    with pytest.raises(TypeError, match="dtype"):
        experts(torch.randn(5, 4, dtype=torch.float64), [2, 3])
    with pytest.raises(ValueError, match="activation"):
        Experts(num_experts=2, d_model=4, hidden_dim=8, activation="tanh")


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_unthreaded_path_leaves_the_thread_count_alone(activation, two_threads, monkeypatch):
    """``threaded=False`` never touches process-wide state, even where automatic threads."""

    def forbidden(n: int) -> None:
        raise AssertionError(f"expert_ffn called torch.set_num_threads({n})")

    w1, b1, w2, b2 = _params(3, 8, 16, dtype=torch.float32)
    x = torch.randn(600, 8, requires_grad=True)  # large enough for the old automatic threading
    monkeypatch.setattr(torch, "set_num_threads", forbidden)
    y = expert_ffn(x, [200, 100, 300], w1, b1, w2, b2, activation=activation, threaded=False)
    y.square().sum().backward()
    assert x.grad is not None and all(w.grad is not None for w in w1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_layer_forward_backward_on_cuda() -> None:
    from damex.moe import MoEFFN

    torch.manual_seed(0)
    layer = MoEFFN(d_model=32, hidden_dim=64, num_experts=4, capacity_factor=1.25).eval()
    cpu_x = torch.randn(50, 32)
    token_image = torch.arange(50) // 25
    ref_y, _ = layer(cpu_x, token_image)  # eval: no gate noise, the same routing on both
    layer = layer.cuda()
    x = cpu_x.cuda().requires_grad_(True)
    y, _ = layer(x, token_image.cuda())
    torch.testing.assert_close(y.cpu(), ref_y, atol=1e-4, rtol=1e-4)
    layer.train()
    y, info = layer(x, token_image.cuda())
    y.square().sum().backward()
    assert info.expert.device.type == "cuda"
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for e in set(info.expert[info.kept].tolist()):
        assert layer.experts[e].fc1.weight.grad is not None


def test_threaded_under_inference_mode(two_threads) -> None:
    """Worker threads follow the caller's inference mode (they write its inference tensors)."""
    w1, b1, w2, b2 = _params(3, 8, 16, dtype=torch.float32)
    x = torch.randn(60, 8)
    counts = [20, 10, 30]
    with torch.no_grad():
        ref = expert_ffn(x, counts, w1, b1, w2, b2, threaded=False)
    with torch.inference_mode():
        out = expert_ffn(x, counts, w1, b1, w2, b2, threaded=True)
    torch.testing.assert_close(out, ref)
