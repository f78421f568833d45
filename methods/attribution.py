"""Attribution shared by DAAM, Attn2Mask, OVAM and iSeg: a word's token positions, the attention layers of a
block spec, re-keying stored queries with any text (OVAM Eq. 3-4), per-class layer maps and their aggregation."""

from __future__ import annotations

import torch

from bench.models.layers import layer_map
from methods.maps import resize_maps


def word_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of `word` as it appears inside a prompt (no SOS/EOS)."""
    return tokenizer(word, add_special_tokens=False).input_ids


def token_indices(tokenizer, token_ids: list[int], word: str) -> list[int]:
    """Positions of every occurrence of `word`'s sub-tokens in a tokenized prompt (DAAM's word merging)."""
    pattern = word_token_ids(tokenizer, word)
    if not pattern:
        return []
    hits: list[int] = []
    n = len(pattern)
    for start in range(len(token_ids) - n + 1):
        if token_ids[start:start + n] == pattern:
            hits.extend(range(start, start + n))
    return hits


# Block specs by the papers' SD resolution names at 512 px (latent 64): "64" = down0/up3, "32" = down1/up2,
# "16" = down2/up1, "8" = mid; "all" = every down/up attention level (mid dropped, DAAM Sec. 3), which is
# "64+32+16" on SD and whatever levels another layout has (bench.models.layers resolves them by role).
BLOCK_CHOICES = ("all", "64", "32", "16", "64+32", "64+16", "32+16", "64+32+16", "64+32+16+8")


def attn_layers(blocks: str, kind: str = "attn2", backbone=None) -> list[str]:
    """Module names of the attn2 (cross) or attn1 (self) layers of the block spec (e.g. "64+16" or "all") in the
    backbone's UNet (SD's layout without a backbone)."""
    return layer_map(backbone).blocks(blocks, "cross" if kind == "attn2" else "self")


def attribution_embedding(backbone, text: str, pad: bool = False) -> tuple[torch.Tensor, list[int]]:
    """OVAM's attribution prompt X' (Eq. 4): the text encoder's hidden states (L', D) with SoT and EoT and no
    padding (pad=False, the paper), or padded to the model length like a generation prompt (pad=True, then the
    softmax runs over all 77 tokens as DAAM's does). Returns the embedding and its token ids."""
    tok = backbone.tokenizer
    if pad:
        ids = backbone.tokenize([text])[0]
    else:
        ids = torch.tensor(tok([text], truncation=True, max_length=backbone.max_length).input_ids[0])
    with torch.no_grad():
        ids_in = ids[None].to(backbone.device)
        # a family's key-side text states (bench.models: SDXL/SD3/Flux condition their text otherwise)
        states = getattr(backbone, "attribution_states", None)
        emb = states(ids_in)[0] if states is not None else backbone.text_encoder(ids_in)[0][0]
    return emb.to(backbone.dtype), ids.tolist()


def rekey(trace, layer: str, emb: torch.Tensor, steps: slice | list[int] | None = None) -> torch.Tensor:
    """Open-vocabulary attention A(Q_{i,t}, K'_i) of one attn2 layer (OVAM Eq. 3-4): the stored per-head pixel
    queries Q (S, H, hw, d) against K' = to_k(X'), softmax over the L' tokens of X' only (a joint layer's K' per
    step: bench.trace_joint.TextStream).
    Returns (S, H, h, w, L'). Differentiable in `emb` (token optimisation)."""
    module = trace.modules[layer]
    q = trace.queries[layer]
    if steps is not None:
        q = q[steps]
    heads = q.shape[1]
    if hasattr(module, "step_keys"):  # a joint layer: X' keyed through the text stream, per step
        k = module.step_keys(emb, steps).float()  # (S, H, L', d)
        logits = torch.einsum("shqd,shld->shql", q.float(), k) * module.scale
    else:
        k = module.to_k(emb.to(module.to_k.weight.dtype))  # (L', heads*d)
        k = k.view(k.shape[0], heads, -1).transpose(0, 1).float()  # (H, L', d)
        logits = torch.einsum("shqd,hld->shql", q.float(), k) * module.scale
    probs = logits.softmax(-1)
    h, w = trace.spatial_size(layer)
    return probs.unflatten(2, (h, w))


def aggregate_daam(layer_maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """DAAM aggregation of per-layer maps (K, S, H, h, w): sum over steps, bicubic upsampling to `size`,
    clamp at 0, mean over layers and heads -> (K, *size)."""
    out = []
    for maps in layer_maps:
        summed = maps.sum(1)  # (K, H, h, w)
        out.append(resize_maps(summed, size, mode="bicubic").clamp_min(0))
    return torch.cat(out, dim=1).mean(1)


def aggregate_sum(layer_maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """OVAM Eq. 5: bilinear resize of every (layer, step, head) map to `size`, summed -> (K, *size)."""
    return torch.stack([resize_maps(m, size, mode="bilinear").sum(dim=(1, 2)) for m in layer_maps]).sum(0)


class AttributionSource:
    """Per-class, per-layer attention maps (K, S, H, h, w) for DAAM, Attn2Mask and OVAM.

    For each class name, in order of preference:
      1. optimised tokens (OVAM Sec. 3.3) when `tokens` holds the class: X' = [background, class], map of the
         class token from the stored queries (Eq. 4-5);
      2. the recorded cross-attention of the class's sub-tokens in the generation prompt (`recorded=True`
         and the word occurs in the prompt; DAAM's word merging: mean over all sub-token occurrences);
      3. the attribution prompt `attribution.format(name=..., prompt=...)` re-keyed against the stored queries
         (OVAM; also OVAM's adaptation of DAAM/Attn2Mask to classes absent from the prompt, which gives the
         same maps as 2 when the word is in the prompt and pad=True).
    """

    def __init__(self, backbone, attribution: str = "A photograph of a {name}", pad: bool = False,
                 tokens: dict[str, torch.Tensor] | None = None, recorded: bool = True):
        self.backbone, self.attribution, self.pad = backbone, attribution, pad
        self.tokens, self.recorded = tokens or {}, recorded
        self._emb: dict[tuple, tuple] = {}

    def embedding(self, text: str) -> tuple[torch.Tensor, list[int]]:
        key = (text, self.pad)
        if key not in self._emb:
            self._emb[key] = attribution_embedding(self.backbone, text, self.pad)
        return self._emb[key]

    def uses_tokens(self, name: str) -> bool:
        return name in self.tokens

    def class_maps(self, trace, layer: str, name: str, steps=None) -> torch.Tensor:
        """(S, H, h, w) map of one class on one layer: the mean of its token maps."""
        return self.token_maps(trace, layer, name, steps).mean(0)

    def token_maps(self, trace, layer: str, name: str, steps=None) -> torch.Tensor:
        """(n_tokens, S, H, h, w) maps of each of a class's tokens on one layer (one map for optimised tokens)."""
        tok = self.backbone.tokenizer
        if name in self.tokens:
            return rekey(trace, layer, self.tokens[name].to(self.backbone.device), steps)[..., 1][None]
        if self.recorded and layer in trace.cross:
            idx = token_indices(tok, trace.token_ids, name)
            if idx:
                cross = trace.cross[layer] if steps is None else trace.cross[layer][steps]
                return cross[..., idx].float().movedim(-1, 0)
        if layer not in trace.queries:
            raise KeyError(f"class {name!r} is not in the prompt {trace.prompt!r} and no queries were recorded "
                           f"for {layer}; enable open-vocabulary attribution")
        text = self.attribution.format(name=name, prompt=trace.prompt)
        emb, ids = self.embedding(text)
        idx = token_indices(tok, ids, name)
        if not idx:  # the template does not contain the name (e.g. "{prompt}" without it): name alone
            emb, ids = self.embedding(name)
            idx = token_indices(tok, ids, name)
        return rekey(trace, layer, emb, steps)[..., idx].movedim(-1, 0)

    def layer_maps(self, trace, layers: list[str], names: list[str], steps=None) -> list[torch.Tensor]:
        """[(K, S, H, h, w) per layer]. When recorded maps were averaged over heads at capture time and
        re-keyed ones were not, every class of that layer is averaged over heads (H = 1)."""
        out = []
        for layer in layers:
            maps = [self.class_maps(trace, layer, n, steps) for n in names]
            if len({m.shape[1] for m in maps}) > 1:
                maps = [m.mean(1, keepdim=True) for m in maps]
            out.append(torch.stack(maps))
        return out
