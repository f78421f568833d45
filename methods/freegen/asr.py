"""FreeGen's learned Attention Self-Rectification (Eq. 1-3 with W and Upsilon fitted by Eq. 5).

One sample's inputs (`AsrInputs`, read from a trace at one denoising step): the per-head self-attention of the
`self_blocks` layers (mean over those layers, per head: Eq. 1's W weights heads and rows, and the mean over
layers commutes with it), and for each `cross_blocks` layer the stored per-head pixel queries and the keys of
the generation prompt (to_k of its text embedding), so that Eq. 2 can re-project the class-entity keys.

`AsrModule` holds the learnable parts, initialised so that the output is the training-free rule exactly:
  W (H x N) = 1/H        (Eq. 1; the head mean)
  Upsilon_l (H x d x d) = I per cross layer l, per head (Eq. 2's Upsilon_h; block-diagonal over heads)
and returns A_* (Eq. 3) per class on the self-attention grid: the class's cross-attention (mean over its
sub-tokens, over heads as in the paper's Training Strategy, over layers, resized to the grid) propagated by
the adaptive self-attention.

Eq. 5's BCE needs A_* in [0, 1]; the paper does not say how. Here each class map is min-max normalised (the
same normalisation the pseudo-label thresholds use), upsampled to the image size and compared with SAM's mask
of that class (G_*), summed over classes and averaged over pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from methods.freegen.rectify import head_mean_weights, normalise, rekeyed_cross
from methods.maps import resize_maps


@dataclass
class AsrInputs:
    self_probs: torch.Tensor  # (H, N, N) rows are queries; N = gh * gw
    grid: tuple[int, int]  # (gh, gw) of the self-attention layers
    queries: dict[str, torch.Tensor]  # cross layer -> (H, N_l, d)
    keys: dict[str, list[torch.Tensor]]  # cross layer -> per class (H, T, d): the keys of the text its tokens
    # are in (the generation prompt, shared by the classes it names; the attribution text otherwise)
    scales: dict[str, float]  # cross layer -> 1 / sqrt(d)
    grids: dict[str, tuple[int, int]]  # cross layer -> (h, w)
    class_tokens: list[list[int]]  # per class: its token positions in its text


def asr_record(inputs: AsrInputs) -> dict:
    """AsrInputs as a plain dict (its fields, not copied) for a fit cache (bench.fitting.FitContext.cached)."""
    return {f.name: getattr(inputs, f.name) for f in fields(inputs)}


def asr_inputs_from(record: dict, device: torch.device | str) -> AsrInputs:
    """AsrInputs from asr_record after a round trip through a fit cache (tuples read back as lists, tensors on the
    CPU): tuples restored, tensors moved to `device`."""
    return AsrInputs(record["self_probs"].to(device), tuple(record["grid"]),
                     {k: v.to(device) for k, v in record["queries"].items()},
                     {k: [t.to(device) for t in v] for k, v in record["keys"].items()}, dict(record["scales"]),
                     {k: tuple(v) for k, v in record["grids"].items()}, [list(t) for t in record["class_tokens"]])


def prompt_keys(module, embedding: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, D) text embedding -> the layer's per-head keys (H, T, d)."""
    with torch.no_grad():
        k = module.to_k(embedding.to(module.to_k.weight.dtype))
    return k.view(k.shape[0], heads, -1).transpose(0, 1).float()


class AsrModule(torch.nn.Module):
    """W of Eq. 1 and one Upsilon per cross layer (Eq. 2), at their initialisations."""

    def __init__(self, heads: int, positions: int, cross: dict[str, tuple[int, int]]):
        super().__init__()
        self.weights = torch.nn.Parameter(head_mean_weights(heads, positions))
        self.layers = sorted(cross)  # the artefact's order (safetensors sorts names): the same float sums
        self.upsilon = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.eye(cross[n][1]).expand(*cross[n], cross[n][1]).clone()) for n in self.layers])

    @classmethod
    def like(cls, inputs: AsrInputs) -> "AsrModule":
        heads = inputs.self_probs.shape[0]
        return cls(heads, inputs.self_probs.shape[-1],
                   {name: (q.shape[0], q.shape[-1]) for name, q in inputs.queries.items()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The artefact: W and each layer's Upsilon, by layer name."""
        out = {"W": self.weights.detach().clone()}
        out.update({f"upsilon/{name}": u.detach().clone() for name, u in zip(self.layers, self.upsilon)})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "AsrModule":
        layers = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("upsilon/")}
        w = tensors["W"]
        module = cls(w.shape[0], w.shape[1], {n: (u.shape[0], u.shape[-1]) for n, u in layers.items()})
        with torch.no_grad():
            module.weights.copy_(w)
            for name, p in zip(module.layers, module.upsilon):
                p.copy_(layers[name])
        return module

    def cross_maps(self, x: AsrInputs) -> torch.Tensor:
        """Eq. 2: (K, gh, gw) class cross-attention, mean over heads, class sub-tokens and layers."""
        per_layer = []
        for name, upsilon in zip(self.layers, self.upsilon):
            texts: dict[int, list[int]] = {}  # classes sharing one text share its softmax
            for k, keys in enumerate(x.keys[name]):
                texts.setdefault(id(keys), []).append(k)
            maps: list = [None] * len(x.class_tokens)
            for members in texts.values():
                entity = sorted({i for k in members for i in x.class_tokens[k]})  # Upsilon re-projects these keys
                probs = rekeyed_cross(x.queries[name], x.keys[name][members[0]], x.scales[name], upsilon, entity)
                for k in members:  # (H, N_l, T) -> mean over the class's sub-tokens and the heads
                    maps[k] = probs[..., x.class_tokens[k]].mean(-1).mean(0)
            per_layer.append(resize_maps(torch.stack(maps).unflatten(1, x.grids[name]), x.grid))
        return torch.stack(per_layer).mean(0)

    def forward(self, x: AsrInputs) -> torch.Tensor:
        """Eq. 1-3: A_* (K, gh, gw), un-normalised."""
        a_s = (self.weights[:, :, None] * x.self_probs.float()).sum(0)  # Eq. 1 summed over heads: (N, N)
        a_c = self.cross_maps(x)  # (K, gh, gw)
        return (a_s @ a_c.flatten(1).T).T.unflatten(1, x.grid)  # Eq. 3


def asr_loss(a_star: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 5: sum over classes of the pixel-mean BCE between the normalised A_* (upsampled to the targets'
    size) and SAM's class masks G_* (K, H, W)."""
    maps = normalise(F.interpolate(a_star[None], size=targets.shape[-2:], mode="bilinear",
                                   align_corners=False)[0]).clamp(eps, 1 - eps)
    return F.binary_cross_entropy(maps, targets.float(), reduction="none").flatten(1).mean(1).sum()
