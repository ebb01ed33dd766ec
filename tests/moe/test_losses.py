"""Closed-form values and invariants of the MoE losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from damex.moe import (
    RoutingInfo,
    damex_loss,
    load_importance_loss,
    moe_loss,
    router_z_loss,
    switch_loss,
)


def _info(logits, token_image=None, noisy=None, expert=None, gate=None, k=1) -> RoutingInfo:
    logits = torch.as_tensor(logits, dtype=torch.float64).requires_grad_()
    t = logits.shape[0]
    sel = noisy if noisy is not None else logits.detach()
    sel = torch.as_tensor(sel, dtype=torch.float64)
    probs = torch.softmax(sel, -1)
    if expert is None:
        gate_v, expert = probs.topk(k, -1)
    else:
        expert = torch.as_tensor(expert)
        gate_v = probs.gather(1, expert)
    return RoutingInfo(
        logits=logits,
        noisy_logits=None if noisy is None else torch.as_tensor(noisy, dtype=torch.float64),
        expert=expert,
        gate=gate_v if gate is None else gate,
        kept=torch.ones_like(expert, dtype=torch.bool),
        token_image=torch.zeros(t, dtype=torch.long)
        if token_image is None
        else torch.as_tensor(token_image),
    )


def _lse(*v: float) -> float:
    return math.log(sum(math.exp(a) for a in v))


def _phi(x: float, std: float) -> float:
    return 0.5 * (1 + math.erf(x / (std * math.sqrt(2))))


def test_damex_loss_closed_form_and_layer_mean() -> None:
    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    info = _info(logits, token_image=[0, 1, 1, 0])
    image_expert = torch.tensor([0, 2])  # image 0 -> expert 0, image 1 -> expert 2
    ce = [
        _lse(2, 0, 0) - 2,
        _lse(0, 1, 0) - 0,
        _lse(0, 0, 0) - 0,
        _lse(1, 2, 3) - 1,
    ]
    layer1 = sum(ce) / 4
    assert damex_loss([info], image_expert).item() == pytest.approx(layer1, rel=1e-12)
    # second layer restricted to tokens 1 and 3
    mask = torch.tensor([False, True, False, True])
    value = damex_loss([info, info], image_expert, [None, mask])
    assert value.item() == pytest.approx((layer1 + (ce[1] + ce[3]) / 2) / 2, rel=1e-12)
    # an image without target (-1) is ignored
    value = damex_loss([info], torch.tensor([-1, 2]))
    assert value.item() == pytest.approx((ce[1] + ce[2]) / 2, rel=1e-12)
    value.backward()
    assert info.logits.grad[0].abs().sum() == 0 and info.logits.grad[1].abs().sum() > 0


def test_damex_loss_uses_noisy_logits_only_when_asked() -> None:
    info = _info([[1.0, 0.0]], noisy=[[0.0, 3.0]])
    clean = damex_loss([info], torch.tensor([0]))
    noisy = damex_loss([info], torch.tensor([0]), use_noisy=True)
    assert clean.item() == pytest.approx(_lse(1, 0) - 1)
    assert noisy.item() == pytest.approx(_lse(0, 3) - 0)


def test_damex_loss_identity_travels_with_token_image() -> None:
    torch.manual_seed(0)
    batch, queries, experts = 3, 5, 4
    logits = torch.randn(batch * queries, experts, dtype=torch.float64)
    # query-major layout, as the official decoder flattens [NQ, B, d]: token i is image i % B
    token_image = torch.arange(batch * queries) % batch
    image_expert = torch.tensor([3, 0, 1])
    info = _info(logits, token_image=token_image)
    value = damex_loss([info], image_expert)
    reference = F.cross_entropy(logits, image_expert[token_image])
    torch.testing.assert_close(value, reference)
    # permuting the tokens (with their image ids) changes nothing
    perm = torch.randperm(batch * queries)
    permuted = _info(logits[perm], token_image=token_image[perm])
    torch.testing.assert_close(damex_loss([permuted], image_expert), value)
    # the official repeat_interleave assumes batch-major tokens: wrong for this layout
    wrong = F.cross_entropy(logits, image_expert.repeat_interleave(queries))
    assert not torch.allclose(wrong, value)


def test_damex_loss_validation_and_empty_selection() -> None:
    info = _info([[1.0, 0.0]], token_image=[0])
    with pytest.raises(ValueError, match="num_experts"):
        damex_loss([info], torch.tensor([2]))
    value = damex_loss([info], torch.tensor([0]), [torch.tensor([False])])
    assert value.item() == 0.0 and value.requires_grad


def test_load_importance_tutel_closed_form() -> None:
    clean = [[1.0, 0.0], [0.0, 0.5]]
    noisy = [[1.1, -0.2], [0.3, 0.5]]  # picks expert 0 for token 0, expert 1 for token 1
    info = _info(clean, noisy=noisy)
    assert info.expert[:, 0].tolist() == [0, 1]
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in clean]
    imp = [p[0][0] + p[1][0], p[0][1] + p[1][1]]
    cv2 = lambda a, b: ((a - b) ** 2 / 2) / (((a + b) / 2) ** 2 + 1e-10)  # noqa: E731
    sigma = 1.0 / 2
    theta = [clean[0][0], clean[1][1]]  # clean logit at the noisily chosen expert
    load = [sum(_phi(p[t][e] - theta[t], sigma) for t in range(2)) for e in range(2)]
    expected = (cv2(*imp) + cv2(*load)) / 2
    value = load_importance_loss(info, variant="tutel", gate_noise=1.0)
    assert value.item() == pytest.approx(expected, rel=1e-10)
    # tutel's own l_aux: theta from the noisy logits
    theta_n = [noisy[0][0], noisy[1][1]]
    load_n = [sum(_phi(p[t][e] - theta_n[t], sigma) for t in range(2)) for e in range(2)]
    value_n = load_importance_loss(info, gate_noise=1.0, theta_from="noisy")
    assert value_n.item() == pytest.approx((cv2(*imp) + cv2(*load_n)) / 2, rel=1e-10)


def test_load_importance_corrected_closed_form() -> None:
    clean = [[1.0, 0.0], [0.0, 0.5]]
    noisy = [[1.1, -0.2], [0.3, 0.5]]
    info = _info(clean, noisy=noisy)
    q = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in noisy]
    imp = [q[0][0], q[1][1]]  # gates of the chosen experts
    sigma = 0.5
    # kth_excluding(H, 1, e): the best other noisy logit
    load = [
        _phi(1.0 - (-0.2), sigma) + _phi(0.0 - 0.5, sigma),
        _phi(0.0 - 1.1, sigma) + _phi(0.5 - 0.3, sigma),
    ]
    cv2 = lambda a, b: ((a - b) ** 2 / 2) / (((a + b) / 2) ** 2 + 1e-10)  # noqa: E731
    value = load_importance_loss(info, variant="corrected", gate_noise=1.0)
    assert value.item() == pytest.approx((cv2(*imp) + cv2(*load)) / 2, rel=1e-10)
    value.backward()
    assert info.logits.grad.abs().sum() > 0


def test_load_importance_mask_and_errors() -> None:
    info = _info([[1.0, 0.0], [0.0, 0.5], [3.0, -1.0]], noisy=[[1.1, -0.2], [0.3, 0.5], [0, 0]])
    sub = _info([[1.0, 0.0], [0.0, 0.5]], noisy=[[1.1, -0.2], [0.3, 0.5]])
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(load_importance_loss(info, mask), load_importance_loss(sub))
    with pytest.raises(ValueError, match="gate_noise"):
        load_importance_loss(info, gate_noise=0.0)
    with pytest.raises(ValueError, match="bool"):
        load_importance_loss(info, torch.tensor([1, 1, 0]))


def test_switch_loss_closed_form() -> None:
    uniform = _info([[0.0, 0.0], [0.0, 0.0]], expert=[[0], [1]])
    assert switch_loss(uniform).item() == pytest.approx(1.0)
    skewed = _info([[math.log(9.0), 0.0], [math.log(9.0), 0.0]])  # probs [0.9, 0.1], top-1 = 0
    assert switch_loss(skewed).item() == pytest.approx(2 * 0.9)


def test_router_z_loss_closed_form() -> None:
    info = _info([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(info).item() == pytest.approx(expected)


def test_moe_loss_dispatcher() -> None:
    a = _info([[1.0, 0.0], [0.0, 0.5]], noisy=[[1.1, -0.2], [0.3, 0.5]])
    b = _info([[0.2, 0.1], [0.3, 0.9]], noisy=[[0.2, 0.3], [0.3, 0.5]])
    for name, fn in (
        ("switch", switch_loss),
        ("z_loss", router_z_loss),
        ("load_importance", load_importance_loss),
    ):
        expected = (fn(a) + fn(b)) / 2
        torch.testing.assert_close(moe_loss(name, [a, b]), expected)
    corrected = (
        load_importance_loss(a, variant="corrected") + load_importance_loss(b, variant="corrected")
    ) / 2
    torch.testing.assert_close(moe_loss("load_importance_corrected", [a, b]), corrected)
    damex = moe_loss("damex", [a, b], image_expert=torch.tensor([1]))
    torch.testing.assert_close(damex, damex_loss([a, b], torch.tensor([1])))
    none = moe_loss("none", [a, b])
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="unknown MoE loss"):
        moe_loss("gshard2", [a])
    with pytest.raises(ValueError, match="image_expert"):
        moe_loss("damex", [a])
