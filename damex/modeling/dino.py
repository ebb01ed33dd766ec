"""DINO (Zhang et al. 2022) with optional MoE decoder FFNs: ``Batch -> DetectorOutput``.

Training-only branches (zero inference cost): contrastive denoising (when targets have boxes),
the one-to-many (H-DETR) queries and the dense auxiliary head. In eval mode the forward is the
plain detector: backbone -> neck -> encoder -> top-Q selection -> decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from damex.modeling.backbone import Backbone, ChannelMapper, valid_sizes_from_mask
from damex.modeling.denoising import prepare_cdn
from damex.modeling.dense_head import DenseHead
from damex.modeling.outputs import DetectorOutput, Prediction
from damex.modeling.transformer import DeformableTransformer
from damex.structures import Batch

__all__ = ["DINO"]


class DINO(nn.Module):
    """DINO-4scale-style detector.

    Args:
        backbone: CNN feature extractor.
        neck: projections to ``d_model`` and extra levels.
        transformer: encoder + query selection + decoder (owns the shared heads).
        num_classes: K.
        label_embed: DN label table ``nn.Embedding(K + 1, D)``, or None to disable DN.
        dn_number: DN budget (DINO: 100), 0 disables DN.
        dn_label_noise_ratio: DN label noise (DINO: 0.5).
        dn_box_noise_scale: DN box noise (DAMEX: 1.0, DINO: 0.4).
        pixel_mean: RGB mean in [0, 255] units.
        pixel_std: RGB std in [0, 255] units.
        dense_head: the training-only dense auxiliary head, or None.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: ChannelMapper,
        transformer: DeformableTransformer,
        num_classes: int,
        label_embed: nn.Embedding | None = None,
        dn_number: int = 100,
        dn_label_noise_ratio: float = 0.5,
        dn_box_noise_scale: float = 1.0,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        dense_head: DenseHead | None = None,
    ) -> None:
        super().__init__()
        if label_embed is not None and label_embed.num_embeddings != num_classes + 1:
            raise ValueError(
                f"label_embed must have num_classes + 1 = {num_classes + 1} rows, "
                f"got {label_embed.num_embeddings}"
            )
        self.backbone = backbone
        self.neck = neck
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = transformer.num_queries
        self.label_embed = label_embed
        self.dn_number = dn_number if label_embed is not None else 0
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.dense_head = dense_head
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False
        )

    def forward(self, batch: Batch) -> DetectorOutput:
        """Run the detector.

        Args:
            batch: padded images ``[B, 3, H, W]`` in [0, 255], ``mask`` ``[B, H, W]`` (True on
                padding), targets (used by DN in training).

        Returns:
            ``DetectorOutput``; ``dn`` / ``one_to_many`` / ``dense`` only in training.
        """
        images, mask = batch.images, batch.mask
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Batch.images must be [B, 3, H, W], got {tuple(images.shape)}")
        if tuple(mask.shape) != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"Batch.mask must be [B, H, W]={[images.shape[0], *images.shape[2:]]}, "
                f"got {tuple(mask.shape)}"
            )
        x = (images - self.pixel_mean) / self.pixel_std
        x = x.masked_fill(mask[:, None], 0.0)  # padding is zero after normalization (DETR)
        valid_hw = valid_sizes_from_mask(mask)  # [B, 2]
        feats = self.backbone(x, mask)
        srcs, masks = self.neck(feats, valid_hw)

        training = self.training
        dn = None
        if training and self.dn_number > 0 and batch.targets:
            if len(batch.targets) != images.shape[0]:
                raise ValueError(
                    f"Batch has {images.shape[0]} images but {len(batch.targets)} targets"
                )
            use_o2m = self.transformer.one_to_many_queries > 0
            dn = prepare_cdn(
                batch.targets,
                self.dn_number,
                self.dn_label_noise_ratio,
                self.dn_box_noise_scale,
                self.num_classes,
                self.label_embed,
                True,
                num_queries=self.num_queries,
                num_one_to_many=self.transformer.one_to_many_queries if use_o2m else 0,
            )
        out = self.transformer(srcs, masks, dn=dn, one_to_many=training)
        dec = out.decoder
        nd, nq = out.num_dn, out.num_queries

        def split(lo: int, hi: int) -> list[Prediction]:
            return [Prediction(lg[:, lo:hi], bx[:, lo:hi]) for lg, bx in zip(dec.logits, dec.boxes)]

        matching = split(nd, nd + nq)
        dense = None
        if training and self.dense_head is not None:
            dense = self.dense_head(
                out.memory, out.memory_padding_mask, out.spatial_shapes, valid_hw
            )
        return DetectorOutput(
            pred=matching[-1],
            aux=matching[:-1],
            interm=out.interm,
            dn=split(0, nd) if dn is not None else [],
            dn_meta=dn.meta if dn is not None else None,
            one_to_many=split(nd + nq, nd + nq + out.num_one_to_many)
            if out.num_one_to_many
            else [],
            dense=dense,
            routing=dec.routing,
        )
