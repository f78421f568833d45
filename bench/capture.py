"""Attention tracing: record what methods ask for, on the selected layers only.

    with AttentionTracer(backbone, request) as tracer:
        ...run the UNet (see bench.forward)...
    traces = tracer.traces(prompts)

Selected layers get a `CaptureProcessor` (explicit softmax via `attn.get_attention_scores`); every other layer
keeps its own processor (the fast SDPA path), except that Cat-Cross key weights, when requested, need every
cross-attention layer to weight its keys (`WeightedKeyProcessor`, still SDPA). Processors see (B, h*w, C), so
the latent size comes from a UNet forward pre-hook.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.errors import BenchError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TraceRequest:
    """What a method needs recorded. Layer names are diffusers module names (glob patterns allowed)."""

    cross: frozenset[str] = frozenset()  # attn2 layers: cross-attention probabilities (h, w, T)
    self_attn: frozenset[str] = frozenset()  # attn1 layers: self-attention probabilities (h*w, h*w)
    queries: frozenset[str] = frozenset()  # attn2 layers: per-head queries, to re-key with any text (OVAM)
    per_head: bool = False  # keep heads of cross-attention separate (else mean over heads at capture time)
    dtype: str = "float32"
    sum_steps: bool = False  # sum over denoising steps at capture time (DAAM); else keep each step
    sum_self_steps: bool = False  # sum self-attention only over steps at capture time (OVAM Eq. 8: S x less memory)
    self_per_head: bool = False  # keep heads of self-attention separate (HW x HW per head: ask only if needed)

    def union(self, other: "TraceRequest") -> "TraceRequest":
        """Everything either needs. A request that records nothing of a kind does not constrain how that kind
        is stored (a cross-attention-only method does not stop self-attention from being summed over steps)."""
        if other.dtype != self.dtype:
            raise ValueError("cannot merge trace requests with different dtypes")
        both = (self, other)

        def agree(flag, records) -> bool:
            votes = [flag(r) for r in both if records(r)]
            return bool(votes) and all(votes)

        return TraceRequest(self.cross | other.cross, self.self_attn | other.self_attn,
                            self.queries | other.queries,
                            any(r.per_head for r in both if r.cross or r.queries), self.dtype,
                            agree(lambda r: r.sum_steps, lambda r: not r.is_empty()),
                            agree(lambda r: r.sum_steps or r.sum_self_steps, lambda r: bool(r.self_attn)),
                            any(r.self_per_head for r in both if r.self_attn))

    def is_empty(self) -> bool:
        return not (self.cross or self.self_attn or self.queries)


def request(cross=(), self_attn=(), queries=(), **kw) -> TraceRequest:
    return TraceRequest(frozenset(cross), frozenset(self_attn), frozenset(queries), **kw)


def attention_layers(unet: torch.nn.Module) -> dict[str, str]:
    """{module name: "self" | "cross" | "joint"} for every diffusers attention of the denoiser, in module
    registration order (diffusers registers up_blocks before mid_block; `bench.models.layers.LayerMap` has the
    forward order). "joint": an MM-DiT attention over image and text tokens (SD3's `attn`, every Flux block),
    which serves both roles (bench.trace_joint); SD3.5's image-only `attn2` is "self"."""
    from diffusers.models.attention_processor import Attention

    out = {}
    for name, module in unet.named_modules():
        if type(module).__name__ == "FluxAttention":
            out[name] = "joint"
        elif isinstance(module, Attention):
            if type(module.processor).__name__ == "JointAttnProcessor2_0" or name.endswith(".attn") \
                    and getattr(module, "add_k_proj", None) is not None:
                out[name] = "joint" if getattr(module, "add_k_proj", None) is not None else "self"
            else:
                out[name] = "cross" if module.is_cross_attention else "self"
    return out


def resolve_layers(patterns, layers: dict[str, str], kind: str) -> list[str]:
    """Expand glob patterns against the attention layers of one kind (a joint layer is of both kinds); unknown
    names are errors."""
    names = [n for n, k in layers.items() if k in (kind, "joint")]
    chosen: list[str] = []
    for pattern in sorted(patterns):
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            example = ", ".join(names[:3])
            raise BenchError(f"layer {pattern!r} matches no {kind}-attention layer of this UNet "
                             f"(e.g. {example}); list them with bench.capture.attention_layers(unet)")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]  # registration order


@dataclass
class Trace:
    """Recorded attention for ONE image. Tensors are indexed [step, head, ...]; head has size 1 if averaged.

    cross[layer]:   (S, H, h, w, T)      probabilities over the prompt tokens (77 on SD)
    self_attn[layer]: (S, H, h*w, h*w)   rows are queries
    queries[layer]: (S, H, h*w, d)       pre-softmax queries, per head
    """

    prompt: str
    token_ids: list[int]
    timesteps: list[int]
    latent_size: tuple[int, int]
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attn: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # attn2 modules, for re-keying (to_k)
    image: torch.Tensor | None = None  # generated image (H, W, 3) uint8 in generation mode

    def step_mean(self, kind: str, layer: str) -> torch.Tensor:
        """Mean over denoising steps of cross / self_attn / queries[layer], whether or not it was summed at
        capture time (a summed record has one entry for all `timesteps`)."""
        value = getattr(self, kind)[layer]
        if value.shape[0] == len(self.timesteps):
            return value.mean(0)
        return value[0] / len(self.timesteps)

    def spatial_size(self, layer: str) -> tuple[int, int]:
        t = self.cross.get(layer, self.queries.get(layer, self.self_attn.get(layer)))
        if t is None:
            raise KeyError(layer)
        if layer in self.cross:
            return tuple(t.shape[2:4])
        return grid_size(t.shape[2], self.latent_size)


def grid_size(seq_len: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    height, width = latent_size
    factor = math.sqrt(height * width / seq_len)
    return int(round(height / factor)), int(round(width / factor))


class _Recorder:
    """Shared state of one tracing session: branch selection, latent size, key weights, recorded tensors."""

    def __init__(self, req: TraceRequest):
        self.request = req
        self.dtype = DTYPES[req.dtype]
        self.latent_size: tuple[int, int] | None = None
        self.keep: slice = slice(None)  # which part of the UNet batch to record (the conditional branch)
        self.key_weights: torch.Tensor | None = None  # (B_unet, T) Cat-Cross weights, or None
        self.timesteps: list[int] = []
        self.data: dict[str, dict[str, list[torch.Tensor]]] = {"cross": {}, "self_attn": {}, "queries": {}}
        # joint attention (bench.trace_joint): which text positions the cross role keeps, how its blocks' rows are
        # normalised, and the text length of Flux's single blocks (read from the transformer's input)
        self.text_columns: slice = slice(None)
        self.rows: str = "renormalised"
        self.text_length: int = 0

    def add(self, kind: str, layer: str, value: torch.Tensor, selected: bool = False) -> None:
        """Record `value` (batch first); `selected`: already restricted to the recorded branch."""
        value = (value if selected else value[self.keep]).to(self.dtype).detach()
        steps = self.data[kind].setdefault(layer, [])
        if (self.request.sum_steps or (kind == "self_attn" and self.request.sum_self_steps)) and steps:
            steps[0] += value
        else:
            steps.append(value)


# Attention scores computed at once by a capturing layer: a quarter of what the layer keeps, at least this many
# bytes. The softmax holds scores and probabilities together, so a layer's peak stays within what it keeps plus
# half of it (the bound: traced peak <= plain peak + 2x the trace kept), in few enough blocks to stay fast.
MIN_SCORE_BLOCK_BYTES = 16 * 2**20


def _row_block(batch_heads: int, rows: int, keys: int, element_size: int, kept_bytes: int) -> int:
    """Query rows per block so that a block of scores (batch_heads, block, keys) stays within the budget."""
    per_row = batch_heads * keys * max(element_size, 4)  # get_attention_scores may upcast to fp32
    budget = max(MIN_SCORE_BLOCK_BYTES, kept_bytes // 4)
    return max(1, min(rows, budget // per_row))


class CaptureProcessor:
    """diffusers `AttnProcessor` semantics with the probabilities exposed (and optional key weighting).

    Mirrors `diffusers.models.attention_processor.AttnProcessor` of diffusers 0.42 (group norm, spatial norm,
    residual, rescale, `get_attention_scores` softmax); `tests/test_method_contract.py` checks that it gives
    that processor's output exactly and SDPA's within rounding."""

    def __init__(self, recorder: _Recorder, name: str, kinds: set[str]):
        self.recorder, self.name, self.kinds = recorder, name, kinds

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        rec = self.recorder
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if is_cross and rec.key_weights is not None:
            key = key * rec.key_weights[:, :, None].to(key.dtype)  # iSeg Eq. 9: W . K
        heads = attn.heads
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # (B*heads, L, d)
        # Probabilities for a block of query rows at a time: the full (B*heads, L, T) matrix (168 MiB per image
        # for SD2.1's 64x64 self-attention in fp16, twice that while the softmax runs) never exists at once;
        # only what is recorded (usually the head mean) is kept. One block when it fits: AttnProcessor exactly.
        rows = _row_block(query.shape[0], query.shape[1], key.shape[1], query.element_size(),
                          self._kept_bytes(query.shape[0] // heads, heads, query.shape[1], key.shape[1]))
        outs, recorded = [], {}
        for start in range(0, query.shape[1], rows):
            block = slice(start, start + rows)
            mask = attention_mask if attention_mask is None or attention_mask.shape[1] == 1 \
                else attention_mask[:, block]
            probs = attn.get_attention_scores(query[:, block], key, mask)
            outs.append(torch.bmm(probs, value))
            kept = self._reduce(probs, heads)
            del probs
            if rows >= query.shape[1]:
                recorded = kept
                continue
            # Several blocks: each is written into its rows of one preallocated tensor, so what is kept exists
            # once (a list of blocks joined by torch.cat at the end would hold it twice at the peak).
            for kind, part in kept.items():
                if kind not in recorded:
                    recorded[kind] = part.new_empty((*part.shape[:2], query.shape[1], part.shape[3]))
                recorded[kind][:, :, block] = part
            del kept
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self._record(recorded, query, heads, hidden_states.shape[1])
        return out

    def _kept_bytes(self, batch: int, heads: int, rows: int, keys: int) -> int:
        """Bytes of probabilities this layer records for one call (the recorded branch, its heads)."""
        rec = self.recorder
        kept_batch = len(range(batch)[rec.keep])
        per_head = {"cross": rec.request.per_head, "self_attn": rec.request.self_per_head}
        size = torch.empty((), dtype=rec.dtype).element_size()
        return sum(kept_batch * (heads if per_head[kind] else 1) * rows * keys * size
                   for kind in ("cross", "self_attn") if kind in self.kinds)

    def _reduce(self, probs, heads) -> dict[str, torch.Tensor]:
        """What is kept of one row block of probabilities (B*heads, rows, T): the rows of the recorded
        branch, per head or head-averaged, in the trace's dtype."""
        rec = self.recorder
        probs = probs.unflatten(0, (-1, heads))[rec.keep]  # (B_kept, heads, rows, T)
        kept = {}
        if "cross" in self.kinds:
            kept["cross"] = probs if rec.request.per_head else probs.mean(1, keepdim=True)
        if "self_attn" in self.kinds:
            kept["self_attn"] = probs if rec.request.self_per_head else probs.mean(1, keepdim=True)
        return {kind: value.to(rec.dtype) for kind, value in kept.items()}

    def _record(self, whole: dict[str, torch.Tensor], query, heads, seq_len):
        rec = self.recorder
        if "queries" in self.kinds:
            rec.add("queries", self.name, query.unflatten(0, (-1, heads)))
        if "cross" in self.kinds:
            h, w = grid_size(seq_len, rec.latent_size)
            rec.add("cross", self.name, whole["cross"].unflatten(2, (h, w)), selected=True)
        if "self_attn" in self.kinds:
            rec.add("self_attn", self.name, whole["self_attn"], selected=True)


class WeightedKeyProcessor:
    """SDPA cross-attention with Cat-Cross key weights (iSeg Eq. 8-9); used on layers nobody records.
    Mirrors `AttnProcessor2_0` of diffusers 0.42 on cross-attention without group or spatial norm (SD's
    transformer blocks), with the keys scaled before the product."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        batch = hidden_states.shape[0]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states) * self.recorder.key_weights[:, :, None].to(hidden_states.dtype)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * q.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionTracer:
    """Context manager that installs processors on the requested layers and restores them on exit."""

    def __init__(self, unet: torch.nn.Module, req: TraceRequest, weight_keys: bool = False, family: str = "sd",
                 text_columns: slice = slice(None), rows: str | None = None):
        self.unet, self.request, self.family = unet, req, family
        self.recorder = _Recorder(req)
        self.recorder.text_columns = text_columns
        self.recorder.rows = rows or "renormalised"
        self.joint = {n for n, k in attention_layers(unet).items() if k == "joint"}
        layers = attention_layers(unet)
        kinds: dict[str, set[str]] = {}
        for kind, attn_kind in (("cross", "cross"), ("self_attn", "self"), ("queries", "cross")):
            for name in resolve_layers(getattr(req, kind), layers, attn_kind):
                kinds.setdefault(name, set()).add(kind)
        self.layer_kinds = kinds
        self.weighted = [n for n, k in layers.items() if k in ("cross", "joint") and n not in kinds] \
            if weight_keys else []
        self._saved: dict[str, object] = {}
        self._hook = None
        # OVAM's re-keying on joint layers reads the traced pass's image stream (bench.trace_joint.TextStream)
        self.rekeyed = [n for n, k in kinds.items() if "queries" in k and n in self.joint]
        self._stream = None

    def __enter__(self) -> "AttentionTracer":
        from bench.trace_joint import FluxCaptureProcessor, JointCaptureProcessor

        for name, kinds in self.layer_kinds.items():
            module = self.unet.get_submodule(name)
            self._saved[name] = module.processor
            if type(module).__name__ == "FluxAttention":
                module.set_processor(FluxCaptureProcessor(self.recorder, name, kinds))
            elif type(module.processor).__name__ == "JointAttnProcessor2_0":
                module.set_processor(JointCaptureProcessor(self.recorder, name, kinds))
            else:
                module.set_processor(CaptureProcessor(self.recorder, name, kinds))
        for name in self.weighted:
            module = self.unet.get_submodule(name)
            self._saved[name] = module.processor
            if name in self.joint:  # the joint processors weight text keys; recording nothing here
                joint = FluxCaptureProcessor if type(module).__name__ == "FluxAttention" else JointCaptureProcessor
                module.set_processor(joint(self.recorder, name, set()))
            else:
                module.set_processor(WeightedKeyProcessor(self.recorder))

        scale = 1000 if self.family == "flux" else 1  # Flux's transformer takes t / 1000
        flow = self.family in ("sd3", "flux")

        def pre_hook(_module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            if sample.ndim == 4:  # Flux's packed tokens: the forward sets the latent size (set_latent_size)
                self.recorder.latent_size = tuple(sample.shape[-2:])
            text = kwargs.get("encoder_hidden_states")
            if text is not None:
                self.recorder.text_length = int(text.shape[1])
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            value = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
            # flow matching: the scheduler's float timestep (sigma x 1000), rounded; UNets: as given
            self.recorder.timesteps.append(int(round(float(value) * scale)) if flow else int(value))

        self._hook = self.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if self.rekeyed:
            from bench.trace_joint import TextStreamRecorder

            self._stream = TextStreamRecorder(self.unet, self.recorder, self.rekeyed).install()
        return self

    def __exit__(self, *exc) -> None:
        for name, processor in self._saved.items():
            self.unet.get_submodule(name).set_processor(processor)
        self._saved.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._stream is not None:
            self._stream.remove()

    def set_latent_size(self, size: tuple[int, int]) -> None:
        self.recorder.latent_size = tuple(int(x) for x in size)

    def set_branch(self, keep: slice) -> None:
        self.recorder.keep = keep

    def set_key_weights(self, weights: torch.Tensor | None) -> None:
        self.recorder.key_weights = weights

    def traces(self, prompts: list[str], token_ids: torch.Tensor) -> list[Trace]:
        """Split the recording into one Trace per image (stacking steps)."""
        rec = self.recorder
        stacked = {kind: {layer: torch.stack(vals, 0) for layer, vals in per_layer.items()}
                   for kind, per_layer in rec.data.items()}
        from bench.trace_joint import JointKeys

        modules = base = {n: self.unet.get_submodule(n) for n, k in self.layer_kinds.items() if "queries" in k}
        out = []
        for i, prompt in enumerate(prompts):
            if self._stream is not None:
                stream = self._stream.stream(i)
                modules = {**base, **{n: JointKeys(base[n], stream, n) for n in self.rekeyed}}
            out.append(Trace(prompt=prompt, token_ids=token_ids[i].tolist(), timesteps=list(rec.timesteps),
                             latent_size=rec.latent_size,
                             cross={k: v[:, i] for k, v in stacked["cross"].items()},
                             self_attn={k: v[:, i] for k, v in stacked["self_attn"].items()},
                             queries={k: v[:, i] for k, v in stacked["queries"].items()},
                             modules=modules))
        return out
