"""Typed configuration schema, YAML loading with ``_base_`` inheritance, overrides, validation.

The schema is the frozen dataclasses below; OmegaConf (structured configs) merges the YAML files
into it, applies the command-line ``key=value`` overrides (its dotlist syntax, e.g.
``train.lr=2e-4 moe.num_experts=4``) and rejects unknown keys and wrong types. A YAML file
sets a subset of the fields and may name one or more ``_base_`` files (paths relative to the
file); the files are merged in order (a base before the file naming it). Mappings merge key by
key and lists are replaced; ``_replace_: [moe.expert_map, data.datasets]`` makes the listed
keys of a file replace what its bases set instead of merging with it.

Every closed set of choices is declared once, here, as a ``Literal`` type; other modules import
it (``typing.get_args`` gives the tuple). ``load_config`` returns a read-only ``Config``
(frozen dataclasses: change a copy with ``dataclasses.replace`` or ``with_overrides``) and
raises ``ConfigError`` naming the file (the one that set the key, where known) and the key.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf, read_write
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    GrammarParseError,
    OmegaConfBaseException,
    ValidationError,
)

from damex.errors import ConfigError

__all__ = [
    "Activation",
    "AmpMode",
    "BadSamplePolicy",
    "CapacityGroup",
    "DeviceKind",
    "FFNKind",
    "LabelPolicy",
    "LogitsSource",
    "MoELoss",
    "OutOfBoundsPolicy",
    "RouterKind",
    "RoutingMode",
    "SamplerMode",
    "Schedule",
    "TokenSelection",
    "choices",
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
    "ConfigError",
    "load_config",
    "config_from_dict",
    "with_overrides",
    "config_to_yaml",
    "save_config",
    "default_config_path",
    "config_to_dict",
]

# ----------------------------------------------------------------------------------- choices
# The one declaration of every closed set of string options (see ``choices``).
LabelPolicy = Literal["disjoint", "merged"]
SamplerMode = Literal["proportional", "uniform", "temperature", "repeat_factor"]
OutOfBoundsPolicy = Literal["clip", "error"]  # a box partly outside its image
BadSamplePolicy = Literal["error", "skip"]  # an unreadable image or annotation
FFNKind = Literal["dense", "moe"]  # a decoder layer's FFN
CapacityGroup = Literal["image", "batch"]  # tokens sharing an expert's capacity
RouterKind = Literal["linear", "cosine"]
# token_choice: every token takes its top-k experts; expert_choice: every expert takes its
# top-C tokens (Zhou et al., NeurIPS 2022; balanced by construction)
RoutingMode = Literal["token_choice", "expert_choice"]
Activation = Literal["gelu", "relu"]
MoELoss = Literal["damex", "load_importance", "load_importance_corrected", "switch", "none"]
TokenSelection = Literal["all", "matching_only", "foreground", "exclude_dn"]  # decoder tokens
LogitsSource = Literal["clean", "noisy"]  # router logits before / after the training noise
VOCMetric = Literal["area", "11point"]  # VOC AP: all-point (VOC2010+) | 11-point (VOC07)
LabelMask = Literal["none", "router"]  # eval: all labels | the router's voted dataset(s)' labels
MoENorm = Literal["pre", "post"]  # MoE sub-block: x + MoE(LN(x)) (DAMEX) | LN(x + MoE(x)) (dense)
ExpertInit = Literal["independent", "identical", "zero_out"]  # own init | copies of one | fc2 = 0
MoELossSchedule = Literal["constant", "ramp", "decay"]  # MoE loss weight over training
Schedule = Literal["step", "multistep", "cosine", "time_cosine"]
AmpMode = Literal["none", "bf16", "fp16"]
DeviceKind = Literal["auto", "cpu", "cuda"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a choice type, e.g. ``choices(SamplerMode) == ("proportional", ...)``."""
    return typing.get_args(literal)


# ----------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SyntheticConfig:
    """The built-in multi-domain benchmark (``damex.data.synthetic``)."""

    root: str = "data/synthetic"  # where it is generated (once) if missing
    seed: int = 0
    image_size: int = 256  # longest side in pixels
    scale: float = 1.0  # multiplies every dataset's image counts


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"
    train: list[str] = field(default_factory=list)  # ordered dataset names for training
    test: list[str] = field(default_factory=list)  # evaluation datasets (default: train)
    train_split: str = "train"
    test_split: str = "test"
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    label_policy: LabelPolicy = "disjoint"
    # sampling over datasets (docs/design.md §4.4)
    sampler: SamplerMode = "proportional"
    temperature: float = 2.0
    repeat_threshold: float = 0.001
    homogeneous_batches: bool = False
    epoch_size: int = 0  # samples per epoch; 0 = sum of training set sizes
    # dataset -> percent of its training images kept (docs/design.md §4.7)
    limited: dict[str, float] = field(default_factory=dict)
    # augmentation (docs/design.md §4.5)
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    test_scale: int = 0  # 0 = max(scales)
    crop: bool = True  # DETR's resize -> random crop -> resize branch
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    hflip: bool = True
    per_dataset_scales: bool = False  # official joint training ignores them (docs/design.md Q7)
    # bad input
    out_of_bounds: OutOfBoundsPolicy = "clip"
    on_bad_sample: BadSamplePolicy = "error"
    num_workers: int = 2


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | timm:<name>
    weights: str | None = None  # local file; never downloaded
    frozen_stages: int = 1  # stem + layer1 frozen (DINO)
    frozen_bn: bool = True
    return_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    # NHWC convolutions (torchvision ResNets): a 1.06x (default job) / 1.12x (R50-4scale,
    # 512 px) faster training step on CPU, same values (README, Benchmarks)
    channels_last: bool = True


@dataclass(frozen=True)
class DNConfig:
    enabled: bool = True
    number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0  # DAMEX config value; DINO uses 0.4


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class AcceleratorConfig:
    """Training-only convergence accelerators (zero inference cost)."""

    one_to_many: bool = False  # H-DETR hybrid matching branch
    one_to_many_queries: int = 300
    one_to_many_k: int = 6
    one_to_many_weight: float = 1.0
    dense_head: bool = False  # Co-DETR style auxiliary dense (ATSS/FCOS-type) head
    dense_head_weight: float = 1.0


@dataclass(frozen=True)
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
    decoder_ffn: list[FFNKind] = field(default_factory=lambda: ["dense"] * 6)  # one per layer
    dn: DNConfig = field(default_factory=DNConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    accel: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.25  # 0 = no drop; < 0 = dynamic capped at |cf|
    capacity_group: CapacityGroup = "image"
    gate_noise: float = 1.0
    router: RouterKind = "linear"
    routing: RoutingMode = "token_choice"  # expert_choice: C = |cf or 1| * k * T_group / E
    activation: Activation = "gelu"
    dropout: float = 0.0
    drop_path: float = 0.2
    fc2_bias: bool = True
    normalize_gate: bool = False
    # losses
    loss: MoELoss = "damex"
    loss_weight: float = 0.1
    damex_tokens: TokenSelection = "all"
    damex_logits: LogitsSource = "clean"
    balance_tokens: TokenSelection = "foreground"
    z_loss_weight: float = 0.0
    # dataset name -> expert id, or "auto" (computed from the data before training). Typed Any
    # because OmegaConf cannot type a union of a mapping and a string; _validate checks it.
    expert_map: Any = field(default_factory=dict)
    # under torchrun: E/W experts per rank (needs E % W == 0, checked by build_model)
    expert_parallel: bool = False
    # recipe options (README "Making the mixture pay")
    norm: MoENorm = "pre"
    shared_expert: bool = False  # DeepSeekMoE: a shared FFN for every token, added to the routed
    unit_gate: bool = False  # top-1 combine weight 1 (straight-through gradient to the router)
    expert_init: ExpertInit = "independent"
    # the router reads a detached copy of the tokens: the routing losses (DAMEX, balance) and the
    # gates train the router only, never the features it reads
    router_detach: bool = False
    # the router also reads the mean of the image's matching-query tokens (an image-level
    # context, no dataset id): logits = W [x ; mean_image(x)]
    router_context: bool = False
    # set by `damex extend`: experts 0..base_experts-1 predate the added ones; their gates ignore
    # the added experts, so tokens routed to them get the pre-extension output (0 = off)
    base_experts: int = 0
    loss_schedule: MoELossSchedule = "constant"
    loss_ramp_frac: float = 0.25  # ramp: fraction of training to reach loss_weight
    loss_weight_final: float = 0.1  # decay: the weight at the end of training
    upcycle_from: str = ""  # a dense run's checkpoint: experts start as its FFNs (fresh runs)
    upcycle_noise: float = 0.0  # std of the noise on upcycled experts, relative to the weights'


@dataclass(frozen=True)
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
    grad_checkpoint: bool = False  # recompute encoder layers in backward: less memory, more time
    schedule: Schedule = "step"
    lr_drop: int = 11  # step: decay every lr_drop epochs (official; docs/design.md Q8)
    milestones: list[int] = field(default_factory=lambda: [33])
    gamma: float = 0.1
    warmup_iters: int = 0
    min_lr_ratio: float = 0.0  # cosine / time_cosine: the lr floor, a fraction of the base lr
    amp: AmpMode = "none"
    ema: bool = False
    ema_decay: float = 0.9997
    grad_accum: int = 1
    seed: int = 42
    eval_every: int = 4  # epochs; 0 = only at the end
    checkpoint_every: int = 4  # epochs; 0 = only last/best
    log_every: int = 10  # iterations
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    device: DeviceKind = "auto"


@dataclass(frozen=True)
class EvalConfig:
    datasets: list[str] = field(default_factory=list)  # default: data.test or data.train
    batch_size: int = 1
    num_select: int = 300
    restrict_to_dataset_labels: bool = False  # oracle: uses the dataset id; reported separately
    max_images: int = 0  # > 0 caps images per dataset (quick checks)
    routing_tokens: TokenSelection = "matching_only"  # for routing statistics / heatmaps
    report_images: int = 4  # per-dataset overlays in the routing report
    voc_metric: VOCMetric = "area"  # the VOC AP50 column: all-point ("area") or VOC07 "11point"
    # "router": each image keeps only the labels of the dataset(s) its MoE router votes for (no
    # dataset id; damex.modeling.postprocess.router_label_mask); needs MoE layers and a map
    label_mask: LabelMask = "none"


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
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


_REPO_ROOT = Path(__file__).resolve().parents[1]
_REPLACE_KEY = "_replace_"
_BASE_KEY = "_base_"
_COMMAND_LINE = "command line"


def default_config_path() -> Path:
    """The config ``tools/train.py`` runs with no arguments: DAMEX on the built-in benchmark."""
    return _REPO_ROOT / "configs" / "synthetic" / "damex_small.yaml"


# ----------------------------------------------------------------------------- schema lookup
def _type_at(key: str) -> Any | None:
    """The schema type at a dotted key (``data.datasets.x.splits``, ``model.decoder_ffn[1]``)."""
    tp: Any = Config
    for part in key.replace("[", ".[").split("."):
        if not part:
            continue
        origin = typing.get_origin(tp)
        if part.startswith("[") and origin is list:
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        else:
            return None
    return tp


def _keys_under(prefix: str) -> list[str]:
    """The valid dotted keys one level below ``prefix`` ('' = the top level)."""
    tp = _type_at(prefix) if prefix else Config
    if not is_dataclass(tp):
        return []
    return [f"{prefix}.{f.name}" if prefix else f.name for f in fields(tp)]


def _unknown_key(key: str, source: str) -> ConfigError:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    while parent and _type_at(parent) is None:  # the first known ancestor
        parent = parent.rsplit(".", 1)[0] if "." in parent else ""
    valid = _keys_under(parent)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def _choice_error(key: str, options: Sequence[str], value: Any, source: str) -> ConfigError:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: '{key}' must be one of {list(options)}, got '{value}'{hint}")


def _omegaconf_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """OmegaConf's error as one line naming the file and the key (with a suggestion)."""
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and " not in " in msg:
        return _unknown_key(key, source)
    tp = _type_at(key)
    if isinstance(exc, ValidationError) and typing.get_origin(tp) is Literal:
        return _choice_error(key, typing.get_args(tp), getattr(exc, "value", "?"), source)
    return ConfigError(f"{source}: invalid value for '{key}': {msg}")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    """``base`` with ``layer`` merged in; OmegaConf checks the keys and types."""
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, source) from None
    assert isinstance(merged, DictConfig)
    return merged


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of the values a layer sets (mappings are walked, lists are leaves)."""
    out = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _leaf_keys(value, f"{full}.")
        else:
            out.append(full)
    return out


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


def _str_list(value: Any, what: str, path: Path | str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(b, str) for b in items):
        raise ConfigError(f"{path}: {what} must be a key or a list of keys, got {value!r}")
    return items


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The files of a config in merge order (each ``_base_`` before the file naming it)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"_base_ cycle: {cycle}")
    data = _read_yaml(path)
    layers: list[tuple[Path, dict[str, Any]]] = []
    for base in _str_list(data.pop(_BASE_KEY, []), "_base_", path):
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        if not base_path.exists():
            raise ConfigError(f"{path}: _base_ file not found: {base_path}")
        layers += _file_layers(base_path, (*chain, path))
    layers.append((path, data))
    return layers


def _has_key(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _clear(merged: DictConfig, key: str, source: str) -> None:
    """Empty ``key`` (a mapping or list) in ``merged`` so that the next layer replaces it."""
    tp = _type_at(key)
    empty: Any = [] if typing.get_origin(tp) is list else {}
    if typing.get_origin(tp) not in (list, dict) and tp is not Any:
        raise ConfigError(
            f"{source}: {_REPLACE_KEY} names '{key}', a single value (always replaced); "
            "list only mappings and lists"
        )
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key) if parent_key else merged
    with read_write(parent):  # frozen dataclasses make every node read-only
        parent[leaf] = empty


def _apply_layer(
    merged: DictConfig, data: dict[str, Any], source: str, origin: dict[str, str]
) -> DictConfig:
    """Merge one file's (or the command line's) values; record which keys it set."""
    merged = _merge(merged, data, source)
    for key in _leaf_keys(data):
        origin[key] = source
    return merged


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"{_COMMAND_LINE}: override '{item}' must look like key=value")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{_COMMAND_LINE}: override '{item}' has an empty key")
    try:
        dotlist = OmegaConf.from_dotlist([item.strip() for item in overrides])
    except GrammarParseError as exc:
        raise ConfigError(f"{_COMMAND_LINE}: cannot parse an override value: {exc}") from None
    container = OmegaConf.to_container(dotlist)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Load a YAML config (with ``_base_`` inheritance) and apply ``key=value`` overrides.

    Args:
        path: the YAML file; None = ``default_config_path()``.
        overrides: OmegaConf dotlist, e.g. ``["train.lr=2e-4", "data.train=[a,b]"]``.

    Raises:
        ConfigError: naming the file (or "command line") and the key.
    """
    path = Path(path) if path is not None else default_config_path()
    origin: dict[str, str] = {}  # dotted key -> the file (or command line) that set it
    layers: list[tuple[str, dict[str, Any]]] = [(str(f), d) for f, d in _file_layers(path)]
    source = str(path)
    if overrides:
        layers.append((_COMMAND_LINE, _parse_overrides(overrides)))
        source = f"{path} (+ command-line overrides)"
    merged = _apply_layers(OmegaConf.structured(Config), layers, origin)
    return _to_config(merged, source, origin)


def _apply_layers(
    merged: DictConfig, layers: Sequence[tuple[str, dict[str, Any]]], origin: dict[str, str]
) -> DictConfig:
    """Merge the layers in order, emptying each layer's ``_replace_`` keys first."""
    for layer_source, data in layers:
        replace_keys = _str_list(data.pop(_REPLACE_KEY, []), _REPLACE_KEY, layer_source)
        for key in replace_keys:
            if _type_at(key) is None:
                raise _unknown_key(key, f"{layer_source}: {_REPLACE_KEY}")
            if not _has_key(data, key):
                raise ConfigError(
                    f"{layer_source}: {_REPLACE_KEY} names '{key}', which is not set there"
                )
            _clear(merged, key, layer_source)
            origin = {k: v for k, v in origin.items() if not k.startswith(f"{key}.")}
        merged = _apply_layer(merged, data, layer_source, origin)
    return merged


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain nested dict against the schema and return a ``Config``."""
    merged = _merge(OmegaConf.structured(Config), dict(data), source)
    return _to_config(merged, source, {})


def with_overrides(cfg: Config, overrides: Sequence[str], source: str = _COMMAND_LINE) -> Config:
    """A copy of ``cfg`` with ``key=value`` overrides applied and validated again."""
    origin: dict[str, str] = {}
    layers = [(source, _parse_overrides(overrides))]
    return _to_config(_apply_layers(OmegaConf.structured(cfg), layers, origin), source, origin)


def _to_config(merged: DictConfig, source: str, origin: dict[str, str]) -> Config:
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _omegaconf_error(exc, source) from None
    assert isinstance(cfg, Config)
    _validate(cfg, source, origin)
    return cfg


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
# Types and choices are checked by OmegaConf against the schema; these are the value ranges and
# the rules that relate fields.
_POSITIVE = (
    "model.d_model", "model.nheads", "model.dec_layers", "model.dim_feedforward",
    "model.num_queries", "model.num_feature_levels", "model.enc_n_points",
    "model.dec_n_points", "moe.num_experts", "moe.top_k",
    "train.batch_size", "train.grad_accum", "train.log_every", "train.max_nonfinite",
    "train.lr", "data.max_size", "data.temperature", "eval.batch_size", "eval.num_select",
)  # fmt: skip
_NON_NEGATIVE = (
    "model.enc_layers", "model.dropout", "model.dn.number", "model.dn.label_noise_ratio",
    "model.dn.box_noise_scale", "moe.gate_noise", "moe.dropout", "moe.loss_weight",
    "moe.z_loss_weight", "train.epochs", "train.max_iters", "train.time_budget_min",
    "train.lr_backbone", "train.weight_decay", "train.clip_max_norm", "train.warmup_iters",
    "train.eval_every", "train.checkpoint_every", "data.num_workers", "data.epoch_size",
    "data.test_scale", "eval.max_images", "model.accel.one_to_many_queries",
    "moe.loss_weight_final", "moe.upcycle_noise",
)  # fmt: skip


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _validate(cfg: Config, source: str, origin: Mapping[str, str]) -> None:
    """Ranges and cross-field rules; the error names the file that set the key, where known."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{origin.get(key, source)}: '{key}' {msg}")

    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            fail(key, f"must be > 0, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            fail(key, f"must be >= 0, got {_get(cfg, key)}")
    if cfg.model.d_model % cfg.model.nheads:
        fail(
            "model.d_model",
            f"({cfg.model.d_model}) must be divisible by model.nheads ({cfg.model.nheads})",
        )
    if not 0.0 <= cfg.moe.drop_path < 1.0:
        fail("moe.drop_path", f"must be in [0, 1), got {cfg.moe.drop_path}")
    if not 0.0 < cfg.moe.loss_ramp_frac <= 1.0:
        fail("moe.loss_ramp_frac", f"must be in (0, 1], got {cfg.moe.loss_ramp_frac}")
    if cfg.moe.unit_gate and cfg.moe.top_k != 1:
        fail("moe.unit_gate", f"needs moe.top_k = 1, got {cfg.moe.top_k}")
    if cfg.eval.label_mask == "router" and not cfg.uses_moe:
        fail("eval.label_mask", "= router needs MoE layers (model.decoder_ffn has no 'moe')")
    if not 0 <= cfg.moe.base_experts < max(cfg.moe.num_experts, 1):
        fail(
            "moe.base_experts",
            f"must be in [0, moe.num_experts={cfg.moe.num_experts}), got {cfg.moe.base_experts}",
        )
    if not 0.0 < cfg.train.ema_decay < 1.0:
        fail("train.ema_decay", f"must be in (0, 1), got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        fail("train.min_lr_ratio", f"must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if not cfg.data.scales or min(cfg.data.scales) <= 0:
        fail("data.scales", f"must be a non-empty list of positive sizes, got {cfg.data.scales}")
    if len(cfg.model.decoder_ffn) != cfg.model.dec_layers:
        fail(
            "model.decoder_ffn",
            f"must have one entry per decoder layer "
            f"(model.dec_layers={cfg.model.dec_layers}), got {len(cfg.model.decoder_ffn)}",
        )
    if cfg.moe.expert_parallel and cfg.train.amp == "fp16":
        fail(
            "train.amp",
            "fp16 does not work with moe.expert_parallel=true: the GradScaler skips a step on the "
            "ranks whose own experts overflowed only, and the ranks would diverge; use bf16",
        )
    if cfg.moe.top_k > cfg.moe.num_experts:
        fail("moe.top_k", f"({cfg.moe.top_k}) must be <= moe.num_experts ({cfg.moe.num_experts})")
    if not cfg.data.train:
        fail("data.train", "must name at least one training dataset")
    names = list(cfg.data.train)
    for name, pct in cfg.data.limited.items():
        if name not in names:
            fail(f"data.limited.{name}", f"is not a training dataset (data.train: {names})")
        if not 0.0 < pct <= 100.0:
            fail(f"data.limited.{name}", f"must be a percentage in (0, 100], got {pct}")
    for name, entry in cfg.data.datasets.items():
        if entry.scales is not None and (not entry.scales or min(entry.scales) <= 0):
            fail(f"data.datasets.{name}.scales", f"must be positive sizes, got {entry.scales}")
        if entry.num_slots is not None and entry.num_slots < 1:
            fail(f"data.datasets.{name}.num_slots", f"must be >= 1, got {entry.num_slots}")
        expert = entry.expert
        if expert is not None and not 0 <= expert < cfg.moe.num_experts:
            fail(
                f"data.datasets.{name}.expert",
                f"= {expert} is out of range [0, moe.num_experts={cfg.moe.num_experts})",
            )
    _validate_expert_map(cfg, source, origin)


def _validate_expert_map(cfg: Config, source: str, origin: Mapping[str, str]) -> None:
    """Names only datasets of the run, ids in [0, E), every training dataset mapped (Q1)."""
    moe = cfg.moe

    def fail(key: str, msg: str) -> None:
        where = origin.get(key) or origin.get("moe.expert_map") or source
        raise ConfigError(f"{where}: {msg}")

    if isinstance(moe.expert_map, str):
        if moe.expert_map != "auto":
            fail(
                "moe.expert_map",
                f"'moe.expert_map' must be a mapping dataset -> expert id or 'auto', "
                f"got '{moe.expert_map}'",
            )
        return
    if not isinstance(moe.expert_map, Mapping):
        fail(
            "moe.expert_map",
            f"'moe.expert_map' must be a mapping dataset -> expert id or 'auto', "
            f"got {moe.expert_map!r}",
        )
    run = list(dict.fromkeys([*cfg.data.train, *cfg.eval_datasets]))
    for name, expert in moe.expert_map.items():
        key = f"moe.expert_map.{name}"
        if name not in run:
            close = difflib.get_close_matches(str(name), run, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            fail(
                key,
                f"'{key}': dataset '{name}' is neither trained nor evaluated{hint} (datasets "
                f"of this run: {run}); remove it, or list 'moe.expert_map' in "
                f"{_REPLACE_KEY} to replace an inherited map",
            )
        if isinstance(expert, bool) or not isinstance(expert, int):
            fail(key, f"'{key}' must be an expert id (an int), got {expert!r}")
        if not 0 <= expert < moe.num_experts:
            fail(
                key,
                f"'{key}' = {expert} is out of range: expert ids must be in "
                f"[0, moe.num_experts={moe.num_experts})",
            )
    if not (cfg.uses_moe and moe.loss == "damex"):
        return
    for name in cfg.data.train:
        entry = cfg.data.datasets.get(name)
        if name not in moe.expert_map and (entry is None or entry.expert is None):
            raise ConfigError(
                f"{source}: training dataset '{name}' has no expert: add it to 'moe.expert_map' "
                f"(the DAMEX loss needs an expert for every training dataset)"
            )
