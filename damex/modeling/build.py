"""``build_model``: the only place that reads the config for modeling (house rule 14)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from damex.config import FFNKind, ModelConfig, MoEConfig, choices
from damex.errors import ConfigError
from damex.modeling.backbone import Backbone, ChannelMapper
from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.dense_head import DenseHead
from damex.modeling.dino import DINO
from damex.modeling.transformer import (
    FFN,
    BoxHead,
    ClassHead,
    DecoderLayer,
    DeformableDecoder,
    DeformableEncoder,
    DeformableTransformer,
    EncoderLayer,
    MoEBlock,
)
from damex.moe import MoEFFN

__all__ = ["build_model"]

logger = logging.getLogger(__name__)

_FFN_KINDS = choices(FFNKind)


def _validate(cfg: ModelConfig, num_classes: int) -> None:
    def bad(key: str, expected: str, got: object) -> ConfigError:
        return ConfigError(f"model.{key}: expected {expected}, got {got!r}")

    if num_classes < 1:
        raise ConfigError(f"num_classes (label space size) must be >= 1, got {num_classes}")
    if cfg.d_model < 2 or cfg.d_model % cfg.nheads:
        raise bad("d_model", f"a positive multiple of model.nheads={cfg.nheads}", cfg.d_model)
    if cfg.d_model % 32:
        raise bad("d_model", "a multiple of 32 (GroupNorm(32) in the neck)", cfg.d_model)
    if cfg.dec_layers < 1:
        raise bad("dec_layers", ">= 1", cfg.dec_layers)
    if cfg.enc_layers < 0:
        raise bad("enc_layers", ">= 0", cfg.enc_layers)
    if len(cfg.decoder_ffn) != cfg.dec_layers:
        raise bad("decoder_ffn", f"one entry per decoder layer ({cfg.dec_layers})", cfg.decoder_ffn)
    unknown = [k for k in cfg.decoder_ffn if k not in _FFN_KINDS]
    if unknown:
        raise bad("decoder_ffn", f"entries in {_FFN_KINDS}", unknown)
    if cfg.num_feature_levels < len(cfg.backbone.return_strides):
        raise bad(
            "num_feature_levels",
            f">= len(model.backbone.return_strides)={len(cfg.backbone.return_strides)}",
            cfg.num_feature_levels,
        )
    if cfg.num_queries < 1:
        raise bad("num_queries", ">= 1", cfg.num_queries)


def _expert_parallel_group(moe_cfg: MoEConfig) -> dist.ProcessGroup | None:
    """The default process group when ``moe.expert_parallel`` applies, else None.

    Expert parallelism needs an initialized process group of world size ``W > 1`` (torchrun)
    and ``moe.num_experts % W == 0``; in a single process every expert is local (the same
    model: checkpoints do not depend on ``W``).
    """
    if not moe_cfg.expert_parallel or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    if moe_cfg.num_experts % world:
        raise ConfigError(
            f"moe.expert_parallel=true needs moe.num_experts to be a multiple of the number of "
            f"processes, got moe.num_experts={moe_cfg.num_experts} on {world} processes; change "
            f"moe.num_experts or the number of processes, or set moe.expert_parallel=false"
        )
    return dist.group.WORLD


def _build_moe_block(
    model_cfg: ModelConfig, moe_cfg: MoEConfig, group: dist.ProcessGroup | None
) -> nn.Module:
    moe = MoEFFN(
        d_model=model_cfg.d_model,
        hidden_dim=model_cfg.dim_feedforward,
        num_experts=moe_cfg.num_experts,
        top_k=moe_cfg.top_k,
        capacity_factor=moe_cfg.capacity_factor,
        capacity_group=moe_cfg.capacity_group,
        gate_noise=moe_cfg.gate_noise,
        router=moe_cfg.router,
        routing=moe_cfg.routing,
        activation=moe_cfg.activation,
        dropout=moe_cfg.dropout,
        fc2_bias=moe_cfg.fc2_bias,
        normalize_gate=moe_cfg.normalize_gate,
        expert_parallel_group=group,
        shared_expert=moe_cfg.shared_expert,
        unit_gate=moe_cfg.unit_gate,
        base_experts=moe_cfg.base_experts,
        expert_init=moe_cfg.expert_init,
        router_detach=moe_cfg.router_detach,
        router_context=moe_cfg.router_context,
    )
    return MoEBlock(
        moe=moe, d_model=model_cfg.d_model, drop_path=moe_cfg.drop_path, norm=moe_cfg.norm
    )


def _build_backbone(m: ModelConfig) -> Backbone:
    bcfg = m.backbone
    try:
        return Backbone(
            name=bcfg.name,
            return_strides=tuple(bcfg.return_strides),
            frozen_stages=bcfg.frozen_stages,
            frozen_bn=bcfg.frozen_bn,
            weights=bcfg.weights,
            channels_last=bcfg.channels_last,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise ConfigError(f"model.backbone: {exc}") from exc


def _build_encoder(m: ModelConfig) -> DeformableEncoder:
    return DeformableEncoder(
        layers=[
            EncoderLayer(
                d_model=m.d_model,
                n_heads=m.nheads,
                n_levels=m.num_feature_levels,
                n_points=m.enc_n_points,
                dim_feedforward=m.dim_feedforward,
                dropout=m.dropout,
            )
            for _ in range(m.enc_layers)
        ]
    )


def _build_decoder(
    m: ModelConfig, moe_cfg: MoEConfig, group: dist.ProcessGroup | None, num_classes: int
) -> DeformableDecoder:
    """One decoder layer per ``model.decoder_ffn`` entry (MoE or dense FFN), then the heads."""
    layers = []
    for kind in m.decoder_ffn:
        if kind == "moe":
            ffn = _build_moe_block(m, moe_cfg, group)
        else:
            ffn = FFN(d_model=m.d_model, hidden_dim=m.dim_feedforward, dropout=m.dropout)
        layers.append(
            DecoderLayer(
                self_attn=nn.MultiheadAttention(
                    m.d_model, m.nheads, dropout=m.dropout, batch_first=True
                ),
                cross_attn=MSDeformAttn(
                    d_model=m.d_model,
                    n_levels=m.num_feature_levels,
                    n_heads=m.nheads,
                    n_points=m.dec_n_points,
                ),
                ffn=ffn,
                d_model=m.d_model,
                dropout=m.dropout,
            )
        )
    return DeformableDecoder(
        layers=layers,
        d_model=m.d_model,
        class_head=ClassHead(d_model=m.d_model, num_classes=num_classes),
        box_head=BoxHead(d_model=m.d_model),
    )


def _build_dense_head(m: ModelConfig, num_classes: int, strides: Sequence[int]) -> DenseHead | None:
    accel = m.accel
    if not accel.dense_head:
        return None
    dense_head = DenseHead(d_model=m.d_model, num_classes=num_classes, strides=strides)
    return dense_head


def _sync_rng_across_ranks() -> None:
    """Give every rank rank 0's RNG state: expert shards must come from one RNG stream.

    DDP only broadcasts the shared weights, so the ranks' shards together are the model a
    single process would build only if every rank draws from the same stream.
    """
    rng = [torch.get_rng_state() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(rng, src=0)
    torch.set_rng_state(rng[0])


def _log_built(
    model: nn.Module, m: ModelConfig, moe_cfg: MoEConfig, group: dist.ProcessGroup | None
) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if group is not None:
        logger.info(
            "expert parallelism: %d of %d experts per MoE layer on rank %d of %d",
            moe_cfg.num_experts // dist.get_world_size(group),
            moe_cfg.num_experts,
            dist.get_rank(group),
            dist.get_world_size(group),
        )
    logger.info(
        "built DINO: %s, d=%d, %d enc / %d dec layers (%s), %d queries, %.2fM params "
        "(%.2fM trainable)",
        m.backbone.name,
        m.d_model,
        m.enc_layers,
        m.dec_layers,
        ",".join(m.decoder_ffn),
        m.num_queries,
        n_params / 1e6,
        n_train / 1e6,
    )


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, num_classes: int) -> nn.Module:
    """Build the DINO detector (with MoE decoder FFNs where ``model.decoder_ffn`` says ``moe``).

    Args:
        model_cfg: ``cfg.model``.
        moe_cfg: ``cfg.moe`` (read only if some decoder layer is ``moe``).
        num_classes: size of the unified label space (head outputs).

    With ``moe.expert_parallel=true`` under ``torchrun`` (world size ``W > 1``), every MoE layer
    keeps only experts ``[r * E/W, (r + 1) * E/W)`` on rank ``r`` and routes tokens to them with
    all-to-all (:mod:`damex.moe.parallel`). The ranks then build the model from rank 0's RNG
    state, so that their shards together are exactly the model a single process would build.
    Every collective-dependent step of training (DDP, clipping, checkpoints, evaluation) is in
    :mod:`damex.engine.expert_parallel`.

    Returns:
        A ``damex.modeling.dino.DINO``.

    Raises:
        ConfigError: naming the offending key.
    """
    _validate(model_cfg, num_classes)
    group = None
    if "moe" in model_cfg.decoder_ffn:
        group = _expert_parallel_group(moe_cfg)
    if group is not None:
        _sync_rng_across_ranks()

    # construction order is the parameter-initialization order (seeded runs depend on it)
    m = model_cfg
    backbone = _build_backbone(m)
    neck = ChannelMapper(
        in_channels=backbone.channels,
        in_strides=backbone.strides,
        d_model=m.d_model,
        num_levels=m.num_feature_levels,
    )
    encoder = _build_encoder(m)
    decoder = _build_decoder(m, moe_cfg, group, num_classes)
    accel = m.accel
    transformer = DeformableTransformer(
        encoder=encoder,
        decoder=decoder,
        d_model=m.d_model,
        num_levels=m.num_feature_levels,
        num_queries=m.num_queries,
        num_classes=num_classes,
        two_stage=m.two_stage,
        one_to_many_queries=accel.one_to_many_queries if accel.one_to_many else 0,
        pe_temperature=m.pe_temperature,
    )
    dense_head = _build_dense_head(m, num_classes, neck.strides)
    dn = m.dn
    label_embed = nn.Embedding(num_classes + 1, m.d_model) if dn.enabled and dn.number > 0 else None
    model = DINO(
        backbone=backbone,
        neck=neck,
        transformer=transformer,
        num_classes=num_classes,
        label_embed=label_embed,
        dn_number=dn.number if dn.enabled else 0,
        dn_label_noise_ratio=dn.label_noise_ratio,
        dn_box_noise_scale=dn.box_noise_scale,
        pixel_mean=tuple(m.pixel_mean),
        pixel_std=tuple(m.pixel_std),
        dense_head=dense_head,
    )
    _log_built(model, m, moe_cfg, group)
    return model
