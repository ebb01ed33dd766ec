"""Experiment specs: variants x seeds at one per-run budget, read from YAML.

A spec (``configs/experiments/*.yaml``)::

    name: full_mixture                  # a label for the tables
    output: runs/experiments/full_mixture
    baseline: dino                      # differences are reported against this variant
    seeds: [0, 1, 2]
    budget:
      iterations: 200                   # optimizer steps per run (train.max_iters)
      minutes: 0                        # > 0: a wall-clock budget instead (biased on a shared
                                        #   machine: contention slows some runs, not others)
    eval_splits: [val, test]            # each run's final checkpoint is evaluated on these
    overrides: [eval.max_images=0]      # key=value for every variant
    variants:
      - name: dino
        config: configs/synthetic/dino_small.yaml
        overrides: [model.accel.dense_head=true]
      - name: damex
        config: configs/synthetic/damex_small.yaml

Relative paths (``output``, ``config``) are taken from the current directory when they exist
there, else from the spec file's folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from damex.errors import ConfigError

__all__ = ["Budget", "Variant", "ExperimentSpec", "load_spec", "spec_from_dict"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SPEC_KEYS = {
    "name",
    "output",
    "baseline",
    "seeds",
    "budget",
    "eval_splits",
    "overrides",
    "variants",
}
_VARIANT_KEYS = {"name", "config", "overrides"}
_BUDGET_KEYS = {"iterations", "minutes"}


@dataclass(frozen=True)
class Budget:
    """Per-run training budget.

    Attributes:
        iterations: optimizer steps (``train.max_iters``); the learning-rate schedule is the
            iteration cosine over them (a config's ``time_cosine`` becomes ``cosine``).
        minutes: > 0: stop after this many training minutes instead (``train.time_budget_min``,
            ``time_cosine`` schedule); ``iterations`` then only caps.
    """

    iterations: int = 0
    minutes: float = 0.0


@dataclass(frozen=True)
class Variant:
    """One model / setting: a config file plus ``key=value`` overrides."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExperimentSpec:
    """A set of runs: every variant with every seed, all at one budget."""

    name: str
    output: Path
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    budget: Budget
    baseline: str | None = None
    eval_splits: tuple[str, ...] = ("val", "test")
    overrides: tuple[str, ...] = ()
    source: str = "<dict>"
    extra: dict[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(
            f"{self.source}: no variant {name!r} (variants: {[v.name for v in self.variants]})"
        )


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or base is None or p.exists():
        return p
    alt = base / p
    return alt if alt.exists() else p


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of 'key=value' strings, got {value!r}")
    for v in value:
        if "=" not in v:
            raise ConfigError(f"{where}: {v!r} must look like key=value")
    return tuple(value)


def _unknown(data: dict[str, Any], allowed: set[str], where: str) -> None:
    bad = sorted(set(data) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; allowed: {sorted(allowed)}")


def spec_from_dict(data: dict[str, Any], source: str = "<dict>", base: Path | None = None):
    """Validate a spec mapping (see the module docstring) -> :class:`ExperimentSpec`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a spec must be a mapping, got {type(data).__name__}")
    _unknown(data, _SPEC_KEYS, source)
    for key in ("name", "output", "variants", "seeds", "budget"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}")
    name = str(data["name"])
    if not _NAME.match(name):
        raise ConfigError(f"{source}: name {name!r} must be letters, digits, '_', '.', '-'")

    seeds = data["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds repeat: {seeds}")

    b = data["budget"]
    if not isinstance(b, dict):
        raise ConfigError(f"{source}: budget must be a mapping, got {b!r}")
    _unknown(b, _BUDGET_KEYS, f"{source}: budget")
    try:
        budget = Budget(iterations=int(b.get("iterations", 0)), minutes=float(b.get("minutes", 0)))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: budget: {err}") from None
    if budget.iterations < 0 or budget.minutes < 0 or (budget.iterations == budget.minutes == 0):
        raise ConfigError(f"{source}: budget needs iterations > 0 or minutes > 0, got {b!r}")

    variants_raw = data["variants"]
    if not isinstance(variants_raw, list) or not variants_raw:
        raise ConfigError(f"{source}: variants must be a non-empty list")
    variants: list[Variant] = []
    for i, v in enumerate(variants_raw):
        where = f"{source}: variants[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{where} must be a mapping with name, config, overrides")
        _unknown(v, _VARIANT_KEYS, where)
        if "name" not in v or "config" not in v:
            raise ConfigError(f"{where}: needs 'name' and 'config'")
        vname = str(v["name"])
        if not _NAME.match(vname):
            raise ConfigError(f"{where}: name {vname!r} must be letters, digits, '_', '.', '-'")
        cfg = _resolve(str(v["config"]), base)
        if not cfg.is_file():
            raise ConfigError(f"{where}: config file {v['config']!r} not found")
        variants.append(Variant(vname, cfg, _str_list(v.get("overrides"), f"{where}.overrides")))
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: variant names repeat: {dup}")

    baseline = data.get("baseline")
    if baseline is not None and baseline not in names:
        raise ConfigError(f"{source}: baseline {baseline!r} is not a variant (variants: {names})")
    splits = data.get("eval_splits", ["val", "test"])
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise ConfigError(f"{source}: eval_splits must be a non-empty list, got {splits!r}")
    return ExperimentSpec(
        name=name,
        output=_resolve(str(data["output"]), None),
        variants=tuple(variants),
        seeds=tuple(seeds),
        budget=budget,
        baseline=baseline,
        eval_splits=tuple(splits),
        overrides=_str_list(data.get("overrides"), f"{source}: overrides"),
        source=source,
    )


def load_spec(path: str | os.PathLike[str]) -> ExperimentSpec:
    """Read and validate a spec YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment spec {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML: {err}") from None
    return spec_from_dict(data, source=str(p), base=p.resolve().parent)
