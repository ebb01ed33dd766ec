"""Typed configuration schema, YAML loading with ``_base_`` inheritance, overrides, validation.

The schema is the dataclasses below; YAML files under ``configs/`` set a subset of the fields
and may name one or more ``_base_`` files (paths relative to the file). Command-line
``key=value`` overrides (OmegaConf dotlist syntax, e.g. ``train.lr=2e-4 moe.num_experts=4``)
are applied last. ``load_config`` returns an immutable ``Config`` and raises ``ConfigError``
naming the file and key for any unknown key (with the closest valid one), wrong type,
out-of-range value or inconsistent dataset -> expert map.
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from damex.errors import ConfigError

__all__ = [
    "BackboneConfig",
    "DatasetEntry",
    "DataConfig",
    "SyntheticConfig",
    "DNConfig",
    "LossConfig",
    "AcceleratorConfig",
    "ModelConfig",
    "MoEConfig",
    "TrainConfig",
    "EvalConfig",
    "OutputConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "config_to_yaml",
    "save_config",
    "default_config_path",
    "config_to_dict",
]


# ----------------------------------------------------------------------------------- schema
@dataclass
class DatasetEntry:
    """A dataset defined (or a built-in catalog entry overridden) in the config.

    Paths are relative to ``data.root`` unless absolute. ``splits`` maps a split name
    (train / val / test) to a COCO JSON file. ``classes`` (optional) fixes the class order of the
    label space; by default it comes from the JSON's categories sorted by id.
    """

    image_root: str = ""
    splits: dict[str, str] = field(default_factory=dict)
    image_roots: dict[str, str] = field(default_factory=dict)  # per-split image root overrides
    classes: list[str] | None = None
    # disjoint label space: give the dataset a block of num_slots with slot = native_id - 1
    # (COCO's 91 slots in the paper's 178-way head); None = one slot per category (compact)
    num_slots: int | None = None
    expert: int | None = None  # default expert when moe.expert_map does not name the dataset
    scales: list[int] | None = None  # per-dataset short-side train scales (data.per_dataset_scales)
    test_scale: int | None = None
    max_size: int | None = None


@dataclass
class SyntheticConfig:
    """The built-in multi-domain benchmark (``damex.data.synthetic``)."""

    root: str = "data/synthetic"  # where it is generated (once) if missing
    seed: int = 0
    image_size: int = 256  # longest side in pixels
    scale: float = 1.0  # multiplies every dataset's image counts


@dataclass
class DataConfig:
    root: str = "data"
    train: list[str] = field(default_factory=list)  # ordered dataset names for training
    test: list[str] = field(default_factory=list)  # evaluation datasets (default: train)
    train_split: str = "train"
    test_split: str = "test"
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    label_policy: str = "disjoint"  # disjoint | merged
    # sampling over datasets (spec §4.4)
    sampler: str = "proportional"  # proportional | uniform | temperature | repeat_factor
    temperature: float = 2.0
    repeat_threshold: float = 0.001
    homogeneous_batches: bool = False
    epoch_size: int = 0  # samples per epoch; 0 = sum of training set sizes
    limited: dict[str, float] = field(default_factory=dict)  # dataset -> percent kept (spec §4.7)
    # augmentation (spec §4.5)
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    test_scale: int = 0  # 0 = max(scales)
    crop: bool = True  # DETR's resize -> random crop -> resize branch
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    hflip: bool = True
    per_dataset_scales: bool = False  # official joint training ignores them (spec Q7)
    # bad input
    out_of_bounds: str = "clip"  # clip | error
    on_bad_sample: str = "error"  # error | skip
    num_workers: int = 2


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | timm:<name>
    weights: str | None = None  # local file; never downloaded
    frozen_stages: int = 1  # stem + layer1 frozen (DINO)
    frozen_bn: bool = True
    return_strides: list[int] = field(default_factory=lambda: [8, 16, 32])


@dataclass
class DNConfig:
    enabled: bool = True
    number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0  # DAMEX config value; DINO uses 0.4


@dataclass
class LossConfig:
    class_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    match_class: float = 2.0
    match_bbox: float = 5.0
    match_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux: bool = True
    interm_weight: float = 1.0


@dataclass
class AcceleratorConfig:
    """Training-only convergence accelerators (zero inference cost)."""

    one_to_many: bool = False  # H-DETR hybrid matching branch
    one_to_many_queries: int = 300
    one_to_many_k: int = 6
    one_to_many_weight: float = 1.0
    dense_head: bool = False  # Co-DETR style auxiliary dense (ATSS/FCOS-type) head
    dense_head_weight: float = 1.0
    dense_head_queries: int = 0  # positives fed to the decoder as extra queries (0 = loss only)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_feature_levels: int = 4
    num_queries: int = 900
    two_stage: bool = True
    pe_temperature: int = 20
    decoder_ffn: list[str] = field(default_factory=lambda: ["dense"] * 6)  # dense | moe per layer
    dn: DNConfig = field(default_factory=DNConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    accel: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.25  # 0 = no drop; < 0 = dynamic capped at |cf|
    capacity_group: str = "image"  # image | batch
    gate_noise: float = 1.0
    router: str = "linear"  # linear | cosine
    activation: str = "gelu"
    dropout: float = 0.0
    drop_path: float = 0.2
    fc2_bias: bool = True
    normalize_gate: bool = False
    # losses
    loss: str = "damex"  # damex | load_importance | load_importance_corrected | switch | none
    loss_weight: float = 0.1
    damex_tokens: str = "all"  # all | matching_only | foreground | exclude_dn
    damex_logits: str = "clean"  # clean | noisy
    balance_tokens: str = "foreground"  # all | matching_only | foreground | exclude_dn
    z_loss_weight: float = 0.0
    expert_map: dict[str, int] = field(default_factory=dict)  # dataset name -> expert id
    expert_parallel: bool = False


@dataclass
class TrainConfig:
    epochs: int = 36
    max_iters: int = 0  # > 0 caps the number of optimizer steps
    time_budget_min: float = 0.0  # > 0: stop after this many minutes (time-based schedule)
    batch_size: int = 1  # per process
    lr: float = 1.4e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 1.0  # 0.1 in DINO's config but the 'default' groups ignore it
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    schedule: str = "step"  # step | multistep | cosine | time_cosine
    lr_drop: int = 11  # step: decay every lr_drop epochs (official; spec Q8)
    milestones: list[int] = field(default_factory=lambda: [33])
    gamma: float = 0.1
    warmup_iters: int = 0
    amp: str = "none"  # none | bf16 | fp16
    ema: bool = False
    ema_decay: float = 0.9997
    grad_accum: int = 1
    seed: int = 42
    eval_every: int = 4  # epochs; 0 = only at the end
    checkpoint_every: int = 4  # epochs; 0 = only last/best
    log_every: int = 10  # iterations
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    datasets: list[str] = field(default_factory=list)  # default: data.test or data.train
    batch_size: int = 1
    num_select: int = 300
    restrict_to_dataset_labels: bool = False  # oracle: uses the dataset id; reported separately
    max_images: int = 0  # > 0 caps images per dataset (quick checks)
    routing_tokens: str = "matching_only"  # for routing statistics / heatmaps
    report_images: int = 4  # per-dataset overlays in the routing report


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    overwrite: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def uses_moe(self) -> bool:
        return "moe" in self.model.decoder_ffn

    @property
    def eval_datasets(self) -> list[str]:
        return list(self.eval.datasets or self.data.test or self.data.train)


# ----------------------------------------------------------------------------- choices
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.label_policy": ("disjoint", "merged"),
    "data.sampler": ("proportional", "uniform", "temperature", "repeat_factor"),
    "data.out_of_bounds": ("clip", "error"),
    "data.on_bad_sample": ("error", "skip"),
    "moe.capacity_group": ("image", "batch"),
    "moe.router": ("linear", "cosine"),
    "moe.activation": ("gelu", "relu"),
    "moe.loss": ("damex", "load_importance", "load_importance_corrected", "switch", "none"),
    "moe.damex_tokens": ("all", "matching_only", "foreground", "exclude_dn"),
    "moe.damex_logits": ("clean", "noisy"),
    "moe.balance_tokens": ("all", "matching_only", "foreground", "exclude_dn"),
    "train.schedule": ("step", "multistep", "cosine", "time_cosine"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "eval.routing_tokens": ("all", "matching_only", "foreground", "exclude_dn"),
}

_REPO_ROOT = Path(__file__).resolve().parents[1]


def default_config_path() -> Path:
    """The config ``tools/train.py`` runs with no arguments: DAMEX on the built-in benchmark."""
    return _REPO_ROOT / "configs" / "synthetic" / "damex_small.yaml"


# ----------------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: expected a mapping at the top level, got {kind}")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``top`` wins; lists and scalars are replaced, not merged."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"_base_ cycle: {cycle}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        if not base_path.exists():
            raise ConfigError(f"{path}: _base_ file not found: {base_path}")
        merged = _deep_merge(merged, _load_with_bases(base_path, (*chain, path)))
    _check_keys(data, Config, "", str(path))
    return _deep_merge(merged, data)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _dict_value_type(tp: Any) -> Any | None:
    """For ``dict[str, X]`` return X, else None."""
    if typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1]
    return None


def _check_keys(data: dict[str, Any], cls: type, prefix: str, source: str) -> None:
    """Raise ConfigError for any key of ``data`` that is not a field of dataclass ``cls``."""
    types = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types:
            valid = [f"{prefix}{k}" for k in types]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean '{close[0]}'?"
            else:
                hint = f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        tp = types[key]
        if is_dataclass(tp) and isinstance(value, dict):
            _check_keys(value, tp, f"{full}.", source)
        value_tp = _dict_value_type(tp)
        if value_tp is not None and is_dataclass(value_tp) and isinstance(value, dict):
            for name, entry in value.items():
                if isinstance(entry, dict):
                    _check_keys(entry, value_tp, f"{full}.{name}.", source)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"command line: override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: cannot parse the value of '{key}': {exc}") from None
    return key.split("."), value


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain nested dict against the schema and return a ``Config``."""
    _check_keys(data, Config, "", source)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
        cfg = OmegaConf.to_object(merged)
    except (ValidationError, ConfigKeyError, ConfigAttributeError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: invalid value for '{key}': {msg}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {str(exc).splitlines()[0]}") from None
    assert isinstance(cfg, Config)
    _validate(cfg, source)
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML config (with ``_base_`` inheritance) and apply ``key=value`` overrides.

    Args:
        path: the YAML file; None = ``default_config_path()``.
        overrides: OmegaConf-style dotlist, e.g. ``["train.lr=2e-4", "data.train=[a,b]"]``.
            Values are parsed as YAML.

    Raises:
        ConfigError: naming the file (or "command line") and the key.
    """
    path = Path(path) if path is not None else default_config_path()
    data = _load_with_bases(path)
    source = str(path)
    for item in overrides:
        parts, value = _parse_override(item)
        patch: dict[str, Any] = {}
        _set_path(patch, parts, value)
        _check_keys(patch, Config, "", "command line")
        data = _deep_merge(data, patch)
        source = f"{path} (+ command-line overrides)"
    return config_from_dict(data, source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts/lists (JSON/YAML-able; stored in checkpoints)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config_to_yaml(cfg))
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- validation
def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _validate(cfg: Config, source: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: '{key}' {msg}")

    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            fail(key, f"must be one of {list(choices)}, got '{value}'{hint}")

    positive = [
        "model.d_model", "model.nheads", "model.dec_layers", "model.dim_feedforward",
        "model.num_queries", "model.num_feature_levels", "model.enc_n_points",
        "model.dec_n_points", "moe.num_experts", "moe.top_k",
        "train.batch_size", "train.grad_accum", "train.log_every", "train.max_nonfinite",
        "data.max_size", "eval.batch_size", "eval.num_select",
    ]  # fmt: skip
    for key in positive:
        if _get(cfg, key) <= 0:
            fail(key, f"must be > 0, got {_get(cfg, key)}")
    non_negative = [
        "model.enc_layers", "model.dropout", "model.dn.number", "model.dn.label_noise_ratio",
        "model.dn.box_noise_scale", "moe.gate_noise", "moe.dropout", "moe.loss_weight",
        "moe.z_loss_weight", "train.epochs", "train.max_iters", "train.time_budget_min",
        "train.lr_backbone", "train.weight_decay", "train.clip_max_norm", "train.warmup_iters",
        "train.eval_every", "train.checkpoint_every", "data.num_workers", "data.epoch_size",
        "data.test_scale", "eval.max_images", "model.accel.one_to_many_queries",
        "model.accel.dense_head_queries",
    ]  # fmt: skip
    for key in non_negative:
        if _get(cfg, key) < 0:
            fail(key, f"must be >= 0, got {_get(cfg, key)}")
    if cfg.train.lr <= 0:
        fail("train.lr", f"must be > 0, got {cfg.train.lr}")
    if cfg.model.d_model % cfg.model.nheads:
        fail(
            "model.d_model",
            f"({cfg.model.d_model}) must be divisible by model.nheads ({cfg.model.nheads})",
        )
    if not 0.0 <= cfg.moe.drop_path < 1.0:
        fail("moe.drop_path", f"must be in [0, 1), got {cfg.moe.drop_path}")
    if not 0.0 < cfg.train.ema_decay < 1.0:
        fail("train.ema_decay", f"must be in (0, 1), got {cfg.train.ema_decay}")
    if cfg.data.temperature <= 0:
        fail("data.temperature", f"must be > 0, got {cfg.data.temperature}")
    if not cfg.data.scales or min(cfg.data.scales) <= 0:
        fail("data.scales", f"must be a non-empty list of positive sizes, got {cfg.data.scales}")
    if len(cfg.model.decoder_ffn) != cfg.model.dec_layers:
        fail(
            "model.decoder_ffn",
            f"must have one entry per decoder layer "
            f"(model.dec_layers={cfg.model.dec_layers}), got {len(cfg.model.decoder_ffn)}",
        )
    for i, kind in enumerate(cfg.model.decoder_ffn):
        if kind not in ("dense", "moe"):
            fail(f"model.decoder_ffn[{i}]", f"must be 'dense' or 'moe', got '{kind}'")
    if cfg.moe.expert_parallel:
        fail(
            "moe.expert_parallel",
            "is not supported by the trainer yet: damex.moe.parallel provides the rank-local "
            "expert layer, but the detector and checkpoints hold every expert on every rank; "
            "set moe.expert_parallel=false",
        )
    if cfg.moe.top_k > cfg.moe.num_experts:
        fail("moe.top_k", f"({cfg.moe.top_k}) must be <= moe.num_experts ({cfg.moe.num_experts})")
    if not cfg.data.train:
        fail("data.train", "must name at least one training dataset")
    for name, pct in cfg.data.limited.items():
        if not 0.0 < pct <= 100.0:
            fail(f"data.limited.{name}", f"must be a percentage in (0, 100], got {pct}")
    for name, entry in cfg.data.datasets.items():
        for field_name in ("scales",):
            values = getattr(entry, field_name)
            if values is not None and (not values or min(values) <= 0):
                fail(f"data.datasets.{name}.{field_name}", f"must be positive sizes, got {values}")
    _validate_expert_map(cfg, source)


def _known_dataset_names(cfg: Config) -> set[str]:
    names = set(cfg.data.train) | set(cfg.data.test) | set(cfg.data.datasets)
    from damex.data.uodb import UODB_DATASETS

    names |= set(UODB_DATASETS)
    try:  # the synthetic benchmark's names, when that module is available
        from damex.data.synthetic import SYNTHETIC_DATASETS

        names |= set(SYNTHETIC_DATASETS)
    except ImportError:
        pass
    return names


def _validate_expert_map(cfg: Config, source: str) -> None:
    """Every training dataset mapped (by name), every id in [0, E), no unknown names (Q1)."""
    moe = cfg.moe
    known = _known_dataset_names(cfg)
    for name, expert in moe.expert_map.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: 'moe.expert_map' names an unknown dataset '{name}'{hint}"
            )
        if not 0 <= expert < moe.num_experts:
            raise ConfigError(
                f"{source}: 'moe.expert_map.{name}' = {expert} is out of range: expert ids must be "
                f"in [0, moe.num_experts={moe.num_experts})"
            )
    needs_map = cfg.uses_moe and moe.loss == "damex"
    if not needs_map:
        return
    for name in cfg.data.train:
        default = cfg.data.datasets[name].expert if name in cfg.data.datasets else None
        if name not in moe.expert_map and default is None:
            raise ConfigError(
                f"{source}: training dataset '{name}' has no expert: add it to 'moe.expert_map' "
                f"(the DAMEX loss needs an expert for every training dataset)"
            )
        if (
            name not in moe.expert_map
            and default is not None
            and not 0 <= default < moe.num_experts
        ):
            raise ConfigError(
                f"{source}: 'data.datasets.{name}.expert' = {default} is out of range "
                f"[0, {moe.num_experts})"
            )
