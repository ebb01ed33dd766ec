"""Shared fixtures of the engine tests: a tiny synthetic benchmark and a tiny DAMEX config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in benchmark at 5% scale and 96 px (generated once per session)."""
    from damex.config import SyntheticConfig
    from damex.data.synthetic import ensure_benchmark

    root = tmp_path_factory.mktemp("synthetic")
    ensure_benchmark(SyntheticConfig(root=str(root), scale=0.05, image_size=96), progress=False)
    return root


@pytest.fixture(scope="session")
def reference_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted tiny run (``engine_fixtures.REF``) shared by the engine tests."""
    from engine_fixtures import REF, REF_ITERS, tiny_config

    from damex.engine.trainer import train

    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(tiny_config(synthetic_root, out, **REF))
    assert result.iterations == REF_ITERS and result.stop_reason == "completed"
    return out
