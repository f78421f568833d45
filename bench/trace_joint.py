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

from bench.capture import _Recorder, grid_size

ROWS = ("renormalised", "raw")


# float32 tensors of a block's rows alive at once: scores and probabilities of each slice (and, raw, the joint
# row's scores concatenated for its log-normaliser)
LIVE_PER_ROW = 3
# at least this many bytes of live scores per block, as the UNet processors (bench.capture.MIN_SCORE_BLOCK_BYTES):
# SD3 Medium's image->image role at 512 px keeps 4 MiB a layer, and blocks of half that (6 query rows of 24
# heads) made the capture several times slower than blocks of 16 MiB
MIN_BLOCK_BYTES = 16 * 2**20


def rows_per_block(batch_heads: int, rows: int, keys: int, kept_bytes: int) -> int:
    """Query rows per block: a block's live scores stay within half of what the layer keeps (at least
    MIN_BLOCK_BYTES), so a traced layer's peak stays within plain + 2x kept (tests/test_backbone_memory.py)."""
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


class _Stop(Exception):
    """Ends a re-keying pass once the deepest re-keyed layer has given its keys."""


def _block_of(layer: str) -> str:
    return layer.rsplit(".", 1)[0]


def _transformer_blocks(unet) -> list[str]:
    """The joint transformer blocks in forward order (Flux: double blocks, then single blocks)."""
    return [f"{group}.{i}" for group in ("transformer_blocks", "single_transformer_blocks")
            for i in range(len(getattr(unet, group, ())))]


class TextStreamRecorder:
    """Records, during a traced pass, what OVAM's re-keying on joint attention needs (`TextStream`): the image
    tokens entering every transformer block up to the deepest re-keyed layer, and the denoiser's other inputs
    (timestep, pooled text, guidance, image ids) of each call, for the recorded branch only."""

    def __init__(self, unet, recorder: _Recorder, layers: list[str]):
        self.unet, self.recorder = unet, recorder
        blocks = _transformer_blocks(unet)
        deepest = max(blocks.index(_block_of(n)) for n in layers)
        self.blocks, self.layers = blocks[:deepest + 1], list(layers)
        self.inputs: dict[str, list[torch.Tensor]] = {b: [] for b in self.blocks}
        self.calls: list[dict] = []
        self.shapes: list[tuple] = []
        self._handles: list = []

    def install(self) -> "TextStreamRecorder":
        def call_hook(_module, args, kwargs):
            sample = kwargs.get("hidden_states", args[0] if args else None)
            batch, keep = sample.shape[0], self.recorder.keep
            self.shapes.append(tuple(sample.shape[1:]))
            kept = {}
            for key, value in kwargs.items():
                if key in ("hidden_states", "encoder_hidden_states", "txt_ids") or not torch.is_tensor(value):
                    continue
                batched = key != "img_ids" and value.ndim >= 1 and value.shape[0] == batch
                kept[key] = (value[keep] if batched else value).detach()
            self.calls.append(kept)

        def block_hook(name):
            def hook(_module, args, kwargs):
                self.inputs[name].append(kwargs["hidden_states"][self.recorder.keep].detach())
            return hook

        self._handles.append(self.unet.register_forward_pre_hook(call_hook, with_kwargs=True))
        for name in self.blocks:
            block = self.unet.get_submodule(name)
            self._handles.append(block.register_forward_pre_hook(block_hook(name), with_kwargs=True))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stream(self, image: int) -> "TextStream":
        """The record of one image of the batch (S calls)."""
        calls = [{k: (v[image:image + 1] if k != "img_ids" and v.ndim >= 1 and v.shape[0] > image else v)
                  for k, v in call.items()} for call in self.calls]
        inputs = {b: [x[image:image + 1] for x in xs] for b, xs in self.inputs.items()}
        return TextStream(self.unet, self.blocks, self.layers, inputs, calls, self.shapes)


class TextStream:
    """OVAM's re-keying (Eq. 3-4) on joint attention, for one traced image.

    On a UNet the keys of an attribution prompt X' are a projection of the text encoder's states, the same in
    every layer. A joint block projects its text keys from its own text stream, which its adaptive layer norm
    and every earlier block (reading the image tokens) have transformed. So X' is run through the text stream
    as the prompt was: the transformer's own forward with X' as its text, the traced pass's timestep, pooled
    text and guidance, and every block's image tokens pinned to those the traced pass had (the image stream is
    the generation's, as OVAM's queries are; X' only reads it). K'_i are the text keys block i computes for X'
    (after its projection and qk-norm). With X' = the prompt itself the keys, and so the re-keyed attention, are
    the recorded pass's own (OVAM Sec. 3.2). Differentiable in X' (token optimisation). One pass per call
    covers every re-keyed layer and the requested steps, up to the deepest re-keyed block."""

    def __init__(self, unet, blocks, layers, inputs, calls, shapes):
        self.unet, self.blocks, self.layers = unet, blocks, layers
        self.inputs, self.calls, self.shapes = inputs, calls, shapes
        self._cache: tuple | None = None

    def keys(self, layer: str, emb: torch.Tensor, steps=None) -> torch.Tensor:
        """(S', H, L', d) text keys of X' = emb (L', D) at `layer` for the recorded steps `steps` (all: None)."""
        chosen = list(range(len(self.calls)))
        if steps is not None:
            chosen = chosen[steps] if isinstance(steps, slice) else [chosen[i] for i in steps]
        key = (id(emb), emb._version, tuple(chosen))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, emb, self._run(emb, chosen))  # holds emb: its id stays its own
        return self._cache[2][layer]

    def _run(self, emb: torch.Tensor, steps: list[int]) -> dict[str, torch.Tensor]:
        unet, n = self.unet, len(steps)
        dtype = next(unet.parameters()).dtype
        kwargs = {}
        for name, value in self.calls[steps[0]].items():
            per_step = [self.calls[s][name] for s in steps]
            batched = name != "img_ids" and value.ndim >= 1 and value.shape[0] == 1
            kwargs[name] = torch.cat(per_step) if batched else value
        sample = torch.zeros((n, *self.shapes[steps[0]]), dtype=dtype, device=emb.device)
        text = emb.to(dtype)[None].expand(n, -1, -1)
        if type(unet).__name__ == "FluxTransformer2DModel":
            kwargs["txt_ids"] = torch.zeros(text.shape[1], 3, dtype=dtype, device=emb.device)
        pinned = {b: torch.cat([self.inputs[b][s] for s in steps]) for b in self.blocks}
        got: dict[str, torch.Tensor] = {}
        recorder = _Recorder(_empty_request())
        recorder.text_length = text.shape[1]
        last = max(self.layers, key=lambda n: self.blocks.index(_block_of(n)))

        def pin(name):
            def hook(_module, args, kw):
                kw["hidden_states"] = pinned[name].to(kw["hidden_states"].dtype)
                return args, kw
            return hook

        def grab(name, base):
            class Grab(base):
                def capture(self, q_img, k_img, k_txt, scale):
                    got[name] = k_txt  # (S', H, L', d): one image, its steps batched
                    if name == last:
                        raise _Stop
            return Grab(recorder, name, set())

        handles = [unet.get_submodule(b).register_forward_pre_hook(pin(b), with_kwargs=True) for b in self.blocks]
        saved = {}
        try:
            for name in self.layers:
                attn = unet.get_submodule(name)
                saved[name] = attn.processor
                base = FluxCaptureProcessor if type(attn).__name__ == "FluxAttention" else JointCaptureProcessor
                attn.set_processor(grab(name, base))
            try:
                unet(hidden_states=sample, encoder_hidden_states=text, return_dict=False, **kwargs)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
            for name, processor in saved.items():
                unet.get_submodule(name).set_processor(processor)
        return got


def _empty_request():
    from bench.capture import TraceRequest

    return TraceRequest()


class JointKeys(torch.nn.Module):
    """A joint layer as `methods.attribution.rekey` reads it: `step_keys(X', steps)` gives the text keys of X'
    at this layer for each recorded step (`TextStream`); `scale` is the layer's softmax scale."""

    def __init__(self, attn, stream: TextStream, name: str):
        super().__init__()
        self.heads = attn.heads
        proj = getattr(attn, "add_k_proj", None) or attn.to_k
        self.scale = (proj.out_features // attn.heads) ** -0.5
        self.stream, self.name = [stream], name  # a list: not registered as a submodule

    def step_keys(self, emb: torch.Tensor, steps=None) -> torch.Tensor:
        return self.stream[0].keys(self.name, emb, steps)
