"""Drawing boxes with labels on images; used by the routing overlays and the demo.

Rectangles come from ``torchvision.utils.draw_bounding_boxes``; labels are drawn with PIL at
positions chosen so that they do not cover each other (:func:`place_labels`), and
:func:`select_for_display` / :func:`upscale_for_display` keep explained overlays readable.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import nms
from torchvision.utils import draw_bounding_boxes

from damex.structures import Detections

__all__ = [
    "Color",
    "palette",
    "to_hwc_uint8",
    "draw_boxes",
    "draw_detections",
    "legend_strip",
    "place_labels",
    "save_png",
    "select_for_display",
    "upscale_for_display",
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


def _label_candidates(
    box: tuple[float, float, float, float], tw: float, th: float, w_img: int, h_img: int
) -> list[tuple[float, float]]:
    """Top-left corners to try for a ``tw x th`` label of ``box``, best first."""
    x1, y1, x2, y2 = box
    xr = max(x2 - tw, 0.0)  # right-aligned
    spots = [
        (x1, y1 - th),  # above the box, left
        (x1, y1),  # inside, top-left
        (x1, y2),  # below the box, left
        (x1, y2 - th),  # inside, bottom-left
        (xr, y1 - th),
        (xr, y2),
    ]
    out = []
    for x, y in spots:
        x = min(max(x, 0.0), max(w_img - tw, 0.0))
        y = min(max(y, 0.0), max(h_img - th, 0.0))
        out.append((x, y))
    return out


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def place_labels(
    boxes: Sequence[Sequence[float]],
    sizes: Sequence[tuple[float, float]],
    image_size: tuple[int, int],
) -> list[tuple[float, float]]:
    """Greedy label placement: each label (in the given order, best box first) goes to the first
    of a few spots around its box (above, inside top, below, inside bottom; left- then
    right-aligned) that overlaps no label placed before it, else to the spot overlapping least.

    Args:
        boxes: ``[N, 4]`` ``xyxy`` pixels.
        sizes: ``(width, height)`` of each label in pixels.
        image_size: ``(height, width)`` of the canvas (labels stay inside it).

    Returns:
        The top-left corner of every label.
    """
    h_img, w_img = image_size
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for box, (tw, th) in zip(boxes, sizes):
        best, best_cost = None, None
        for x, y in _label_candidates(tuple(box), tw, th, w_img, h_img):  # type: ignore[arg-type]
            rect = (x, y, x + tw, y + th)
            cost = sum(_overlap(rect, r) for r in placed)
            if best_cost is None or cost < best_cost:
                best, best_cost = (x, y), cost
            if cost == 0.0:
                break
        assert best is not None
        corners.append(best)
        placed.append((best[0], best[1], best[0] + tw, best[1] + th))
    return corners


def draw_boxes(
    image: Tensor | np.ndarray,
    boxes_xyxy: Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    colors: Sequence[Color] | Color = (255, 0, 0),
    texts: Sequence[str] | None = None,
    width: int = 2,
    font_size: int = 12,
) -> np.ndarray:
    """Draw rectangles (and a filled label beside each) on a copy of an image.

    Rectangles are drawn by ``torchvision.utils.draw_bounding_boxes``; labels are placed by
    :func:`place_labels` so that they do not cover each other (torchvision draws every label at
    its box's top-left corner, where the labels of overlapping boxes pile up).

    Args:
        image: RGB ``[3, H, W]`` or ``[H, W, 3]`` (see :func:`to_hwc_uint8`).
        boxes_xyxy: ``[N, 4]`` absolute pixels of ``image``; label placement priority follows
            this order (put the best box first).
        colors: one RGB colour per box, or one colour for all.
        texts: one label per box (drawn on a box-coloured background), or None.
        width: line width in pixels.
        font_size: label font size in pixels.

    Returns:
        ``uint8`` ``[H, W, 3]``.
    """
    hwc = to_hwc_uint8(image)
    h_img, w_img = hwc.shape[:2]
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
    if n == 0:
        return hwc.copy()
    # clip into the image and order the corners (draw_bounding_boxes needs x1 <= x2, y1 <= y2)
    xs = np.sort(np.clip(boxes[:, [0, 2]], 0.0, w_img - 1), axis=1)
    ys = np.sort(np.clip(boxes[:, [1, 3]], 0.0, h_img - 1), axis=1)
    clipped = np.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), axis=1)  # [N, 4]
    drawn = draw_bounding_boxes(
        # draw_bounding_boxes returns a new image; a read-only array (PIL's) is copied first
        torch.from_numpy(hwc if hwc.flags.writeable else hwc.copy()).permute(2, 0, 1),
        torch.from_numpy(clipped).float(),
        colors=cols,  # type: ignore[arg-type]
        width=width,
    )
    if texts is None:
        return np.ascontiguousarray(drawn.permute(1, 2, 0).numpy())
    canvas = Image.fromarray(np.ascontiguousarray(drawn.permute(1, 2, 0).numpy()))
    draw = ImageDraw.Draw(canvas)
    font = _font(font_size)
    order = [i for i in range(n) if texts[i]]
    extents = [draw.textbbox((0, 0), texts[i], font=font) for i in order]
    sizes = [(r - lft + 4.0, b - t + 4.0) for lft, t, r, b in extents]
    corners = place_labels([clipped[i].tolist() for i in order], sizes, (h_img, w_img))
    for i, (lft, top, _, _), (tw, th), (x, y) in zip(order, extents, sizes, corners):
        draw.rectangle((x, y, x + tw, y + th), fill=cols[i])
        draw.text((x + 2 - lft, y + 2 - top), texts[i], fill=_text_color(cols[i]), font=font)
    return np.asarray(canvas)


def select_for_display(
    detections: Detections,
    *,
    top_n: int = 20,
    min_score: float = 0.05,
    relative: float = 0.3,
    iou: float = 0.5,
) -> Tensor:
    """Which detections of one image to draw, best first: a readable subset.

    DINO keeps the top-K (query, class) pairs without NMS, so one object shows up as several
    boxes (one query with several classes, neighbouring queries). For display only:

    1. one box per query (its best class);
    2. a score threshold chosen per image: ``max(min_score, relative * best score)`` (a fixed
       threshold draws nothing on one image and a hundred boxes on another);
    3. class-agnostic NMS at ``iou`` (``torchvision.ops.nms``);
    4. at most ``top_n`` boxes.

    Returns:
        ``int64`` indices into ``detections``, by descending score.
    """
    n = len(detections)
    if n == 0 or top_n < 1:
        return torch.zeros(0, dtype=torch.long)
    scores = detections.scores.detach().cpu().float()
    boxes = detections.boxes.detach().cpu().float()
    order = torch.argsort(scores, descending=True, stable=True)
    if detections.query_index.numel() == n:
        seen: set[int] = set()
        first = []
        for i in order.tolist():
            q = int(detections.query_index[i])
            if q not in seen:
                seen.add(q)
                first.append(i)
        order = torch.tensor(first, dtype=torch.long)
    threshold = max(float(min_score), float(relative) * float(scores[order[0]]))
    order = order[scores[order] >= threshold]
    if order.numel() == 0:
        return order
    kept = nms(boxes[order], scores[order], float(iou))  # sorted by score
    return order[kept][:top_n]


def upscale_for_display(
    image: np.ndarray, boxes_xyxy: Tensor, min_side: int = 512
) -> tuple[np.ndarray, Tensor]:
    """Enlarge a small image (shorter side below ``min_side``) and its boxes for drawing.

    Returns:
        The ``uint8`` ``[H', W', 3]`` image (bicubic) and the boxes in its pixels; unchanged
        when the shorter side is already ``>= min_side``.
    """
    hwc = to_hwc_uint8(image)
    h, w = hwc.shape[:2]
    scale = min_side / max(min(h, w), 1)
    if scale <= 1.0:
        return hwc, boxes_xyxy
    size = (round(w * scale), round(h * scale))
    big = np.asarray(Image.fromarray(hwc).resize(size, Image.Resampling.BICUBIC))
    sx, sy = size[0] / w, size[1] / h
    return big, boxes_xyxy * boxes_xyxy.new_tensor([sx, sy, sx, sy])


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
