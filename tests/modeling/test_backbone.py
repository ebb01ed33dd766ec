"""Backbone, frozen BN, weight loading, and padding invariance of backbone + neck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from damex.modeling.backbone import (
    Backbone,
    ChannelMapper,
    FrozenBatchNorm2d,
    level_mask,
    masked_group_norm,
    valid_sizes_from_mask,
)


def _randomize_frozen_bn(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(1 + 0.1 * torch.rand(n, generator=g))


def test_frozen_bn_equals_batchnorm_in_eval():
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", [128, 256, 512]), ("resnet50", [512, 1024, 2048])]
)
def test_shapes_channels_and_frozen_stages(name, channels):
    bb = Backbone(name=name, return_strides=(8, 16, 32), frozen_stages=1)
    assert bb.channels == channels
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (1, channels[0], 8, 12),
        (1, channels[1], 4, 6),
        (1, channels[2], 2, 3),
    ]
    trainable = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert frozen == {"conv1", "layer1"}  # bn1 is a frozen BN (buffers only)


def test_frozen_stages_zero_and_stride4():
    bb = Backbone(name="resnet18", return_strides=(4, 8), frozen_stages=0, frozen_bn=False)
    assert all(p.requires_grad for p in bb.parameters())
    assert not hasattr(bb.body, "layer3")  # unused stages are dropped
    feats = bb(torch.randn(1, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [8, 4]


def test_bad_names_and_strides():
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone(name="resnet7")
    with pytest.raises(ValueError, match="return_strides"):
        Backbone(name="resnet18", return_strides=(16, 8))


def test_weights_file_loading_and_errors(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        src.layer2[0].conv1.weight.mul_(3.0)
        src.bn1.running_mean.fill_(0.25)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    bb = Backbone(name="resnet18", weights=str(path))
    torch.testing.assert_close(bb.body.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert torch.all(bb.body.bn1.running_mean == 0.25)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone(name="resnet18", weights=str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="r34.pth.*unexpected"):
        Backbone(name="resnet18", weights=str(tmp_path / "r34.pth"))
    bad = src.state_dict()
    bad["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="conv1.weight: expected"):
        Backbone(name="resnet18", weights=str(tmp_path / "bad.pth"))


def test_level_mask_uses_ceil_of_valid_size():
    mask = torch.zeros(2, 100, 100, dtype=torch.bool)
    mask[1, 65:, :] = True
    mask[1, :, 30:] = True
    hw = valid_sizes_from_mask(mask)
    assert hw.tolist() == [[100, 100], [65, 30]]
    m = level_mask(hw, 8, (13, 13))
    assert (~m[1]).sum(0).max().item() == 9  # ceil(65 / 8)
    assert (~m[1]).sum(1).max().item() == 4  # ceil(30 / 8)
    assert not m[0].any()


def test_masked_group_norm_equals_group_norm_on_valid_crop():
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(1, 8, 6, 7)
    valid = torch.zeros(1, 1, 6, 7)
    valid[..., :4, :5] = 1
    out = masked_group_norm(x, valid, norm)
    torch.testing.assert_close(out[..., :4, :5], norm(x[..., :4, :5]))
    assert out[..., 4:, :].abs().sum() == 0 and out[..., :, 5:].abs().sum() == 0


def test_backbone_and_neck_are_padding_invariant():
    torch.manual_seed(0)
    bb = Backbone(name="resnet18", return_strides=(8, 16, 32))
    _randomize_frozen_bn(bb)
    neck = ChannelMapper(in_channels=bb.channels, in_strides=bb.strides, d_model=32, num_levels=4)
    assert neck.strides == [8, 16, 32, 64]
    # odd and stride-multiple valid sizes (the latter leak through pooling windows if unmasked)
    for h, w in ((70, 45), (64, 64)):
        _check_padding_invariance(bb, neck, h, w)


def _check_padding_invariance(bb, neck, h, w):
    image = torch.randn(1, 3, h, w)
    padded = torch.zeros(2, 3, 96, 96)
    padded[0, :, :h, :w] = image[0]
    padded[1] = torch.randn(3, 96, 96)
    mask = torch.ones(2, 96, 96, dtype=torch.bool)
    mask[0, :h, :w] = False
    mask[1] = False
    with torch.no_grad():
        alone_srcs, alone_masks = neck(bb(image), torch.tensor([[h, w]]))
        srcs, masks = neck(bb(padded, mask), valid_sizes_from_mask(mask))
    for a, am, p, pm in zip(alone_srcs, alone_masks, srcs, masks):
        h, w = a.shape[-2:]
        assert not am.any()
        assert (~pm[0]).sum().item() == h * w  # valid extent equals the unpadded map
        torch.testing.assert_close(p[0, :, :h, :w], a[0], atol=1e-4, rtol=1e-4)
        assert p[0, :, h:].abs().sum() == 0 and p[0, :, :, w:].abs().sum() == 0


def test_channels_last_backbone_equals_the_contiguous_one_and_stays_padding_invariant():
    """NHWC is a memory layout only: same maps (forward and weight gradients, trainable BN,
    padding mask), returned in channels_last."""
    torch.manual_seed(0)
    plain = Backbone(name="resnet18", return_strides=(8, 16, 32), frozen_stages=0, frozen_bn=False)
    nhwc = Backbone(
        name="resnet18", return_strides=(8, 16, 32), frozen_stages=0, frozen_bn=False,
        channels_last=True,
    )  # fmt: skip
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 70, 52)
    mask = torch.zeros(2, 70, 52, dtype=torch.bool)
    mask[1, 60:] = True
    outs = [bb(images, mask) for bb in (plain, nhwc)]
    for a, b in zip(*outs):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for out in outs:
        sum(o.square().mean() for o in out).backward()
    torch.testing.assert_close(
        nhwc.body.layer2[0].conv1.weight.grad, plain.body.layer2[0].conv1.weight.grad,
        atol=1e-4, rtol=1e-3,
    )  # fmt: skip
    neck = ChannelMapper(
        in_channels=nhwc.channels, in_strides=nhwc.strides, d_model=32, num_levels=4
    )
    nhwc.eval()
    _check_padding_invariance(nhwc, neck, 70, 45)
