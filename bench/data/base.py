"""Dataset interface: indexable samples with an RGB image, a label map and image-level class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


@dataclass
class Sample:
    image_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8 class ids, IGNORE_INDEX = not evaluated
    caption: str | None = None
    extra: dict = field(default_factory=dict)

    def present_class_ids(self) -> list[int]:
        """Image-level labels (foreground classes with ground-truth pixels), as the WSSS protocol uses."""
        ids = np.unique(self.label)
        return [int(i) for i in ids if i != 0 and i != IGNORE_INDEX]


class SegDataset:
    """Base class. `classes[0]` is the background; ids index `classes`."""

    name: str = "base"
    classes: list[str] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict:
        """Provenance for reports."""
        return {"name": self.name, "num_images": len(self), "classes": list(self.classes)}
