"""Typed configuration schema, YAML loading with ``_base_`` inheritance, overrides, validation.

The schema is the dataclasses below; YAML files under ``configs/`` set a subset of the fields
and may name one or more ``_base_`` files (paths relative to the file). Command-line
``key=value`` overrides (OmegaConf dotlist syntax, e.g. ``train.lr=2e-4 moe.num_experts=4``)
are applied last. ``load_config`` returns an immutable ``Config`` and raises ``ConfigError``
naming the file and key for any unknown key (with the closest valid one), wrong type,
out-of-range value or inconsistent dataset -> expert map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    val_split: str = "val"
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
    num_select: int = 300
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
