"""Cheap per-image appearance descriptors, for proposing a dataset -> expert map from data.

``damex.moe.propose_mapping`` clusters per-dataset descriptors into experts; this module gives
it descriptors that need no trained model: a joint RGB colour histogram plus gradient-energy
statistics of a downsampled image. Datasets from one domain (same rendering, sensor, palette)
land close together; see ``tests/data/test_descriptors.py`` for the check on the built-in
benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["image_descriptor", "dataset_descriptors"]


def image_descriptor(image: Tensor, bins: int = 4, size: int = 64) -> Tensor:
    """Appearance descriptor of one ``uint8`` ``[3, H, W]`` image.

    Returns:
        ``float32`` ``[bins**3 + 4]``: the normalized joint RGB histogram, then the mean and
        standard deviation of the gray level and of the gradient magnitude (all in ``[0, 1]``).
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    x = F.interpolate(image[None].float() / 255.0, size=(size, size), mode="area")[0]  # [3,s,s]
    q = (x * bins).long().clamp_(max=bins - 1)  # [3, s, s]
    code = (q[0] * bins + q[1]) * bins + q[2]
    hist = torch.bincount(code.flatten(), minlength=bins**3).float()
    hist /= hist.sum()
    gray = x.mean(0)  # [s, s]
    gx = gray[:, 1:] - gray[:, :-1]
    gy = gray[1:, :] - gray[:-1, :]
    grad = (gx[:-1, :] ** 2 + gy[:, :-1] ** 2).sqrt()
    stats = torch.stack((gray.mean(), gray.std(), grad.mean(), grad.std()))
    return torch.cat((hist, stats))


def dataset_descriptors(dataset, max_images: int = 32) -> Tensor:
    """``[N, F]`` descriptors of the first ``max_images`` images of a ``CocoDetection``."""
    n = min(len(dataset), max_images)
    if n == 0:
        raise ValueError("dataset_descriptors: the dataset has no image")
    return torch.stack([image_descriptor(dataset[i].image) for i in range(n)])
