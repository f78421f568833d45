"""FreeGen's Stage 2: the Entity-level Grounding Decoder (EGD) and hardness-aware self-training (HST).

FreeGen Sec. 3.3 (no public code; the Supplement with the decoder's details is not available):
  features   "multi-scale feature maps F within the temporal U-Net, corresponding to four resolutions (64, 32,
             16, 8 on SD), in a single forward diffusion process (t = 1)": `unet_features` encodes the generated
             image with the VAE, noises it to t = 1 and runs the UNet once with the generation prompt; the
             outputs of every ResNet and transformer module of the UNet are grouped by resolution and
             concatenated per resolution. "compress their channel dimensions with 3x3 convolution blocks":
             one 3x3 conv + GroupNorm per resolution (`GroundingDecoder.compress`).
  Eq. 6      F_{l+1} = BiAttn(phi(F_l), Y_l) + F_l, phi = multi-scale deformable self-attention (transformers'
             Mask2FormerPixelDecoderEncoderLayer, over the three coarsest levels as in Mask2Former's pixel
             decoder; the finest level is the mask-feature level, fed by an FPN lateral + the upsampled
             coarser map).
  Eq. 7      Y_{l+1} = BiAttn(xi(Y_l), F_l) + Y_l, xi = a vanilla transformer layer on the entity embeddings;
             BiAttn = transformers' GroundingDinoBiMultiHeadAttention (one block per layer, used for both
             directions: its vision output for Eq. 6, its text output for Eq. 7).
  text adapter  the class entities' CLIP embeddings (mean over each name's tokens) through a 2-layer MLP; a
             "background" entity is encoded the same way, so background is one more open-vocabulary entity.
  head       Mask2Former's masked-attention decoder layers (transformers' Mask2FormerMaskedAttentionDecoderLayer,
             round robin over the three coarse levels, attention masked by the previous layer's masks) on
             queries = [learnable queries ; the entity embeddings Y] ("we concatenate the linguistic embeddings
             ... with the learnable queries"); class score of query q for entity k = sigmoid of the scaled
             cosine (dot product of normalised vectors) between q and Y_k; mask logits = MLP(q) . mask features.
  semantic map  Mask2Former's semantic inference: P(k | pixel) proportional to sum_q sigmoid(s_qk) sigmoid(m_q).
Losses ("dice and cross-entropy losses for classification, and BCE losses for mask prediction"; the paper gives
no matching rule): the entity query of class k is that class's query by construction, so it needs no Hungarian
matching: BCE + dice between its mask and M_* == k, and sigmoid BCE of its class scores against k; the pixel
cross-entropy of the semantic map against M_* (ignore 255) supervises every query, the learnable ones included.
That pixel cross-entropy is the loss map L_i of Eq. 8:
  Eq. 8      S = sum_j sum_{i in object j} L_i / (h_j w_j): per-pixel CE averaged over each object category's
             area in M_*, summed over the categories (foreground classes present; background alone when none).
HST: the EGD pre-trained once on every pair ranks them by S; training continues on the easiest `keep`
fraction (the paper: 50%), and that decoder regenerates the masks of the rest (`hardness`, `easiest`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.data.base import IGNORE_INDEX

BACKGROUND = "background"


# -- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class EgdSample:
    """One image-prompt pair as the decoder sees it."""

    # per resolution, finest first: (C_r, h_r, w_r), float32; or a function that computes them at each use
    # (a fit streams them where holding every pair's would not fit in memory)
    features: list[torch.Tensor] | Callable[[], list[torch.Tensor]]
    entities: torch.Tensor  # (1 + K, D_text): background, then the prompt's classes
    label: torch.Tensor | None = None  # (H, W) local ids: 0 background, k = class k, IGNORE_INDEX

    def feature_maps(self) -> list[torch.Tensor]:
        return self.features() if callable(self.features) else self.features


def feature_modules(unet: nn.Module) -> list[nn.Module]:
    """Every ResNet and transformer (Transformer2DModel) module of the UNet's down, mid and up blocks."""
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    found = []
    for block in blocks:
        for group in ("resnets", "attentions"):
            found.extend(getattr(block, group, None) or [])
    return found


@torch.no_grad()
def unet_features(backbone, images: list[np.ndarray], prompts: list[str], timestep: int = 1, seed: int = 0
                  ) -> list[list[torch.Tensor]]:
    """FreeGen Sec. 3.3: one UNet pass at t = `timestep` on the generated images' latents (the VAE posterior
    mean, noised with seeded noise), conditioned on their prompts. Returns per image the per-resolution
    concatenation of every ResNet / transformer output, finest resolution first: [(C_r, h_r, w_r), ...]."""
    size = int(np.asarray(images[0]).shape[0])
    z0 = backbone.encode_images(images, size).float()
    sched = backbone.noising_scheduler()
    a = sched.alphas_cumprod[timestep].float()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0.device)
    z = (a.sqrt() * z0 + (1 - a).sqrt() * eps).to(backbone.dtype)
    text = backbone.encode_text(prompts)
    captured: list[torch.Tensor] = []

    def keep(_module, _args, out):
        captured.append((out if torch.is_tensor(out) else out[0]).float())

    handles = [m.register_forward_hook(keep) for m in feature_modules(backbone.unet)]
    try:
        backbone.unet(z, torch.tensor([timestep], device=z.device), encoder_hidden_states=text)
    finally:
        for h in handles:
            h.remove()
    by_size: dict[int, list[torch.Tensor]] = {}
    for out in captured:
        by_size.setdefault(out.shape[-1], []).append(out)
    finest_first = sorted(by_size, reverse=True)
    per_res = [torch.cat(by_size[s], 1).cpu() for s in finest_first]
    return [[r[b] for r in per_res] for b in range(len(images))]


@torch.no_grad()
def entity_embeddings(backbone, names: list[str]) -> torch.Tensor:
    """(1 + K, D) CLIP embeddings of 'background' and each class name: the mean over the name's own tokens of
    the text encoder's last hidden states for the name alone (between the start and end tokens)."""
    texts = [BACKGROUND, *names]
    hidden = backbone.encode_text(texts).float().cpu()
    out = []
    for text, h in zip(texts, hidden):
        n = len(backbone.tokenizer(text, add_special_tokens=False).input_ids)
        out.append(h[1:1 + max(n, 1)].mean(0))
    return torch.stack(out)


def local_label(label: np.ndarray | torch.Tensor, class_ids: list[int]) -> torch.Tensor:
    """Dataset ids -> the decoder's local ids (0 background, k for class_ids[k-1], IGNORE_INDEX kept; ids of
    classes not in the prompt become ignore)."""
    label = torch.as_tensor(np.asarray(label)).long()
    out = torch.full_like(label, IGNORE_INDEX)
    out[label == 0] = 0
    for k, cid in enumerate(class_ids, start=1):
        out[label == cid] = k
    return out


# -- the decoder ---------------------------------------------------------------------------------------------------
def _mask2former_config(dim: int, heads: int):
    from transformers import Mask2FormerConfig

    return Mask2FormerConfig(feature_size=dim, hidden_dim=dim, mask_feature_size=dim, num_attention_heads=heads,
                             encoder_feedforward_dim=2 * dim, dim_feedforward=2 * dim, dropout=0.0,
                             pre_norm=False)


def _bi_attention(dim: int, heads: int):
    from transformers import GroundingDinoConfig
    from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoBiMultiHeadAttention

    cfg = GroundingDinoConfig(d_model=dim, encoder_ffn_dim=2 * dim, encoder_attention_heads=2 * heads,
                              fusion_dropout=0.0, use_timm_backbone=False, backbone_config={"model_type": "resnet"})
    return GroundingDinoBiMultiHeadAttention(cfg)


class GroundingDecoder(nn.Module):
    """The EGD (module docstring). `in_channels`: UNet channels per resolution, finest first (4 levels)."""

    def __init__(self, in_channels: list[int], text_dim: int, dim: int = 32, queries: int = 4, layers: int = 2,
                 decoder_layers: int = 3, heads: int = 4):
        super().__init__()
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerMaskedAttentionDecoderLayer, Mask2FormerPixelDecoderEncoderLayer,
            Mask2FormerSinePositionEmbedding)

        if len(in_channels) != 4:
            raise ValueError(f"the EGD reads 4 UNet resolutions (FreeGen Sec. 3.3), got {len(in_channels)}")
        self.arch = {"in_channels": list(in_channels), "text_dim": text_dim, "dim": dim, "queries": queries,
                     "layers": layers, "decoder_layers": decoder_layers, "heads": heads}
        groups = math.gcd(8, dim)
        self.compress = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 3, padding=1), nn.GroupNorm(groups, dim),
                                                    nn.ReLU()) for c in in_channels)
        self.text_adapter = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.level_embed = nn.Parameter(torch.randn(3, dim) * 0.02)
        self.position = Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
        m2f = _mask2former_config(dim, heads)
        self.phi = nn.ModuleList(Mask2FormerPixelDecoderEncoderLayer(m2f) for _ in range(layers))  # Eq. 6
        self.xi = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
                                for _ in range(layers))  # Eq. 7
        self.bi_attn = nn.ModuleList(_bi_attention(dim, heads) for _ in range(layers))
        self.lateral = nn.Conv2d(dim, dim, 1)  # FPN to the finest level (Mask2Former's pixel decoder)
        self.mask_features = nn.Conv2d(dim, dim, 3, padding=1)
        self.queries = nn.Embedding(queries, dim)
        self.query_position = nn.Embedding(queries + 1, dim)  # learnable queries, then one shared for entities
        self.decoder = nn.ModuleList(Mask2FormerMaskedAttentionDecoderLayer(m2f) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                        nn.Linear(dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # cosine -> logit temperature
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))
        self.heads = heads

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        return self.position(x.shape, x.device, x.dtype).flatten(2).transpose(1, 2)  # (B, hw, dim)

    def encode(self, features: list[torch.Tensor], entities: torch.Tensor):
        """Eq. 6-7 on one image: features (C_r, h_r, w_r) finest first, entities (1 + K, D_text) ->
        (mask features (dim, h0, w0), coarse levels [(hw, dim)], their positions, shapes, Y (1 + K, dim))."""
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoderEncoderOnly

        device = self.level_embed.device
        maps = [c(f[None].to(device)) for c, f in zip(self.compress, features)]  # (1, dim, h, w)
        coarse = maps[1:][::-1]  # coarsest first, as Mask2Former's encoder orders them
        shapes = [tuple(m.shape[-2:]) for m in coarse]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in coarse], 1)  # (1, S, dim)
        pos = torch.cat([self._positions(m) + self.level_embed[i] for i, m in enumerate(coarse)], 1)
        starts = torch.tensor([0, *np.cumsum([h * w for h, w in shapes])[:-1]], dtype=torch.long, device=device)
        valid = torch.ones(1, 3, 2, device=device)
        ref = Mask2FormerPixelDecoderEncoderOnly.get_reference_points(shapes, valid, device)
        y = self.text_adapter(entities.float().to(device))[None]  # (1, 1 + K, dim)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        for phi, xi, bi in zip(self.phi, self.xi, self.bi_attn):
            f_phi = phi(tokens, mask, position_embeddings=pos, reference_points=ref, spatial_shapes_list=shapes,
                        level_start_index=starts)[0]
            (dv, _), _ = bi(f_phi, y)  # Eq. 6
            _, (dt, _) = bi(tokens, xi(y))  # Eq. 7
            tokens, y = tokens + dv, y + dt
        levels = list(tokens[0].split([h * w for h, w in shapes]))
        finest_coarse = levels[-1].T.reshape(1, -1, *shapes[-1])
        up = F.interpolate(finest_coarse, size=maps[0].shape[-2:], mode="bilinear", align_corners=False)
        mask_features = self.mask_features(self.lateral(maps[0]) + up)[0]
        positions = [pos[0, int(s):int(s) + h * w] for s, (h, w) in zip(starts, shapes)]
        return mask_features, levels, positions, shapes, y[0]

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor, y: torch.Tensor):
        qn = self.decoder_norm(q)
        masks = torch.einsum("qc,chw->qhw", self.mask_embed(qn), mask_features)
        cls = self.logit_scale.exp() * F.normalize(qn, dim=-1) @ F.normalize(y, dim=-1).T + self.logit_bias
        return masks, cls

    def forward(self, sample: EgdSample) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mask logits (Q, h0, w0) and class logits (Q, 1 + K); Q = learnable queries + 1 + K entity queries
        (the entity query of entity k is at index queries + k)."""
        mask_features, levels, positions, shapes, y = self.encode(sample.feature_maps(), sample.entities)
        n = self.queries.num_embeddings
        q = torch.cat([self.queries.weight, y], 0)  # text-concatenated queries
        qpos = torch.cat([self.query_position.weight[:n], self.query_position.weight[n:].expand(len(y), -1)], 0)
        masks, cls = self._predict(q, mask_features, y)
        for i, layer in enumerate(self.decoder):
            level = i % len(levels)
            attn = F.interpolate(masks[None], size=shapes[level], mode="bilinear", align_corners=False)[0]
            attn = (attn.sigmoid() < 0.5).flatten(1)  # masked attention: True = not attended
            attn[attn.all(-1)] = False
            attn = attn[None].expand(self.heads, -1, -1)
            q = layer(q[:, None], level_index=level, position_embeddings=[p[:, None] for p in positions],
                      query_position_embeddings=qpos[:, None], encoder_hidden_states=[lv[:, None] for lv in levels],
                      encoder_attention_mask=attn)[0][:, 0]
            masks, cls = self._predict(q, mask_features, y)
        return masks, cls

    def entity_index(self, k: int) -> int:
        return self.queries.num_embeddings + k

    # -- artefact -----------------------------------------------------------------------------------------------
    def state_tensors(self, prefix: str = "egd/") -> dict[str, torch.Tensor]:
        out = {f"{prefix}{k}": v.detach().cpu().clone() for k, v in self.state_dict().items()}
        a = self.arch
        out[f"{prefix}arch"] = torch.tensor([a["text_dim"], a["dim"], a["queries"], a["layers"],
                                             a["decoder_layers"], a["heads"], *a["in_channels"]])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "egd/") -> "GroundingDecoder":
        arch = [int(v) for v in tensors[f"{prefix}arch"]]
        model = cls(arch[6:], arch[0], dim=arch[1], queries=arch[2], layers=arch[3], decoder_layers=arch[4],
                    heads=arch[5])
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k != f"{prefix}arch"}
        model.load_state_dict(state)
        return model.eval()


# -- semantic map, losses, Eq. 8 ---------------------------------------------------------------------------------
def semantic_probs(masks: torch.Tensor, cls: torch.Tensor, size: tuple[int, int], eps: float = 1e-6
                   ) -> torch.Tensor:
    """Mask2Former's semantic inference, normalised over entities: (1 + K, H, W) probabilities at `size`."""
    masks = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
    sem = torch.einsum("qk,qhw->khw", cls.sigmoid(), masks.sigmoid()) + eps
    return sem / sem.sum(0, keepdim=True)


def pixel_loss_map(masks: torch.Tensor, cls: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """L_i of Eq. 8: per-pixel cross-entropy of the semantic map against the local label (0 where ignored)."""
    label = label.to(masks.device)
    probs = semantic_probs(masks, cls, tuple(label.shape))
    valid = label != IGNORE_INDEX
    picked = probs.gather(0, torch.where(valid, label, 0)[None])[0]
    return -picked.log() * valid


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid() * valid
    t = target * valid
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def egd_loss(model: GroundingDecoder, masks: torch.Tensor, cls: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The training loss of one sample (module docstring): pixel CE + per entity query mask BCE + dice and
    class sigmoid BCE."""
    label = label.to(masks.device)
    valid = (label != IGNORE_INDEX).float()
    ce = pixel_loss_map(masks, cls, label).sum() / valid.sum().clamp_min(1)
    up = F.interpolate(masks[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
    entities = cls.shape[1]
    mask_loss = up.new_zeros(())
    for k in range(entities):
        target = (label == k).float()
        logits = up[model.entity_index(k)]
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() \
            / valid.sum().clamp_min(1)
        mask_loss = mask_loss + bce + dice_loss(logits, target, valid)
    rows = cls[model.entity_index(0):]
    class_loss = F.binary_cross_entropy_with_logits(rows, torch.eye(entities, device=rows.device))
    return ce + mask_loss / entities + class_loss


def hardness(loss_map: torch.Tensor, label: torch.Tensor) -> float:
    """Eq. 8: sum over the object categories j in the mask of the mean loss over their area h_j x w_j
    (foreground categories; the background's when the mask has none)."""
    loss_map, label = loss_map.cpu(), label.cpu()
    present = [int(j) for j in torch.unique(label) if int(j) not in (0, IGNORE_INDEX)]
    present = present or ([0] if bool((label == 0).any()) else [])
    with torch.no_grad():
        return float(sum(loss_map[label == j].mean() for j in present)) if present else 0.0


def easiest(scores: list[float], keep: float) -> list[int]:
    """HST's selection: the indices of the ceil(keep * n) lowest-hardness samples (ties by index)."""
    n = max(1, math.ceil(keep * len(scores))) if scores else 0
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:n])


def predict_label(model: GroundingDecoder, sample: EgdSample, size: tuple[int, int]) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """The EGD's (1 + K, H, W) entity probabilities and its (H, W) local label map (argmax)."""
    with torch.no_grad():
        masks, cls = model(sample)
        probs = semantic_probs(masks, cls, size).cpu()
    return probs, probs.argmax(0)


def train_epochs(model: GroundingDecoder, samples: list[EgdSample], epochs: int, lr: float, batch: int,
                 seed: int, step_hook=None, optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999: the paper) over `samples` for `epochs`, shuffled per epoch with a seeded
    generator; `step_hook(epoch, mean_loss)` after each epoch."""
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        total = 0.0
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            loss = sum(egd_loss(model, *model(samples[i]), samples[i].label) for i in chunk) / len(chunk)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
        if step_hook is not None:
            step_hook(epoch, total / len(order))
    model.eval()
    return opt
