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


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of circumradius r; None for the circle (drawn as an ellipse)."""
    if kind == "circle":
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


class ShapesDataset(SegDataset):
    name = "shapes"
    classes = CLASSES

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
                objects.append({"shape": SHAPES[int(rng.integers(len(SHAPES)))],
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
        for obj in objects:
            cx, cy, r = obj["cx"] * size, obj["cy"] * size, obj["r"] * size
            class_id = CLASSES.index(obj["shape"])
            colour = COLOURS[obj["colour"]]
            poly = shape_polygon(obj["shape"], cx, cy, r)
            if poly is None:
                box = [cx - r, cy - r, cx + r, cy + r]
                draw_img.ellipse(box, fill=colour)
                draw_lbl.ellipse(box, fill=class_id)
            else:
                draw_img.polygon(poly, fill=colour)
                draw_lbl.polygon(poly, fill=class_id)
        return np.asarray(image), np.asarray(label)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split, "seed": self.seed, "size": self.size}

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        objects = self.layout(index)
        image, label = self.render(objects, index)
        caption = " and ".join(f"{article(o['colour'])} {o['colour']} {o['shape']}" for o in objects)
        return Sample(image_id=f"shapes-{self.split}-{self.seed}-{index:05d}", image=image, label=label,
                      caption=caption, extra={"objects": objects})


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
