"""The step profile's bookkeeping: exclusive sections from nested hook totals, the table."""

from __future__ import annotations

import pytest
from torch import nn

from damex.engine.step_profile import (
    SECTIONS,
    StepProfile,
    _exclusive,
    _SectionTimer,
    format_profiles,
)


def test_exclusive_sections_subtract_the_split_out_parts():
    raw = {
        "_model": 10.0,
        "_backbone": 3.0,
        "_neck": 0.5,
        "_transformer": 5.0,
        "_encoder": 2.0,
        "_enc_deform": 1.5,
        "_decoder": 2.5,
        "_dec_deform": 1.0,
        "_moe": 0.5,
        "_dense_head": 1.0,
        "_criterion": 2.0,
        "_matcher": 0.75,
    }
    out = _exclusive(raw)
    assert out["backbone"] == pytest.approx(3.5)
    assert out["encoder"] == pytest.approx(0.5)
    assert out["decoder"] == pytest.approx(1.0)
    assert out["query selection"] == pytest.approx(0.5)
    assert out["forward, other"] == pytest.approx(10.0 - 3.5 - 5.0 - 1.0)
    assert out["criterion"] == pytest.approx(1.25)
    forward = sum(out[k] for k in out if k not in ("matcher", "criterion"))
    assert forward == pytest.approx(raw["_model"])  # the parts add up to the whole forward


def test_section_timer_hooks_time_nested_modules_and_are_removed():
    inner = nn.Linear(4, 4)
    outer = nn.Sequential(inner, nn.ReLU())
    timer = _SectionTimer(device=next(inner.parameters()).device)
    timer.watch(outer, "_outer")
    timer.watch(inner, "_inner")
    import torch

    outer(torch.randn(2, 4))
    totals = timer.pop()
    assert 0 < totals["_inner"] <= totals["_outer"]
    timer.remove()
    outer(torch.randn(2, 4))
    assert timer.pop() == {}


def test_format_profiles_has_one_row_per_section_and_the_ratio():
    ms = {s: 1.0 for s in SECTIONS}
    a = StepProfile("a", "8x8", 1, 3, ms, 20.0, 100.0)
    b = StepProfile("b", "8x8", 1, 3, ms, 25.0, 100.0)
    text = format_profiles([a, b])
    for s in SECTIONS:
        assert f"| {s} |" in text
    assert "| it/s relative to a | 1.000 |  | 0.800 |" in text


def test_same_batches_steps_every_config_on_the_first_configs_batches(
    tmp_path, synthetic_root, monkeypatch
):
    import yaml
    from engine_fixtures import tiny_config_dict

    from damex.engine import step_profile
    from damex.errors import ConfigError

    tiny = tiny_config_dict(synthetic_root, tmp_path / "run")
    tiny["data"]["scales"] = [48, 64, 80]  # a random size per batch: shared batches share it
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    root: list[str] = ["model.decoder_ffn=[dense, dense]", "moe.loss=none"]
    damex = ["moe.loss=damex"]
    drawn = []
    real_next = step_profile._Runner.next_batch

    def counting_next(self):
        drawn.append(id(self))
        return real_next(self)

    monkeypatch.setattr(step_profile._Runner, "next_batch", counting_next)
    configs = [("dense", str(path), root), ("damex", str(path), damex)]
    dense, moe = step_profile.profile_training_steps(configs, steps=2, warmup=1, same_batches=True)
    assert len(drawn) == 3 and len(set(drawn)) == 1  # only the first config's loader ran
    assert dense.image == moe.image
    assert dense.section_ms["decoder: MoE"] == 0 < moe.section_ms["decoder: MoE"]
    drawn.clear()
    step_profile.profile_training_steps(configs, steps=1, warmup=0)
    assert len(set(drawn)) == 2  # by default each config draws from its own loader
    other = ("merged", str(path), [*root, "data.label_policy=merged"])
    with pytest.raises(ConfigError, match="label space"):
        step_profile.profile_training_steps([configs[0], other], steps=1, same_batches=True)
