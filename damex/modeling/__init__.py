"""The DINO detector with optional MoE decoder FFNs."""

from __future__ import annotations

from damex.modeling.backbone import Backbone, ChannelMapper, FrozenBatchNorm2d
from damex.modeling.build import build_model
from damex.modeling.deform_attn import MSDeformAttn, ms_deform_attn
from damex.modeling.denoising import DenoisingQueries, prepare_cdn
from damex.modeling.dense_head import DenseHead
from damex.modeling.dino import DINO
from damex.modeling.outputs import DenseOutput, DetectorOutput, DNMeta, Prediction, TokenKind
from damex.modeling.transformer import DeformableTransformer

__all__ = [
    "build_model",
    "DINO",
    "Backbone",
    "ChannelMapper",
    "FrozenBatchNorm2d",
    "MSDeformAttn",
    "ms_deform_attn",
    "DeformableTransformer",
    "DenseHead",
    "DenoisingQueries",
    "prepare_cdn",
    "DetectorOutput",
    "Prediction",
    "DNMeta",
    "DenseOutput",
    "TokenKind",
]
