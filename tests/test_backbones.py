"""Backbone families on tiny random-weight pipelines (tests/tiny.py), saved with save_pretrained and loaded by
`model.path=` as a user's folder is: detection, and the three checks that catch a swapped token order or a
wrong slice (bench.trace_joint):

* the capture processors change nothing: the denoiser's output with every attention layer traced equals the
  stock processors' output bit for bit;
* the captured probabilities equal a naive reference: the full joint softmax materialised on the same q/k,
  sliced (and renormalised) afterwards;
* planted attention: q/k set by hand so that one text token attends to one known patch; the capture finds that
  patch in the cross role (image->text) and the self role (image->image).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.forward import ForwardSetting, run_traced
from bench.models import load_backbone, model_provenance, validate_model_config
from bench.models.families import detect_family
from bench.models.layers import TransformerLayerMap, layer_map, select_depth
from bench.capture import AttentionTracer, attention_layers, request
from tiny import LATENT, save_tiny_family

FAMILIES = ("sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_family(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def backbones(folders):
    return {f: load_backbone({"path": str(folders[f]), "device": "cpu"}) for f in FAMILIES}


def _noisy_input(backbone, seed=0):
    """A latent, a timestep and the conditioning of one prompt, as bench.forward's inversion builds them."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, backbone.vae.config.latent_channels, LATENT, LATENT, generator=g)
    noisy, t = backbone.noise_to(latents, torch.randn(latents.shape, generator=g), 400)
    return noisy, t, backbone.condition(["a red circle", "a dog"])


def _all_roles(backbone):
    layers = attention_layers(backbone.unet)
    cross = [n for n, k in layers.items() if k in ("cross", "joint")]
    selfs = [n for n, k in layers.items() if k in ("self", "joint")]
    return request(cross=cross, self_attn=selfs, queries=cross, per_head=True, self_per_head=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_from_model_index_and_recorded(folders, backbones, family):
    assert detect_family(folders[family]) == family
    assert backbones[family].family == family and backbones[family].describe()["family"] == family
    assert model_provenance({"path": str(folders[family])}) == {"family": family, "random_weights": True}


def test_unsupported_family_is_a_one_line_error_naming_the_supported(folders, tmp_path):
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(BenchError, match=r"PixArtSigmaPipeline.*supported: .*FluxPipeline.*StableDiffusion3Pipeline"
                                         r".*StableDiffusionXLPipeline") as err:
        validate_model_config({"path": str(folder)})
    assert "\n" not in str(err.value)


def test_transformer_options_refused_on_unets(folders):
    with pytest.raises(BenchError, match="model.depth applies to transformer backbones"):
        validate_model_config({"path": str(folders["sdxl"]), "depth": "last"})
    with pytest.raises(BenchError, match="model.joint_rows"):
        validate_model_config({"path": str(folders["sd3"]), "joint_rows": "softmax"})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", ["renormalised", "raw"])
def test_capture_changes_nothing(backbones, family, rows):
    """Every attention layer traced (both roles, queries, per head): the output equals the stock processors'
    bit for bit. The UNet's CaptureProcessor mirrors AttnProcessor (its exact reference), the joint ones mirror
    JointAttnProcessor2_0 / FluxAttnProcessor."""
    from diffusers.models.attention_processor import AttnProcessor

    backbone = backbones[family]
    if family == "sdxl":
        if rows == "raw":
            pytest.skip("row normalisation is a joint-attention choice")
        backbone.unet.set_attn_processor(AttnProcessor())
    noisy, t, cond = _noisy_input(backbone)
    with torch.no_grad():
        plain = backbone.denoise(noisy, t, cond)
        with AttentionTracer(backbone.unet, _all_roles(backbone), family=family,
                             text_columns=backbone.text_columns(), rows=rows) as tracer:
            tracer.set_latent_size((LATENT, LATENT))
            traced = backbone.denoise(noisy, t, cond)
        again = backbone.denoise(noisy, t, cond)
    assert torch.equal(plain, traced) and torch.equal(plain, again)
    assert all(tracer.recorder.data[k] for k in ("cross", "self_attn"))
    if family == "sdxl":
        backbone.unet.set_default_attn_processor()


def _reference_qk(attn, family: str, hidden, context, rotary, text_length):
    """q, k (B, H, N, d) of a joint layer computed naively from its weights, ordered [image, text]."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))  # (B, N, H, d)

    def norm(fn, x):
        return x if fn is None else fn(x)

    q, k = norm(attn.norm_q, heads(attn.to_q(hidden))), norm(attn.norm_k, heads(attn.to_k(hidden)))
    if context is not None:
        cq = norm(attn.norm_added_q, heads(attn.add_q_proj(context)))
        ck = norm(attn.norm_added_k, heads(attn.add_k_proj(context)))
        q, k = (torch.cat([cq, q], 1), torch.cat([ck, k], 1)) if family == "flux" else \
            (torch.cat([q, cq], 1), torch.cat([k, ck], 1))
    if rotary is not None:
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if family == "flux":  # [text, image] -> [image, text]
        n_txt = context.shape[1] if context is not None else text_length
        q = torch.cat([q[:, :, n_txt:], q[:, :, :n_txt]], 2)
        k = torch.cat([k[:, :, n_txt:], k[:, :, :n_txt]], 2)
    return q, k


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("rows", ["renormalised", "raw"])
def test_captured_probabilities_equal_full_softmax(backbones, family, rows):
    """The captured slices equal the full (N_img + N_txt)^2 joint softmax per head, materialised naively on the
    same q/k and sliced afterwards: rows [image] x columns [text positions] and [image]."""
    backbone = backbones[family]
    noisy, t, cond = _noisy_input(backbone)
    inputs = {}

    def keep_inputs(name):
        def hook(module, args, kwargs):
            inputs[name] = (kwargs.get("hidden_states", args[0] if args else None),
                            kwargs.get("encoder_hidden_states"), kwargs.get("image_rotary_emb"))
        return hook

    layers = [n for n, k in attention_layers(backbone.unet).items() if k == "joint"]
    handles = [backbone.unet.get_submodule(n).register_forward_pre_hook(keep_inputs(n), with_kwargs=True)
               for n in layers]
    with torch.no_grad(), AttentionTracer(backbone.unet, _all_roles(backbone), family=family,
                                          text_columns=backbone.text_columns(), rows=rows) as tracer:
        tracer.set_latent_size((LATENT, LATENT))
        backbone.denoise(noisy, t, cond)
        text_length = tracer.recorder.text_length
    for h in handles:
        h.remove()
    n_img = (LATENT // 2) ** 2
    cols = backbone.text_columns()
    checked = 0
    for name in layers:
        hidden, context, rotary = inputs[name]
        with torch.no_grad():
            q, k = _reference_qk(backbone.unet.get_submodule(name), family, hidden, context, rotary, text_length)
        full = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N, N), [image, text]
        self_block = full[:, :, :n_img, :n_img]
        cross_block = full[:, :, :n_img, n_img:][..., cols]
        if rows == "renormalised":
            self_block = self_block / self_block.sum(-1, keepdim=True)
            cross_block = cross_block / cross_block.sum(-1, keepdim=True)
        got_cross = tracer.recorder.data["cross"][name][0].flatten(2, 3)
        got_self = tracer.recorder.data["self_attn"][name][0]
        assert got_cross.shape == cross_block.shape and got_self.shape == self_block.shape
        torch.testing.assert_close(got_cross, cross_block, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_self, self_block, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == len(layers) >= 3  # SD3: every joint block; Flux: double and single blocks


@pytest.mark.parametrize("rows", ["renormalised", "raw"])
def test_row_blocks_equal_the_full_joint_softmax(monkeypatch, rows):
    """The capture's query-row blocks (a few rows each here) give the slices of the full joint softmax."""
    import bench.trace_joint as tj

    g = torch.Generator().manual_seed(0)
    q, k_img, k_txt = (torch.randn(2, 3, n, 8, generator=g) for n in (40, 40, 12))
    monkeypatch.setattr(tj, "MIN_BLOCK_BYTES", 1)
    assert tj.rows_per_block(6, 40, 40 + 12 + 5, 6 * 40 * 4) < 40  # several blocks
    got = tj.block_probs(q, k_img, k_txt, slice(0, 5), {"cross", "self_attn"}, rows, 8 ** -0.5, 6 * 40 * 4)
    full = (q @ torch.cat([k_img, k_txt], 2).transpose(-1, -2) * 8 ** -0.5).softmax(-1)
    want = {"self_attn": full[..., :40], "cross": full[..., 40:45]}
    for kind, value in want.items():
        if rows == "renormalised":
            value = value / value.sum(-1, keepdim=True)
        torch.testing.assert_close(got[kind], value, rtol=1e-5, atol=1e-6)


def _plant(attn, family: str, patch: int, token: int, strength: float = 8.0):
    """Weights and inputs by hand: q = k = the layer's input (identity projections); patch `patch` and text token
    `token` are e0, every other patch e1, every other text token e2 (dims Flux's rotary leaves unrotated for text
    and rotates only by the first axis, id 0, for images). Returns the pre-hook that writes the inputs."""
    dim = attn.to_q.in_features
    eye = torch.eye(attn.to_q.out_features, dim)
    with torch.no_grad():
        for proj in [attn.to_q, attn.to_k, getattr(attn, "add_q_proj", None), getattr(attn, "add_k_proj", None)]:
            if proj is not None:
                proj.weight.copy_(torch.eye(proj.out_features, proj.in_features))
                if proj.bias is not None:
                    proj.bias.zero_()
    del eye

    def vectors(n, chosen, other):
        x = torch.zeros(n, dim)
        x[:, other] = strength
        x[chosen] = 0
        x[chosen, 0] = strength
        return x

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states")
        b = hidden.shape[0]
        if context is not None or family == "sd3" or family == "sdxl":
            n_img = hidden.shape[1]
            kwargs["hidden_states"] = vectors(n_img, patch, 1).expand(b, -1, -1).to(hidden.dtype)
            if context is not None:
                kwargs["encoder_hidden_states"] = vectors(context.shape[1], token, 2)[:, :context.shape[-1]] \
                    .expand(b, -1, -1).to(context.dtype)
        return (), kwargs

    return hook


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_planted_attention_found_in_both_roles(folders, family):
    """A text token planted to attend to one patch: the cross role's map of that token peaks at the patch, and
    the self role's row and column of the patch peak at the patch (a swapped [image, text] order or a wrong
    slice moves or loses the peak)."""
    backbone = load_backbone({"path": str(folders[family]), "device": "cpu"})
    layer = "transformer_blocks.0.attn"
    attn = backbone.unet.get_submodule(layer)
    patch, token = 37, 3
    attn.register_forward_pre_hook(_plant(attn, family, patch, token), with_kwargs=True)
    image = np.full((LATENT, LATENT, 3), 128, np.uint8)
    req = request(cross=[layer], self_attn=[layer])
    for rows in ("renormalised", "raw"):
        backbone.joint_rows = rows
        trace = run_traced(backbone, req, ForwardSetting(timestep=500, size=LATENT), ["a dog"], [image]).traces[0]
        cross = trace.cross[layer][0, 0].flatten(0, 1)  # (N_img, T)
        assert int(cross[:, token].argmax()) == patch, rows
        self_attn = trace.self_attn[layer][0, 0]
        assert int(self_attn[patch].argmax()) == patch and int(self_attn[:, patch].argmax()) == patch, rows
        # a clear peak, not a tie broken by argmax (RMS qk-norm bounds the logits: e^(sqrt(d)) against 1)
        assert cross[patch, token] > 4 * cross[:, token].median()
        assert self_attn[patch, patch] > 4 * self_attn[patch].median()


def test_planted_attention_sdxl_cross_and_self(folders):
    backbone = load_backbone({"path": str(folders["sdxl"]), "device": "cpu"})
    m = layer_map(backbone)
    cross, selfl = m.blocks("all", "cross")[0], m.decoder_self(-1)
    patch, token = 5, 3
    for name in (cross, selfl):
        attn = backbone.unet.get_submodule(name)
        with torch.no_grad():
            attn.to_q.weight.copy_(torch.eye(*attn.to_q.weight.shape))
            attn.to_k.weight.copy_(torch.eye(*attn.to_k.weight.shape))
        dim = attn.to_q.in_features

        def hook(module, args, kwargs, dim=dim, is_cross=name == cross):
            hidden = args[0] if args else kwargs["hidden_states"]
            x = torch.zeros_like(hidden)
            x[..., 1] = 8.0
            x[:, patch] = 0
            x[:, patch, 0] = 8.0
            kwargs["hidden_states"] = x
            if is_cross:
                ctx = torch.zeros_like(kwargs["encoder_hidden_states"])
                ctx[..., 2] = 8.0
                ctx[:, token] = 0
                ctx[:, token, 0] = 8.0
                kwargs["encoder_hidden_states"] = ctx
            return (), kwargs

        attn.register_forward_pre_hook(hook, with_kwargs=True)
    image = np.full((LATENT, LATENT, 3), 128, np.uint8)
    trace = run_traced(backbone, request(cross=[cross], self_attn=[selfl]), ForwardSetting(timestep=500, size=LATENT),
                       ["a dog"], [image]).traces[0]
    assert int(trace.cross[cross][0, 0].flatten(0, 1)[:, token].argmax()) == patch
    assert int(trace.self_attn[selfl][0, 0][patch].argmax()) == patch


def test_depth_by_rank_and_flux_scope(backbones):
    assert select_depth(19, "middle") == list(range(6, 13))
    assert select_depth(6, "0,-1") == [0, 5] and select_depth(6, "last") == [5]
    with pytest.raises(BenchError, match="rank 9 does not exist"):
        select_depth(6, "9")
    flux = backbones["flux"].unet
    assert TransformerLayerMap(flux).chosen == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert TransformerLayerMap(flux, "all", "single").chosen == ["single_transformer_blocks.0.attn",
                                                                "single_transformer_blocks.1.attn"]
    both = TransformerLayerMap(flux, "last", "all")
    assert both.chosen == ["single_transformer_blocks.1.attn"] and both.decoder_self(-1) == both.chosen[0]
    sd3 = TransformerLayerMap(backbones["sd3"].unet, "first")
    assert sd3.blocks("all", "cross") == ["transformer_blocks.0.attn"]
    assert sd3.decoder_self(-1) == "transformer_blocks.2.attn"  # iSeg's last self-attention: the last block
    with pytest.raises(BenchError, match="blocks=16.*model.depth"):
        sd3.blocks("16", "cross")
    with pytest.raises(BenchError, match="variant=paper"):
        sd3.ranked("cross", ("up",), (0,))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_matching_noising_uses_the_schedulers_shifted_sigma(backbones, family):
    """x_t = (1 - sigma) x0 + sigma eps at the folder scheduler's shifted sigma (SD3: shift 3; Flux: mu from
    the image token count, as FluxPipeline computes it)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    backbone = backbones[family]
    x0, eps = torch.ones(1, 4, LATENT, LATENT), torch.zeros(1, 4, LATENT, LATENT)
    noisy, t = backbone.noise_to(x0, eps, 250)
    s = 0.25
    if family == "sd3":
        sigma = 3 * s / (1 + 2 * s)
    else:
        mu = calculate_shift((LATENT // 2) ** 2, 256, 4096, 0.5, 1.15)
        sigma = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(noisy, torch.full_like(x0, 1 - sigma))
    assert float(t) == pytest.approx(sigma * 1000, rel=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cat_cross_weights_the_text_keys_of_joint_attention(backbones, family):
    """iSeg Eq. 8-9 on joint attention: a token's key weighted by gamma > 1 draws more of every image row's
    text mass in every layer that records it (renormalised rows); weights of 1 change nothing."""
    backbone = backbones[family]
    layer = "transformer_blocks.1.attn"
    image = np.full((LATENT, LATENT, 3), 128, np.uint8)
    req, setting, token = request(cross=[layer]), ForwardSetting(timestep=500, size=LATENT), 2

    def trace(weights):
        return run_traced(backbone, req, setting, ["a dog"], [image], key_weights=weights).traces[0].cross[layer]

    plain, ones = trace(None), trace(torch.ones(1, backbone.max_length))
    weights = torch.ones(1, backbone.max_length)
    weights[0, token] = 3.0
    weighted = trace(weights)
    torch.testing.assert_close(plain, ones)
    assert weighted[..., token].mean() > plain[..., token].mean()


def test_joint_perf_measures_each_role(backbones):
    """bench.perf --model sd3-medium-arch's measurement, on the tiny SD3 (the real architecture takes minutes)."""
    from bench.perf_joint import measure_joint

    result = measure_joint(backbones["sd3"], repeats=1, size=LATENT)
    assert result["image_tokens"] == (LATENT // 2) ** 2 and result["joint_layers"] == 3
    assert set(result["roles"]) == {"cross", "self", "both"}
    for row in result["roles"].values():
        assert row["traced_s"] > 0 and row["kept_mib"] >= 0 and isinstance(row["within_bound"], bool)
    kept = {role: row["kept_mib"] for role, row in result["roles"].items()}
    assert kept["both"] >= max(kept["cross"], kept["self"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name", ["daam", "attn2mask", "ovam", "iseg"])
def test_every_method_finds_the_planted_patch(folders, family, name):
    """Every joint block planted so that the class word's token attends to one patch: each method's score map
    of that class peaks on the patch's pixels. OVAM re-keys its attribution prompt through the text stream
    (bench.trace_joint.TextStream), so the plant reaches its keys as it reaches the prompt's; its self-attention
    refinement cannot find the patch here (the planted image->image block gives every pixel the same received
    attention), so the peak comes from the re-keyed maps alone."""
    from bench.models.layers import layer_map
    from methods import METHODS
    from methods.attribution import token_indices
    from methods.base import ClassQuery

    backbone = load_backbone({"path": str(folders[family]), "device": "cpu"})
    prompt, word, patch = "a photograph of a circle", "circle", 37
    ids = backbone.tokenize([prompt])[0].tolist()
    (token,) = token_indices(backbone.tokenizer, ids, word)
    for layer in layer_map(backbone).scope:
        attn = backbone.unet.get_submodule(layer)
        attn.register_forward_pre_hook(_plant(attn, family, patch, token), with_kwargs=True)
    cls = METHODS.get(name)
    method = cls(backbone)
    params = cls.resolve({"mode": "inversion", "timestep": 500, "prompt": "caption"} if "prompt" in cls.params
                         else {"mode": "inversion", "timestep": 500})
    image = np.full((LATENT, LATENT, 3), 128, np.uint8)
    trace = run_traced(backbone, method.trace_request(params), ForwardSetting(timestep=500, size=LATENT), [prompt],
                       [image]).traces[0]
    pred = method.predict(trace, ClassQuery(ids=[1], names=[word]), params, (LATENT, LATENT))
    score = pred.scores[0]
    row, col = divmod(int(score.argmax()), score.shape[1])
    side = LATENT // 2
    assert (row * side // score.shape[0], col * side // score.shape[1]) == divmod(patch, side)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rekeying_the_prompt_itself_gives_the_recorded_attention(backbones, family):
    """OVAM Sec. 3.2 on joint attention: X' = the prompt's own text states re-keyed through the text stream gives
    the image->text attention the traced pass computed, in every block (Flux: double and single blocks) and
    head (the re-keyed softmax over all of X', restricted to the trace's columns and renormalised)."""
    from methods.attribution import rekey

    backbone = backbones[family]
    layers = [n for n, k in attention_layers(backbone.unet).items() if k == "joint"]
    image = np.full((LATENT, LATENT, 3), 90, np.uint8)
    prompt = "a photograph of a circle"
    trace = run_traced(backbone, request(cross=layers, queries=layers, per_head=True),
                       ForwardSetting(timestep=500, size=LATENT), [prompt], [image]).traces[0]
    emb = backbone.condition([prompt])["encoder_hidden_states"][0]
    cols = backbone.text_columns()
    for layer in layers:
        probs = rekey(trace, layer, emb)[..., cols]
        torch.testing.assert_close(probs / probs.sum(-1, keepdim=True), trace.cross[layer], rtol=1e-4, atol=1e-6)
    other = rekey(trace, layers[-1], backbone.condition(["a dog on grass"])["encoder_hidden_states"][0])[..., cols]
    assert not torch.allclose(other / other.sum(-1, keepdim=True), trace.cross[layers[-1]], atol=1e-3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_token_optimisation_reaches_the_text_stream(backbones, family):
    """OVAM's token optimisation (Eq. 6) on joint attention: the loss gradient flows back through the re-keying
    pass to X', and a few epochs lower the loss."""
    from methods.attribution import attribution_embedding
    from methods.tokens import optimize_tokens

    backbone = backbones[family]
    layers = [n for n, k in attention_layers(backbone.unet).items() if k == "joint"][:2]
    image = np.full((LATENT, LATENT, 3), 90, np.uint8)
    trace = run_traced(backbone, request(queries=layers, per_head=True), ForwardSetting(timestep=500, size=LATENT),
                       ["a dog"], [image]).traces[0]
    target = torch.zeros(trace.latent_size)
    target[: LATENT // 2] = 1
    init = attribution_embedding(backbone, "a dog")[0][:2]
    _, curve = optimize_tokens([(trace, target)], init, layers, epochs=4, lr=10.0)
    assert curve[-1] < curve[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_conditioning_is_the_pipelines_own(backbones, family):
    """The denoiser's text inputs equal what the family's diffusers pipeline builds from the same components
    (encode_prompt; SDXL's add_time_ids), positive and negative branch."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    b = backbones[family]
    prompts = ["a red circle", "a dog"]
    cond, neg = b.condition(prompts), b.negative_condition(len(prompts))
    with torch.no_grad():
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer,
                                             unet=b.unet, scheduler=b.scheduler, **b.extra_parts())
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu")
            want = {"encoder_hidden_states": embeds, "text_embeds": pooled}
            want_neg = {"encoder_hidden_states": neg_embeds, "text_embeds": neg_pooled}
            time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                              text_encoder_projection_dim=b.extra["text_encoder_2"].config.projection_dim)
            seen = {}
            handle = b.unet.register_forward_pre_hook(
                lambda m, a, kw: seen.update(kw["added_cond_kwargs"]), with_kwargs=True)
            b.denoise(torch.zeros(2, 4, 32, 32), torch.tensor([10]), cond)
            handle.remove()
            torch.testing.assert_close(seen["time_ids"], time_ids.repeat(2, 1), rtol=0, atol=0)
        elif family == "sd3":
            pipe = StableDiffusion3Pipeline(transformer=b.unet, scheduler=b.scheduler, vae=b.vae,
                                            text_encoder=b.text_encoder, tokenizer=b.tokenizer, **b.extra_parts())
            embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
                prompts, None, None, device="cpu", max_sequence_length=b.extra["tokenizer_3"].model_max_length)
            want = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            want_neg = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
        else:
            pipe = FluxPipeline(scheduler=b.scheduler, vae=b.vae, text_encoder=b.text_encoder,
                                tokenizer=b.extra["clip_tokenizer"], text_encoder_2=b.extra["text_encoder_2"],
                                tokenizer_2=b.tokenizer, transformer=b.unet)
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=b.max_length)
            want, want_neg = {"encoder_hidden_states": embeds, "pooled_projections": pooled}, None
    for key, value in want.items():
        torch.testing.assert_close(cond[key], value, rtol=0, atol=0)
    if want_neg is not None:
        for key, value in want_neg.items():
            torch.testing.assert_close(neg[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sweep, refused", [("sweeps/dedos_components.yaml", True),
                                            ("sweeps/freegen_components.yaml", True),
                                            ("sweeps/linear_probe.yaml", False)])
def test_trained_methods_say_which_families_they_run_on(folders, family, sweep, refused):
    """DEDOS and FreeGen read an SD UNet's internals: on another family preflight stops with one line naming the
    families they run on; the linear probe reads attention roles and runs on every family."""
    from bench.config import compose
    from bench.plan import make_plan
    from bench.preflight import check_model_fit

    cfg = compose(sweep, [f"model.path={folders[family]}"])
    if refused:
        with pytest.raises(BenchError, match=rf"method={cfg.method} runs on sd backbones only \(.*\); this model "
                                             rf"is {family}"):
            check_model_fit(cfg, make_plan(cfg), folders[family])
    else:
        check_model_fit(cfg, make_plan(cfg), folders[family])


@pytest.mark.parametrize("overrides, message", [
    (["params.timestep=0"], "flow-matching model .* timestep must be in 1"),
    (["params.mode=generation", "params.scheduler=ddim"], "generates with its own FlowMatchEulerDiscreteScheduler"),
    (["model.resolution=15"], "multiple of 2"),
])
def test_preflight_checks_flow_matching_settings(folders, overrides, message):
    """`timestep` means the training-schedule position on every family: t = 0 (the clean image) has no flow-matching
    noise level; noise-prediction samplers are refused; the size must survive SD3's 2 x 2 patches."""
    from bench.config import compose
    from bench.plan import make_plan
    from bench.preflight import check_model_fit

    cfg = compose("sweeps/iseg_lambda.yaml", [f"model.path={folders['sd3']}", *overrides])
    with pytest.raises(BenchError, match=message):
        check_model_fit(cfg, make_plan(cfg), folders["sd3"])
