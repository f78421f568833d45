"""Seeded synthetic attention of real shapes and a stand-in backbone, shared by the parity suite.

Each test module re-expresses a released implementation's math in a few lines (facts from the public code, the
code itself is not copied; repo, commit and function are cited next to each function) and feeds it and this
project's implementation the same tensors. Tolerances: maps 1e-5 (relative to their range), label maps >= 99.9%
of pixels.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

SIZES = {0: 1, 1: 2, 2: 4, 3: 8}  # SD block index -> spatial divisor (down_blocks.i / up_blocks.(3 - i))


def segments(side: int, seed: int, count: int = 4) -> torch.Tensor:
    """(side, side) long map of `count` random rectangles over a background (0): the structure the synthetic
    attention follows, so refinements keep contrast instead of averaging noise."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(side, side, dtype=torch.long)
    for k in range(1, count + 1):
        y, x = torch.randint(0, side * 3 // 4, (2,), generator=g).tolist()
        h, w = torch.randint(side // 6, side // 3, (2,), generator=g).tolist()
        seg[y:y + h, x:x + w] = k
    return seg


def structured_softmax(logits_shape: tuple, same: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """softmax(strength * same + N(0, 1)) over the last axis; `same` broadcasts against logits_shape."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(logits_shape, generator=g) + strength * same).softmax(-1)


def self_attention(side: int, heads: int, seed: int) -> torch.Tensor:
    """(heads, side^2, side^2) row-query self-attention, each query attending mostly to its own segment."""
    seg = segments(side, seed).flatten()
    same = (seg[:, None] == seg[None, :]).float()
    return structured_softmax((heads, side * side, side * side), same, 4.0, seed + 1)


def cross_attention(side: int, heads: int, tokens: int, token_segment: dict[int, int], seed: int,
                    steps: int = 1) -> torch.Tensor:
    """(steps, heads, side, side, tokens) probabilities over the prompt tokens: token t is strong on segment
    token_segment[t] (of `segments(side, seed)`)."""
    seg = segments(side, seed).flatten()
    same = torch.zeros(side * side, tokens)
    for t, k in token_segment.items():
        same[:, t] = (seg == k).float()
    probs = structured_softmax((steps, heads, side * side, tokens), same, 3.0, seed + 2)
    return probs.unflatten(2, (side, side))


class StandInBackbone(SimpleNamespace):
    """What methods read from a backbone outside the UNet: the embedded CLIP tokenizer (77 tokens) and a seeded
    text encoder of SD 1.5's width (an embedding table), on CPU in fp32; no VAE (methods assume SD's factor 8)."""

    def __init__(self, width: int = 768):
        from bench.embedded import build_tokenizer
        from bench.models.layers import sd_layer_map

        tokenizer = build_tokenizer(77)
        table = torch.nn.Embedding(len(tokenizer), width)
        torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(0))
        encoder = lambda ids: (table(ids),)  # noqa: E731  (CLIPTextModel returns (hidden_states, ...))
        # no UNet: the layers are SD 1.x/2.x's (what bench.models.layers.layer_map reads from a backbone)
        super().__init__(tokenizer=tokenizer, text_encoder=encoder, device=torch.device("cpu"),
                         dtype=torch.float32, max_length=77, vae=None, _layer_map=sd_layer_map())

    def tokenize(self, prompts):
        return self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the range of b: map agreement independent of the maps' scale."""
    a, b = a.detach().double(), b.detach().double()
    span = float(b.max() - b.min()) or 1.0
    return float((a - b).abs().max()) / span


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


SD15_DIM = {0: 320, 1: 640, 2: 1280, 3: 1280}  # attn2 inner dim per UNet level (0 = 64x64; 8 heads each)


def sd15_world(backbone: StandInBackbone, prompt: str, steps: int, latent: int = 64, seed: int = 0):
    """A Trace of SD 1.5's 16 attn2 layers (8 heads, 77 tokens): seeded per-step queries, a seeded to_k per layer
    (text width 768 -> inner dim) and the cross-attention the UNet computes from them with the padded prompt."""
    from bench.models.layers import sd_layer_map
    from bench.capture import Trace
    from methods.attribution import attribution_embedding

    g = torch.Generator().manual_seed(seed)
    emb, ids = attribution_embedding(backbone, prompt, pad=True)
    cross, queries, modules = {}, {}, {}
    for attention in (a for a in sd_layer_map().layers if a.kind == "cross"):
        side, inner, layer = latent >> attention.level, SD15_DIM[attention.level], attention.name
        d = inner // 8
        to_k = torch.nn.Linear(768, inner, bias=False)
        torch.nn.init.normal_(to_k.weight, std=768 ** -0.5, generator=g)
        modules[layer] = SimpleNamespace(to_k=to_k, scale=d ** -0.5)
        q = torch.randn(steps, 8, side * side, d, generator=g) * 2
        k = to_k(emb).detach().view(77, 8, d).transpose(0, 1)
        queries[layer] = q
        cross[layer] = torch.einsum("shqd,hld->shql", q, k).mul(d ** -0.5).softmax(-1).unflatten(2, (side, side))
    return Trace(prompt=prompt, token_ids=ids, timesteps=list(range(steps)), latent_size=(latent, latent),
                 cross=cross, queries=queries, modules=modules)
