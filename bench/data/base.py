"""Dataset interface: indexable samples with an RGB image, a label map and image-level class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


@dataclass
class Sample:
    image_id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) uint8 class ids (uint16 past 255 classes), ignore_index = not evaluated
    caption: str | None = None
    extra: dict = field(default_factory=dict)
    ignore_index: int = IGNORE_INDEX  # 65535 for the uint16 label maps of layouts with more than 255 classes

    def present_class_ids(self) -> list[int]:
        """Image-level labels (foreground classes with ground-truth pixels), as the WSSS protocol uses."""
        ids = np.unique(self.label)
        return [int(i) for i in ids if i != 0 and i != self.ignore_index]


class SegDataset:
    """Base class. `classes[0]` is the background; ids index `classes`."""

    name: str = "base"
    classes: list[str] = []
    # False: the layout has no background class; id 0 is a slot that never occurs in the ground truth and the
    # metrics leave out of their means (bench.data.layout).
    has_background: bool = True
    ignore_index: int = IGNORE_INDEX

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict:
        """Provenance for reports."""
        return {"name": self.name, "num_images": len(self), "classes": list(self.classes),
                "has_background": self.has_background}
