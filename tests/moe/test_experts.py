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
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.5).requires_grad_()  # noqa: E731
    return (
        mk(num_experts, h, d),
        mk(num_experts, h),
        mk(num_experts, d, h),
        (mk(num_experts, d) if bias2 else None),
    )


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

    def fn(x, w1, b1, w2, b2):
        return expert_ffn(x, counts, w1, b1, w2, b2, activation=activation, threaded=threaded)

    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2))


def test_gradcheck_without_fc2_bias_and_partial_grads(two_threads) -> None:
    counts = [2, 5]
    w1, b1, w2, _ = _params(2, 3, 4, bias2=False)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w2: expert_ffn(x, counts, w1.detach(), b1.detach(), w2, None, threaded=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w2))


@pytest.mark.parametrize("threaded", [False, True])
def test_matches_reference_per_expert(threaded: bool, two_threads) -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=6, hidden_dim=10, cpu_threads=threaded)
    counts = [4, 7, 2]
    x = torch.randn(13, 6)
    y = experts(x, counts)
    starts = [0, 4, 11, 13]
    for e in range(3):
        ref = experts.reference_forward(x[starts[e] : starts[e + 1]], e)
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
    w1, b1, w2, b2 = (t.detach().float() for t in _params(2, 4, 6))
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
    assert experts.fc1_weight.abs().max() <= bound1 and experts.fc1_bias.abs().max() <= bound1
    assert experts.fc2_weight.abs().max() <= bound2 and experts.fc2_bias.abs().max() <= bound2
    # experts differ from each other and use most of the range (not a tiny trunc-normal)
    assert not torch.equal(experts.fc1_weight[0], experts.fc1_weight[1])
    assert experts.fc1_weight.abs().max() > 0.9 * bound1
    experts.reset_parameters("xavier")
    xavier = math.sqrt(6 / (64 + 256))
    assert 0.9 * xavier < experts.fc1_weight.abs().max() <= xavier
    assert experts.fc2_bias.abs().max() == 0 and experts.fc1_bias.abs().max() == 0


def test_load_dense_copies_into_chosen_experts() -> None:
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
    experts = Experts(num_experts=3, d_model=8, hidden_dim=16)
    before = experts.fc1_weight[0].clone()
    experts.load_dense_(fc1, fc2, experts=[1, 2])
    x = torch.randn(5, 8)
    dense = fc2(nn.functional.gelu(fc1(x)))
    y = experts(torch.cat([x, x]), [0, 5, 5])
    torch.testing.assert_close(y, torch.cat([dense, dense]))
    assert torch.equal(experts.fc1_weight[0], before)
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
    assert experts.fc1_weight.grad.dtype == torch.float32
    assert experts.fc1_weight.grad.abs().sum() > 0


def test_validation_errors() -> None:
    experts = Experts(num_experts=2, d_model=4, hidden_dim=8)
    with pytest.raises(ValueError, match="counts sum"):
        experts(torch.randn(5, 4), [2, 2])
    with pytest.raises(ValueError, match="2 experts"):
        experts(torch.randn(5, 4), [5])
    with pytest.raises(TypeError, match="dtype"):
        experts(torch.randn(5, 4, dtype=torch.float64), [2, 3])
    with pytest.raises(ValueError, match="activation"):
        Experts(num_experts=2, d_model=4, hidden_dim=8, activation="tanh")
