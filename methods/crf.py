"""Dense CRF (Kraehenbuehl & Koltun 2011) through pydensecrf2 (imported as `pydensecrf`).

OVAM refines its binarised masks with a fully connected CRF (paper Sec. 3.4; the paper used SimpleCRF with its
defaults, the released code pydensecrf with w1 = 10, alpha = 80, beta = 13, w2 = 3, gamma = 3, 5 iterations and
the unary from the binarised mask). Attn2Mask optionally applies the same CRF. Energies:

    E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) [ w1 exp(-|p_i-p_j|^2 / 2 alpha^2 - |I_i-I_j|^2 / 2 beta^2)
                                                  + w2 exp(-|p_i-p_j|^2 / 2 gamma^2) ]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import Param


@dataclass(frozen=True)
class CRFParams:
    w1: float = 10.0  # bilateral (appearance) kernel weight
    alpha: float = 80.0  # bilateral spatial std (pixels)
    beta: float = 13.0  # bilateral colour std
    w2: float = 3.0  # smoothness kernel weight
    gamma: float = 3.0  # smoothness spatial std (pixels)
    iterations: int = 5
    gt_prob: float = 0.9  # unary confidence in the binarised mask's label

    @classmethod
    def from_cfg(cls, cfg: dict) -> "CRFParams":
        return cls(cfg["crf_w1"], cfg["crf_alpha"], cfg["crf_beta"], cfg["crf_w2"], cfg["crf_gamma"],
                   cfg["crf_iterations"], cfg["crf_gt_prob"])


# Method parameters exposing the CRF (released OVAM code's values).
CRF_PARAMS: dict[str, Param] = {
    "crf_w1": Param(10.0, "dCRF bilateral kernel weight w1", low=0),
    "crf_alpha": Param(80.0, "dCRF bilateral spatial std alpha (pixels)", positive=True),
    "crf_beta": Param(13.0, "dCRF bilateral colour std beta", positive=True),
    "crf_w2": Param(3.0, "dCRF smoothness kernel weight w2", low=0),
    "crf_gamma": Param(3.0, "dCRF smoothness spatial std gamma (pixels)", positive=True),
    "crf_iterations": Param(5, "dCRF mean-field iterations", low=0),
    "crf_gt_prob": Param(0.9, "dCRF unary: probability given to the binarised mask's label (pydensecrf "
                              "unary_from_labels)", low=0, high=1),
}


def _image(image, size: tuple[int, int]) -> np.ndarray:
    img = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float()
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).cpu().numpy())


def _crf(image: np.ndarray, unary: np.ndarray, n: int, p: CRFParams) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary.astype(np.float32)))
    d.addPairwiseGaussian(sxy=p.gamma, compat=p.w2)
    d.addPairwiseBilateral(sxy=p.alpha, srgb=p.beta, rgbim=image, compat=p.w1)
    q = d.inference(int(p.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n, h, w)


def dense_crf(image, probs: torch.Tensor, params: CRFParams = CRFParams()) -> torch.Tensor:
    """Soft unary: class probabilities (C, H, W) (summing to 1 over C) on an RGB image -> refined (C, H, W)."""
    size = tuple(probs.shape[-2:])
    p = probs.float().clamp(1e-5, 1).cpu().numpy()
    unary = -np.log(p).reshape(probs.shape[0], -1)
    return torch.from_numpy(_crf(_image(image, size), unary, probs.shape[0], params))


def crf_labels(image, labels: torch.Tensor, class_ids: list[int], params: CRFParams = CRFParams()) -> torch.Tensor:
    """Hard unary from a label map (H, W) of dataset ids (0 = background; the classes in `class_ids`):
    probability gt_prob for the mask's label, the rest shared by the others (released OVAM code's practice of
    a unary from the binarised mask). Returns the CRF's MAP labelling as dataset ids."""
    from pydensecrf.utils import unary_from_labels

    ids = [0, *class_ids]
    index = torch.zeros_like(labels)
    for i, cid in enumerate(ids):
        index[labels == cid] = i
    n = len(ids)
    if n < 2:
        return labels
    unary = unary_from_labels(index.cpu().numpy().astype(np.int64), n, gt_prob=params.gt_prob, zero_unsure=False)
    q = _crf(_image(image, tuple(labels.shape)), unary, n, params)
    return torch.tensor(ids, dtype=torch.long)[torch.from_numpy(q.argmax(0))]
