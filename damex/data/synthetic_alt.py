"""A second multi-domain benchmark with its own generator, for checking a recipe chosen elsewhere.

The built-in benchmark (:mod:`damex.data.synthetic`) is where the recipe is chosen (on its val
split); this one is only run once, with the chosen recipe, to see whether the choice carries
over. It shares only the plumbing with the built-in generator (canvas, file writing, marker, lock),
none of the content: other object shapes, other backgrounds, four domains instead of six and a
10:1 train-size imbalance::

    out/NAME/annotations/{train,val,test}.json
    out/NAME/images/{split}_{index:05d}.png
    out/.damex_synthetic_alt.json       marker: generator version, seed, image size

==============  =====================================================  =================  =====
name            domain                                                 classes            train
==============  =====================================================  =================  =====
alt_docs        scanned pages: paper, text lines; large page objects   table, figure,     300
                                                                       stamp
alt_underwater  blue-green water, caustics, sand; mid-size animals      fish, starfish,    120
                                                                       jellyfish
alt_night       dark streets with lamps and lit windows; small objects  car, lamp,          60
                                                                       pedestrian
alt_cells       pale stained microscopy field; many tiny cells          cell, dividing     30
==============  =====================================================  =================  =====

Object sizes differ by an order of magnitude across domains (pages: 40-110 px, cells: 7-16 px
at 256 px); no class name appears in two datasets, so the label space is disjoint under either
label policy. Deterministic: image ``i`` of a split comes from
``numpy.random.default_rng([seed, 1000 + dataset, split, i])``.

The catalog knows the datasets as ``alt_*`` under ``{data.root}/synthetic_alt``;
``damex make-synthetic --alt`` (or :func:`ensure_alt_benchmark`) generates them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# one canvas, box-union rule, image / JSON writer, lock and completion marker for both generators
from damex.data.synthetic import (
    SPLITS,
    Box,
    _Canvas,
    _check_generation_args,
    _ensure_generated,
    _generate_rendered,
    _scaled_split_sizes,
    _union,
)

__all__ = [
    "ALT_DATASETS",
    "ALT_GENERATOR_VERSION",
    "ALT_MARKER_FILE",
    "SPLITS",
    "alt_split_sizes",
    "ensure_alt_benchmark",
    "generate_alt_benchmark",
]

ALT_GENERATOR_VERSION = 1
ALT_MARKER_FILE = ".damex_synthetic_alt.json"

ALT_DATASETS: dict[str, list[str]] = {
    "alt_docs": ["table", "figure", "stamp"],
    "alt_underwater": ["fish", "starfish", "jellyfish"],
    "alt_night": ["car", "lamp", "pedestrian"],
    "alt_cells": ["cell", "dividing"],
}

# (train, val, test) at scale 1: 300 .. 30 train images (10:1)
_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "alt_docs": (300, 30, 60),
    "alt_underwater": (120, 20, 40),
    "alt_night": (60, 20, 40),
    "alt_cells": (30, 20, 40),
}


def alt_split_sizes(name: str, scale: float = 1.0) -> dict[str, int]:
    """Images per split of an ``alt_*`` dataset at ``scale`` (at least 1 each)."""
    return _scaled_split_sizes(_SPLIT_SIZES[name], scale)


# --------------------------------------------------------------------------- drawing
class _Layer(_Canvas):
    """The built-in benchmark's canvas with blurred, translucent shapes (``paint``)."""

    def __init__(self, arr: np.ndarray) -> None:
        super().__init__(arr.astype(np.float32))

    def paint(
        self,
        draw: Callable[[ImageDraw.ImageDraw], None],
        color: Any,
        blur: float = 0.0,
        opacity: float = 1.0,
    ) -> Box | None:
        mask = self._mask(draw, filled=True)
        if blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        box = mask.getbbox()
        if box is None:
            return None
        x0, y0 = box[:2]
        alpha = opacity * np.asarray(mask.crop(box), np.float32)[..., None] / 255.0
        self._composite(box, alpha, np.asarray(color, np.float32))
        # the object box: pixels at least half covered
        ys, xs = np.nonzero(alpha[..., 0] >= 0.5 * opacity)
        if len(xs) == 0:
            return None
        return (
            x0 + int(xs.min()),
            y0 + int(ys.min()),
            x0 + int(xs.max()) + 1,
            y0 + int(ys.max()) + 1,
        )


def _col(rng: np.random.Generator, base: tuple[float, float, float], amount: float = 15.0):
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, amount, 3), 0, 255).tolist()


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise ``[H, W]`` in about -1..1."""
    grid = rng.integers(0, 256, (cells, cells)).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------- documents
def _bg_docs(rng: np.random.Generator, h: int, w: int) -> _Layer:
    paper = np.asarray(_col(rng, (238, 234, 222), 8), np.float32)
    arr = paper + 6.0 * _smooth(rng, h, w, 6)[..., None] + rng.normal(0, 3.0, (h, w, 3))
    layer = _Layer(arr)
    margin = rng.uniform(0.06, 0.1) * w
    y = margin
    ink = _col(rng, (40, 40, 50), 6)
    while y < h - margin:  # text lines
        x1 = w - margin - rng.uniform(0, 0.3) * w
        layer.paint(lambda d, y=y, x1=x1: d.rectangle([margin, y, x1, y + 2]), ink, opacity=0.55)
        y += rng.uniform(6, 9)
    return layer


def _doc_table(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    w, h = s * rng.uniform(0.9, 1.3), s * rng.uniform(0.5, 0.8)
    x0, y0 = cx - w / 2, cy - h / 2
    layer.paint(lambda d: d.rectangle([x0, y0, x0 + w, y0 + h]), (250, 250, 248))
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
    line = _col(rng, (30, 30, 30), 5)
    parts = [
        layer.paint(lambda d: d.rectangle([x0, y0, x0 + w, y0 + h], outline=255, width=2), line)
    ]
    for r in range(1, rows):
        yy = y0 + h * r / rows
        layer.paint(lambda d, yy=yy: d.line([(x0, yy), (x0 + w, yy)], fill=255, width=1), line)
    for c in range(1, cols):
        xx = x0 + w * c / cols
        layer.paint(lambda d, xx=xx: d.line([(xx, y0), (xx, y0 + h)], fill=255, width=1), line)
    return _union(parts)


def _doc_figure(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    w, h = s * rng.uniform(0.7, 1.0), s * rng.uniform(0.6, 0.9)
    x0, y0 = cx - w / 2, cy - h / 2
    box = layer.paint(
        lambda d: d.rectangle([x0, y0, x0 + w, y0 + h]), _col(rng, (225, 232, 245), 8)
    )
    n = int(rng.integers(3, 7))
    colors = [(70, 110, 200), (220, 120, 40), (80, 170, 90)]
    for i in range(n):  # bar chart
        bh = max(3.0, h * rng.uniform(0.15, 0.85))
        bx = x0 + w * (0.1 + 0.8 * i / n)
        layer.paint(
            lambda d, bx=bx, bh=bh: d.rectangle([bx, y0 + h - bh, bx + 0.6 * w / n, y0 + h - 2]),
            _col(rng, colors[i % 3], 10),
        )
    return box


def _doc_stamp(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    r = s * rng.uniform(0.25, 0.35)
    ink = _col(rng, (190, 30, 40), 15)
    box = layer.paint(
        lambda d: d.ellipse(
            [cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, round(r / 6))
        ),
        ink,
        opacity=0.85,
    )
    layer.paint(
        lambda d: d.regular_polygon((cx, cy, 0.5 * r), 5, rotation=rng.uniform(0, 72)),
        ink,
        opacity=0.85,
    )
    return box


# ---------------------------------------------------------------------- underwater
def _bg_underwater(rng: np.random.Generator, h: int, w: int) -> _Layer:
    top = np.asarray(_col(rng, (40, 120, 160), 12), np.float32)
    bottom = np.asarray(_col(rng, (10, 50, 80), 8), np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    arr = top * (1 - t) + bottom * t
    caustic = np.abs(_smooth(rng, h, w, 12))  # bright ridges
    arr = arr + 40.0 * np.clip(0.25 - caustic, 0, 1)[..., None] * (1 - t)
    sand = int(h * rng.uniform(0.75, 0.9))
    arr[sand:] = (
        np.asarray(_col(rng, (170, 150, 100), 10)) + 10 * _smooth(rng, h - sand, w, 8)[..., None]
    )
    arr += rng.normal(0, 4.0, (h, w, 3))
    return _Layer(arr)


def _fish(layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float) -> Box | None:
    body = _col(rng, [(240, 140, 30), (230, 220, 60), (200, 60, 60)][int(rng.integers(3))], 15)
    d = 1 if rng.random() < 0.5 else -1
    bw, bh = s * 0.5, s * 0.22
    tail = [
        (cx - d * bw, cy),
        (cx - d * (bw + 0.35 * s), cy - bh),
        (cx - d * (bw + 0.35 * s), cy + bh),
    ]
    parts = [
        layer.paint(lambda dr: dr.ellipse([cx - bw, cy - bh, cx + bw, cy + bh]), body),
        layer.paint(lambda dr: dr.polygon(tail), body),
    ]
    ex = cx + d * 0.55 * bw
    layer.paint(
        lambda dr: dr.ellipse([ex - 2, cy - 0.4 * bh - 2, ex + 2, cy - 0.4 * bh + 2]), (10, 10, 10)
    )
    return _union(parts)


def _starfish(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    r_out, r_in = s * 0.5, s * 0.2
    phase = rng.uniform(0, 2 * math.pi)
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = phase + math.pi * k / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return layer.paint(lambda d: d.polygon(pts), _col(rng, (220, 90, 140), 18))


def _jellyfish(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    r = s * 0.4
    col = _col(rng, (210, 180, 240), 12)
    parts = [
        layer.paint(
            lambda d: d.pieslice([cx - r, cy - r, cx + r, cy + r], 180, 360), col, opacity=0.8
        )
    ]
    for k in range(4):
        x = cx - 0.7 * r + 1.4 * r * k / 3
        wav = [(x + 2 * math.sin(j + k), cy + j * s * 0.1) for j in range(7)]
        parts.append(
            layer.paint(lambda d, wav=wav: d.line(wav, fill=255, width=2), col, opacity=0.8)
        )
    return _union(parts)


# --------------------------------------------------------------------------- night
def _bg_night(rng: np.random.Generator, h: int, w: int) -> _Layer:
    sky = np.asarray(_col(rng, (15, 18, 35), 5), np.float32)
    arr = np.broadcast_to(sky, (h, w, 3)).copy()
    layer = _Layer(arr)
    ground = int(h * rng.uniform(0.6, 0.75))
    layer.paint(lambda d: d.rectangle([0, ground, w, h]), _col(rng, (35, 35, 40), 4))
    for _ in range(int(rng.integers(2, 5))):  # building silhouettes with a few lit windows
        bx, bw = rng.uniform(0, w), rng.uniform(0.15, 0.35) * w
        top = rng.uniform(0.15, 0.45) * h
        layer.paint(
            lambda d, bx=bx, bw=bw, top=top: d.rectangle([bx, top, bx + bw, ground]),
            _col(rng, (25, 25, 30), 4),
        )
        for _ in range(int(rng.integers(0, 4))):
            wx, wy = bx + rng.uniform(0.1, 0.8) * bw, rng.uniform(top + 3, ground - 8)
            layer.paint(
                lambda d, wx=wx, wy=wy: d.rectangle([wx, wy, wx + 4, wy + 5]),
                _col(rng, (200, 170, 90), 15),
                opacity=0.7,
            )
    layer.arr += rng.normal(0, 5.0, (h, w, 3)).astype(np.float32)
    return layer


def _car_night(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    w, h = s, s * 0.45
    box = layer.paint(
        lambda d: d.rounded_rectangle(
            [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], radius=h / 4
        ),
        _col(rng, (60, 60, 75), 8),
    )
    for x in (cx - 0.35 * w, cx + 0.35 * w):  # headlights with glow
        layer.paint(
            lambda d, x=x: d.ellipse([x - 0.12 * h, cy, x + 0.12 * h, cy + 0.24 * h]),
            (255, 250, 220),
            blur=1.5,
        )
    return box


def _lamp(layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float) -> Box | None:
    r = s * 0.18
    post = layer.paint(lambda d: d.rectangle([cx - 1, cy, cx + 1, cy + s * 0.8]), (70, 70, 75))
    layer.paint(
        lambda d: d.ellipse([cx - 2.5 * r, cy - 2.5 * r, cx + 2.5 * r, cy + 2.5 * r]),
        _col(rng, (255, 200, 110), 10),
        blur=3.0,
        opacity=0.5,
    )
    head = layer.paint(lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r]), (255, 235, 170))
    return _union([post, head])


def _pedestrian(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    col = _col(rng, (90, 85, 95), 10)
    hr = s * 0.1
    parts = [
        layer.paint(
            lambda d: d.ellipse([cx - hr, cy - 0.5 * s, cx + hr, cy - 0.5 * s + 2 * hr]), col
        ),
        layer.paint(
            lambda d: d.rectangle([cx - 0.15 * s, cy - 0.28 * s, cx + 0.15 * s, cy + 0.1 * s]), col
        ),
        layer.paint(
            lambda d: d.line(
                [(cx - 0.07 * s, cy + 0.1 * s), (cx - 0.12 * s, cy + 0.5 * s)],
                fill=255,
                width=max(2, round(s / 12)),
            ),
            col,
        ),
        layer.paint(
            lambda d: d.line(
                [(cx + 0.07 * s, cy + 0.1 * s), (cx + 0.12 * s, cy + 0.5 * s)],
                fill=255,
                width=max(2, round(s / 12)),
            ),
            col,
        ),
    ]
    return _union(parts)


# --------------------------------------------------------------------------- cells
def _bg_cells(rng: np.random.Generator, h: int, w: int) -> _Layer:
    base = np.asarray(_col(rng, (235, 205, 220), 8), np.float32)
    arr = base + 12.0 * _smooth(rng, h, w, 5)[..., None] + rng.normal(0, 3.0, (h, w, 3))
    layer = _Layer(arr)
    for _ in range(int(rng.integers(10, 25))):  # debris
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3)
        layer.paint(
            lambda d, x=x, y=y, r=r: d.ellipse([x - r, y - r, x + r, y + r]),
            _col(rng, (200, 150, 190), 10),
            opacity=0.5,
        )
    return layer


def _cell(layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float) -> Box | None:
    r = s * 0.5
    box = layer.paint(
        lambda d: d.ellipse([cx - r, cy - r * 0.9, cx + r, cy + r * 0.9]),
        _col(rng, (200, 120, 180), 12),
    )
    n = 0.4 * r
    layer.paint(lambda d: d.ellipse([cx - n, cy - n, cx + n, cy + n]), _col(rng, (90, 40, 120), 10))
    return box


def _dividing(
    layer: _Layer, rng: np.random.Generator, cx: float, cy: float, s: float
) -> Box | None:
    r = s * 0.3
    a = rng.uniform(0, math.pi)
    dx, dy = 0.55 * s * math.cos(a) / 2, 0.55 * s * math.sin(a) / 2
    col = _col(rng, (190, 110, 175), 12)
    parts = [
        layer.paint(lambda d, x=x, y=y: d.ellipse([x - r, y - r, x + r, y + r]), col)
        for x, y in ((cx - dx, cy - dy), (cx + dx, cy + dy))
    ]
    for x, y in ((cx - dx, cy - dy), (cx + dx, cy + dy)):
        layer.paint(
            lambda d, x=x, y=y: d.ellipse([x - 0.45 * r, y - 0.45 * r, x + 0.45 * r, y + 0.45 * r]),
            (60, 20, 90),
        )
    return _union(parts)


# ------------------------------------------------------------------------- datasets
_Renderer = Callable[[_Layer, np.random.Generator, float, float, float], "Box | None"]
# name -> (size (w, h) at 256 px, objects per image, object size range at 256 px, bg, renderers)
_STYLES: dict[
    str,
    tuple[
        tuple[int, int],
        tuple[int, int],
        tuple[float, float],
        Callable[[np.random.Generator, int, int], _Layer],
        list[_Renderer],
    ],
] = {
    "alt_docs": (
        (192, 256),
        (1, 4),
        (40.0, 110.0),
        _bg_docs,
        [_doc_table, _doc_figure, _doc_stamp],
    ),
    "alt_underwater": (
        (256, 192),
        (1, 5),
        (24.0, 70.0),
        _bg_underwater,
        [_fish, _starfish, _jellyfish],
    ),
    "alt_night": ((256, 160), (2, 6), (14.0, 40.0), _bg_night, [_car_night, _lamp, _pedestrian]),
    "alt_cells": ((224, 224), (6, 16), (7.0, 16.0), _bg_cells, [_cell, _dividing]),
}


def _render(name: str, rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list]:
    size, count, obj, bg, renderers = _STYLES[name]
    k = image_size / 256.0
    w, h = (max(32, round(v * k)) for v in size)
    layer = bg(rng, h, w)
    placed: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, Box]] = []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        c = int(rng.integers(len(renderers)))
        for _try in range(25):
            s = max(6.0, rng.uniform(*obj) * k)
            half = 0.75 * s
            if 2 * half + 2 >= min(w, h):
                continue
            cx, cy = rng.uniform(half + 1, w - half - 1), rng.uniform(half + 1, h - half - 1)
            approx = (cx - half, cy - half, cx + half, cy + half)
            if any(
                min(approx[2], p[2]) > max(approx[0], p[0])
                and min(approx[3], p[3]) > max(approx[1], p[1])
                for p in placed
            ):
                continue
            box = renderers[c](layer, rng, cx, cy, s)
            if box is not None and box[2] - box[0] >= 3 and box[3] - box[1] >= 3:
                placed.append(approx)
                objects.append((c, box))
            break
    return np.clip(layer.arr, 0, 255).round().astype(np.uint8), objects


def _render_indexed(
    name: str, ds_index: int, split_index: int, i: int, *, seed: int, image_size: int
) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """Image ``i`` of split ``split_index`` of dataset ``ds_index``, from its own RNG stream."""
    return _render(name, np.random.default_rng([seed, 1000 + ds_index, split_index, i]), image_size)


# -------------------------------------------------------------------------- writing
def generate_alt_benchmark(
    out: str | os.PathLike[str], seed: int = 0, scale: float = 1.0, image_size: int = 256
) -> dict[str, Any]:
    """Write the four ``alt_*`` datasets under ``out`` (existing dataset folders are replaced).

    Returns:
        Summary ``{"root", "generator_version", "seed", "scale", "image_size", "seconds",
        "datasets": {name: {split: {"images", "boxes"}}}}``; the same minus ``seconds`` is the
        marker file, written last.
    """
    _check_generation_args(seed, scale, image_size, image_sizes=(64, 2048))
    return _generate_rendered(
        Path(out),
        datasets=ALT_DATASETS,
        split_sizes=alt_split_sizes,
        render=functools.partial(_render_indexed, seed=seed, image_size=image_size),
        marker_file=ALT_MARKER_FILE,
        version=ALT_GENERATOR_VERSION,
        tag="synthetic_alt",
        seed=seed,
        scale=scale,
        image_size=image_size,
    )


def ensure_alt_benchmark(
    root: str | os.PathLike[str], seed: int = 0, scale: float = 1.0, image_size: int = 256
) -> Path:
    """Generate the ``alt_*`` datasets under ``root`` unless an up-to-date copy is there."""
    root = Path(root).expanduser()
    expected = {
        "generator_version": ALT_GENERATOR_VERSION, "seed": seed, "scale": scale,
        "image_size": image_size,
    }  # fmt: skip
    return _ensure_generated(
        root,
        ALT_MARKER_FILE,
        expected,
        ALT_DATASETS,
        functools.partial(
            generate_alt_benchmark, root, seed=seed, scale=scale, image_size=image_size
        ),
    )
