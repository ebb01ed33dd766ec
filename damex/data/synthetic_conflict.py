"""A generated benchmark with domain conflict: the same shapes under different label blocks.

Two datasets draw the *same* objects (circles, squares, triangles, placed by one layout
generator with the same sizes and counts) and name them in their own label blocks, in strongly
different image styles; a third dataset with shapes of its own is a non-conflicting control::

    out/NAME/annotations/{train,val,test}.json
    out/NAME/images/{split}_{index:05d}.png
    out/.damex_synthetic_conflict.json      marker: generator version, seed, scale, image size

===========  ==============================================  ===============================  =====
name         style                                           classes                          train
===========  ==============================================  ===============================  =====
conf_paint   saturated filled shapes, shaded, on a textured  paint_circle, paint_square,        150
             colour background                               paint_triangle
conf_sketch  dark pencil outlines on white paper             sketch_ball, sketch_box,           150
                                                             sketch_wedge
conf_neon    glowing outlines on a dark background (control) neon_star, neon_cross, neon_arrow  100
===========  ==============================================  ===============================  =====

A circle in a paint image is ``paint_circle``; the same circle in a sketch image is
``sketch_ball``. No class name is shared, so the label space is disjoint under either label
policy, and naming a box correctly requires knowing which dataset the image looks like: a
detector that confuses the domains gives boxes the other dataset's labels (the evaluation's
"foreign %", ``damex.evaluation.coco_eval``). The shape a class is drawn with is
``CONFLICT_SHAPES[name][class index]``.

Deterministic: image ``i`` of a split draws its layout from ``numpy.random.default_rng([seed,
2000 + dataset, split, i, 0])`` and its style (colours, texture, strokes) from ``[..., 1]``,
so a layout does not depend on the style that renders it.

The catalog knows the datasets as ``conf_*`` under ``{data.root}/synthetic_conflict``;
``damex make-synthetic --conflict`` (or :func:`ensure_conflict_benchmark`) generates them.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# the built-in generator's drawing, placement and writing helpers (one copy of each)
from damex.data.synthetic import (
    Box,
    Point,
    _Canvas,
    _check_generation_args,
    _ensure_generated,
    _Frame,
    _generate_rendered,
    _jitter,
    _low_freq,
    _overlaps,
    _pick,
    _scaled_split_sizes,
)

__all__ = [
    "CONFLICT_DATASETS",
    "CONFLICT_SHAPES",
    "CONFLICT_GENERATOR_VERSION",
    "CONFLICT_MARKER_FILE",
    "conflict_groups",
    "conflict_split_sizes",
    "ensure_conflict_benchmark",
    "generate_conflict_benchmark",
]

CONFLICT_GENERATOR_VERSION = 1
CONFLICT_MARKER_FILE = ".damex_synthetic_conflict.json"

# dataset -> its label block (class names, in category-id order)
CONFLICT_DATASETS: dict[str, list[str]] = {
    "conf_paint": ["paint_circle", "paint_square", "paint_triangle"],
    "conf_sketch": ["sketch_ball", "sketch_box", "sketch_wedge"],
    "conf_neon": ["neon_star", "neon_cross", "neon_arrow"],
}
# dataset -> the shape each of its classes is drawn with (same order as CONFLICT_DATASETS)
CONFLICT_SHAPES: dict[str, tuple[str, ...]] = {
    "conf_paint": ("circle", "square", "triangle"),
    "conf_sketch": ("circle", "square", "triangle"),
    "conf_neon": ("star", "cross", "arrow"),
}

# (train, val, test) at scale 1; the two conflicting datasets are the same size
_SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "conf_paint": (150, 30, 60),
    "conf_sketch": (150, 30, 60),
    "conf_neon": (100, 30, 60),
}

# one geometry for every dataset: only the shapes and the style differ
_SIZE = (256, 192)  # (width, height) at image_size=256
_COUNT = (2, 6)  # objects per image, inclusive
_OBJ_SIZE = (22.0, 64.0)  # object size range in pixels at image_size=256


def conflict_split_sizes(name: str, scale: float = 1.0) -> dict[str, int]:
    """Images per split of a ``conf_*`` dataset at ``scale`` (at least 1 each)."""
    return _scaled_split_sizes(_SPLIT_SIZES[name], scale)


def conflict_groups() -> list[list[str]]:
    """Groups of two or more datasets that draw the same shapes under different labels."""
    by_shapes: dict[tuple[str, ...], list[str]] = {}
    for name, shapes in CONFLICT_SHAPES.items():
        by_shapes.setdefault(shapes, []).append(name)
    return [names for names in by_shapes.values() if len(names) > 1]


# ---------------------------------------------------------------------------- shapes
def _outline(shape: str, f: _Frame) -> list[Point]:
    """The closed outline of a shape in frame ``f`` (centre, size ``f.s``, rotation)."""
    if shape == "circle":
        return f.ngon(40, 0.5, 0.0)
    if shape == "square":
        return f.rect(-0.4, -0.4, 0.4, 0.4)
    if shape == "triangle":
        return f.ngon(3, 0.55, -math.pi / 2, y=0.1)
    if shape == "star":
        radii = [0.5 if k % 2 == 0 else 0.2 for k in range(10)]
        angles = [-math.pi / 2 + math.pi * k / 5 for k in range(10)]
        return [f.p(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]
    if shape == "cross":
        a, b = 0.15, 0.5
        return f.pts(
            (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
            (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
        )  # fmt: skip
    if shape == "arrow":
        return f.pts((-0.5, -0.12), (0.05, -0.12), (0.05, -0.32), (0.5, 0.0),
                     (0.05, 0.32), (0.05, 0.12), (-0.5, 0.12))  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(_SHAPE_NAMES)}")


_SHAPE_NAMES = {s for shapes in CONFLICT_SHAPES.values() for s in shapes}

# (class index, centre x, centre y, size, rotation) of one object, in pixels and radians
_Placement = tuple[int, float, float, float, float]


def _layout(rng: np.random.Generator, num_classes: int, w: int, h: int, k: float) -> list:
    """Where the objects of one image go; the same for every dataset (only shapes differ).

    Args:
        rng: the image's layout generator.
        num_classes: classes of the dataset (a class index is drawn uniformly).
        w, h: image size in pixels.
        k: image_size / 256.

    Returns:
        ``_Placement``s, non-overlapping (their circumscribed squares are disjoint).
    """
    placed: list[tuple[float, float, float, float]] = []
    out: list[_Placement] = []
    for _ in range(int(rng.integers(_COUNT[0], _COUNT[1] + 1))):
        c = int(rng.integers(num_classes))
        for _try in range(25):
            s = max(8.0, rng.uniform(*_OBJ_SIZE) * k)
            half = 0.6 * s  # covers every outline at any rotation
            if 2 * half + 2 >= min(w, h):
                continue
            cx, cy = rng.uniform(half + 1, w - half - 1), rng.uniform(half + 1, h - half - 1)
            approx = (cx - half, cy - half, cx + half, cy + half)
            if _overlaps(approx, placed, 0.0):
                continue
            placed.append(approx)
            out.append((c, cx, cy, s, rng.uniform(0, 2 * math.pi)))
            break
    return out


# ---------------------------------------------------------------------------- styles
def _bg_paint(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured, mid-bright colour background ``[H, W, 3]``."""
    base = np.asarray(_jitter(rng, (135, 125, 115), 30))
    arr = base + 45.0 * _low_freq(rng, h, w, (4, 5), 0.8)  # broad colour patches
    arr += 25.0 * _low_freq(rng, h, w, (16, 20), 0.6)  # canvas texture
    arr += rng.normal(0.0, 6.0, (h, w, 3))
    return arr.astype(np.float32)


_PAINT_COLORS = [(220, 40, 40), (40, 90, 220), (240, 200, 30), (40, 170, 70), (200, 60, 200)]


def _paint(cv: _Canvas, rng: np.random.Generator, outline: list[Point]) -> Box | None:
    """Filled with a saturated colour (any class any colour), shaded; no outline."""
    color = _jitter(rng, _pick(rng, _PAINT_COLORS), 20)
    return cv.poly(outline, color, shade=0.5, angle=rng.uniform(0, 2 * math.pi))


def _bg_sketch(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """White paper ``[H, W, 3]`` (gray: the three channels are equal) with faint strokes."""
    paper = rng.uniform(238.0, 250.0)
    gray = 4.0 * _low_freq(rng, h, w, (6, 8), 0.0)[..., :1] + rng.normal(0.0, 2.0, (h, w, 1))
    cv = _Canvas(np.repeat(paper + gray, 3, axis=2).astype(np.float32))  # [H, W, 3]
    for _ in range(int(rng.integers(1, 4))):  # stray pencil marks, not objects
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        a, n = rng.uniform(0, 2 * math.pi), rng.uniform(6, 18)
        cv.line([(x, y), (x + n * math.cos(a), y + n * math.sin(a))], [200.0] * 3)
    return cv.arr


def _sketch(cv: _Canvas, rng: np.random.Generator, outline: list[Point]) -> Box | None:
    """A dark pencil outline and a lighter, slightly offset second stroke; no fill."""
    ink = [float(rng.uniform(30, 80))] * 3
    width = int(rng.integers(1, 3))
    closed = [*outline, outline[0]]
    box = cv.line(closed, ink, width=width)
    wobble = [(x + rng.normal(0, 0.7), y + rng.normal(0, 0.7)) for x, y in closed]
    cv.line(wobble, [min(255.0, ink[0] + 90.0)] * 3, width=1)
    return box


def _bg_neon(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark, slightly blue background ``[H, W, 3]``."""
    base = np.asarray(_jitter(rng, (18, 18, 34), 5))
    arr = base + 10.0 * _low_freq(rng, h, w, (3, 4), 0.5) + rng.normal(0.0, 3.0, (h, w, 3))
    return arr.astype(np.float32)


_NEON_COLORS = [(60, 255, 230), (255, 60, 200), (120, 255, 80), (255, 200, 60)]


def _neon(cv: _Canvas, rng: np.random.Generator, outline: list[Point]) -> Box | None:
    """A wide dim halo, a bright coloured tube and a white core along the outline."""
    color = np.asarray(_jitter(rng, _pick(rng, _NEON_COLORS), 12))
    closed = [*outline, outline[0]]
    box = cv.line(closed, (0.35 * color).tolist(), width=5)
    cv.line(closed, color.tolist(), width=3)
    cv.line(closed, [235.0, 235.0, 235.0], width=1)
    return box


_Background = Callable[[np.random.Generator, int, int], np.ndarray]
_Style = Callable[[_Canvas, np.random.Generator, list[Point]], "Box | None"]
_STYLES: dict[str, tuple[_Background, _Style]] = {
    "conf_paint": (_bg_paint, _paint),
    "conf_sketch": (_bg_sketch, _sketch),
    "conf_neon": (_bg_neon, _neon),
}


def _render(
    name: str, layout_rng: np.random.Generator, style_rng: np.random.Generator, image_size: int
) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """One image ``uint8 [H, W, 3]`` of dataset ``name`` and its ``(class index, box)``s."""
    k = image_size / 256.0
    w, h = (max(32, round(v * k)) for v in _SIZE)
    shapes = CONFLICT_SHAPES[name]
    background, style = _STYLES[name]
    layout = _layout(layout_rng, len(shapes), w, h, k)
    cv = _Canvas(background(style_rng, h, w))
    objects: list[tuple[int, Box]] = []
    for c, cx, cy, s, angle in layout:
        box = style(cv, style_rng, _outline(shapes[c], _Frame(cx, cy, s, angle=angle)))
        if box is not None and box[2] - box[0] >= 3 and box[3] - box[1] >= 3:
            objects.append((c, box))
    return np.clip(cv.arr, 0, 255).round().astype(np.uint8), objects


def _render_indexed(
    name: str, ds_index: int, split_index: int, i: int, *, seed: int, image_size: int
) -> tuple[np.ndarray, list[tuple[int, Box]]]:
    """Image ``i`` of split ``split_index`` of dataset ``ds_index``: one RNG stream for the
    layout, one for the style (the same layout draw gives the same objects in either style)."""
    key = [seed, 2000 + ds_index, split_index, i]
    return _render(
        name, np.random.default_rng([*key, 0]), np.random.default_rng([*key, 1]), image_size
    )


# --------------------------------------------------------------------------- writing
def generate_conflict_benchmark(
    out: str | os.PathLike[str], seed: int = 0, scale: float = 1.0, image_size: int = 256
) -> dict[str, Any]:
    """Write the three ``conf_*`` datasets under ``out`` (existing dataset folders are replaced).

    Args:
        out: output folder.
        seed: the random seed; the same seed gives byte-identical files.
        scale: multiplies every split's image count (each split keeps >= 1 image).
        image_size: the longest image side in pixels (object sizes scale with it).

    Returns:
        Summary ``{"root", "generator_version", "seed", "scale", "image_size", "seconds",
        "datasets": {name: {split: {"images", "boxes"}}}}``; the same minus ``seconds`` is the
        marker file, written last, so an interrupted run is not taken as done.
    """
    _check_generation_args(seed, scale, image_size, image_sizes=(64, 2048))
    return _generate_rendered(
        Path(out),
        datasets=CONFLICT_DATASETS,
        split_sizes=conflict_split_sizes,
        render=functools.partial(_render_indexed, seed=seed, image_size=image_size),
        marker_file=CONFLICT_MARKER_FILE,
        version=CONFLICT_GENERATOR_VERSION,
        tag="synthetic_conflict",
        seed=seed,
        scale=scale,
        image_size=image_size,
    )


def ensure_conflict_benchmark(
    root: str | os.PathLike[str], seed: int = 0, scale: float = 1.0, image_size: int = 256
) -> Path:
    """Generate the ``conf_*`` datasets under ``root`` unless an up-to-date copy is there."""
    root = Path(root).expanduser()
    expected = {
        "generator_version": CONFLICT_GENERATOR_VERSION, "seed": seed, "scale": scale,
        "image_size": image_size,
    }  # fmt: skip
    return _ensure_generated(
        root,
        CONFLICT_MARKER_FILE,
        expected,
        CONFLICT_DATASETS,
        functools.partial(
            generate_conflict_benchmark, root, seed=seed, scale=scale, image_size=image_size
        ),
    )
