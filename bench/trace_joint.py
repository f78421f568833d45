"""Capture processors for joint (MM-DiT) attention: SD3/SD3.5 (`JointAttnProcessor2_0`, tokens `[image, text]`)
and Flux.1 (`FluxAttnProcessor`, tokens `[text, image]`; single blocks attend over the concatenated sequence).

The layer's output is computed exactly as the stock processor computes it (same projections, norms, rotary
embedding and the same fused attention call), so a traced layer returns the stock output bit for bit; the
probabilities are computed beside it from the very q/k the fused call saw, for the requested slices only:

* cross role (image -> text): rows = image tokens, columns = the text positions `text_columns` names (SD3: the
  77 CLIP positions; Flux: all T5 tokens) -> (B, H, N_img, T);
* self role (image -> image): rows and columns = image tokens -> (B, H, N_img, N_img).

Joint attention's rows are a softmax over image AND text keys, so neither block sums to 1 per row.
`rows="renormalised"` (default) renormalises each block's rows to sum to 1 (a softmax over the block's own
columns: what a cross-attention over those text tokens, or a self-attention over the image, gives; iSeg's
iteration assumes row-stochastic self-attention); `rows="raw"` keeps the joint softmax's own values (rows sum to
the block's share of the mass). Both are computed in query-row blocks, in float32, so no (N_img + N_txt)^2 matrix
per head ever exists: at most a block of rows against all keys.
"""

from __future__ import annotations

import torch

from bench.trace import _Recorder, grid_size

ROWS = ("renormalised", "raw")


# float32 tensors of a block's rows alive at once: scores and probabilities of each slice (and, raw, the joint
# row's scores concatenated for its log-normaliser)
LIVE_PER_ROW = 3
MIN_BLOCK_BYTES = 2**20


def rows_per_block(batch_heads: int, rows: int, keys: int, kept_bytes: int) -> int:
    """Query rows per block: a block's live scores stay within half of what the layer keeps (at least 1 MiB), so
    a traced layer's peak stays within plain + 2x kept (tests/test_backbone_memory.py)."""
    per_row = batch_heads * keys * 4 * LIVE_PER_ROW
    return max(1, min(rows, max(MIN_BLOCK_BYTES, kept_bytes // 2) // per_row))


def block_probs(q_img: torch.Tensor, k_img: torch.Tensor, k_txt: torch.Tensor, cols: slice, kinds: set[str],
                rows: str, scale: float, kept_bytes: int, per_head: dict[str, bool] | None = None,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Requested slices of softmax(q k^T * scale) over keys [image, text] for image queries, layout (B, H, N, d).
    Returns {"cross": (B, H, N_img, T), "self_attn": (B, H, N_img, N_img)} for the kinds asked, in `dtype`; a kind
    whose `per_head` is False is averaged over heads block by block (H = 1), so only what is kept is allocated."""
    per_head = per_head or {}
    b, h, n, _ = q_img.shape
    k_cols = k_txt[:, :, cols]
    keys = n + (k_txt.shape[2] if rows == "raw" else 0) + k_cols.shape[2]
    step = rows_per_block(b * h, n, keys, kept_bytes)
    out = {kind: None for kind in kinds if kind in ("cross", "self_attn")}
    k_img, k_cols, k_all_txt = k_img.float(), k_cols.float(), k_txt.float()
    for start in range(0, n, step):
        q = q_img[:, :, start:start + step].float() * scale
        s_img = q @ k_img.transpose(-1, -2) if "self_attn" in out or rows == "raw" else None
        s_cols = q @ k_cols.transpose(-1, -2) if "cross" in out else None
        if rows == "raw":  # the joint row's log-normaliser over every key, image and text
            s_txt = q @ k_all_txt.transpose(-1, -2)
            lse = torch.logsumexp(torch.cat([s_img, s_txt], -1), -1, keepdim=True)
            del s_txt
        parts = {}
        if "cross" in out:
            parts["cross"] = (s_cols - lse).exp() if rows == "raw" else s_cols.softmax(-1)
        if "self_attn" in out:
            parts["self_attn"] = (s_img - lse).exp() if rows == "raw" else s_img.softmax(-1)
        for kind, value in parts.items():
            if not per_head.get(kind, True):
                value = value.mean(1, keepdim=True)
            if out[kind] is None:
                out[kind] = value.new_empty((b, value.shape[1], n, value.shape[-1]), dtype=dtype)
            out[kind][:, :, start:start + step] = value
        del parts, s_img, s_cols
    return out


class _JointCapture:
    """Shared recording of the image-query slices (the recorded branch, heads kept or averaged)."""

    def __init__(self, recorder: _Recorder, name: str, kinds: set[str]):
        self.recorder, self.name, self.kinds = recorder, name, kinds

    def _kept_bytes(self, batch, heads, n_img, n_cols) -> int:
        rec = self.recorder
        kept = len(range(batch)[rec.keep])
        per_head = {"cross": rec.request.per_head, "self_attn": rec.request.self_per_head}
        size = torch.empty((), dtype=rec.dtype).element_size()
        cols = {"cross": n_cols, "self_attn": n_img}
        return sum(kept * (heads if per_head[k] else 1) * n_img * cols[k] * size
                   for k in ("cross", "self_attn") if k in self.kinds)

    def weight_text_keys(self, keys: torch.Tensor, seq_dim: int, start: int = 0) -> torch.Tensor:
        """iSeg's Cat-Cross (Eq. 8-9) on joint attention: the text keys at the trace's text positions
        (`text_columns`, counted from `start` along `seq_dim`) scaled by the per-token weights W. Every query
        sees the weighted keys, the text stream's own queries included (a UNet has none)."""
        weights = self.recorder.key_weights
        if weights is None:
            return keys
        cols = range(keys.shape[seq_dim] - start)[self.recorder.text_columns]
        scale = torch.ones(weights.shape[0], keys.shape[seq_dim], dtype=keys.dtype, device=keys.device)
        scale[:, start + cols.start:start + cols.start + weights.shape[1]] = weights.to(keys.dtype)
        shape = [1] * keys.ndim
        shape[0], shape[seq_dim] = scale.shape
        return keys * scale.view(shape)

    def capture(self, q_img, k_img, k_txt, scale) -> None:
        """q/k in layout (B, H, N, d), exactly the tensors the fused attention saw."""
        if not self.kinds:
            return
        rec = self.recorder
        b, heads, n_img, _ = q_img.shape
        cols = rec.text_columns
        n_cols = k_txt[:, :, cols].shape[2] if k_txt is not None else 0
        if k_txt is None:  # an image-only attention (SD3.5's attn2): its probabilities are the self role's own
            k_txt = k_img[:, :, :0]
        keep = rec.keep
        per_head = {"cross": rec.request.per_head, "self_attn": rec.request.self_per_head}
        probs = block_probs(q_img[keep], k_img[keep], k_txt[keep], cols, self.kinds, rec.rows, scale,
                            self._kept_bytes(b, heads, n_img, n_cols), per_head, rec.dtype)
        if "queries" in self.kinds:
            rec.add("queries", self.name, q_img)
        h, w = grid_size(n_img, rec.latent_size)
        if "cross" in probs:
            rec.add("cross", self.name, probs["cross"].unflatten(2, (h, w)), selected=True)
        if "self_attn" in probs:
            rec.add("self_attn", self.name, probs["self_attn"], selected=True)


class JointCaptureProcessor(_JointCapture):
    """`diffusers.models.attention_processor.JointAttnProcessor2_0` of diffusers 0.42.1, line for line, plus the
    capture of the image-query slices (module docstring). Tokens are `[image, text]`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        q_img, k_img, k_txt = query, key, None
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            ek = self.weight_text_keys(ek, 2)
            k_txt = ek
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        self.capture(q_img, k_img, k_txt, head_dim ** -0.5)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxCaptureProcessor(_JointCapture):
    """`diffusers.models.transformers.transformer_flux.FluxAttnProcessor` of diffusers 0.42.1, line for line,
    plus the capture (module docstring). Tokens are `[text, image]`: in double blocks the text comes from
    `encoder_hidden_states`; single blocks see the concatenated sequence, whose text length the tracer takes
    from the transformer's input (`recorder.text_length`)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            encoder_key = self.weight_text_keys(encoder_key, 1)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        elif self.recorder.key_weights is not None:  # a single block: [text, image] in one sequence
            key = torch.cat([self.weight_text_keys(key[:, :self.recorder.text_length], 1),
                             key[:, self.recorder.text_length:]], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.recorder.text_length
        q, k = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, N, d), text first
        self.capture(q[:, :, txt:], k[:, :, txt:], k[:, :, :txt], attn.head_dim ** -0.5)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class JointKeys(torch.nn.Module):
    """OVAM's re-keying (Eq. 3-4) on a joint layer: K' = norm_added_k(add_k_proj(context_embedder(X'))), X' the
    attribution prompt's text states as the family conditions its first text positions
    (`Backbone.attribution_states`). `methods.attribution.rekey` reads `to_k` and `scale` as on a UNet's attn2.

    An approximation, where a UNet's is exact: a UNet's cross-attention keys are a projection of the text
    encoder's states, but a joint block's text keys are projected from the block's own text stream, which the
    adaptive layer norm and every earlier block have transformed (with the image tokens). X' skips both; the
    recorded cross role (image->text block) is exact."""

    def __init__(self, attn, context_embedder):
        super().__init__()
        self.attn, self.context_embedder = attn, context_embedder
        self.heads = attn.heads
        # Flux's single blocks project text and image keys alike (to_k, norm_k)
        self.proj = getattr(attn, "add_k_proj", None) or attn.to_k
        self.norm = attn.norm_added_k if getattr(attn, "add_k_proj", None) is not None else attn.norm_k
        self.scale = (self.proj.out_features // attn.heads) ** -0.5
        self.to_k = _JointKeyProjection(self)


class _JointKeyProjection(torch.nn.Module):
    def __init__(self, keys: JointKeys):
        super().__init__()
        self.keys = [keys]  # a list: not registered as a submodule (no cycle)

    @property
    def weight(self):
        return self.keys[0].proj.weight

    def forward(self, states):
        keys = self.keys[0]
        k = keys.proj(keys.context_embedder(states)).unflatten(-1, (keys.heads, -1))
        if keys.norm is not None:
            k = keys.norm(k)
        return k.flatten(-2)
