"""Ground truth for *generated* shapes images: colour segmentation of the objects a caption names.

The shapes palette is known (`COLOURS`), so a generated image's objects are found by colour: pixels close
to a palette colour (and closer to it than to any other palette colour) form that colour's mask; its
connected components are the candidate objects. Each component's shape is recognised by matching it against
the canonical polygon of every shape (same centroid, same area). `generated_ground_truth` returns a label
map when the objects match the caption (right colours, right shapes, right count, nothing extra), else the
reason for rejecting the image.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from bench.data.base import IGNORE_INDEX
from bench.data.shapes import CLASSES, COLOURS, SHAPES, shape_polygon

_OBJECT = re.compile(rf"^(?:a|an)\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})$")
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """'a red circle and a blue square' -> [('red', 'circle'), ('blue', 'square')]."""
    objects = []
    for part in caption.strip().lower().split(" and "):
        m = _OBJECT.match(part.strip())
        if m is None:
            raise ValueError(f"not a shapes caption: {caption!r} (part {part!r})")
        objects.append((m.group(1), m.group(2)))
    return objects


def draw_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean mask of one shape in pixel units, drawn exactly as `ShapesDataset.render` draws it."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    poly = shape_polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(poly, fill=1)
    return np.asarray(mask, dtype=bool)


def object_masks(objects: list[dict], size: int) -> list[np.ndarray]:
    """Per-object boolean masks of a layout (`Sample.extra["objects"]`, relative units) at `size` px."""
    return [draw_mask(o["shape"], o["cx"] * size, o["cy"] * size, o["r"] * size, size) for o in objects]


def _unit_area(shape: str) -> float:
    """Area of the shape with circumradius 1."""
    if shape == "circle":
        return math.pi
    pts = np.array(shape_polygon(shape, 0.0, 0.0, 1.0))
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


UNIT_AREA = {s: _unit_area(s) for s in SHAPES}


def colour_masks(image: np.ndarray, tolerance: float = 60.0) -> dict[str, np.ndarray]:
    """Per palette colour: pixels within `tolerance` (RGB distance) of it and nearest to it."""
    px = image[..., :3].astype(np.float32)
    dist = np.linalg.norm(px[..., None, :] - PALETTE, axis=-1)  # (H, W, C)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < tolerance
    return {name: close & (nearest == k) for k, name in enumerate(COLOURS)}


def shape_scores(component: np.ndarray) -> dict[str, float]:
    """Best IoU of a component with each canonical shape centred at its centroid, over radii around the
    one that matches its area (pixel coordinates as PIL rasterises them: pixel i covers coordinate i)."""
    size = max(component.shape)
    ys, xs = np.nonzero(component)
    cx, cy, area = float(xs.mean()), float(ys.mean()), float(len(xs))
    scores = {}
    for shape in SHAPES:
        r0 = math.sqrt(area / UNIT_AREA[shape])
        best = 0.0
        for f in (0.85, 0.9, 0.95, 1.0, 1.05, 1.1):
            template = draw_mask(shape, cx, cy, r0 * f, size)[: component.shape[0], : component.shape[1]]
            union = np.logical_or(template, component).sum()
            if union:
                best = max(best, float(np.logical_and(template, component).sum() / union))
        scores[shape] = best
    return scores


def generated_ground_truth(image: np.ndarray, caption: str, tolerance: float = 60.0,
                           min_area: float = 0.004, min_shape_iou: float = 0.5, shape_margin: float = 0.0,
                           ignore_border: int = 0) -> tuple[np.ndarray | None, str | None]:
    """(label map, None) when the image shows exactly the caption's objects, else (None, reason).

    label: (H, W) uint8 class ids (`CLASSES`), 0 background; with `ignore_border` > 0 a band of that many
    pixels around each object is IGNORE_INDEX (colour edges of generated images are soft).
    min_area: smallest object, as a fraction of the image; smaller same-colour specks are ignored, larger
    components of a colour the caption does not name (or one more than it names) reject the image.
    A component passes as the named shape when its IoU with that shape's template is >= min_shape_iou and
    within shape_margin of the best-matching shape (default 0: it must be the best match; small or
    soft-edged stars and crosses look round, and a margin accepts them but also lets wrong shapes through).
    """
    try:
        wanted = parse_caption(caption)
    except ValueError as err:
        return None, str(err)
    h, w = image.shape[:2]
    min_px = max(4, int(min_area * h * w))
    masks = colour_masks(image, tolerance)
    label = np.zeros((h, w), dtype=np.uint8)
    for colour, mask in masks.items():
        names = [shape for c, shape in wanted if c == colour]
        comps, n = ndimage.label(mask)
        sizes = ndimage.sum(np.ones_like(comps), comps, index=range(1, n + 1)) if n else []
        big = [i + 1 for i, s in enumerate(sizes) if s >= min_px]
        if len(big) < len(names):
            return None, f"{len(names) - len(big)} {colour} object(s) missing ({' '.join(names)})"
        if len(big) > len(names):
            return None, f"{len(big) - len(names)} unexpected {colour} object(s)"
        if not names:
            continue
        objs = [ndimage.binary_fill_holes(comps == i) for i in big]
        scores = [shape_scores(o) for o in objs]
        best = max(itertools.permutations(range(len(objs))),
                   key=lambda perm: sum(scores[j][names[k]] for k, j in enumerate(perm)))
        for k, j in enumerate(best):
            recognised = max(scores[j], key=scores[j].get)
            named = scores[j][names[k]]
            if named < min_shape_iou or named < scores[j][recognised] - shape_margin:
                return None, (f"{colour} {names[k]} does not match its shape template (IoU {named:.2f}; "
                              f"best: {recognised} {scores[j][recognised]:.2f})")
            if ignore_border > 0:
                ring = ndimage.binary_dilation(objs[j], iterations=ignore_border) & ~ndimage.binary_erosion(
                    objs[j], iterations=ignore_border)
                label[objs[j]] = CLASSES.index(names[k])
                label[ring] = IGNORE_INDEX
            else:
                label[objs[j]] = CLASSES.index(names[k])
    return label, None


def check_generated(image: np.ndarray, caption: str, **kwargs) -> str | None:
    """None when the generated image matches its caption, else the reason it does not."""
    return generated_ground_truth(image, caption, **kwargs)[1]
