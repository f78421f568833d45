"""Attention layers by role: the one place that maps what the papers say ("decoder cross-attention at the two
middle resolutions", "the last decoder self-attention", "#-2 decoder self-attention") to module names of the
loaded UNet.

`LayerMap(unet)` walks the UNet's diffusers `Attention` modules and places each by part (down / mid / up),
UNet level (0 = finest) and index inside its block. Roles are then relative to *this* UNet's layout:

* `ranked(kind, parts, ranks)`: attention levels of a part counted from the coarsest (rank 0). On SD 1.x/2.x at
  512 px the decoder has attention at 16x16 (rank 0, `up_blocks.1`), 32x32 (rank 1, `up_blocks.2`) and 64x64
  (rank 2, `up_blocks.3`); the papers' resolution names are SD's, so `SD_RESOLUTIONS` translates "16" -> rank 0,
  "32" -> rank 1, "64" -> rank 2 and "8" -> the mid block. On a UNet without attention at its finest level
  (the embedded v2 layout) "16" and "32" are still the coarsest two decoder attention levels, and "64" does
  not exist (an error says so).
* `decoder_self(k)`: the k-th decoder self-attention layer from the end (k = -1: the last one, iSeg Table 6b).

`sd_layer_map()` is the map of SD 1.x/2.x (built from SD's block layout on the meta device, no weights); it is
what methods use when they have no backbone (tests on synthetic traces with SD's layer names).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from bench.errors import BenchError

PARTS = ("down", "mid", "up")
# The papers' resolution names (SD at 512 px) -> rank from the coarsest attention level; "8" is the mid block.
SD_RESOLUTIONS = {"16": 0, "32": 1, "64": 2}
_NAME = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d+)?\.?attentions\.(\d+)\.transformer_blocks\.(\d+)"
                   r"\.attn([12])$")


@dataclass(frozen=True)
class AttentionLayer:
    name: str  # diffusers module name, e.g. up_blocks.1.attentions.0.transformer_blocks.0.attn2
    kind: str  # "self" (attn1) or "cross" (attn2)
    part: str  # "down" | "mid" | "up"
    level: int  # UNet level, 0 = finest (the mid block sits at the coarsest level)
    attention: int  # index of the transformer within its block (attentions.{i})
    transformer: int  # transformer_blocks.{j} (> 0 on SDXL-style layouts)


class LayerMap:
    """The attention layers of one UNet, placed by role (see the module docstring)."""

    def __init__(self, unet: torch.nn.Module):
        from diffusers.models.attention_processor import Attention

        n_up = len(getattr(unet, "up_blocks", []))
        layers = []
        for name, module in unet.named_modules():
            if not isinstance(module, Attention):
                continue
            match = _NAME.match(name)
            if match is None:  # an attention outside the SD block structure: reachable by explicit name only
                continue
            block, index, attention, transformer, which = match.groups()
            part = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[block]
            level = (int(index) if part == "down" else n_up - 1 - int(index) if part == "up" else n_up - 1)
            kind = "cross" if module.is_cross_attention else "self"
            layers.append(AttentionLayer(name, kind, part, level, int(attention), int(transformer)))
        order = {p: k for k, p in enumerate(PARTS)}
        # Forward order: down blocks fine -> coarse, mid, up blocks coarse -> fine.
        self.layers = tuple(sorted(layers, key=lambda a: (order[a.part], a.level if a.part == "down" else -a.level,
                                                          a.attention, a.transformer, a.kind == "cross")))
        self.names = {a.name for a in self.layers}

    def levels(self, part: str, kind: str = "cross") -> list[int]:
        """UNet levels of `part` that have `kind` attention, coarsest first."""
        return sorted({a.level for a in self.layers if a.part == part and a.kind == kind}, reverse=True)

    def describe(self) -> str:
        return ", ".join(f"{p}: levels {self.levels(p)}" for p in ("down", "up")) + \
            f", mid: {'yes' if self.levels('mid') else 'no'}"

    def ranked(self, kind: str, parts: tuple[str, ...], ranks: tuple[int, ...],
               attentions: tuple[int, ...] | None = None) -> list[str]:
        """Layers of `kind` in `parts` at the given ranks (0 = coarsest attention level of each part),
        optionally only the `attentions` indices within each block; forward order."""
        out = []
        for part in parts:
            levels = self.levels(part, kind)
            for rank in ranks:
                if rank >= len(levels):
                    raise BenchError(f"this UNet has no {kind}-attention at rank {rank} of its {part} blocks "
                                     f"(rank 0 = coarsest; it has {self.describe()}): choose a coarser level "
                                     f"or name layers explicitly")
            chosen = {levels[r] for r in ranks}
            out += [a.name for a in self.layers if a.part == part and a.kind == kind and a.level in chosen
                    and (attentions is None or a.attention in attentions)]
        return [a.name for a in self.layers if a.name in set(out)]

    def mid(self, kind: str) -> list[str]:
        names = [a.name for a in self.layers if a.part == "mid" and a.kind == kind]
        if not names:
            raise BenchError(f"this UNet has no mid-block {kind}-attention ({self.describe()})")
        return names

    def sd_resolution(self, kind: str, resolution: str, parts: tuple[str, ...] = ("down", "mid", "up")) -> list[str]:
        """Layers at one of the papers' SD-at-512-px resolution names ("8", "16", "32", "64")."""
        if resolution == "8":
            return self.mid(kind)
        if resolution not in SD_RESOLUTIONS:
            raise BenchError(f"unknown attention resolution {resolution!r}: one of 8, 16, 32, 64 (SD at 512 px)")
        return self.ranked(kind, tuple(p for p in parts if p != "mid"), (SD_RESOLUTIONS[resolution],))

    def finest(self, kind: str) -> list[str]:
        """Layers of `kind` at the finest UNet level that has attention (down and up: OVAM's "highest
        resolution" self-attention; SD's 64x64 blocks)."""
        level = min(a.level for a in self.layers if a.kind == kind and a.part != "mid")
        return [a.name for a in self.layers if a.kind == kind and a.part != "mid" and a.level == level]

    def blocks(self, spec: str, kind: str) -> list[str]:
        """Layers of `kind` named by DAAM/OVAM's block spec: "all" (every down and up attention level, the mid
        block dropped, as DAAM does) or SD resolution names joined by "+" ("64+16"); forward order."""
        if spec == "all":
            names = {a.name for a in self.layers if a.kind == kind and a.part != "mid"}
        else:
            names = {n for res in spec.split("+") for n in self.sd_resolution(kind, res)}
        return [a.name for a in self.layers if a.name in names]

    def decoder_self(self, k: int) -> str:
        """The k-th decoder self-attention layer counted from the end (k = -1: the last, iSeg Table 6b)."""
        names = [a.name for a in self.layers if a.part == "up" and a.kind == "self"]
        if not -len(names) <= k <= -1:
            raise BenchError(f"decoder self-attention #{k} does not exist: this UNet has {len(names)} "
                             f"decoder self-attention layers (use -1 .. -{len(names)})")
        return names[k]


def sd_block_unet() -> torch.nn.Module:
    """An SD 1.x/2.x block layout (layers_per_block 2, attention at the three finest levels) on the meta device:
    module names only, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(32, 32, 32, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=8,
            attention_head_dim=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


@functools.lru_cache(maxsize=1)
def sd_layer_map() -> LayerMap:
    return LayerMap(sd_block_unet())


def layer_map(backbone) -> LayerMap | TransformerLayerMap:
    """The backbone's map (cached on it), or SD's when there is no backbone (methods on synthetic traces)."""
    if backbone is None:
        return sd_layer_map()
    cached = getattr(backbone, "_layer_map", None)
    if cached is None:
        if getattr(backbone, "family", "sd") in ("sd3", "flux"):
            cached = TransformerLayerMap(backbone.unet, getattr(backbone, "depth", "all"),
                                         getattr(backbone, "flux_blocks", "double"))
        else:
            cached = LayerMap(backbone.unet)
        try:
            backbone._layer_map = cached
        except AttributeError:
            pass
    return cached


# -- transformers (SD3/SD3.5, Flux.1): roles of joint attention -------------------------------------------------------
DEPTHS = ("all", "first", "last", "middle")
FLUX_BLOCKS = ("double", "single", "all")
_JOINT = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn(2?)$")


def parse_depth(spec: str) -> str:
    """`model.depth`: all | first | last | middle (the middle third) | comma-separated block ranks ("0,5,-1")."""
    spec = str(spec).strip()
    if spec in DEPTHS:
        return spec
    try:
        [int(x) for x in spec.split(",")]
    except ValueError:
        raise BenchError(f"model.depth={spec!r} is not one of {', '.join(DEPTHS)} or a comma-separated list of "
                         f"block ranks (e.g. 0,5,-1)") from None
    return spec


def select_depth(n: int, spec: str) -> list[int]:
    """Ranks 0..n-1 chosen by a depth spec (parse_depth); middle = ranks [n // 3, n - n // 3)."""
    spec = parse_depth(spec)
    if spec == "all":
        return list(range(n))
    if spec == "first":
        return [0]
    if spec == "last":
        return [n - 1]
    if spec == "middle":
        return list(range(n // 3, n - n // 3)) or [n // 2]
    ranks = []
    for x in (int(v) for v in spec.split(",")):
        if not -n <= x < n:
            raise BenchError(f"model.depth={spec}: block rank {x} does not exist (this transformer has {n} blocks "
                             f"in scope: 0 .. {n - 1}, or -1 .. -{n})")
        ranks.append(x % n)
    return sorted(set(ranks))


class TransformerLayerMap:
    """Roles of an MM-DiT's joint attention (SD3/SD3.5 `transformer_blocks.{i}.attn`, Flux.1
    `transformer_blocks.{i}.attn` (double) and `single_transformer_blocks.{j}.attn`): every joint layer holds both
    roles, its image->text block (the cross-attention role) and its image->image block (the self-attention role),
    recorded by bench.trace_joint. SD3.5's image-only `attn2` is reachable by explicit name.

    Depth is addressed by rank over the blocks in scope (`flux_blocks` on Flux: the 19 double blocks by default,
    the 38 single blocks, or all 57, double first), chosen by `depth` (parse_depth). A transformer has one token
    grid, so the UNet papers' resolution choices map as follows (docs/backbones.md):
    DAAM/Attn2Mask/OVAM `blocks=all` -> the depth selection; any SD resolution spec ("64", "16+32", ...) is an
    error; iSeg's `cross_levels` ("16", "32", "both") -> the depth selection; iSeg's "last decoder self-attention"
    (`self_layer=-k`) -> the k-th block in scope from the end; OVAM's highest-resolution self-attention -> the
    depth selection's image->image blocks. iSeg's released-code per-level weights have no transformer
    counterpart (an error names variant=paper)."""

    def __init__(self, transformer: torch.nn.Module, depth: str = "all", flux_blocks: str = "double"):
        from bench.capture import attention_layers

        if flux_blocks not in FLUX_BLOCKS:
            raise BenchError(f"model.flux_blocks={flux_blocks!r} is not one of {', '.join(FLUX_BLOCKS)}")
        found = attention_layers(transformer)
        joint = [n for n, k in found.items() if k == "joint"]
        double = sorted((n for n in joint if n.startswith("transformer_blocks.")), key=_rank)
        single = sorted((n for n in joint if n.startswith("single_transformer_blocks.")), key=_rank)
        self.flux = bool(single) or type(transformer).__name__.startswith("Flux")
        scope = {"double": double, "single": single, "all": double + single}[flux_blocks if self.flux else "double"]
        if not scope:
            raise BenchError(f"model.flux_blocks={flux_blocks}: this transformer has no {flux_blocks} blocks")
        self.scope = scope
        self.chosen = [scope[r] for r in select_depth(len(scope), depth)]
        self.depth, self.flux_blocks = depth, flux_blocks
        self.layers = tuple(AttentionLayer(n, kind, "joint", 0, _rank(n), 0) for n, kind in found.items())
        self.names = set(found)

    def describe(self) -> str:
        what = f"{len(self.scope)} {self.flux_blocks if self.flux else 'joint'} blocks in scope"
        return f"{what}, depth={self.depth}: {len(self.chosen)} chosen"

    def levels(self, part: str, kind: str = "cross") -> list[int]:
        return [0]

    def _unet_only(self, what: str):
        raise BenchError(f"{what} names UNet levels; a transformer has one token grid ({self.describe()}): use "
                         f"blocks=all and choose blocks with model.depth= (all, first, last, middle, or ranks)")

    def blocks(self, spec: str, kind: str) -> list[str]:
        if spec != "all":
            self._unet_only(f"blocks={spec}")
        return list(self.chosen)

    def sd_resolution(self, kind: str, resolution: str, parts=("down", "mid", "up")) -> list[str]:
        return list(self.chosen)

    def finest(self, kind: str) -> list[str]:
        return list(self.chosen)

    def decoder_self(self, k: int) -> str:
        if not -len(self.scope) <= k <= -1:
            raise BenchError(f"self-attention #{k} does not exist: {self.describe()} (use -1 .. -{len(self.scope)})")
        return self.scope[k]

    def mid(self, kind: str) -> list[str]:
        self._unet_only("the mid block")

    def ranked(self, kind, parts, ranks, attentions=None) -> list[str]:
        raise BenchError("iSeg's released-code layers and fusion weights are per UNet level and have no transformer "
                         "counterpart: run iSeg with variant=paper on this backbone")


def _rank(name: str) -> tuple[int, int]:
    match = _JOINT.match(name)
    if match is None:
        return (2, 0)
    return (0 if match.group(1) == "transformer_blocks" else 1, int(match.group(2)))
