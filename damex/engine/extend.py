"""Add a dataset to a trained model: ``damex extend -c NEW_CONFIG --checkpoint RUN/best.pth``.

The new config names the old run's datasets plus the new one(s) (``data.test``), trains on
``data.train`` (the new datasets), and maps every dataset to an expert with
``moe.num_experts`` one larger than the old model's. :func:`grow_state_dict` turns the old
weights into the new model's:

* every MoE layer gets one more expert, initialised from the expert the new data is routed to
  most by the old model (``init="routed"``: top-1 choices of the matching queries on up to 32
  training images of the new data, per layer) or from the mean of the old experts
  (``init="mean"``); the router gets one more row (the source expert's row, or the mean row);
* the label space keeps the old slots and appends the new datasets' blocks; the class heads
  (decoder, dense head) get rows for the new slots (fresh init), the denoising label table
  keeps its rows (its spare last row moves to the end); the encoder's proposal class head gets
  rows that never win the two-stage query selection (weight 0, bias -1e4, frozen), because
  that selection ranks locations by their best class score and new classes would otherwise
  change which queries an old image gets (``train="all"`` trains fresh rows instead);
* ``moe.base_experts`` is set to the old expert count: a token routed to an old expert gets
  its gate from the old experts' softmax only, so it is computed exactly as before.

Training (``train="new"``, the default) updates only what is new — the added expert, the
router's new row and the new label slots; everything else is frozen (``requires_grad=False``,
BatchNorm statistics frozen, and the old rows of the grown tensors restored after every step,
so they stay bit-identical; AdamW's weight decay would otherwise move them).
``train="decoder"`` also trains the decoder (and its heads); ``train="all"`` fine-tunes the
whole model (the "plain fine-tuning" baseline). ``replay=P`` adds ``P`` percent of each old
dataset's training images (``data.limited``) to the training data.

Consequence, tested in ``tests/engine/test_extend.py``: with ``train="new"``, an old dataset's
image whose queries never choose the new expert gets exactly the old model's boxes and scores
for the old labels.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from damex.config import Config, config_from_dict, config_to_dict
from damex.data.label_space import LabelSpace, build_label_space
from damex.engine import checkpoint as ckpt
from damex.engine.hooks import HookBase
from damex.engine.run_data import RunData, build_expert_map, build_model_parts, build_run_data
from damex.engine.trainer import Trainer, TrainResult
from damex.errors import CheckpointError, ConfigError
from damex.evaluation.routing import routing_markdown, routing_summary
from damex.predictor import Predictor, moe_layer_names

__all__ = [
    "EXTEND_INITS",
    "EXTEND_TRAIN",
    "ExtendOptions",
    "ExtendPlan",
    "extend",
    "extended_label_space",
    "grow_state_dict",
]

logger = logging.getLogger(__name__)

EXTEND_INITS = ("routed", "mean")
EXTEND_TRAIN = ("new", "decoder", "all")
_ROUTING_IMAGES = 32
_PROPOSAL_HEAD = "transformer.enc_class_head."
_NEVER = -1.0e4  # logit of a class that never wins the two-stage query selection


@dataclass(frozen=True)
class ExtendOptions:
    """How to grow and train.

    Attributes:
        init: ``"routed"`` or ``"mean"`` (the new expert's initial weights).
        train: ``"new"`` (only new parameters), ``"decoder"`` (+ the decoder and its heads) or
            ``"all"`` (plain fine-tuning of the whole model).
        replay: percent (0-100] of every old dataset's training images added to the training
            data; 0 = new data only.
    """

    init: str = "routed"
    train: str = "new"
    replay: float = 0.0

    def __post_init__(self) -> None:
        if self.init not in EXTEND_INITS:
            raise ConfigError(f"extend --init must be one of {EXTEND_INITS}, got {self.init!r}")
        if self.train not in EXTEND_TRAIN:
            raise ConfigError(f"extend --train must be one of {EXTEND_TRAIN}, got {self.train!r}")
        if not 0.0 <= self.replay <= 100.0:
            raise ConfigError(f"extend --replay must be a percent in [0, 100], got {self.replay}")


@dataclass
class ExtendPlan:
    """What :func:`grow_state_dict` did.

    Attributes:
        old_experts: ``E`` before; the new expert has id ``E``.
        old_classes: ``K`` before; the new slots are ``K..K'-1``.
        source_expert: per MoE layer name, the old expert the new one was copied from (-1: mean).
        frozen_rows: parameter name -> number of leading rows (dim 0) that stay frozen in a
            grown tensor.
        new_keys: parameters that did not exist before (the new experts).
    """

    old_experts: int
    old_classes: int
    source_expert: dict[str, int]
    frozen_rows: dict[str, int]
    new_keys: list[str]


def extended_label_space(old: LabelSpace, catalog: Any, new_names: Sequence[str]) -> LabelSpace:
    """The old label space with the blocks of ``new_names`` appended (old slots keep their ids).

    Raises:
        ConfigError: a new dataset is already in the old label space.
        CheckpointError: an old slot would change (cannot happen for ``disjoint``).
    """
    clash = [n for n in new_names if n in old.dataset_names]
    if clash:
        raise ConfigError(f"extend: dataset(s) {clash} are already in the model's label space")
    added = build_label_space(catalog, list(new_names), policy=old.policy).state_dict()
    entries = []
    for d in [*old.state_dict()["datasets"], *added["datasets"]]:
        entries.append((d["name"], d["categories"], d["num_slots"], d["classes"]))
    grown = LabelSpace.build(entries, policy=old.policy, share=old.share_groups)
    for slot in range(old.num_classes):
        if grown.names[slot] != old.names[slot] or grown.to_native(slot) != old.to_native(slot):
            raise CheckpointError(
                f"extend: label slot {slot} would change from {old.names[slot]!r} to "
                f"{grown.names[slot]!r}"
            )
    return grown


def _moe_prefixes(state: Mapping[str, Tensor]) -> list[str]:
    """``...moe.`` prefixes of the MoE layers (keys ``<prefix>router.weight``)."""
    return sorted(k[: -len("router.weight")] for k in state if k.endswith("moe.router.weight"))


def _grown_tensor(
    key: str, w: Tensor, fresh: Tensor, src_map: Mapping[str, int], *, keep_proposals: bool
) -> tuple[Tensor, int]:
    """The old ``w`` grown along dim 0 to ``fresh``'s shape, and its count of frozen rows.

    The new rows keep ``fresh``'s init, except the proposal head's (``keep_proposals``) and a
    router's (the source expert's row, or the mean row).
    """
    if w.dim() != fresh.dim() or any(a > b for a, b in zip(w.shape, fresh.shape)):
        raise CheckpointError(
            f"extend: cannot grow {key} from {tuple(w.shape)} to {tuple(fresh.shape)}"
        )
    if tuple(w.shape[1:]) != tuple(fresh.shape[1:]):
        raise CheckpointError(
            f"extend: {key} changes beyond its first dimension: {tuple(w.shape)} -> "
            f"{tuple(fresh.shape)}"
        )
    grown = fresh.clone()
    rows = w.shape[0]
    if key.endswith("label_embed.weight"):  # [K + 1, D]: the spare row moves to the end
        grown[: rows - 1] = w[: rows - 1]
        grown[-1] = w[-1]
        frozen = rows - 1
    else:
        grown[:rows] = w
        frozen = rows
    if keep_proposals and key.startswith(_PROPOSAL_HEAD):
        grown[rows:] = _NEVER if key.endswith("bias") else 0.0
        frozen = grown.shape[0]
    if key.endswith("moe.router.weight"):
        prefix = key[: -len("router.weight")]
        src = src_map.get(prefix, -1)
        grown[rows:] = w[src] if src >= 0 else w.mean(0)
    return grown, frozen


def _new_expert_tensor(
    key: str,
    old: Mapping[str, Tensor],
    prefixes: Sequence[str],
    old_experts: int,
    src_map: Mapping[str, int],
) -> Tensor:
    """A parameter of the new expert (``<prefix>experts.ffn.<E>.<...>``): its source's or the
    mean of the old experts'."""
    prefix = next((p for p in prefixes if key.startswith(f"{p}experts.ffn.{old_experts}.")), None)
    if prefix is None:
        raise CheckpointError(f"extend: {key} is new but is not part of a new expert")
    tail = key[len(f"{prefix}experts.ffn.{old_experts}.") :]
    src = src_map[prefix]
    if src >= 0:
        return old[f"{prefix}experts.ffn.{src}.{tail}"].clone()
    stack = torch.stack([old[f"{prefix}experts.ffn.{e}.{tail}"] for e in range(old_experts)])
    return stack.mean(0)


def grow_state_dict(
    old: Mapping[str, Tensor],
    new_model: nn.Module,
    *,
    old_experts: int,
    old_classes: int,
    source_expert: Mapping[str, int] | None = None,
    keep_proposals: bool = True,
) -> tuple[dict[str, Tensor], ExtendPlan]:
    """The old weights in the shapes of ``new_model`` (one more expert, more classes).

    Args:
        old: the old model's state dict.
        new_model: the grown model (freshly initialised; its init fills the new class rows).
        old_experts: ``E`` of the old model.
        old_classes: ``K`` of the old model.
        source_expert: MoE prefix (``...moe.``) -> old expert to copy into the new one; a prefix
            missing (or -1) gets the mean of the old experts.
        keep_proposals: the two-stage selection ranks encoder locations by their best class
            score, so new classes would change which queries an old image gets. True: the new
            rows of the encoder's class head get weight 0 and bias ``-1e4`` and stay frozen
            (the old classes' scores keep choosing the queries, for new images too).

    Raises:
        CheckpointError: a tensor that cannot be grown (a dimension shrinks, or differs in a way
            other than the expert or class count).
    """
    new_state = new_model.state_dict()
    out: dict[str, Tensor] = {}
    frozen_rows: dict[str, int] = {}
    new_keys: list[str] = []
    extra_old = sorted(set(old) - set(new_state))
    if extra_old:
        raise CheckpointError(f"extend: the new model has no {extra_old[:5]} (config mismatch?)")
    prefixes = _moe_prefixes(old)
    src_map = {p: int((source_expert or {}).get(p, -1)) for p in prefixes}
    for key, fresh in new_state.items():
        if key not in old:
            out[key] = _new_expert_tensor(key, old, prefixes, old_experts, src_map)
            new_keys.append(key)
        elif old[key].shape == fresh.shape:
            out[key] = old[key].clone()
        else:
            out[key], frozen_rows[key] = _grown_tensor(
                key, old[key], fresh, src_map, keep_proposals=keep_proposals
            )
    plan = ExtendPlan(
        old_experts=old_experts,
        old_classes=old_classes,
        source_expert={p.rstrip("."): s for p, s in src_map.items()},
        frozen_rows=frozen_rows,
        new_keys=new_keys,
    )
    return out, plan


def _trainable(name: str, rows: int, plan: ExtendPlan, mode: str) -> bool:
    if mode == "all":
        return True
    if name in plan.frozen_rows:
        return plan.frozen_rows[name] < rows
    if name in plan.new_keys:
        return True
    return mode == "decoder" and name.startswith("transformer.decoder.")


class _FrozenParts(HookBase):
    """Keeps the frozen parts frozen: BatchNorm statistics (eval mode before every step) and the
    old rows of grown tensors (restored after every optimizer step, bit for bit)."""

    def __init__(self, rows: dict[str, tuple[Tensor, Tensor]], frozen_bn: list[nn.Module]):
        self.rows = rows  # name -> (parameter, saved old rows)
        self.frozen_bn = frozen_bn

    def before_step(self) -> None:
        for m in self.frozen_bn:
            m.eval()

    @torch.no_grad()
    def after_step(self) -> None:
        for param, saved in self.rows.values():
            param[: saved.shape[0]] = saved


class ExtendTrainer(Trainer):
    """The trainer with the grown model, the extended label space and the frozen parts."""

    def __init__(
        self,
        cfg: Config,
        base: Mapping[str, Any],
        base_path: Path,
        options: ExtendOptions,
    ) -> None:
        super().__init__(cfg, None)
        self.base = base
        self.base_path = base_path
        self.options = options
        self.plan: ExtendPlan | None = None

    def build_run_data(self, label_space_state: dict[str, Any] | None) -> RunData:
        """The old label space with the new datasets' blocks appended (not one built from the
        config's dataset order, which would move the old slots)."""
        cfg = self.cfg
        plain = build_run_data(cfg, label_space_state=None)  # catalog, synthetic data
        old = LabelSpace.from_state_dict(self.base["label_space"])
        new_names = [n for n in plain.label_space.dataset_names if n not in old.dataset_names]
        if not new_names:
            raise ConfigError(
                f"extend: the config adds no dataset to the model's {old.dataset_names}; "
                "name the new dataset in data.train / data.test"
            )
        ls = extended_label_space(old, plain.catalog, new_names)
        emap = build_expert_map(cfg, plain.catalog, ls.dataset_names)
        table = torch.tensor([emap[n] for n in ls.dataset_names], dtype=torch.int64)
        logger.info("extend: %s + %s -> %d classes", old.dataset_names, new_names, ls.num_classes)
        return RunData(plain.catalog, ls, emap, table)

    def build_model(self) -> tuple[nn.Module, nn.Module, Any]:
        model, criterion, postprocess = build_model_parts(
            self.cfg, self.data.label_space.num_classes
        )
        old_cfg = self.base["config"]
        old_experts = int(old_cfg["moe"]["num_experts"])
        old_classes = LabelSpace.from_state_dict(self.base["label_space"]).num_classes
        weights = self.base["model"]
        if self.base.get("ema"):
            weights = self.base["ema"]["module"]
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
        sources: dict[str, int] = {}
        if self.options.init == "routed":
            sources = self._routed_sources(weights)
        state, plan = grow_state_dict(
            weights,
            model,
            old_experts=old_experts,
            old_classes=old_classes,
            source_expert=sources,
            keep_proposals=self.options.train != "all",
        )
        ckpt.load_model_state(model, state, path=self.base_path)
        self.plan = plan
        logger.info(
            "extend: expert %d added (init %s: %s); %d new classes",
            old_experts,
            self.options.init,
            plan.source_expert,
            self.data.label_space.num_classes - old_classes,
        )
        self._rows: dict[str, tuple[Tensor, Tensor]] = {}
        self._frozen_bn: list[nn.Module] = []
        mode = self.options.train
        for name, p in model.named_parameters():
            p.requires_grad_(_trainable(name, p.shape[0], plan, mode))
            if p.requires_grad and mode != "all" and name in plan.frozen_rows:
                self._rows[name] = (p, p.detach()[: plan.frozen_rows[name]].clone())
        if mode != "all":
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (
                    mode == "decoder" and name.startswith("transformer.decoder.")
                ):
                    self._frozen_bn.append(m)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "extend: training %s (%.3fM of %.2fM parameters)",
            mode,
            n_train / 1e6,
            sum(p.numel() for p in model.parameters()) / 1e6,
        )
        model.to(self.device)
        criterion.to(self.device)
        self._rows = {k: (p, s.to(self.device)) for k, (p, s) in self._rows.items()}
        return model, criterion, postprocess

    def _routed_sources(self, weights: Mapping[str, Tensor]) -> dict[str, int]:
        """Per MoE layer, the old expert most matching queries of the new data choose."""
        old_cfg = config_from_dict(self.base["config"], source=f"{self.base_path} (saved config)")
        predictor = Predictor.from_checkpoint(self.base_path, config=old_cfg, device=self.device)
        images = self._new_images()
        counts = predictor.routing_counts(images)  # [L, E]
        prefixes = _moe_prefixes(weights)
        if len(prefixes) != counts.shape[0]:
            raise CheckpointError(
                f"extend: {len(prefixes)} MoE layers in the weights, {counts.shape[0]} routed"
            )
        out = {p: int(counts[i].argmax()) for i, p in enumerate(prefixes)}
        logger.info("extend: routing of %d new images per layer: %s", len(images), counts.tolist())
        return out

    def _new_images(self) -> list[Path]:
        ls_old = LabelSpace.from_state_dict(self.base["label_space"])
        paths: list[Path] = []
        for name in self.cfg.data.train:
            if name in ls_old.dataset_names:
                continue
            spec = self.data.catalog.get(name)
            split = self.cfg.data.train_split
            gt = json.loads(Path(spec.splits[split]).read_text(encoding="utf-8"))
            root = Path(spec.image_root)
            paths += [root / im["file_name"] for im in gt["images"][:_ROUTING_IMAGES]]
        return paths[:_ROUTING_IMAGES]

    def build_hooks(self) -> list[HookBase]:
        return [_FrozenParts(self._rows, self._frozen_bn), *super().build_hooks()]

    def best_checkpoint(self, results: Any) -> dict[str, Any]:
        state = super().best_checkpoint(results)
        state["extended_from"] = str(self.base_path)
        return state

    def training_checkpoint(self) -> dict[str, Any]:
        state = super().training_checkpoint()
        state["extended_from"] = str(self.base_path)
        return state


def _extended_config(cfg: Config, base_cfg: Mapping[str, Any], options: ExtendOptions) -> Config:
    """``cfg`` with ``moe.base_experts`` set, checked against the old model, replay applied."""
    old_moe = base_cfg["moe"]
    old_e = int(old_moe["num_experts"])
    if not cfg.uses_moe:
        raise ConfigError("extend: the config's model has no MoE layer (model.decoder_ffn)")
    if cfg.moe.num_experts != old_e + 1:
        raise ConfigError(
            f"extend adds one expert: moe.num_experts must be {old_e + 1} (the checkpoint has "
            f"{old_e}), got {cfg.moe.num_experts}"
        )
    data = config_to_dict(cfg)
    for section in ("model",):
        if data[section] != base_cfg[section]:
            diff = sorted(
                k
                for k in data[section]
                if k in base_cfg[section] and data[section][k] != base_cfg[section][k]
            )
            if not diff:
                continue  # only keys the old schema did not have
            raise ConfigError(
                f"extend: the config's model section differs from the checkpoint's in {diff}"
            )
    data["moe"]["base_experts"] = int(old_moe.get("base_experts") or 0) or old_e
    if options.replay > 0:
        old_names = [n for n in base_cfg["data"]["train"] if n not in cfg.data.train]
        data["data"]["train"] = [*cfg.data.train, *old_names]
        data["data"]["limited"] = {
            **dict(cfg.data.limited),
            **{n: float(options.replay) for n in old_names},
        }
        data["data"]["sampler"] = "proportional"
    return config_from_dict(data, source="extend config")


def extend(
    cfg: Config,
    checkpoint: str | os.PathLike[str],
    options: ExtendOptions | None = None,
) -> TrainResult:
    """Grow the checkpoint's model by one expert and the config's new datasets; train; evaluate.

    Args:
        cfg: the new config (see the module docstring).
        checkpoint: the trained model (``best.pth`` / ``last.pth``).
        options: :class:`ExtendOptions`.

    Returns:
        The :class:`TrainResult` of the extension run (``output.dir``).
    """
    options = options or ExtendOptions()
    path = Path(checkpoint)
    base = ckpt.load_checkpoint(path, required_keys=("model", "label_space", "config"))
    cfg = _extended_config(cfg, base["config"], options)
    trainer = ExtendTrainer(cfg, base, path, options)
    trainer.setup()
    result = trainer.fit()
    if result.is_main_process and result.final_routing is not None:
        summary = routing_summary(
            result.final_routing,
            dataset_names=trainer.data.label_space.dataset_names,
            expert_map={n: e for n, e in trainer.data.expert_map.items() if e >= 0},
            layer_names=moe_layer_names(cfg),
        )
        text = routing_markdown(summary)
        (trainer.out_dir / "routing.md").write_text(text, encoding="utf-8")
        logger.info("routing of the test images after extending:\n%s", text)
    return result
