"""DEDOS's networks (paper Sec. 3.4-3.6), on plain tensors.

ProxyQueries      Eq. 3-8: basic (x) diffusion kernels per timestep, cross-attention to every UNet transformer
                  block with a random key mask, the global proxy queries Q.
CLIPRefiner       Eq. 13-14: Q refines the CLIP image tokens after every CLIP layer (Rein-style residual).
consistency_loss  Eq. 9-12: similarity matrices of CLIP features before/after denoising vs. those of the
                  query-projected features (smooth L1).
DedosDecoder      Mask2Former-style decoder (an FPN pixel decoder over CLIP taps, transformers'
                  Mask2FormerMaskedAttentionDecoderLayer / Mask2FormerMaskPredictor) with the text aggregation
                  module (linear-attention transformer blocks) before classification against text embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- Eq. 3-8 ----------------------------------------------------------------------------------------------------------
class QueryLayer(nn.Module):
    """One UNet block's interaction (Eq. 3-5): q_hat = softmax(Q K^T M) V M + q;  q_new = q_hat W + b."""

    def __init__(self, c: int, feature_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(feature_dim)  # diffusion features differ in scale per block
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(feature_dim, c), nn.Linear(feature_dim, c)
        self.out = nn.Linear(c, c)  # Eq. 5: W_i, b_i

    def forward(self, q: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """q (B, n, c); feats (B, L, C); keep (B, L) bool key mask M_i or None (all keys)."""
        b, n, c = q.shape
        f = self.norm(feats)
        split = lambda x: x.view(b, x.shape[1], self.heads, c // self.heads).transpose(1, 2)
        mask = None if keep is None else keep[:, None, None, :]
        attended = F.scaled_dot_product_attention(split(self.to_q(q)), split(self.to_k(f)), split(self.to_v(f)),
                                                  attn_mask=mask)
        q_hat = attended.transpose(1, 2).reshape(b, n, c) + q  # Eq. 4
        return self.out(q_hat)  # Eq. 5


class ProxyQueries(nn.Module):
    """Learnable proxy queries (n x c). progressive: q_t = q^b (x) q^k_t (Eq. 6, Kronecker product of a basic
    kernel n1 x c1 shared by all timesteps and a diffusion kernel n2 x c2 per timestep); else one (n x c) set
    used at every timestep ("once", Table 3 (II))."""

    def __init__(self, n: int, c: int, feature_dims: list[int], steps: int, heads: int = 8,
                 progressive: bool = True, kernel_n: int = 4, kernel_c: int = 4):
        super().__init__()
        if c % heads:
            raise ValueError(f"query dimension c={c} must be divisible by heads={heads}")
        self.n, self.c, self.steps, self.progressive = n, c, steps, progressive
        if progressive:
            if n % kernel_n or c % kernel_c:
                raise ValueError(f"n={n}, c={c} must be divisible by the diffusion kernel {kernel_n}x{kernel_c}")
            self.basic = nn.Parameter(torch.randn(n // kernel_n, c // kernel_c) * 0.5)
            self.kernels = nn.Parameter(torch.randn(steps, kernel_n, kernel_c) * 0.5)
        else:
            self.queries = nn.Parameter(torch.randn(n, c) * 0.02)
        self.layers = nn.ModuleList(QueryLayer(c, d, heads) for d in feature_dims)
        self.fuse = nn.Linear((2 + steps) * c, c)  # Eq. 8: W_Q, b_Q

    def initial(self) -> list[torch.Tensor]:
        """q_t for every timestep (n, c): Eq. 6 (progressive) or the one shared set."""
        if self.progressive:
            return [torch.kron(self.basic, self.kernels[j]) for j in range(self.steps)]
        return [self.queries] * self.steps

    def combine(self, per_step: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 7-8: Q = Linear(concat[max_j q_tj, mean_j q_tj, q_t1 ... q_tN])."""
        stacked = torch.stack(per_step)
        return self.fuse(torch.cat([stacked.max(0).values, stacked.mean(0), *per_step], dim=-1))

    def forward(self, features: list[list[torch.Tensor]], keep_prob: float = 0.7,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n, c) global proxy queries from the diffusion features [timestep][block] (B, L_i, C_i)."""
        batch = features[0][0].shape[0]
        out = []
        for q0, per_block in zip(self.initial(), features):
            q = q0.expand(batch, -1, -1)
            for layer, feats in zip(self.layers, per_block):
                keep = None
                if keep_prob < 1:  # Eq. 4's M_i: each key kept with probability keep_prob (at least one)
                    keep = torch.rand(feats.shape[:2], generator=generator) < keep_prob
                    keep[:, 0] |= ~keep.any(1)
                    keep = keep.to(feats.device)
                q = layer(q, feats, keep)
            out.append(q)  # q_{L,t} replaces q_t at the end of the denoising step
        return self.combine(out)

    def static(self) -> torch.Tensor:
        """(n, c) Q from the kernels alone (Eq. 6-8 without diffusion features): inference_queries=kernels."""
        return self.combine(self.initial())


# -- Eq. 13-14 --------------------------------------------------------------------------------------------------------
class CLIPRefiner(nn.Module):
    """S_l = softmax(f_l Q_hat^T), f_bar = S_l Q_hat, f_l <- f_l + s_l * P^F([f_bar, f_l]) (Eq. 13-14, with the
    release's Rein-style residual and a learned scale s_l initialised to 1e-3 so that training starts from the
    unmodified CLIP). Q_hat = MLP(Q), shared by all layers."""

    def __init__(self, c: int, width: int, layers: int, scale_init: float = 1e-3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, width), nn.GELU(), nn.Linear(width, width))
        self.fuse = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(layers))  # P^F (1x1 conv)
        self.scale = nn.Parameter(torch.full((layers,), float(scale_init)))

    def forward(self, layer: int, f: torch.Tensor, q_hat: torch.Tensor) -> torch.Tensor:
        s = torch.softmax(f @ q_hat.transpose(1, 2) / math.sqrt(f.shape[-1]), dim=-1)  # Eq. 13
        f_bar = s @ q_hat
        return f + self.scale[layer] * self.fuse[layer](torch.cat([f_bar, f], dim=-1))  # Eq. 14


def clip_tokens(vision, pixel_values: torch.Tensor, refine=None, q_hat: torch.Tensor | None = None,
                taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a transformers CLIPVisionTransformer layer by layer: (final tokens incl. CLS (B, 1+hw, d), patch
    tokens of each tapped layer). With `refine` and `q_hat`, Eq. 13-14 acts after every layer."""
    resized = pixel_values.shape[-1] != vision.config.image_size  # e.g. 640 px crops on a 336 px CLIP
    h = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=resized))
    tapped = {}
    for i, layer in enumerate(vision.encoder.layers):
        h = layer(h, None)
        h = h[0] if isinstance(h, tuple) else h
        if refine is not None:
            h = refine(i, h, q_hat)
        if i in taps:
            tapped[i] = h[:, 1:]
    return h, [tapped[i] for i in taps]


def consistency_loss(q: torch.Tensor, before: torch.Tensor, after: torch.Tensor, proj_q: nn.Module,
                     proj_f: nn.Module) -> torch.Tensor:
    """Eq. 9-12. before/after: (B, hw, d) CLIP patch features of x_b and x_a. f_hat = P^L(Q) x P^C(f) (Eq. 10)
    gives each position an n-vector; M = cosine similarities between all positions before and after (Eq. 11)
    for CLIP features and query features; smooth L1 between them (Eq. 12), the CLIP side as the target."""
    pq = proj_q(q)  # (B, n, d')
    fb = torch.einsum("bnd,bpd->bpn", pq, proj_f(before))
    fa = torch.einsum("bnd,bpd->bpn", pq, proj_f(after))
    m_query = F.normalize(fb, dim=-1) @ F.normalize(fa, dim=-1).transpose(1, 2)
    with torch.no_grad():
        m_clip = F.normalize(before, dim=-1) @ F.normalize(after, dim=-1).transpose(1, 2)
    return F.smooth_l1_loss(m_query, m_clip)


# -- decoder ----------------------------------------------------------------------------------------------------------
class PixelDecoder(nn.Module):
    """FPN over CLIP taps (the release feeds taps 7/11/15/last of ViT-L into an FPN): every tap projected to
    `dim`, the deepest at the patch grid, the others upsampled x2 / x4 / x4 by transposed convolutions and
    added top-down. Returns three scales for masked attention (coarse to fine) and the mask features."""

    def __init__(self, width: int, dim: int, taps: int = 4):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, dim) for _ in range(taps))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up4b = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
        self.smooth = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(3))
        self.mask = nn.Conv2d(dim, dim, 1)

    def forward(self, taps: list[torch.Tensor], grid: tuple[int, int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps = [p(t).transpose(1, 2).reshape(t.shape[0], -1, *grid) for p, t in zip(self.proj, taps)]
        s0 = self.smooth[0](maps[3])  # patch grid
        s1 = self.smooth[1](self.up2(maps[2]) + F.interpolate(s0, scale_factor=2, mode="nearest"))
        s2 = self.smooth[2](self.up4(maps[1]) + F.interpolate(s1, scale_factor=2, mode="nearest"))
        mask = self.mask(self.up4b(maps[0]) + s2)
        return [s0, s1, s2], mask


class LinearAttentionBlock(nn.Module):
    """A linear-transformer block (Katharopoulos et al. 2020, DEDOS ref. [22]): object embeddings attend to text
    embeddings with the elu+1 kernel feature map, then a feed-forward layer; both residual."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_t, self.norm_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        t = self.norm_t(text).expand(b, -1, -1)
        heads = lambda y: y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
        q = F.elu(heads(self.q(self.norm_q(x)))) + 1
        k = F.elu(heads(self.k(t))) + 1
        v = heads(self.v(t))
        kv = k.transpose(-1, -2) @ v  # (B, h, d_h, d_h)
        z = 1 / (q @ k.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)
        x = x + self.o(((q @ kv) * z).transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.norm_f(x))


class DedosDecoder(nn.Module):
    """Mask2Former-style decoder: masked attention over the pixel decoder's three scales round-robin
    (transformers' Mask2FormerMaskedAttentionDecoderLayer), masks from transformers' Mask2FormerMaskPredictor,
    then (text_interaction) the text aggregation module; classes by cosine similarity of the object embeddings
    with the class text embeddings, plus a learned no-object logit (Mask2Former's K+1-way softmax)."""

    def __init__(self, c: int, width: int, text_dim: int, dim: int = 256, layers: int = 9, heads: int = 8,
                 n: int = 100, text_interaction: bool = True, text_blocks: int = 2):
        super().__init__()
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerMaskedAttentionDecoderLayer, Mask2FormerMaskPredictor, Mask2FormerSinePositionEmbedding)

        cfg = Mask2FormerConfig(hidden_dim=dim, num_attention_heads=heads, dim_feedforward=4 * dim, dropout=0.0,
                                pre_norm=False, decoder_layers=layers)
        self.heads = heads
        self.pixel = PixelDecoder(width, dim)
        self.position = Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
        self.level_embed = nn.Embedding(3, dim)
        self.query_in = nn.Linear(c, dim)
        self.query_pos = nn.Embedding(n, dim)
        self.layers = nn.ModuleList(Mask2FormerMaskedAttentionDecoderLayer(cfg) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.mask_head = Mask2FormerMaskPredictor(dim, heads, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.text_blocks = nn.ModuleList(LinearAttentionBlock(dim) for _ in range(text_blocks if text_interaction
                                                                                   else 0))
        self.class_embed = nn.Linear(dim, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.no_object = nn.Parameter(torch.zeros(()))

    def classify(self, obj: torch.Tensor, text: torch.Tensor, masks: torch.Tensor | None = None,
                 cost: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, K+1) logits: K classes (text (K, P)) and no-object. With `cost` (B, K, H, W), the aggregated
        cost pooled over each query's mask (mask logits (B, n, H, W)) is added to the class logits (cost.py)."""
        x = obj
        t = self.text_in(text)[None]
        for block in self.text_blocks:  # text aggregation: Q_object -> Q_hat_object
            x = block(x, t)
        sim = F.normalize(self.class_embed(x), dim=-1) @ F.normalize(text, dim=-1).T * self.logit_scale.exp()
        if cost is not None:
            if cost.shape[-2:] != masks.shape[-2:]:
                cost = F.interpolate(cost, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            sim = sim + mask_pool(masks.sigmoid(), cost)
        return torch.cat([sim, self.no_object.expand(*sim.shape[:2], 1)], dim=-1)

    def forward(self, queries: torch.Tensor, taps: list[torch.Tensor], grid: tuple[int, int],
                text: torch.Tensor, final_only: bool = False,
                aggregate=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(class logits (B, n, K+1), mask logits (B, n, H, W))] after every decoder layer (the last is the
        prediction, the others deep supervision; `final_only`: the last alone, as inference needs).
        `aggregate`: the cost aggregation after the pixel decoder, called with the pixel decoder's scales and
        returning per-class logits (B, K, H, W) that every layer's masks pool (cost.py)."""
        scales, mask_features = self.pixel(taps, grid)
        cost = aggregate(scales) if aggregate is not None else None
        b = queries.shape[0]
        memory, positions = [], []
        for lvl, s in enumerate(scales):
            pos = self.position(s.shape, s.device, s.dtype)
            positions.append(pos.flatten(2).permute(2, 0, 1))  # (HW, B, dim)
            memory.append((s.flatten(2) + self.level_embed.weight[lvl][None, :, None]).permute(2, 0, 1))
        hidden = self.query_in(queries).transpose(0, 1)  # (n, B, dim)
        query_pos = self.query_pos.weight[:, None].expand(-1, b, -1)
        outputs = []

        def predict(h, target):
            obj = self.norm(h).transpose(0, 1)
            masks, attn = self.mask_head(self.norm(h), mask_features, target)
            outputs.append((obj, masks))
            return attn

        attn = predict(hidden, scales[0].shape[-2:])
        for i, layer in enumerate(self.layers):
            lvl = i % 3
            attn[attn.all(-1)] = False  # a query whose mask is empty attends everywhere (Mask2Former)
            hidden = layer(hidden, level_index=lvl, position_embeddings=positions,
                           query_position_embeddings=query_pos, encoder_hidden_states=memory,
                           encoder_attention_mask=attn)[0]
            attn = predict(hidden, scales[(i + 1) % 3].shape[-2:])
        if final_only:
            outputs = outputs[-1:]
        return [(self.classify(obj, text, masks, cost), masks) for obj, masks in outputs]


def mask_pool(masks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, n, C): values (B, C, H, W) averaged over each query's soft mask (masks (B, n, H, W) in [0, 1])."""
    return torch.einsum("bnhw,bchw->bnc", masks, values) / masks.sum((-2, -1))[..., None].clamp_min(1e-6)


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's semantic inference: sum_q softmax(class)[..., :K] x sigmoid(mask) -> (B, K, H, W)."""
    return torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())


def maskpool_probs(mask_logits: torch.Tensor, dense: torch.Tensor, text: torch.Tensor,
                   clip_scale: float) -> torch.Tensor:
    """FC-CLIP's out-of-vocabulary classification (B, n, K): each query's mask pools the frozen CLIP's dense
    embeddings (dense (B, g, g, P), MaskCLIP's patches), whose cosine with the class texts (K, P) x CLIP's logit
    scale gives class probabilities."""
    masks = F.interpolate(mask_logits.float(), size=dense.shape[1:3], mode="bilinear", align_corners=False).sigmoid()
    pooled = mask_pool(masks, dense.permute(0, 3, 1, 2))
    return (F.normalize(pooled, dim=-1) @ F.normalize(text.float(), dim=-1).T * clip_scale).softmax(-1)


def geometric_ensemble(class_logits: torch.Tensor, p_out: torch.Tensor, seen: torch.Tensor, alpha: float,
                       beta: float) -> torch.Tensor:
    """Not in the DEDOS paper: FC-CLIP's out-of-vocabulary ensemble (Yu et al., NeurIPS 2023), an option beside
    DEDOS's cosine classifier. The decoder's in-vocabulary class probabilities and a frozen CLIP's per-query
    ones p_out (B, n, K) (`maskpool_probs`, or CLIP on each query's masked region: `ov_ensemble`) are combined
    geometrically, p_in^(1 - a) * p_out^a with a = alpha for the classes the fit saw (`seen`, (K,) bool) and beta
    for the others, renormalised over the classes and scaled by the decoder's own no-object probability, as
    FC-CLIP does. Returns log-probabilities (B, n, K+1) that `semantic_scores` reads like logits."""
    probs = class_logits.softmax(-1)
    p_in, void = probs[..., :-1], probs[..., -1:]
    weight = torch.where(seen.to(p_in.device), alpha, beta).to(p_in.dtype)
    ensemble = (p_in.clamp_min(1e-8) ** (1 - weight) * p_out.to(p_in).clamp_min(1e-8) ** weight).log().softmax(-1)
    return torch.cat([ensemble * (1 - void), void], -1).clamp_min(1e-8).log()
