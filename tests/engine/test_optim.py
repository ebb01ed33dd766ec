"""Parameter groups and closed-form learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from damex.config import TrainConfig
from damex.engine.checkpoint import load_checkpoint, save_checkpoint
from damex.engine.optim import (
    LRFactor,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    load_scheduler_state,
    step_scheduler,
)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sampling_offsets = nn.Linear(4, 4)
        self.value_proj = nn.Linear(4, 4)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.attn = _Attn()
        self.reference_points = nn.Linear(4, 2)
        self.query_embed = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_split_backbone_linear_proj_default() -> None:
    m = _Tiny()
    groups = build_param_groups(
        m, lr=1e-3, lr_backbone=1e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4
    )
    by = {g["name"]: g for g in groups}
    assert set(by) == {"default", "backbone", "linear_proj"}
    assert _names(m, by["backbone"]) == {
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.1.weight",
        "backbone.1.bias",
    }
    assert _names(m, by["linear_proj"]) == {
        "attn.sampling_offsets.weight",
        "attn.sampling_offsets.bias",
        "reference_points.weight",
        "reference_points.bias",
    }
    assert by["backbone"]["lr"] == 1e-5
    assert by["linear_proj"]["lr"] == pytest.approx(1e-4)
    assert by["default"]["lr"] == 1e-3
    # DINO default: weight decay on everything, frozen params excluded
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == {id(p) for p in m.parameters() if p.requires_grad}


def test_no_decay_groups_hold_norms_biases_embeddings() -> None:
    m = _Tiny()
    groups = build_param_groups(
        m, lr=1e-3, lr_backbone=1e-5, weight_decay=0.05, no_decay_norm_bias=True
    )
    by = {g["name"]: g for g in groups}
    nd = _names(m, by["default_no_decay"])
    assert {"query_embed.weight", "norm.weight", "norm.bias", "attn.value_proj.bias"} <= nd
    assert "attn.value_proj.weight" in _names(m, by["default"])
    assert by["default_no_decay"]["weight_decay"] == 0.0
    assert by["backbone_no_decay"]["lr"] == 1e-5


def test_build_optimizer_uses_config() -> None:
    cfg = TrainConfig(lr=2e-4, lr_backbone=2e-5, weight_decay=0.01)
    opt = build_optimizer(_Tiny(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"default": 2e-4, "backbone": 2e-5, "linear_proj": 2e-4}


def test_build_optimizer_is_fused_and_steps_like_plain_adamw() -> None:
    """The fused kernel applies AdamW's update rule: three steps equal the for-loop AdamW
    (decoupled weight decay, bias correction, per-group lr) on every parameter and moment."""
    cfg = TrainConfig(lr=1e-2, lr_backbone=1e-3, weight_decay=0.1)
    torch.manual_seed(0)
    fused_model, plain_model = _Tiny(), _Tiny()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    plain_params = dict(plain_model.named_parameters())
    groups = []
    for g in fused.param_groups:
        hyper = {k: v for k, v in g.items() if k not in ("params", "fused")}
        groups.append(
            {**hyper, "params": [plain_params[n] for n in sorted(_names(fused_model, g))]}
        )
    plain = torch.optim.AdamW(groups, foreach=False)

    def loss(model: nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return sum((p * torch.randn(p.shape, generator=gen)).sin().sum() for p in trainable)

    for step in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            loss(model, step).backward()
            opt.step()
    for name, a in fused_model.named_parameters():
        b = plain_params[name]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
        if a.requires_grad:
            torch.testing.assert_close(fused.state[a]["exp_avg_sq"], plain.state[b]["exp_avg_sq"])


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    p = nn.Parameter(torch.zeros(1))
    q = nn.Parameter(torch.zeros(1))
    return torch.optim.SGD(
        [{"params": [p], "lr": lr, "initial_lr": lr}, {"params": [q], "lr": 0.1, "initial_lr": 0.1}]
    )


def _sched(opt: torch.optim.Optimizer, **factor) -> LambdaLR:
    return LambdaLR(opt, lr_lambda=LRFactor(**factor))


def _lrs(sched: LambdaLR, n: int, elapsed=None) -> list[float]:
    out = []
    for i in range(n):
        out.append(sched.get_last_lr()[0])
        step_scheduler(sched, None if elapsed is None else elapsed(i + 1))
    return out


def test_step_schedule_reproduces_official_q8_drops() -> None:
    # lr_drop=11 with 36 epochs: x0.1 at epochs 11, 22 and 33 (the official schedule)
    s = _sched(_opt(), schedule="step", iters_per_epoch=2, lr_drop=11, gamma=0.1)
    lrs = _lrs(s, 72)
    for i, lr in enumerate(lrs):
        epoch = i // 2
        assert lr == pytest.approx(0.1 ** (epoch // 11)), i
    assert lrs[21] == 1.0 and lrs[22] == pytest.approx(0.1) and lrs[66] == pytest.approx(1e-3)
    assert s.get_last_lr()[1] == pytest.approx(0.1 * 0.1 ** (36 // 11))


def test_multistep_and_warmup() -> None:
    s = _sched(
        _opt(),
        schedule="multistep",
        iters_per_epoch=3,
        milestones=[4, 2],
        gamma=0.5,
        warmup_iters=4,
    )
    lrs = _lrs(s, 15)
    expected = []
    for i in range(15):
        warm = min(1.0, (i + 1) / 4)
        e = i // 3
        expected.append(warm * 0.5 ** ((e >= 2) + (e >= 4)))
    assert lrs == pytest.approx(expected)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_closed_form_and_floor() -> None:
    s = _sched(_opt(2.0), schedule="cosine", total_iters=10)
    lrs = _lrs(s, 12)
    for i in range(12):
        assert lrs[i] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * min(i / 10, 1.0))))
    assert lrs[5] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.0, abs=1e-12)
    floored = _lrs(_sched(_opt(2.0), schedule="cosine", total_iters=10, min_lr_ratio=0.1), 12)
    for i in range(12):
        cos = 0.5 * (1 + math.cos(math.pi * min(i / 10, 1.0)))
        assert floored[i] == pytest.approx(2.0 * (0.1 + 0.9 * cos))
    assert floored[10] == pytest.approx(0.2) and min(floored) == pytest.approx(0.2)


def test_time_cosine_follows_elapsed_seconds() -> None:
    s = _sched(_opt(), schedule="time_cosine", time_budget_s=100.0, warmup_iters=2)
    assert s.get_last_lr()[0] == pytest.approx(0.5)  # warmup step 0, elapsed 0
    step_scheduler(s, elapsed_s=25.0)
    assert s.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    step_scheduler(s)  # no new time: the factor keeps the last elapsed seconds
    assert s.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_lambdas[0].factor(1, 50.0) == pytest.approx(0.5)  # a pure function of time
    step_scheduler(s, elapsed_s=150.0)
    assert s.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_scheduler_state_dict_resumes_exactly(tmp_path) -> None:
    cfg = TrainConfig(schedule="cosine", warmup_iters=3, lr=1.0)
    o1 = _opt()
    s1 = build_scheduler(o1, cfg, iters_per_epoch=4, total_iters=20)
    assert isinstance(s1, LambdaLR)
    _lrs(s1, 7)
    # through a weights_only checkpoint, as the trainer stores it
    save_checkpoint(tmp_path / "s.pth", {"scheduler": s1.state_dict()})
    state = load_checkpoint(tmp_path / "s.pth")["scheduler"]
    o2 = _opt()
    s2 = build_scheduler(o2, cfg, iters_per_epoch=4, total_iters=20)
    load_scheduler_state(s2, state)
    assert s2.get_last_lr() == s1.get_last_lr()
    assert [g["lr"] for g in o2.param_groups] == [g["lr"] for g in o1.param_groups]
    assert _lrs(s2, 10) == _lrs(s1, 10)


def test_scheduler_reads_the_old_checkpoint_format() -> None:
    cfg = TrainConfig(schedule="time_cosine", time_budget_min=1.0, warmup_iters=2, lr=1.0)
    ref = build_scheduler(_opt(), cfg, iters_per_epoch=4, total_iters=20)
    _lrs(ref, 5, elapsed=lambda i: 6.0 * i)
    old = {"iteration": 5, "elapsed_s": 30.0, "base_lrs": [1.0, 0.1], "schedule": "time_cosine"}
    s = build_scheduler(_opt(), cfg, iters_per_epoch=4, total_iters=20)
    load_scheduler_state(s, old)
    assert s.last_epoch == 5 and s.get_last_lr() == ref.get_last_lr()
    assert _lrs(s, 3, elapsed=lambda i: 30.0 + 6.0 * i) == _lrs(
        ref, 3, elapsed=lambda i: 30.0 + 6.0 * i
    )
    with pytest.raises(ValueError, match=r"scheduler state with keys \['lr'\]"):
        load_scheduler_state(s, {"lr": 1.0})
    with pytest.raises(ValueError, match="3 param groups, optimizer has 2"):
        load_scheduler_state(s, {**old, "base_lrs": [1.0, 1.0, 1.0]})


def test_scheduler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="time_budget_min"):
        LRFactor(schedule="time_cosine", time_budget_s=0.0)
    with pytest.raises(ValueError, match="train.schedule"):
        LRFactor(schedule="poly")
    with pytest.raises(ValueError, match="lr_drop"):
        LRFactor(schedule="step", lr_drop=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRFactor(schedule="cosine", total_iters=5, min_lr_ratio=1.5)
