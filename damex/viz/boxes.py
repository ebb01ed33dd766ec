"""Drawing boxes with labels on images (PIL); used by the routing overlays and the demo."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from damex.structures import Detections

__all__ = [
    "Color",
    "palette",
    "to_hwc_uint8",
    "draw_boxes",
    "draw_detections",
    "legend_strip",
    "save_png",
]

Color = tuple[int, int, int]

# matplotlib's tab10 (colour-blind-friendlier than a hue wheel); more colours come from a
# golden-ratio hue walk.
_TAB10: tuple[Color, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def palette(n: int) -> list[Color]:
    """``n`` distinct RGB colours; the first 10 are matplotlib's tab10."""
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colors = list(_TAB10[:n])
    h = 0.1
    while len(colors) < n:
        h = (h + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
        colors.append((int(255 * r), int(255 * g), int(255 * b)))
    return colors


def to_hwc_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """An RGB image as a ``uint8`` ``[H, W, 3]`` array.

    Args:
        image: ``[3, H, W]`` (the ``Sample.image`` layout) or ``[H, W, 3]``, tensor or array;
            ``uint8``, or float in ``[0, 255]`` (clipped).
    """
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(f"image must be [3, H, W] or [H, W, 3], got {tuple(arr.shape)}")
    if arr.shape[-1] != 3:  # [3, H, W] -> [H, W, 3]
        arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _text_color(bg: Color) -> Color:
    luminance = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_boxes(
    image: Tensor | np.ndarray,
    boxes_xyxy: Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    colors: Sequence[Color] | Color = (255, 0, 0),
    texts: Sequence[str] | None = None,
    width: int = 2,
    font_size: int = 12,
) -> np.ndarray:
    """Draw rectangles (and a filled label above each) on a copy of an image.

    Args:
        image: RGB ``[3, H, W]`` or ``[H, W, 3]`` (see :func:`to_hwc_uint8`).
        boxes_xyxy: ``[N, 4]`` absolute pixels of ``image``.
        colors: one RGB colour per box, or one colour for all.
        texts: one label per box (drawn on a box-coloured background), or None.
        width: line width in pixels.
        font_size: label font size in pixels.

    Returns:
        ``uint8`` ``[H, W, 3]``.
    """
    canvas = Image.fromarray(to_hwc_uint8(image))
    if isinstance(boxes_xyxy, Tensor):
        boxes = boxes_xyxy.detach().cpu().double().numpy()
    else:
        boxes = np.asarray(boxes_xyxy, dtype=np.float64)
    boxes = boxes.reshape(-1, 4)  # [N, 4]
    n = boxes.shape[0]
    if len(colors) == 3 and all(isinstance(c, (int, np.integer)) for c in colors):
        cols = [tuple(int(v) for v in colors)] * n  # type: ignore[arg-type]
    else:
        cols = [tuple(int(v) for v in c) for c in colors]  # type: ignore[union-attr]
        if len(cols) != n:
            raise ValueError(f"got {len(cols)} colours for {n} boxes")
    if texts is not None and len(texts) != n:
        raise ValueError(f"got {len(texts)} texts for {n} boxes")
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    w_img, h_img = canvas.size
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x1, x2 = sorted((min(max(x1, 0.0), w_img - 1), min(max(x2, 0.0), w_img - 1)))
        y1, y2 = sorted((min(max(y1, 0.0), h_img - 1), min(max(y2, 0.0), h_img - 1)))
        color = cols[i]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        if texts is not None and texts[i]:
            left, top, right, bottom = draw.textbbox((0, 0), texts[i], font=font)
            tw, th = right - left, bottom - top
            ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1  # above the box, else inside it
            draw.rectangle((x1, ty, x1 + tw + 4, ty + th + 4), fill=color)
            draw.text((x1 + 2 - left, ty + 2 - top), texts[i], fill=_text_color(color), font=font)
    return np.asarray(canvas)


def draw_detections(
    image: Tensor | np.ndarray,
    detections: Detections,
    class_names: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.3,
    colors: Sequence[Color] | None = None,
    width: int = 2,
    font_size: int = 12,
) -> np.ndarray:
    """Draw the detections scoring at least ``score_threshold``, coloured by class.

    Args:
        image: RGB ``[3, H, W]`` or ``[H, W, 3]`` in the pixels of ``detections.boxes``.
        detections: boxes xyxy, scores, unified labels.
        class_names: name of every unified label (``LabelSpace.names``); None prints the index.
        score_threshold: minimum score drawn.
        colors: one colour per detection (all ``N``, before the threshold); default a palette
            colour per class.
        width: line width in pixels.
        font_size: label font size in pixels.

    Returns:
        ``uint8`` ``[H, W, 3]``.
    """
    keep = (detections.scores >= score_threshold).nonzero().flatten().cpu()  # [n]
    labels = detections.labels.cpu()[keep].tolist()
    scores = detections.scores.cpu()[keep].tolist()
    if colors is None:
        pal = palette(max(len(class_names or ()), max(labels, default=0) + 1))
        drawn = [pal[lab] for lab in labels]
    else:
        if len(colors) != len(detections):
            raise ValueError(f"got {len(colors)} colours for {len(detections)} detections")
        drawn = [tuple(colors[i]) for i in keep.tolist()]
    texts = [
        f"{class_names[lab] if class_names is not None else lab} {s:.2f}"
        for lab, s in zip(labels, scores)
    ]
    return draw_boxes(
        image,
        detections.boxes.cpu()[keep],
        colors=drawn,
        texts=texts,
        width=width,
        font_size=font_size,
    )


def legend_strip(
    width: int, entries: Sequence[tuple[str, Color]], font_size: int = 12
) -> np.ndarray:
    """A white ``uint8`` ``[h, width, 3]`` strip with one labelled colour swatch per entry.

    Args:
        width: strip width in pixels (the image's, to stack it below).
        entries: ``(label, colour)`` pairs, laid out left to right, wrapping.
        font_size: label font size in pixels.
    """
    font = _font(font_size)
    sw = font_size + 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((probe.textlength(t, font=font) for t, _ in entries), default=0.0)
    item = int(sw + 4 + text_w + 10)
    per_row = max(1, width // item)
    rows = -(-len(entries) // per_row)
    strip = Image.new("RGB", (width, rows * (sw + 6) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (text, color) in enumerate(entries):
        r, k = divmod(i, per_row)
        x, y = 4 + k * item, 3 + r * (sw + 6)
        draw.rectangle((x, y, x + sw, y + sw), fill=tuple(color))
        draw.text((x + sw + 4, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a ``uint8`` ``[H, W, 3]`` array as PNG (parent folders created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_hwc_uint8(image)).save(out, format="PNG")
    return out
