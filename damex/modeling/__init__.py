"""The DINO detector with optional MoE decoder FFNs (DESIGN.md §2).

Heavy submodules (torchvision, the transformer) are imported on first attribute access, so
``from damex.modeling import build_model`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from damex.modeling.build import build_model
from damex.modeling.outputs import DenseOutput, DetectorOutput, DNMeta, Prediction, TokenKind

if TYPE_CHECKING:
    from damex.modeling.backbone import Backbone, ChannelMapper, FrozenBatchNorm2d
    from damex.modeling.deform_attn import MSDeformAttn, ms_deform_attn
    from damex.modeling.denoising import DenoisingQueries, prepare_cdn
    from damex.modeling.dense_head import DenseHead
    from damex.modeling.dino import DINO
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

_LAZY = {
    "DINO": "damex.modeling.dino",
    "Backbone": "damex.modeling.backbone",
    "ChannelMapper": "damex.modeling.backbone",
    "FrozenBatchNorm2d": "damex.modeling.backbone",
    "MSDeformAttn": "damex.modeling.deform_attn",
    "ms_deform_attn": "damex.modeling.deform_attn",
    "DeformableTransformer": "damex.modeling.transformer",
    "DenseHead": "damex.modeling.dense_head",
    "DenoisingQueries": "damex.modeling.denoising",
    "prepare_cdn": "damex.modeling.denoising",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'damex.modeling' has no attribute {name!r}")
