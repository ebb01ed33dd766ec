"""The built-in multi-domain detection benchmark: six small datasets that differ like UODB's.

``generate_benchmark(out)`` writes real image files and COCO JSON for six datasets::

    out/NAME/annotations/{train,val,test}.json
    out/NAME/images/{split}_{index:05d}.{jpg,png}
    out/.damex_synthetic.json          marker: generator version, seed, scale, image size

The datasets mirror the ways UODB's sources differ (docs/design.md §4.1):

============  ==================================================  ============================
name          domain (UODB analogue)                              classes
============  ==================================================  ============================
syn_photo     textured photo-like scenes, shaded objects (COCO)   car, person, dog, bottle
syn_clipart   flat clip-art, black outlines (Clipart1k, Comic)    car, person, bird, chair
syn_aerial    top-down terrain, many small rotated objects (DOTA) plane, ship, car, storage-tank
syn_signs     traffic signs on road scenes (LISA)                 stop, speedlimit, warning,
                                                                  noturn
syn_faces     faces in indoor scenes, one class (WIDER FACE)      face
syn_medical   grayscale CT-like scans, blob lesions (DeepLesion)  lesion
============  ==================================================  ============================

Class names overlap ("car" in three datasets, "person" in two) so the ``merged`` label policy is
exercised; the train sets range from 300 to 30 images (10:1); object sizes and counts per image
differ by dataset; images are at most ``image_size`` pixels on the long side and not all square.
Each class has its own shape and colour family with moderate variation, so a small detector
learns it in minutes, and the domain shows in every image (background, palette, rendering), so
a router can learn it.

Deterministic: image ``i`` of a split is drawn from ``numpy.random.default_rng([seed, dataset,
split, i])`` alone, so the same seed gives byte-identical JSON and identical pixels, whatever the
number of worker processes (and the first images of a smaller ``scale`` equal a larger one's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from damex.config import SyntheticConfig

__all__ = [
    "SYNTHETIC_DATASETS",
    "SPLITS",
    "GENERATOR_VERSION",
    "MARKER_FILE",
    "split_sizes",
    "generate_benchmark",
    "ensure_benchmark",
    "main",
]

logger = logging.getLogger(__name__)

# Bump whenever the generated content changes: ensure_benchmark() regenerates stale folders.
GENERATOR_VERSION = 2
MARKER_FILE = ".damex_synthetic.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")

SYNTHETIC_DATASETS: dict[str, list[str]] = {
    "syn_photo": ["car", "person", "dog", "bottle"],
    "syn_clipart": ["car", "person", "bird", "chair"],
    "syn_aerial": ["plane", "ship", "car", "storage-tank"],
    "syn_signs": ["stop", "speedlimit", "warning", "noturn"],
    "syn_faces": ["face"],
    "syn_medical": ["lesion"],
}

# (train, val, test) images at scale 1.0: train sizes 300 .. 30 (10:1, as UODB's are uneven).
_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "syn_photo": (300, 30, 60),
    "syn_clipart": (150, 20, 40),
    "syn_aerial": (120, 20, 40),
    "syn_signs": (90, 20, 40),
    "syn_faces": (60, 15, 30),
    "syn_medical": (30, 15, 30),
}


def split_sizes(name: str, scale: float = 1.0) -> dict[str, int]:
    """Images per split of a synthetic dataset at ``scale`` (at least 1 each)."""
    return _scaled_split_sizes(_SPLIT_SIZES[name], scale)


def _scaled_split_sizes(sizes: Sequence[int], scale: float) -> dict[str, int]:
    """``{split: images}`` from (train, val, test) sizes at scale 1 (at least 1 each)."""
    return {s: max(1, round(n * scale)) for s, n in zip(SPLITS, sizes)}


# ------------------------------------------------------------------------------ drawing
Color = Sequence[float]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (pixel edges, exclusive end)
Point = tuple[float, float]


def _union(boxes: Sequence[Box | None]) -> Box | None:
    real = [b for b in boxes if b is not None]
    if not real:
        return None
    return (
        min(b[0] for b in real),
        min(b[1] for b in real),
        max(b[2] for b in real),
        max(b[3] for b in real),
    )


class _Canvas:
    """A float32 ``[H, W, 3]`` image that shapes are composited onto, one part at a time.

    Every shape method paints ``color`` through a mask drawn with PIL and returns the box of
    the painted pixels (None if nothing is visible). ``outline`` > 0 paints only the outline,
    that many pixels wide. ``shade`` > 0 darkens the part linearly along direction ``angle``
    (lit from one side), so objects are not flat.
    """

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr  # [H, W, 3] float32, 0..255
        self.h, self.w = arr.shape[:2]

    def _mask(
        self, draw: Callable[[ImageDraw.ImageDraw], None], *, filled: bool = False
    ) -> Image.Image:
        """An ``L`` mask of the canvas size with ``draw`` applied at 255.

        ``filled``: shapes drawn without ``fill``/``outline`` are filled (PIL's default ink).
        """
        mask = Image.new("L", (self.w, self.h), 0)
        canvas = ImageDraw.Draw(mask)
        if filled:
            canvas.ink, canvas.fill = 255, True
        draw(canvas)
        return mask

    def _composite(self, box: Box, alpha: np.ndarray, color: np.ndarray) -> None:
        """Blend ``color`` (``[3]`` or ``[h, w, 3]``) into ``box`` with ``alpha`` ``[h, w, 1]``."""
        x0, y0, x1, y1 = box
        region = self.arr[y0:y1, x0:x1]
        region *= 1.0 - alpha
        region += alpha * color

    def _paint(
        self, draw: Callable[[ImageDraw.ImageDraw], None], color: Color, shade: float, angle: float
    ) -> Box | None:
        mask = self._mask(draw)
        box = mask.getbbox()
        if box is None:
            return None
        x0, y0, x1, y1 = box
        alpha = np.asarray(mask.crop(box), dtype=np.float32)[..., None] / 255.0  # [h, w, 1]
        col = np.asarray(color, dtype=np.float32)  # [3]
        if shade > 0:
            yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
            proj = xx * math.cos(angle) + yy * math.sin(angle)  # [h, w]
            proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)  # 0..1
            col = col * (1.0 + shade * (0.5 - proj))[..., None]  # [h, w, 3]
        self._composite(box, alpha, col)
        return box

    def ellipse(
        self, box: Sequence[float], color: Color, *, outline: int = 0, shade: float = 0.0,
        angle: float = 0.0,
    ) -> Box | None:  # fmt: skip
        if outline:
            return self._paint(lambda d: d.ellipse(box, outline=255, width=outline), color, 0, 0)
        return self._paint(lambda d: d.ellipse(box, fill=255), color, shade, angle)

    def rect(
        self, box: Sequence[float], color: Color, *, outline: int = 0, radius: float = 0.0,
        shade: float = 0.0, angle: float = 0.0,
    ) -> Box | None:  # fmt: skip
        if outline:
            return self._paint(
                lambda d: d.rounded_rectangle(box, radius=radius, outline=255, width=outline),
                color, 0, 0,
            )  # fmt: skip
        return self._paint(
            lambda d: d.rounded_rectangle(box, radius=radius, fill=255), color, shade, angle
        )

    def poly(
        self, points: Sequence[Point], color: Color, *, outline: int = 0, shade: float = 0.0,
        angle: float = 0.0,
    ) -> Box | None:  # fmt: skip
        if outline:
            return self._paint(lambda d: d.polygon(points, outline=255, width=outline), color, 0, 0)
        return self._paint(lambda d: d.polygon(points, fill=255), color, shade, angle)

    def line(self, points: Sequence[Point], color: Color, *, width: int = 1) -> Box | None:
        return self._paint(lambda d: d.line(points, fill=255, width=width), color, 0, 0)


class _Frame:
    """Object-local coordinates: ``(x, y)`` in units of the object size ``s`` around its
    centre, optionally mirrored (``flip=-1``) and rotated by ``angle``."""

    def __init__(
        self, cx: float, cy: float, s: float, *, flip: float = 1.0, angle: float = 0.0
    ) -> None:
        self.cx, self.cy, self.s, self.flip = cx, cy, s, flip
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def p(self, x: float, y: float) -> Point:
        x *= self.flip * self.s
        y *= self.s
        return (self.cx + x * self.cos - y * self.sin, self.cy + x * self.sin + y * self.cos)

    def pts(self, *xy: tuple[float, float]) -> list[Point]:
        return [self.p(x, y) for x, y in xy]

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """Axis-aligned ``[x0, y0, x1, y1]`` (mirroring applied; rotation ignored)."""
        a, b = self.p(x0, y0), self.p(x1, y1)
        return [min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])]

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> list[Point]:
        """The four (rotated) corners of a local rectangle."""
        return self.pts((x0, y0), (x1, y0), (x1, y1), (x0, y1))

    def ngon(self, n: int, r: float, phase: float, y: float = 0.0) -> list[Point]:
        return [
            self.p(
                r * math.cos(phase + 2 * math.pi * k / n),
                y + r * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]


def _jitter(rng: np.random.Generator, color: Color, amount: float = 18.0) -> list[float]:
    return np.clip(np.asarray(color) + rng.normal(0.0, amount, 3), 0, 255).tolist()


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _low_freq(
    rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], color: float = 1.0
) -> np.ndarray:
    """Smooth noise ``[H, W, 3]`` in about -1..1 (a bicubically upsampled random grid).

    ``color`` in 0..1 mixes channel-independent noise into a shared (gray) component.
    """
    grid = rng.integers(0, 256, (cells[0], cells[1], 3)).astype(np.float32)
    grid = color * grid + (1.0 - color) * grid.mean(axis=2, keepdims=True)
    img = Image.fromarray(grid.round().astype(np.uint8), "RGB").resize(
        (w, h), Image.Resampling.BICUBIC
    )
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


BLACK = (0, 0, 0)
WHITE = (245, 245, 245)

# ------------------------------------------------------------------- per-class renderers
# A renderer draws one object in frame f (centre, size f.s) and returns its box.
Renderer = Callable[[_Canvas, np.random.Generator, _Frame], "Box | None"]


def _photo_car(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    paint = _jitter(rng, _pick(rng, [(185, 30, 35), (150, 20, 30), (205, 60, 40)]))
    lit = rng.uniform(0, 2 * math.pi)
    return _union([
        cv.rect(f.box(-0.3, -0.27, 0.25, 0), _jitter(rng, (120, 150, 175), 10), radius=0.07 * f.s,
                shade=0.4, angle=lit),
        cv.rect(f.box(-0.5, -0.06, 0.5, 0.2), paint, radius=0.08 * f.s, shade=0.5, angle=lit),
        cv.ellipse(f.box(-0.4, 0.1, -0.2, 0.3), (25, 25, 25)),
        cv.ellipse(f.box(0.2, 0.1, 0.4, 0.3), (25, 25, 25)),
    ])  # fmt: skip


def _photo_person(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    shirt = _jitter(rng, _pick(rng, [(40, 70, 160), (40, 120, 70), (200, 170, 40)]), 15)
    skin = _jitter(rng, _pick(rng, [(230, 190, 150), (190, 140, 100), (120, 80, 55)]), 10)
    jeans = _jitter(rng, (45, 50, 70), 8)
    lit = rng.uniform(0, 2 * math.pi)
    return _union([
        cv.rect(f.box(-0.14, 0.08, -0.02, 0.5), jeans, shade=0.3),
        cv.rect(f.box(0.02, 0.08, 0.14, 0.5), jeans, shade=0.3),
        cv.rect(f.box(-0.22, -0.26, 0.22, 0.05), _jitter(rng, shirt, 6), shade=0.3, angle=lit),
        cv.rect(f.box(-0.15, -0.27, 0.15, 0.12), shirt, radius=0.05 * f.s, shade=0.4, angle=lit),
        cv.ellipse(f.box(-0.1, -0.5, 0.1, -0.28), skin, shade=0.4, angle=lit),
    ])  # fmt: skip


def _photo_dog(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    fur = _jitter(rng, _pick(rng, [(120, 80, 40), (160, 120, 70), (90, 60, 35)]), 12)
    lit = rng.uniform(0, 2 * math.pi)
    parts = [cv.rect(f.box(x - 0.04, 0, x + 0.04, 0.3), _jitter(rng, fur, 6), shade=0.3)
             for x in (-0.28, -0.16, 0.12, 0.24)]  # fmt: skip
    tail = _Frame(*f.p(-0.42, -0.16), f.s, flip=f.flip, angle=0.6 * f.flip)
    parts += [
        cv.poly(tail.rect(-0.14, -0.03, 0.14, 0.03), fur),
        cv.ellipse(f.box(-0.36, -0.16, 0.32, 0.1), fur, shade=0.5, angle=lit),
        cv.ellipse(f.box(0.2, -0.33, 0.48, -0.07), fur, shade=0.4, angle=lit),
        cv.poly(f.pts((0.29, -0.28), (0.18, -0.08), (0.32, -0.14)), _jitter(rng, (60, 40, 25), 6)),
        cv.ellipse(f.box(0.41, -0.21, 0.47, -0.15), (20, 15, 15)),
    ]
    return _union(parts)


def _photo_bottle(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    glass = _jitter(rng, _pick(rng, [(40, 130, 60), (30, 100, 50), (110, 70, 30)]), 12)
    cap = _jitter(rng, _pick(rng, [(210, 180, 60), (200, 40, 40)]), 10)
    lit = rng.uniform(-0.5, 0.5)  # lit from the side
    parts = [
        cv.rect(f.box(-0.15, -0.18, 0.15, 0.5), glass, radius=0.06 * f.s, shade=0.8, angle=lit),
        cv.rect(f.box(-0.06, -0.42, 0.06, -0.15), glass, shade=0.8, angle=lit),
        cv.rect(f.box(-0.07, -0.5, 0.07, -0.42), cap),
    ]
    cv.rect(f.box(-0.15, 0.02, 0.15, 0.22), _jitter(rng, (235, 230, 215), 10), shade=0.5, angle=lit)
    return _union(parts)


def _ow(f: _Frame) -> int:
    """Clip-art outline width."""
    return max(1, round(f.s / 28))


def _clip_car(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    paint = _jitter(rng, _pick(rng, [(40, 110, 230), (30, 190, 220), (60, 80, 200)]), 15)
    shape = f.pts((-0.5, 0.15), (-0.5, -0.02), (-0.3, -0.05), (-0.17, -0.28), (0.2, -0.28),
                  (0.33, -0.05), (0.5, -0.02), (0.5, 0.15))  # fmt: skip
    window = f.pts((-0.13, -0.23), (0.17, -0.23), (0.26, -0.06), (-0.22, -0.06))
    parts = [cv.poly(shape, paint), cv.poly(shape, BLACK, outline=_ow(f))]
    cv.poly(window, (200, 235, 250))
    cv.poly(window, BLACK, outline=_ow(f))
    for x in (-0.27, 0.27):
        parts.append(cv.ellipse(f.box(x - 0.12, 0.03, x + 0.12, 0.27), (20, 20, 20)))
        cv.ellipse(f.box(x - 0.06, 0.09, x + 0.06, 0.21), (190, 190, 190))
    return _union(parts)


def _clip_person(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    dress = _jitter(rng, _pick(rng, [(230, 90, 170), (160, 80, 220), (240, 120, 200)]), 15)
    body = f.pts((0, -0.2), (0.25, 0.35), (-0.25, 0.35))
    head = f.box(-0.16, -0.5, 0.16, -0.18)
    parts = [cv.rect(f.box(x - 0.03, 0.3, x + 0.03, 0.5), BLACK) for x in (-0.1, 0.1)]
    parts.append(
        cv.line(f.pts((-0.32, -0.05), (0.32, -0.05)), BLACK, width=max(2, round(0.05 * f.s)))
    )
    parts.append(cv.poly(body, dress))
    cv.poly(body, BLACK, outline=_ow(f))
    parts.append(cv.ellipse(head, _jitter(rng, (255, 215, 60), 10)))
    cv.ellipse(head, BLACK, outline=_ow(f))
    for x in (-0.06, 0.06):
        cv.ellipse(f.box(x - 0.025, -0.38, x + 0.025, -0.33), BLACK)
    return _union(parts)


def _clip_bird(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    feathers = _jitter(rng, _pick(rng, [(240, 120, 30), (230, 50, 40), (250, 160, 40)]), 15)
    tail = f.pts((-0.3, 0), (-0.52, -0.18), (-0.52, 0.12))
    beak = f.pts((0.4, -0.2), (0.4, -0.08), (0.61, -0.14))
    parts = []
    for draw in (
        lambda: cv.poly(tail, feathers),
        lambda: cv.ellipse(f.box(-0.38, -0.2, 0.25, 0.22), feathers),
        lambda: cv.ellipse(f.box(-0.2, -0.08, 0.08, 0.12), _jitter(rng, (150, 60, 20), 10)),
        lambda: cv.ellipse(f.box(0.13, -0.3, 0.43, 0), feathers),
        lambda: cv.poly(beak, (255, 200, 0)),
    ):
        parts.append(draw())
    cv.poly(tail, BLACK, outline=_ow(f))
    cv.ellipse(f.box(-0.38, -0.2, 0.25, 0.22), BLACK, outline=_ow(f))
    cv.ellipse(f.box(0.13, -0.3, 0.43, 0), BLACK, outline=_ow(f))
    cv.poly(beak, BLACK, outline=_ow(f))
    cv.ellipse(f.box(0.3, -0.21, 0.36, -0.15), BLACK)
    return _union(parts)


def _clip_chair(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    wood = _jitter(rng, _pick(rng, [(170, 110, 50), (200, 150, 80), (140, 90, 40)]), 12)
    parts = []
    for piece in ((-0.27, -0.5, -0.17, 0.5), (-0.27, -0.02, 0.27, 0.08), (0.16, 0.05, 0.24, 0.5),
                  (-0.27, -0.5, -0.02, -0.25)):  # back, seat, leg, back rest  # fmt: skip
        parts.append(cv.rect(f.box(*piece), wood))
        cv.rect(f.box(*piece), BLACK, outline=_ow(f))
    return _union(parts)


def _aerial_plane(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    hull = _jitter(rng, (225, 225, 232), 8)
    wings = f.pts(
        (0.1, 0), (-0.08, 0.45), (-0.16, 0.45), (-0.06, 0), (-0.16, -0.45), (-0.08, -0.45)
    )
    return _union([
        cv.poly(f.rect(-0.5, -0.07, 0.5, 0.07), hull, shade=0.2),
        cv.poly(wings, hull, shade=0.2),
        cv.poly(f.rect(-0.48, -0.17, -0.36, 0.17), hull, shade=0.2),
    ])  # fmt: skip


def _aerial_ship(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    hull = f.pts((0.5, 0), (0.3, 0.18), (-0.5, 0.18), (-0.5, -0.18), (0.3, -0.18))
    box = cv.poly(hull, _jitter(rng, (235, 235, 240), 8))
    cv.poly(f.rect(-0.33, -0.07, 0.03, 0.07), _jitter(rng, (90, 90, 110), 10))
    return box


def _aerial_car(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    paint = _jitter(
        rng, _pick(rng, [(210, 30, 30), (30, 60, 200), (235, 210, 30), (245, 245, 245)])
    )
    box = cv.poly(f.rect(-0.5, -0.3, 0.5, 0.3), paint)
    cv.poly(f.rect(0.02, -0.23, 0.22, 0.23), (30, 30, 40))
    return box


def _aerial_tank(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    disc = f.box(-0.5, -0.5, 0.5, 0.5)
    box = cv.ellipse(disc, _jitter(rng, (200, 200, 195), 8), shade=0.4, angle=rng.uniform(0, 6.3))
    cv.ellipse(disc, (95, 95, 90), outline=max(1, round(f.s / 8)))
    cv.ellipse(f.box(-0.12, -0.12, 0.12, 0.12), (120, 120, 115))
    return box


def _pole(cv: _Canvas, f: _Frame) -> None:
    cv.rect(f.box(-0.05, 0, 0.05, 1.6), (90, 90, 95))


def _sign_stop(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    _pole(cv, f)
    box = cv.poly(f.ngon(8, 0.5, math.pi / 8), _jitter(rng, (200, 25, 30), 12), shade=0.3)
    cv.poly(f.ngon(8, 0.42, math.pi / 8), WHITE, outline=max(1, round(f.s / 14)))
    cv.rect(f.box(-0.25, -0.06, 0.25, 0.06), WHITE)
    return box


def _sign_speed(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    _pole(cv, f)
    disc = f.box(-0.5, -0.5, 0.5, 0.5)
    box = cv.ellipse(disc, WHITE, shade=0.2)
    cv.ellipse(disc, _jitter(rng, (210, 20, 25), 10), outline=max(2, round(f.s / 7)))
    for x in (-0.12, 0.12):  # two "digits"
        cv.rect(
            f.box(x - 0.07, -0.17, x + 0.07, 0.17), (10, 10, 10), outline=max(1, round(f.s / 18))
        )
    return box


def _sign_warning(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    _pole(cv, f)
    tri = f.ngon(3, 0.58, -math.pi / 2, y=0.08)
    box = cv.poly(tri, _jitter(rng, (245, 200, 20), 12), shade=0.3)
    cv.poly(tri, (15, 15, 15), outline=max(2, round(f.s / 10)))
    cv.rect(f.box(-0.04, -0.15, 0.04, 0.12), (15, 15, 15))
    cv.rect(f.box(-0.04, 0.18, 0.04, 0.25), (15, 15, 15))
    return box


def _sign_noturn(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    _pole(cv, f)
    box = cv.ellipse(f.box(-0.5, -0.5, 0.5, 0.5), _jitter(rng, (30, 80, 200), 12), shade=0.3)
    arrow = f.pts((-0.05, 0.3), (-0.05, -0.1), (-0.18, -0.1), (0.02, -0.32), (0.22, -0.1),
                  (0.09, -0.1), (0.09, 0.3))  # fmt: skip
    cv.poly(arrow, WHITE)
    cv.poly(
        _Frame(f.cx, f.cy, f.s, angle=math.pi / 4).rect(-0.45, -0.06, 0.45, 0.06), (215, 25, 30)
    )
    return box


_SKIN = [(255, 220, 180), (240, 195, 130), (225, 170, 110), (195, 135, 70), (140, 90, 45)]
_HAIR = [(30, 25, 20), (90, 60, 30), (200, 170, 90), (60, 40, 30), (150, 150, 150)]


def _face(cv: _Canvas, rng: np.random.Generator, f: _Frame) -> Box | None:
    shirt = _jitter(rng, _pick(rng, [(60, 90, 140), (140, 40, 50), (70, 110, 70), (200, 200, 200)]))
    hair = _jitter(rng, _pick(rng, _HAIR), 10)
    cv.ellipse(f.box(-0.75, 0.42, 0.75, 1.3), shirt)  # shoulders (not part of the box)
    cv.ellipse(f.box(-0.44, -0.62, 0.44, 0.2), hair)
    box = cv.ellipse(f.box(-0.39, -0.5, 0.39, 0.5), _jitter(rng, _pick(rng, _SKIN), 10), shade=0.35,
                     angle=rng.uniform(0, 2 * math.pi))  # fmt: skip
    cv._paint(lambda d: d.chord(f.box(-0.4, -0.56, 0.4, -0.05), 180, 360, fill=255), hair, 0, 0)
    for x in (-0.17, 0.17):
        cv.ellipse(f.box(x - 0.06, -0.04, x + 0.06, 0.04), (30, 25, 25))
    cv.ellipse(f.box(-0.14, 0.22, 0.14, 0.29), _jitter(rng, (170, 60, 60), 10))
    return box


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _DatasetStyle:
    """How one synthetic dataset looks: image size, objects per image, object sizes, renderers."""

    size: tuple[int, int]  # (width, height) at image_size=256
    count: tuple[int, int]  # objects per image, inclusive range
    obj_size: tuple[float, float]  # object size range (pixels at image_size=256)
    extent: dict[str, tuple[float, float]]  # class -> approximate (w, h) / size, for placement
    renderers: dict[str, Renderer]
    min_px: float = 0.0  # floor on object size after scaling (aerial stays >= 8 px)
    reserve_below: float = 0.0  # extra height (/ size) kept free below an object (shoulders)
    rotate: bool = False  # random in-plane rotation (top-down views)


def _bg_photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    top = np.asarray(
        _jitter(rng, _pick(rng, [(150, 180, 215), (190, 185, 170), (120, 130, 140)]), 20)
    )
    bottom = np.asarray(
        _jitter(rng, _pick(rng, [(90, 110, 60), (120, 100, 80), (110, 110, 110)]), 20)
    )
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    arr = top * (1 - t) + bottom * t + 45.0 * _low_freq(rng, h, w, (4, 5), 0.3)  # [H, W, 3]
    arr += 25.0 * _low_freq(rng, h, w, (12, 16), 0.15)
    arr += rng.normal(0.0, 6.0, (h, w, 3))
    return arr.astype(np.float32)


def _bg_clipart(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[:] = _pick(rng, [(200, 230, 255), (255, 240, 200), (230, 210, 250), (210, 250, 220)])
    horizon = int(h * rng.uniform(0.6, 0.8))
    arr[horizon:] = _pick(rng, [(120, 200, 90), (240, 210, 140), (180, 180, 190)])
    cv = _Canvas(arr)
    ow = max(1, round(w / 128))
    if rng.random() < 0.6:  # sun
        sun = _Frame(rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.2) * h, 0.14 * w)
        cv.ellipse(sun.box(-0.5, -0.5, 0.5, 0.5), (255, 210, 40))
        cv.ellipse(sun.box(-0.5, -0.5, 0.5, 0.5), BLACK, outline=ow)
    for _ in range(int(rng.integers(0, 3))):  # clouds
        cloud = _Frame(rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.3) * h, w)
        cv.ellipse(cloud.box(-0.12, -0.035, 0.12, 0.035), (255, 255, 255))
        cv.ellipse(cloud.box(-0.12, -0.035, 0.12, 0.035), BLACK, outline=ow)
    cv.line([(0, horizon), (w, horizon)], BLACK, width=ow)
    return arr


def _bg_aerial(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = np.asarray(_pick(rng, [(85, 115, 65), (125, 115, 85), (100, 105, 90)]), np.float32)
    arr = base + 25.0 * _low_freq(rng, h, w, (6, 6), 0.3) + rng.normal(0, 7.0, (h, w, 3))
    cv = _Canvas(arr.astype(np.float32))
    for _ in range(int(rng.integers(2, 6))):  # fields
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        fw, fh = rng.uniform(0.15, 0.4) * w, rng.uniform(0.15, 0.4) * h
        cv.rect([x, y, x + fw, y + fh], _jitter(rng, base, 20))
    asphalt, paint = (105, 105, 108), (230, 230, 230)
    for _ in range(int(rng.integers(1, 3))):  # roads with dashed centre lines
        half = rng.uniform(0.04, 0.06) * w
        if rng.random() < 0.5:
            y = rng.uniform(0.15, 0.85) * h
            cv.rect([0, y - half, w, y + half], asphalt)
            for x in range(0, w, max(4, w // 16)):
                cv.line([(x, y), (x + w / 40, y)], paint)
        else:
            x = rng.uniform(0.15, 0.85) * w
            cv.rect([x - half, 0, x + half, h], asphalt)
            for y in range(0, h, max(4, h // 16)):
                cv.line([(x, y), (x, y + h / 40)], paint)
    return cv.arr


def _bg_signs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    horizon = int(h * rng.uniform(0.45, 0.6))
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]  # [h0, 1, 1]
    arr = np.empty((h, w, 3), dtype=np.float32)
    sky = np.asarray(_jitter(rng, (90, 150, 225), 15), np.float32)
    arr[:horizon] = sky * (1 - t) + np.float32(235) * t
    arr[horizon:] = _jitter(rng, (80, 140, 60), 15)
    arr += 12.0 * _low_freq(rng, h, w, (5, 8))
    cv = _Canvas(arr)
    for _ in range(int(rng.integers(2, 6))):  # trees on the horizon
        x, r = rng.uniform(0, w), rng.uniform(0.04, 0.09) * w
        cv.ellipse(
            [x - r, horizon - 1.6 * r, x + r, horizon + 0.3 * r], _jitter(rng, (35, 90, 40), 10)
        )
    vx = w * rng.uniform(0.4, 0.6)  # vanishing point
    road = [(vx - 0.02 * w, horizon), (vx + 0.02 * w, horizon), (0.95 * w, h), (0.05 * w, h)]
    cv.poly(road, _jitter(rng, (95, 95, 100), 8))
    for k in range(6):  # centre dashes, perspective-spaced
        y0 = horizon + (h - horizon) * (k / 6) ** 1.5
        y1 = horizon + (h - horizon) * ((k + 0.5) / 6) ** 1.5
        x0 = vx + (w / 2 - vx) * (y0 - horizon) / (h - horizon)
        x1 = vx + (w / 2 - vx) * (y1 - horizon) / (h - horizon)
        cv.line([(x0, y0), (x1, y1)], (240, 240, 230), width=2)
    arr += rng.normal(0.0, 4.0, (h, w, 3)).astype(np.float32)
    return arr


def _bg_faces(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    wall = np.asarray(
        _pick(rng, [(200, 185, 160), (170, 160, 150), (210, 200, 185), (150, 130, 110)])
    )
    cv = _Canvas((wall + 30.0 * _low_freq(rng, h, w, (3, 3))).astype(np.float32))
    for _ in range(int(rng.integers(1, 4))):  # windows, shelves, doors
        x, y = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.9) * h
        box = [x, y, x + rng.uniform(0.15, 0.4) * w, y + rng.uniform(0.15, 0.5) * h]
        cv.rect(box, _jitter(rng, wall * 0.7, 25))
    cv.arr += rng.normal(0.0, 5.0, (h, w, 3)).astype(np.float32)
    return cv.arr


_PHOTO = _DatasetStyle(
    size=(256, 192),
    count=(1, 6),
    obj_size=(32.0, 100.0),
    extent={"car": (1.0, 0.62), "person": (0.46, 1.0), "dog": (1.0, 0.72), "bottle": (0.32, 1.0)},
    renderers={
        "car": _photo_car,
        "person": _photo_person,
        "dog": _photo_dog,
        "bottle": _photo_bottle,
    },
)
_CLIPART = _DatasetStyle(
    size=(224, 224),
    count=(1, 5),
    obj_size=(40.0, 110.0),
    extent={"car": (1.0, 0.6), "person": (0.66, 1.0), "bird": (1.04, 0.6), "chair": (0.56, 1.0)},
    renderers={"car": _clip_car, "person": _clip_person, "bird": _clip_bird, "chair": _clip_chair},
)
_AERIAL = _DatasetStyle(
    size=(256, 256),
    count=(4, 12),
    obj_size=(12.0, 32.0),
    extent={"plane": (1.1, 1.1), "ship": (1.0, 1.0), "car": (1.0, 1.0), "storage-tank": (1.0, 1.0)},
    renderers={
        "plane": _aerial_plane,
        "ship": _aerial_ship,
        "car": _aerial_car,
        "storage-tank": _aerial_tank,
    },
    min_px=8.0,
    rotate=True,
)
_SIGNS = _DatasetStyle(
    size=(256, 160),
    count=(1, 4),
    obj_size=(16.0, 44.0),
    extent={
        "stop": (1.0, 1.0),
        "speedlimit": (1.0, 1.0),
        "warning": (1.0, 1.0),
        "noturn": (1.0, 1.0),
    },
    renderers={
        "stop": _sign_stop,
        "speedlimit": _sign_speed,
        "warning": _sign_warning,
        "noturn": _sign_noturn,
    },
)
_FACES = _DatasetStyle(
    size=(208, 256),
    count=(1, 7),
    obj_size=(20.0, 70.0),
    extent={"face": (0.95, 1.2)},
    renderers={"face": _face},
    reserve_below=0.5,
)

_BACKGROUNDS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "syn_photo": _bg_photo,
    "syn_clipart": _bg_clipart,
    "syn_aerial": _bg_aerial,
    "syn_signs": _bg_signs,
    "syn_faces": _bg_faces,
}
_STYLES: dict[str, _DatasetStyle] = {
    "syn_photo": _PHOTO,
    "syn_clipart": _CLIPART,
    "syn_aerial": _AERIAL,
    "syn_signs": _SIGNS,
    "syn_faces": _FACES,
}


def _overlaps(box: tuple[float, float, float, float], placed: list, limit: float) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for a0, b0, a1, b1 in placed:
        iw = min(x1, a1) - max(x0, a0)
        ih = min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0 and iw * ih > limit * min(area, (a1 - a0) * (b1 - b0)):
            return True
    return False


def _render_scene(
    name: str, rng: np.random.Generator, image_size: int
) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """One image of a (non-medical) dataset: ``uint8 [H, W, 3]`` and ``(class index, box)``s."""
    style = _STYLES[name]
    k = image_size / 256.0
    w, h = (max(16, round(v * k)) for v in style.size)
    if name == "syn_photo" and rng.random() < 0.3:  # some portrait photos
        w, h = h, w
    canvas = _Canvas(_BACKGROUNDS[name](rng, h, w))
    classes = SYNTHETIC_DATASETS[name]
    placed: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, Box]] = []
    for _ in range(int(rng.integers(style.count[0], style.count[1] + 1))):
        c = int(rng.integers(len(classes)))
        ew, eh = style.extent[classes[c]]
        for _try in range(20):
            s = max(style.min_px, rng.uniform(*style.obj_size) * k)
            hw, hh = ew * s / 2, eh * s / 2
            if 2 * hw + 2 >= w or 2 * hh + 2 >= h:
                continue
            if name == "syn_signs":  # signs stand above the road, in the upper part
                cy = rng.uniform(hh + 1, max(hh + 2, 0.7 * h - hh))
            else:
                cy = rng.uniform(hh + 1, h - hh - 1)
            cx = rng.uniform(hw + 1, w - hw - 1)
            approx = (cx - hw, cy - hh, cx + hw, cy + hh + style.reserve_below * s)
            if _overlaps(approx, placed, 0.2):
                continue
            angle = rng.uniform(0, 2 * math.pi) if style.rotate else 0.0
            flip = -1.0 if rng.random() < 0.5 else 1.0
            frame = _Frame(cx, cy, s, flip=flip, angle=angle)
            box = style.renderers[classes[c]](canvas, rng, frame)
            if box is not None and box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
                placed.append(approx)
                objects.append((c, box))
            break
    image = np.clip(canvas.arr, 0, 255).round().astype(np.uint8)
    return image, objects


def _render_medical(
    rng: np.random.Generator, image_size: int
) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """A grayscale CT-like slice ``uint8 [H, W]``: body, organs, spine, 1-3 lesion blobs."""
    n = max(32, round(224 * image_size / 256.0))
    k = n / 224.0
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    arr = np.full((n, n), 12.0, dtype=np.float32)
    cx, cy = n / 2 + rng.normal(0, 3 * k), n / 2 + rng.normal(0, 3 * k)
    ax, ay = rng.uniform(0.40, 0.46) * n, rng.uniform(0.30, 0.38) * n
    body = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    tissue = 105.0 + 18.0 * _low_freq(rng, n, n, (6, 6))[..., 0]
    arr[body] = tissue[body]
    ring = body & (((xx - cx) / (ax - 4 * k)) ** 2 + ((yy - cy) / (ay - 4 * k)) ** 2 > 1.0)
    arr[ring] = 150.0  # skin / fat line
    for _ in range(int(rng.integers(2, 4))):  # organs
        ox, oy = cx + rng.uniform(-0.5, 0.5) * ax, cy + rng.uniform(-0.5, 0.3) * ay
        rx, ry = rng.uniform(0.15, 0.3) * ax, rng.uniform(0.15, 0.35) * ay
        organ = (((xx - ox) / rx) ** 2 + ((yy - oy) / ry) ** 2 <= 1.0) & body
        arr[organ] = rng.uniform(70, 85) + 6.0 * tissue[organ] / 105.0
    sx, sy, sr = cx, cy + 0.65 * ay, 0.1 * ay  # vertebra: a bright ring, not a blob
    d2 = (xx - sx) ** 2 + (yy - sy) ** 2
    arr[d2 <= sr**2] = 215.0
    arr[d2 <= (0.6 * sr) ** 2] = 95.0
    objects: list[tuple[int, Box]] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(20):
            r = rng.uniform(5.0, 14.0) * k
            rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
            lx, ly = cx + rng.uniform(-0.7, 0.7) * ax, cy + rng.uniform(-0.7, 0.45) * ay
            if ((lx - cx) / (ax - rx - 6 * k)) ** 2 + ((ly - cy) / (ay - ry - 6 * k)) ** 2 > 1.0:
                continue  # keep the lesion inside the body
            approx = (lx - rx, ly - ry, lx + rx, ly + ry)
            if _overlaps(approx, placed, 0.0) or _overlaps(
                approx, [(sx - sr, sy - sr, sx + sr, sy + sr)], 0.0
            ):
                continue
            d2 = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2
            alpha = np.clip(1.5 * (1.0 - d2), 0.0, 1.0)  # soft-edged blob
            arr = arr * (1 - alpha) + (arr + rng.uniform(65, 95)) * alpha
            ys, xs = np.nonzero(alpha >= 0.5)
            objects.append(
                (0, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
            )
            placed.append(approx)
            break
    arr += rng.normal(0.0, 4.0, (n, n))
    return np.clip(arr, 0, 255).round().astype(np.uint8), objects


def _render(name: str, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list]:
    if name == "syn_medical":
        return _render_medical(rng, image_size)
    return _render_scene(name, rng, image_size)


# --------------------------------------------------------------------------- writing
def _ext(name: str) -> str:
    return "png" if name in ("syn_medical", "syn_clipart") else "jpg"


_Job = tuple[str, int, int, int, int, int, str]  # name, dataset, split, index, seed, size, out


def _make_image(job: _Job) -> dict[str, Any]:
    """Render and write one image; returns its JSON record and boxes (worker-safe)."""
    name, ds_index, split_index, i, seed, image_size, out = job
    rng = np.random.default_rng([seed, ds_index, split_index, i])
    image, objects = _render(name, rng, image_size)
    split = SPLITS[split_index]
    file_name = f"{split}_{i:05d}.{_ext(name)}"
    _save_image(image, Path(out) / name / "images" / file_name)
    h, w = image.shape[:2]
    return {"file_name": file_name, "height": h, "width": w, "objects": objects}


def _save_image(image: np.ndarray, path: Path) -> None:
    """Write ``uint8`` ``[H, W]`` (gray) or ``[H, W, 3]`` as ``.jpg`` (quality 92) or ``.png``."""
    pil = Image.fromarray(image, "L" if image.ndim == 2 else "RGB")
    if path.suffix == ".jpg":
        pil.save(path, quality=92, subsampling=0)
    else:
        pil.save(path, optimize=False, compress_level=6)


def _jobs(
    name: str, ds_index: int, split_index: int, n: int, seed: int, image_size: int, out: Path
) -> Iterator[_Job]:
    for i in range(n):
        yield (name, ds_index, split_index, i, seed, image_size, str(out))


def _coco_json(name: str, split: str, seed: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    info = {
        "description": f"damex synthetic benchmark: {name} {split}",
        "version": str(GENERATOR_VERSION),
        "seed": seed,
    }
    return _coco_from_records(
        records, info=info, classes=SYNTHETIC_DATASETS[name], supercategory=name
    )


def _coco_from_records(
    records: list[dict[str, Any]],
    *,
    info: dict[str, Any],
    classes: Sequence[str],
    supercategory: str,
) -> dict[str, Any]:
    """COCO JSON of rendered images: ``records`` are ``{"file_name", "height", "width",
    "objects": [(class index, (x0, y0, x1, y1))]}``; ids count from 1 in order."""
    images, annotations = [], []
    for i, rec in enumerate(records):
        image_id = i + 1
        images.append(
            {
                "id": image_id,
                "file_name": rec["file_name"],
                "height": rec["height"],
                "width": rec["width"],
            }
        )
        for c, (x0, y0, x1, y1) in rec["objects"]:
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": c + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": supercategory} for k, c in enumerate(classes)
        ],
    }


def _fresh_dataset_dir(path: Path) -> None:
    """Empty ``path/images`` and ``path/annotations`` (an existing ``path`` is removed first)."""
    if path.exists():
        shutil.rmtree(path)
    (path / "images").mkdir(parents=True)
    (path / "annotations").mkdir(parents=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_generation_args(
    seed: int, scale: float, image_size: int, *, image_sizes: tuple[int, int]
) -> None:
    """``ValueError`` unless ``seed >= 0``, ``0 < scale <= 100`` and ``image_size`` is within
    ``image_sizes`` (inclusive)."""
    lo, hi = image_sizes
    if not 0 < scale <= 100:
        raise ValueError(f"scale must be in (0, 100], got {scale}")
    if not lo <= image_size <= hi:
        raise ValueError(f"image_size must be in [{lo}, {hi}], got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _render_pool(workers: int) -> Pool | None:
    """A ``multiprocessing`` pool of ``workers`` processes; None for ``workers <= 1``."""
    if workers <= 1:
        return None
    import multiprocessing as mp

    return mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers)


def generate_benchmark(
    out: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    image_size: int = 256,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the six-dataset benchmark under ``out`` (existing dataset folders are replaced).

    Args:
        out: output folder.
        seed: the random seed; same seed -> identical files.
        scale: multiplies every split's image count (each split keeps >= 1 image).
        image_size: the longest image side in pixels (sizes and object sizes scale with it).
        workers: processes used to render (1 = in this process); the output does not depend
            on it.
        progress: show a tqdm progress bar.

    Returns:
        Summary: ``{"root", "generator_version", "seed", "scale", "image_size", "seconds",
        "datasets": {name: {"classes", "splits": {split: {"images", "boxes"}}}}}``. The same,
        minus ``seconds``, is written to ``out/.damex_synthetic.json`` (the marker that
        :func:`ensure_benchmark` checks), last, so an interrupted run is not taken as done.
    """
    from tqdm import tqdm

    _check_generation_args(seed, scale, image_size, image_sizes=(32, 4096))
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    plan = []
    for ds_index, name in enumerate(SYNTHETIC_DATASETS):
        _fresh_dataset_dir(root / name)
        for split_index, (split, n) in enumerate(split_sizes(name, scale).items()):
            plan.append((name, ds_index, split_index, split, n))
    total = sum(p[-1] for p in plan)
    summary: dict[str, Any] = {
        "root": str(root),
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "scale": scale,
        "image_size": image_size,
        "datasets": {n: {"classes": list(c), "splits": {}} for n, c in SYNTHETIC_DATASETS.items()},
    }
    pool = _render_pool(workers)
    try:
        with tqdm(total=total, desc="synthetic benchmark", unit="img", disable=not progress) as bar:
            for name, ds_index, split_index, split, n in plan:
                jobs = _jobs(name, ds_index, split_index, n, seed, image_size, root)
                it = pool.imap(_make_image, jobs, chunksize=8) if pool else map(_make_image, jobs)
                records = []
                for rec in it:
                    records.append(rec)
                    bar.update(1)
                coco = _coco_json(name, split, seed, records)
                _write_json(root / name / "annotations" / f"{split}.json", coco)
                summary["datasets"][name]["splits"][split] = {
                    "images": len(coco["images"]),
                    "boxes": len(coco["annotations"]),
                }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _write_json(root / MARKER_FILE, summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    logger.info(
        "synthetic benchmark: %d images in %.1f s under %s", total, summary["seconds"], root
    )
    return summary


def _marker_current(
    root: Path, marker_file: str, expected: Mapping[str, Any], datasets: Iterable[str]
) -> bool:
    """Whether ``root/marker_file`` holds ``expected`` and every dataset's annotations exist."""
    try:
        marker = json.loads((root / marker_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(marker.get(k) != v for k, v in expected.items()):
        return False
    return all(
        (root / name / "annotations" / f"{split}.json").is_file()
        for name in datasets
        for split in SPLITS
    )


def _generate_rendered(
    root: Path,
    *,
    datasets: Mapping[str, Sequence[str]],
    split_sizes: Callable[[str, float], Mapping[str, int]],
    render: Callable[[str, int, int, int], tuple[np.ndarray, list[Any]]],
    marker_file: str,
    version: int,
    tag: str,
    seed: int,
    scale: float,
    image_size: int,
) -> dict[str, Any]:
    """The write loop of the second-generation benchmarks (``synthetic_alt``,
    ``synthetic_conflict``): every dataset folder replaced, every split's images rendered by
    ``render(name, dataset index, split index, image index) -> (HWC uint8, objects)`` and saved,
    its COCO JSON written, and the marker file written last (an interrupted run is not taken as
    done). Returns the summary; the same minus ``seconds`` is the marker."""
    root.mkdir(parents=True, exist_ok=True)
    (root / marker_file).unlink(missing_ok=True)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "root": str(root),
        "generator_version": version,
        "seed": seed,
        "scale": scale,
        "image_size": image_size,
        "datasets": {},
    }
    for ds_index, name in enumerate(datasets):
        _fresh_dataset_dir(root / name)
        summary["datasets"][name] = {}
        for split_index, (split, n) in enumerate(split_sizes(name, scale).items()):
            records = []
            for i in range(n):
                image, objects = render(name, ds_index, split_index, i)
                file_name = f"{split}_{i:05d}.png"
                _save_image(image, root / name / "images" / file_name)
                records.append(
                    {
                        "file_name": file_name,
                        "height": image.shape[0],
                        "width": image.shape[1],
                        "objects": objects,
                    }
                )
            _write_split_json(
                root,
                name,
                split,
                records,
                description=f"damex {tag} benchmark: {name} {split}",
                version=version,
                seed=seed,
                classes=datasets[name],
                summary=summary,
            )
    _write_json(root / marker_file, summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _write_split_json(
    root: Path,
    name: str,
    split: str,
    records: list[dict[str, Any]],
    *,
    description: str,
    version: int,
    seed: int,
    classes: Sequence[str],
    summary: dict[str, Any],
) -> None:
    """Write ``name``'s ``split`` COCO JSON from rendered ``records`` and count it in ``summary``
    (``summary["datasets"][name][split]``)."""
    info = {"description": description, "version": str(version), "seed": seed}
    coco = _coco_from_records(records, info=info, classes=classes, supercategory=name)
    _write_json(root / name / "annotations" / f"{split}.json", coco)
    summary["datasets"][name][split] = {
        "images": len(coco["images"]),
        "boxes": len(coco["annotations"]),
    }


def _ensure_generated(
    root: Path,
    marker_file: str,
    expected: Mapping[str, Any],
    datasets: Iterable[str],
    generate: Callable[[], object],
) -> Path:
    """Run ``generate`` under an inter-process lock unless ``root`` already holds an up-to-date
    copy (checked again inside the lock: another rank may have just written it)."""
    datasets = list(datasets)
    if not _marker_current(root, marker_file, expected, datasets):
        with _lock(root.parent / f".{root.name}.lock"):
            if not _marker_current(root, marker_file, expected, datasets):
                generate()
    return root


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (several ranks may call ensure_benchmark at once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_benchmark(cfg: SyntheticConfig, *, workers: int = 1, progress: bool = True) -> Path:
    """Generate the benchmark under ``cfg.root`` unless an up-to-date copy is already there.

    "Up to date" means the marker file names the same generator version, seed, scale and image
    size and every annotation file exists; otherwise the dataset folders are regenerated (a
    stale folder is never reused silently). Safe to call from several processes at once.

    Args:
        cfg: ``data.synthetic`` of the config.
        workers: rendering processes if it has to generate.
        progress: show a progress bar if it has to generate.

    Returns:
        The benchmark root.
    """
    root = Path(cfg.root).expanduser()
    expected = {
        "generator_version": GENERATOR_VERSION, "seed": cfg.seed, "scale": cfg.scale,
        "image_size": cfg.image_size,
    }  # fmt: skip
    if _marker_current(root, MARKER_FILE, expected, SYNTHETIC_DATASETS):
        return root
    with _lock(root.parent / f".{root.name}.lock"):
        if not _marker_current(root, MARKER_FILE, expected, SYNTHETIC_DATASETS):
            if (root / MARKER_FILE).exists():
                logger.info("synthetic benchmark under %s is stale; regenerating", root)
            else:
                logger.info("generating the synthetic benchmark under %s", root)
            generate_benchmark(
                root,
                seed=cfg.seed,
                scale=cfg.scale,
                image_size=cfg.image_size,
                workers=workers,
                progress=progress,
            )
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m damex.data.synthetic --out DIR [--seed] [--scale] [--image-size]``."""
    parser = argparse.ArgumentParser(description="Generate the damex synthetic benchmark.")
    parser.add_argument("--out", default="data/synthetic", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every image count")
    parser.add_argument("--image-size", type=int, default=256, help="longest image side (px)")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    args = parser.parse_args(argv)
    summary = generate_benchmark(
        args.out, seed=args.seed, scale=args.scale, image_size=args.image_size, workers=args.workers
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
