"""CAT-Seg's cost aggregation (Cho et al., "CAT-Seg: Cost Aggregation for Open-Vocabulary Semantic
Segmentation", CVPR 2024, Sec. 3), the part of DEDOS's baseline that the paper places "after its pixel decoder"
(DEDOS Sec. 4.3, Table 3 (I): CLIP + Mask2Former decoder + cost aggregation [11]).

The released DEDOS code imports CAT-Seg's aggregator but its forward never calls it, so the paper is the only
source for where it sits; the reading here (methods/README.md, DEDOS table):

1. Cost computation (CAT-Seg Sec. 3.2): C(i, n) = cos(D^V(i), D^L(n)) between the CLIP's dense image embeddings
   (the final patch tokens through the post-layernorm and the visual projection, CLIP fine-tuned as CAT-Seg
   fine-tunes it) and the class text embeddings; with the prompt-ensembled text, one channel per class.
2. Cost embedding: a 7x7 convolution lifts each class's cost map to d channels.
3. Spatial aggregation (Sec. 3.3): per class, two Swin blocks (window, then shifted window; transformers'
   SwinLayer) with the appearance guidance P^V(E^V) (the CLIP's final patch features).
4. Class aggregation (Sec. 3.3): per position, a linear-attention transformer across the classes (no position
   embedding: permutation-equivariant, so any number of classes, seen or not, goes through the same weights),
   with the text guidance P^L(E^L). 3 and 4 repeat `blocks` times (CAT-Seg: 2).
5. Upsampling decoder (Sec. 3.4): transposed convolutions x2, x2, each step concatenated with guidance from a
   finer feature map. CAT-Seg takes those from intermediate CLIP layers; here they are the pixel decoder's two
   finer scales (built from the same CLIP taps), which is what "after its pixel decoder" gives it.
   A 3x3 convolution reads one logit per class and position: S (B, K, 4g, 4g), at the mask resolution.

Divergence (from transformers' parts): CAT-Seg concatenates the guidance to the queries and keys of its attention;
transformers' SwinLayer takes one input, so the projected guidance is added to the embedding before each spatial
block instead, and likewise before each class block.

How S meets the Mask2Former decoder is not specified by DEDOS; here each query's mask pools S into class logits
that are added to the decoder's own (`model.mask_pool`), so the aggregated cost classifies every mask and the
Hungarian-matched classification loss trains it (CAT-Seg itself trains S with a per-pixel loss; its per-pixel
output has no queries to pool into).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.dedos.model import LinearAttentionBlock

# CAT-Seg's configuration (configs/vitl_336.yaml of the CAT-Seg release, read for facts): hidden 128 channels,
# 2 aggregation layers, 4 heads, window 12 on the 24x24 grid of ViT-L/14@336 (half the grid), decoder 64 and 32
# channels with guidance projected to 32 and 16 (d/2, d/4; d/4, d/8).
BLOCKS = 2
HEADS = 4


class CostAggregation(nn.Module):
    def __init__(self, embed_dim: int, width: int, guide_dim: int, dim: int, grid: tuple[int, int],
                 blocks: int = BLOCKS, heads: int = HEADS):
        super().__init__()
        from transformers import SwinConfig
        from transformers.models.swin.modeling_swin import SwinLayer

        if dim % (4 * heads):
            raise ValueError(f"cost aggregation width {dim} must be a multiple of 4 x heads = {4 * heads}")
        window = max(1, min(grid) // 2)
        cfg = SwinConfig(window_size=window, mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, drop_path_rate=0.0, hidden_act="gelu")
        cfg._attn_implementation = "eager"  # what transformers falls back to for a standalone layer, said once
        self.grid = grid
        self.embed = nn.Conv2d(1, dim, 7, padding=3)  # Sec. 3.2: cost embedding
        self.appearance = nn.ModuleList(nn.Linear(width, dim) for _ in range(blocks))  # P^V per block
        self.text = nn.ModuleList(nn.Linear(embed_dim, dim) for _ in range(blocks))  # P^L per block
        self.spatial = nn.ModuleList(
            nn.ModuleList([SwinLayer(cfg, dim, grid, heads, shift_size=0),
                           SwinLayer(cfg, dim, grid, heads, shift_size=window // 2)]) for _ in range(blocks))
        self.classwise = nn.ModuleList(LinearAttentionBlock(dim, heads) for _ in range(blocks))
        d1, d2 = dim // 2, dim // 4
        self.up1 = nn.ConvTranspose2d(dim, d1, 2, 2)
        self.guide1 = nn.Conv2d(guide_dim, dim // 4, 1)
        self.fuse1 = nn.Sequential(nn.Conv2d(d1 + dim // 4, d1, 3, padding=1), nn.GroupNorm(1, d1), nn.GELU())
        self.up2 = nn.ConvTranspose2d(d1, d2, 2, 2)
        self.guide2 = nn.Conv2d(guide_dim, dim // 8, 1)
        self.fuse2 = nn.Sequential(nn.Conv2d(d2 + dim // 8, d2, 3, padding=1), nn.GroupNorm(1, d2), nn.GELU())
        self.head = nn.Conv2d(d2, 1, 3, padding=1)

    @staticmethod
    def cost(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Sec. 3.2: (B, K, g, g) cosine similarities of dense embeddings (B, g, g, P) with texts (K, P)."""
        return torch.einsum("bhwp,kp->bkhw", F.normalize(dense, dim=-1), F.normalize(text, dim=-1))

    def forward(self, dense: torch.Tensor, appearance: torch.Tensor, text: torch.Tensor,
                guides: list[torch.Tensor]) -> torch.Tensor:
        """dense (B, g, g, P) projected CLIP patch embeddings; appearance (B, g*g, width) the CLIP's final patch
        tokens; text (K, P); guides: the pixel decoder's scales at 2g and 4g (B, guide_dim, ., .).
        Returns S (B, K, 4g, 4g) per-class logits."""
        b, k = dense.shape[0], text.shape[0]
        h, w = self.grid
        x = self.embed(self.cost(dense, text).reshape(b * k, 1, h, w))  # (BK, d, g, g)
        d = x.shape[1]
        x = x.flatten(2).transpose(1, 2)  # (BK, gg, d)
        for appearance_proj, text_proj, (block1, block2), classwise in zip(self.appearance, self.text,
                                                                          self.spatial, self.classwise):
            guide = appearance_proj(appearance).repeat_interleave(k, dim=0)  # (BK, gg, d)
            x = block1(x + guide, (h, w))[0]
            x = block2(x, (h, w))[0]
            x = x.view(b, k, h * w, d).transpose(1, 2).reshape(b * h * w, k, d)  # per position, across classes
            x = x + text_proj(text)[None]
            x = classwise(x, x)
            x = x.view(b, h * w, k, d).transpose(1, 2).reshape(b * k, h * w, d)
        x = x.transpose(1, 2).reshape(b * k, d, h, w)
        g1 = self.guide1(guides[0]).repeat_interleave(k, dim=0)
        x = self.fuse1(torch.cat([self.up1(x), g1], dim=1))
        g2 = self.guide2(guides[1]).repeat_interleave(k, dim=0)
        x = self.fuse2(torch.cat([self.up2(x), g2], dim=1))
        return self.head(x).view(b, k, *x.shape[-2:])


__all__ = ["CostAggregation"]
