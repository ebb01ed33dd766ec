"""Model EMA: closed-form averages, warmup ramp, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from damex.engine.ema import ModelEMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    return m


def test_ema_matches_closed_form_without_warmup() -> None:
    m = _model()
    w0 = m[0].weight.detach().clone()
    ema = ModelEMA(m, decay=0.9, warmup=0)
    values = [w0]
    for k in range(1, 4):
        with torch.no_grad():
            m[0].weight.fill_(float(k))
        m[1].num_batches_tracked.fill_(10 * k)
        ema.update(m)
        values.append(torch.full_like(w0, float(k)))
    # ema_3 = 0.9^3 w0 + 0.1 (0.9^2 * 1 + 0.9 * 2 + 3)
    expected = 0.9**3 * w0 + 0.1 * (0.81 * 1 + 0.9 * 2 + 3)
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert int(ema.module[1].num_batches_tracked) == 30  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert m[0].weight.requires_grad  # the source model is untouched


def test_ema_warmup_ramp() -> None:
    ema = ModelEMA(_model(), decay=0.999, warmup=10)
    assert ema.current_decay(1) == pytest.approx(0.999 * (1 - math.exp(-0.1)))
    assert ema.current_decay(10_000) == pytest.approx(0.999)
    m = _model()
    ema = ModelEMA(m, decay=0.999, warmup=10)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    ema.update(m)
    d = ema.current_decay(1)
    torch.testing.assert_close(ema.module[0].weight, m[0].weight - d)


def test_ema_state_dict_roundtrip() -> None:
    m = _model()
    a = ModelEMA(m, decay=0.5, warmup=3)
    with torch.no_grad():
        m[0].weight.mul_(2)
    a.update(m)
    a.update(m)
    b = ModelEMA(_model(), decay=0.1, warmup=0)
    b.load_state_dict(a.state_dict())
    assert b.updates == 2 and b.decay == 0.5 and b.warmup == 3
    torch.testing.assert_close(b.module[0].weight, a.module[0].weight)
    a.update(m)
    b.update(m)
    torch.testing.assert_close(b.module[0].weight, a.module[0].weight)
