"""CNN backbone (torchvision ResNet; timm optional) and the multi-scale neck of DINO.

Padding: images of a batch are padded at the right/bottom (``Batch.mask``). DINO lets the padded
zeros leak into the features near the border (convolutions, GroupNorm statistics), so a
prediction depends on the other images of the batch. Here the torchvision ResNet is run with the
padded region re-zeroed after every normalization layer, and the neck's GroupNorm uses valid
locations only, so the features of an image are the same whatever the padding (exactly, when the
image is processed alone). This costs one multiply per normalization layer, only when the batch
has padding. (timm backbones run unmasked.)

Valid extent at stride ``s`` of an image of valid size ``h x w``: ``ceil(h / s) x ceil(w / s)``,
which is what ResNet's stride-2 convolutions/pooling produce on the unpadded image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FrozenBatchNorm2d",
    "Backbone",
    "ChannelMapper",
    "valid_sizes_from_mask",
    "level_mask",
    "masked_group_norm",
]

logger = logging.getLogger(__name__)

_RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_STAGE_STRIDES = (4, 8, 16, 32)  # layer1..layer4


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, never trained).

    Args:
        num_features: channels.
        eps: added to the running variance (torchvision / DETR: 1e-5).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in BatchNorm2d checkpoints
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> same shape."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a ``FrozenBatchNorm2d`` with its stats."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _freeze_batch_norms(child)
        if new is not child:
            setattr(module, name, new)
    return module


def valid_sizes_from_mask(mask: Tensor) -> Tensor:
    """Valid ``(h, w)`` per image of a top-left-aligned padding mask.

    Args:
        mask: ``bool`` ``[B, H, W]``, True on padding.

    Returns:
        ``int64`` ``[B, 2]``.
    """
    valid = ~mask
    return torch.stack((valid.any(2).sum(1), valid.any(1).sum(1)), dim=1)


def level_mask(valid_hw: Tensor, stride: int, shape: tuple[int, int]) -> Tensor:
    """Padding mask of a feature map at ``stride``.

    Args:
        valid_hw: ``int64`` ``[B, 2]`` valid image size in pixels.
        stride: feature stride in pixels.
        shape: ``(H_l, W_l)`` of the (padded) feature map.

    Returns:
        ``bool`` ``[B, H_l, W_l]``, True on padding (beyond ``ceil(h / stride)`` etc.).
    """
    vh = (valid_hw[:, 0] + stride - 1) // stride  # [B]
    vw = (valid_hw[:, 1] + stride - 1) // stride
    rows = torch.arange(shape[0], device=valid_hw.device)
    cols = torch.arange(shape[1], device=valid_hw.device)
    return (rows[None, :, None] >= vh[:, None, None]) | (cols[None, None, :] >= vw[:, None, None])


def masked_group_norm(x: Tensor, valid: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm whose statistics use valid locations only; the output is zero on padding.

    Args:
        x: ``[B, C, H, W]``.
        valid: ``[B, 1, H, W]`` float, 1 on valid locations.
        norm: the ``nn.GroupNorm`` holding ``num_groups``, ``eps`` and the affine parameters.

    Returns:
        ``[B, C, H, W]`` float32 or ``x``'s dtype if wider.
    """
    bsz, channels, height, width = x.shape
    groups = norm.num_groups
    xf = x.float().view(bsz, groups, channels // groups, height, width)
    vf = valid.float().view(bsz, 1, 1, height, width)
    count = (vf.sum((2, 3, 4), keepdim=True) * (channels // groups)).clamp(min=1.0)
    mean = (xf * vf).sum((2, 3, 4), keepdim=True) / count
    var = (((xf - mean) ** 2) * vf).sum((2, 3, 4), keepdim=True) / count
    out = ((xf - mean) * torch.rsqrt(var + norm.eps)).view(bsz, channels, height, width)
    if norm.affine:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return out * valid.float()


class _MaskContext:
    """Padding masks of one forward at every stride, computed once per stride."""

    def __init__(self, valid_hw: Tensor) -> None:
        self.valid_hw = valid_hw
        self._cache: dict[tuple[int, int, int], Tensor] = {}

    def apply(self, x: Tensor, stride: int) -> Tensor:
        key = (stride, x.shape[-2], x.shape[-1])
        if key not in self._cache:
            pad = level_mask(self.valid_hw, stride, (x.shape[-2], x.shape[-1]))
            self._cache[key] = (~pad)[:, None].to(x.dtype)  # [B, 1, H, W]
        return x * self._cache[key].to(x.dtype)


def _load_weights_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights file {path!r} does not exist (model.backbone.weights); weights are "
            "never downloaded: place a torchvision/timm state dict there or set it to null"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(
            f"backbone weights file {path!r}: expected a state dict, got {type(state).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


class Backbone(nn.Module):
    """ResNet feature extractor returning C3..C5-style maps at the requested strides.

    Args:
        name: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101`` (torchvision) or
            ``timm:<model name>`` (needs timm).
        return_strides: strides of the returned maps, increasing, from {4, 8, 16, 32}
            (DINO-4scale: 8, 16, 32).
        frozen_stages: 0 trains everything; k >= 1 freezes the stem and stages 1..k (DINO: 1).
        frozen_bn: use ``FrozenBatchNorm2d`` (DINO) instead of trainable BatchNorm.
        weights: optional local state-dict file (``torch.load(weights_only=True)``); the
            classifier (``fc.*``) is ignored, any other missing/unexpected key or shape mismatch
            is an error naming the file.
        mask_padding: re-zero padded locations after every normalization (see module doc).
        channels_last: run the torchvision ResNet in NHWC memory layout (weights and input
            converted; same values). The maps it returns are NHWC too, which flattening to
            tokens reads without a copy.
    """

    def __init__(
        self,
        *,
        name: str = "resnet50",
        return_strides: Sequence[int] = (8, 16, 32),
        frozen_stages: int = 1,
        frozen_bn: bool = True,
        weights: str | None = None,
        mask_padding: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        strides = [int(s) for s in return_strides]
        if not strides or strides != sorted(set(strides)):
            raise ValueError(f"return_strides must be increasing and unique, got {strides}")
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in [0, 4], got {frozen_stages}")
        self.name = name
        self.mask_padding = mask_padding
        self.strides = strides
        self.channels_last = channels_last
        if name.startswith("timm:"):
            self._is_timm = True
            self._build_timm(name[len("timm:") :], strides, frozen_stages, frozen_bn, weights)
            return
        self._is_timm = False
        if name not in _RESNET_CHANNELS:
            raise ValueError(
                f"unknown backbone {name!r}; expected one of {sorted(_RESNET_CHANNELS)} or "
                "'timm:<name>'"
            )
        bad = [s for s in strides if s not in _STAGE_STRIDES]
        if bad:
            raise ValueError(f"return_strides {bad} not in {_STAGE_STRIDES} for {name}")
        import torchvision  # local import keeps `import damex.modeling` cheap

        norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        body = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if weights:
            self._load_torchvision(body, weights)
        del body.fc, body.avgpool
        num_stages = _STAGE_STRIDES.index(strides[-1]) + 1
        for idx in range(num_stages, 4):  # stages after the last returned one are not needed
            delattr(body, f"layer{idx + 1}")
        if channels_last:
            body = body.to(memory_format=torch.channels_last)
        self.body = body
        self.num_stages = num_stages
        self.channels = [_RESNET_CHANNELS[name][_STAGE_STRIDES.index(s)] for s in strides]
        if frozen_stages >= 1:
            for module in (body.conv1, body.bn1):
                module.requires_grad_(False)
        for idx in range(min(frozen_stages, num_stages)):
            getattr(body, f"layer{idx + 1}").requires_grad_(False)

    @staticmethod
    def _load_torchvision(body: nn.Module, path: str) -> None:
        state = {k: v for k, v in _load_weights_file(path).items() if not k.startswith("fc.")}
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        own = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
            for k in own
            if k in state and tuple(own[k].shape) != tuple(state[k].shape)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"backbone weights file {path!r} does not match the model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
                f"({len(unexpected)}), shape mismatches {wrong[:5]}"
            )
        body.load_state_dict(state, strict=False)
        logger.info("loaded backbone weights from %s", path)

    def _build_timm(
        self,
        model_name: str,
        strides: list[int],
        frozen_stages: int,
        frozen_bn: bool,
        weights: str | None,
    ) -> None:
        try:
            import timm
        except ImportError as exc:
            raise ImportError(
                f"backbone 'timm:{model_name}' needs timm (pip install 'damex[timm]')"
            ) from exc
        probe = timm.create_model(model_name, features_only=True, pretrained=False)
        reductions = list(probe.feature_info.reduction())
        missing = [s for s in strides if s not in reductions]
        if missing:
            raise ValueError(f"timm model {model_name!r} has strides {reductions}, not {missing}")
        out_indices = [reductions.index(s) for s in strides]
        body = timm.create_model(
            model_name, features_only=True, pretrained=False, out_indices=out_indices
        )
        if weights:
            state = _load_weights_file(weights)
            result = body.load_state_dict(state, strict=False)
            if result.missing_keys:
                raise ValueError(
                    f"backbone weights file {weights!r} lacks {len(result.missing_keys)} keys of "
                    f"timm:{model_name}, e.g. {result.missing_keys[:5]}"
                )
        if frozen_bn:
            body = _freeze_batch_norms(body)
        # best effort: freeze the top-level children up to the k-th stage of stride >= 4
        if frozen_stages >= 1:
            names = list(probe.feature_info.module_name())
            stage_names = [n for n, r in zip(names, reductions) if r >= 4]
            last = stage_names[min(frozen_stages, len(stage_names)) - 1].split(".")[0]
            for child_name, child in body.named_children():
                child.requires_grad_(False)
                if child_name == last:
                    break
        self.body = body
        self.channels = [probe.feature_info.channels()[i] for i in out_indices]

    def forward(self, images: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Feature maps at ``self.strides``.

        Args:
            images: ``[B, 3, H, W]`` normalized, zero on padding.
            mask: ``bool`` ``[B, H, W]`` True on padding, or None.

        Returns:
            One ``[B, C_i, ceil(H / s_i), ceil(W / s_i)]`` per stride (zero on padding when
            ``mask_padding`` and a torchvision model).
        """
        if self._is_timm:
            return list(self.body(images))
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ctx = None
        if self.mask_padding and mask is not None and bool(mask.any()):
            ctx = _MaskContext(valid_sizes_from_mask(mask))
        body = self.body
        m = ctx.apply if ctx is not None else (lambda t, s: t)
        x = body.relu(m(body.bn1(body.conv1(images)), 2))
        # inputs >= 0, so the zeros of the padding act like the implicit -inf padding of the
        # pool; its windows straddling the border leak into the padding: re-zero it
        x = m(body.maxpool(x), 4)
        stride = 4
        outputs = []
        for idx in range(self.num_stages):
            for block in getattr(body, f"layer{idx + 1}"):
                x, stride = _block_forward(block, x, stride, m)
            if stride in self.strides:
                outputs.append(x)
        return outputs


def _block_forward(block: nn.Module, x: Tensor, stride: int, m) -> tuple[Tensor, int]:  # noqa: ANN001
    """One torchvision BasicBlock / Bottleneck with masking after each normalization."""
    out_stride = stride * block.stride
    identity = x
    if hasattr(block, "conv3"):  # Bottleneck (stride on conv2, ResNet v1.5)
        out = block.relu(m(block.bn1(block.conv1(x)), stride))
        out = block.relu(m(block.bn2(block.conv2(out)), out_stride))
        out = m(block.bn3(block.conv3(out)), out_stride)
    else:  # BasicBlock
        out = block.relu(m(block.bn1(block.conv1(x)), out_stride))
        out = m(block.bn2(block.conv2(out)), out_stride)
    if block.downsample is not None:
        identity = m(block.downsample(x), out_stride)
    return block.relu(out + identity), out_stride


class ChannelMapper(nn.Module):
    """DINO's input projections: every backbone map and the extra levels to ``d_model``.

    Level i < len(in_channels): 1x1 conv + GroupNorm(32). Extra levels: 3x3 stride-2 conv +
    GroupNorm(32) on the last backbone map (first extra) or the previous extra level.

    Args:
        in_channels: channels of the backbone maps.
        in_strides: their strides.
        d_model: output channels.
        num_levels: total levels (>= len(in_channels)).
        num_groups: GroupNorm groups (DINO: 32).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        d_model: int,
        num_levels: int,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(
                f"num_feature_levels={num_levels} < number of backbone maps {len(in_channels)}"
            )
        if d_model % num_groups:
            raise ValueError(f"d_model={d_model} must be divisible by {num_groups} (GroupNorm)")
        self.strides = list(in_strides) + [
            in_strides[-1] * 2 ** (i + 1) for i in range(num_levels - len(in_channels))
        ]
        projs = [
            nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(num_groups, d_model))
            for c in in_channels
        ]
        prev = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projs.append(
                nn.Sequential(
                    nn.Conv2d(prev, d_model, 3, stride=2, padding=1),
                    nn.GroupNorm(num_groups, d_model),
                )
            )
            prev = d_model
        self.input_proj = nn.ModuleList(projs)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(
        self, features: Sequence[Tensor], valid_hw: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Project the maps and build every level's padding mask.

        Args:
            features: backbone maps ``[B, C_i, H_i, W_i]``.
            valid_hw: ``int64`` ``[B, 2]`` unpadded image sizes in pixels.

        Returns:
            ``(srcs, masks)``: ``[B, d_model, H_l, W_l]`` (zero on padding) and ``bool``
            ``[B, H_l, W_l]`` (True on padding) per level.
        """
        srcs: list[Tensor] = []
        masks: list[Tensor] = []
        for lvl, proj in enumerate(self.input_proj):
            # the first extra level reads the last backbone map, later ones the previous level
            inp = features[min(lvl, len(features) - 1)] if lvl <= len(features) else srcs[-1]
            y = proj[0](inp)
            mask = level_mask(valid_hw, self.strides[lvl], (y.shape[-2], y.shape[-1]))
            # always the masked form: same arithmetic with or without padding, and it accepts a
            # 1x1 map with one channel per group (F.group_norm refuses it in training)
            y = masked_group_norm(y, (~mask)[:, None], proj[1])
            srcs.append(y)
            masks.append(mask)
        return srcs, masks
