"""`shapes`: procedurally generated scenes of coloured shapes on textured backgrounds.

Pixel-exact masks (drawn without anti-aliasing from the same polygons as the image), 1-3 non-overlapping
objects, captions such as "a red circle and a blue square". Image `i` depends only on (seed, i), so any
prefix (`data.limit`) and any size is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from bench.data.base import Sample, SegDataset

SHAPES = ["circle", "square", "triangle", "star", "cross"]
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
CLASSES = ["background", *SHAPES]
# `shapes_many`: the open-vocabulary world. Sixteen silhouettes that stay distinct at 64 px: the five
# of `shapes` first (same ids), then eleven more, drawn by the same renderer. A head trained on a dozen names
# of it, tested on the rest, is the setting the paper's 171 training classes stand for.
MANY_SHAPES = [*SHAPES, "ring", "crescent", "heart", "arrow", "diamond", "semicircle", "bar", "hourglass",
               "pentagon", "chevron", "tee"]
MANY_CLASSES = ["background", *MANY_SHAPES]


def _regular(cx: float, cy: float, r: float, n: int, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


def _scaled(points: list[tuple[float, float]], cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Unit-square outline points (x, y in [-1, 1]) placed at (cx, cy) with half-size r."""
    return [(cx + r * x, cy + r * y) for x, y in points]


# outlines in [-1, 1]^2 of the polygonal `shapes_many` silhouettes (y down, as the image)
_OUTLINES = {
    "arrow": [(-0.95, -0.25), (0.15, -0.25), (0.15, -0.65), (0.95, 0.0), (0.15, 0.65), (0.15, 0.25), (-0.95, 0.25)],
    "bar": [(-0.95, -0.3), (0.95, -0.3), (0.95, 0.3), (-0.95, 0.3)],
    "hourglass": [(-0.7, -0.9), (0.7, -0.9), (0.12, 0.0), (0.7, 0.9), (-0.7, 0.9), (-0.12, 0.0)],
    "chevron": [(-0.9, -0.8), (-0.35, -0.8), (0.55, 0.0), (-0.35, 0.8), (-0.9, 0.8), (0.0, 0.0)],
    "tee": [(-0.9, -0.9), (0.9, -0.9), (0.9, -0.45), (0.25, -0.45), (0.25, 0.9), (-0.25, 0.9), (-0.25, -0.45),
            (-0.9, -0.45)],
}


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of circumradius r; None for the shapes drawn from ellipses (circle, and
    `shapes_many`'s ring, crescent and semicircle: `draw_shape`)."""
    if kind in ("circle", "ring", "crescent", "semicircle"):
        return None
    if kind == "square":
        s = r / math.sqrt(2)
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind == "cross":
        a, b = r * 0.32, r * 0.95
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    if kind == "heart":  # two lobes and a point: a parametric heart curve, 40 vertices
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in (2 * math.pi * k / 40 for k in range(40))]
        return [(cx + r * x / 17, cy + r * (y + 2.5) / 17) for x, y in pts]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.62 * r, cy), (cx, cy + r), (cx - 0.62 * r, cy)]
    if kind == "pentagon":
        return _regular(cx, cy, r, 5)
    if kind in _OUTLINES:
        return _scaled(_OUTLINES[kind], cx, cy, r)
    raise ValueError(f"unknown shape {kind!r}")


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation greyish texture: a smooth gradient plus blurred blotches plus fine grain."""
    base = rng.uniform(90, 200)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    grad = (math.cos(angle) * xx + math.sin(angle) * yy) * rng.uniform(-30, 30)
    coarse = rng.normal(0, 1, size=(8, 8)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)) * rng.uniform(4, 12)
    grain = rng.normal(0, 4, size=(size, size, 3))
    img = base + tint + (grad + blotch)[..., None] + grain
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape filled with `fill` (a colour or a class id). Ring and crescent are drawn as their disc:
    ShapesDataset.render then cuts out their `cutout`."""
    poly = shape_polygon(kind, cx, cy, r)
    if poly is not None:
        draw.polygon(poly, fill=fill)
        return
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "semicircle":  # the upper half disc, its flat side down through the centre, moved down by r/2
        draw.pieslice([cx - r, cy - r / 2, cx + r, cy + 3 * r / 2], 180, 360, fill=fill)
    else:
        draw.ellipse(box, fill=fill)


def cutout(kind: str, cx: float, cy: float, r: float) -> list[float] | None:
    """The ellipse box that ring (its hole) and crescent (its bite) remove from their disc; None otherwise."""
    if kind == "ring":
        return [cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r]
    if kind == "crescent":
        return [cx - 0.45 * r, cy - 0.95 * r, cx + 1.15 * r, cy + 0.65 * r]
    return None


class ShapesDataset(SegDataset):
    name = "shapes"
    classes = CLASSES
    shapes = SHAPES

    def __init__(self, num_images: int = 100, size: int = 512, seed: int = 0, max_objects: int = 3,
                 min_objects: int = 1, split: str = "val"):
        if not 1 <= min_objects <= max_objects <= 3:
            raise ValueError("shapes: need 1 <= min_objects <= max_objects <= 3")
        self.num_images, self.size, self.seed = num_images, size, seed
        self.min_objects, self.max_objects, self.split = min_objects, max_objects, split
        # Different splits draw from disjoint seed streams, so train/val never share a scene.
        self._split_offset = {"train": 1, "val": 2, "test": 3}.get(split, 4)

    def __len__(self) -> int:
        return self.num_images

    def layout(self, index: int) -> list[dict]:
        """The scene description of image `index`: [{shape, colour, cx, cy, r}] in relative units."""
        rng = self._rng(index)
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        objects: list[dict] = []
        for _ in range(200):
            if len(objects) == n:
                break
            r = rng.uniform(0.11, 0.2) if n > 1 else rng.uniform(0.14, 0.3)
            cx, cy = rng.uniform(r + 0.02, 0.98 - r, size=2)
            if all(math.hypot(cx - o["cx"], cy - o["cy"]) > r + o["r"] + 0.03 for o in objects):
                objects.append({"shape": self.shapes[int(rng.integers(len(self.shapes)))],
                                "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                                "cx": float(cx), "cy": float(cy), "r": float(r)})
        return objects

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_offset, index])

    def render(self, objects: list[dict], index: int) -> tuple[np.ndarray, np.ndarray]:
        size = self.size
        rng = np.random.default_rng([self.seed, self._split_offset, index, 1])
        image = Image.fromarray(textured_background(rng, size))
        label = Image.new("L", (size, size), 0)
        draw_img, draw_lbl = ImageDraw.Draw(image), ImageDraw.Draw(label)
        background = image.copy() if any(cutout(o["shape"], 0, 0, 1) for o in objects) else None
        for obj in objects:
            cx, cy, r = obj["cx"] * size, obj["cy"] * size, obj["r"] * size
            class_id = self.classes.index(obj["shape"])
            draw_shape(draw_img, obj["shape"], cx, cy, r, COLOURS[obj["colour"]])
            draw_shape(draw_lbl, obj["shape"], cx, cy, r, class_id)
            if (box := cutout(obj["shape"], cx, cy, r)) is not None:  # the hole shows the textured background
                hole = Image.new("L", (size, size), 0)
                ImageDraw.Draw(hole).ellipse(box, fill=255)
                image.paste(background, mask=hole)
                draw_lbl.ellipse(box, fill=0)
        return np.asarray(image), np.asarray(label)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "seed": self.seed, "size": self.size}

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        objects = self.layout(index)
        image, label = self.render(objects, index)
        caption = " and ".join(f"{article(o['colour'])} {o['colour']} {o['shape']}" for o in objects)
        return Sample(image_id=f"{self.name}-{self.split}-{self.seed}-{index:05d}", image=image, label=label,
                      caption=caption, extra={"objects": objects})


class ManyShapesDataset(ShapesDataset):
    """`shapes_many`: the same scenes over sixteen shapes (MANY_SHAPES), for the open-vocabulary protocol."""

    name = "shapes_many"
    classes = MANY_CLASSES
    shapes = MANY_SHAPES


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
