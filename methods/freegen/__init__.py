"""FreeGen (Wang et al., AAAI 2025): text-to-data synthesis with rectified attention.

Stage 1 (the equations are in `rectify.py`): per class, the cross-attention of its tokens at the
`cross_blocks` layers (mean over layers and heads, resized to the self-attention grid) is propagated by the
adaptive self-attention map of the `self_blocks` layers (Eq. 1-3, A_* = A_s . A_c), min-max normalised and
turned into a pseudo-mask (strongest class >= fg_threshold, an ignore band down to ignore_threshold). The mask
comes from the last denoising step (the paper's Training Strategy: "we use only A_{*,t} from the last
timestep") or from the mean over steps (`mask_step`). The Temporal Fluctuation Factor (Eq. 4) is the mean
absolute deviation of the masks at `tff_k` uniformly spaced steps from their mean; `python -m
bench.synthesize` drops samples whose TFF exceeds `tff_threshold` when `tff` is on.

ASR (`asr=learned`, the paper's method and the default): W (Eq. 1) and Upsilon (Eq. 2) are fitted by the fit
stage with Eq. 5's BCE against SAM's masks G_*, SAM prompted with the `sam_points` strongest / farthest points of
each class map of A_* *without* ASR (`asr.py`, `fit`); the fit traces `asr_images` training images with the
configuration's forward parameters. With `asr=init`, W = 1/H and Upsilon = I (their initialisations) and ASR
reduces to the head-mean self-attention times the UNet's own cross-attention (Table 6's "ASR off" rows; with
self_power=4 and mean over steps it is Dataset Diffusion's rule); no fit. Options and their sources are listed
in methods/README.md.

Stage 2 (`egd=true`, the paper's method and the default; `egd.py`): the Entity-level Grounding Decoder is fitted
after the ASR on Stage 1's pseudo-masks of `egd_images` generated training images (those the TFF filter keeps
when `tff` is on), from the UNet's features at t = 1 (one extra UNet pass on the generated image); with `hst`,
hardness-aware self-training (Eq. 8) continues training on the easiest `hst_keep` of them. The decoder's masks
then replace Stage 1's as predictions and as what synthesis writes; the TFF still scores Stage 1's masks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import torch

from bench.models.sam import EMBEDDED_SAM
from bench.capture import Trace, TraceRequest, request
from methods.attribution import AttributionSource, attn_layers, attribution_embedding, token_indices
from methods.base import ARGMAX_TIE, ClassQuery, Method, Param, Prediction, SyntheticMask, TrainSetting, register_method
from methods.freegen.asr import (AsrInputs, AsrModule, asr_inputs_from, asr_loss, asr_record,
                                 prompt_keys)
from methods.freegen.egd import (EgdSample, GroundingDecoder, easiest, entity_embeddings, hardness, local_label,
                                 pixel_loss_map, predict_label, train_epochs, unet_features)
from methods.freegen.rectify import (adaptive_self_attention, normalise, one_hot, pseudo_label,
                                     rectified_attention, strongest_far_points, temporal_fluctuation,
                                     uniform_steps)
from methods.maps import resize_maps
from methods.prompts import PROMPT_PARAMS, build_prompt

log = logging.getLogger(__name__)
# Share of the machine's memory the UNet features of an EGD fit's training pairs may take (every worker holds all
# of them: the share is split between a fit's workers). Beyond it the fit keeps each pair's image and recomputes
# its features at every use (one UNet pass; the same floats): SD 2.1's features at 512 px are 90 MiB a pair
# (every ResNet and transformer output, four resolutions), so the paper's 40k pairs would need ~3.5 TB.
EGD_FEATURES_MEMORY_SHARE = 0.25


def egd_features_budget(world_size: int) -> float:
    """Bytes of training-pair features one EGD fit worker may hold (EGD_FEATURES_MEMORY_SHARE)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        memory = 8 * 2**30
    return EGD_FEATURES_MEMORY_SHARE * memory / max(1, world_size)
RESOLUTIONS = ("16", "32", "16+32", "64", "32+64", "16+32+64", "all")


@register_method("freegen")
class FreeGen(Method):
    version = "3"
    families = ("sd",)
    families_why = "its synthesis and energy-guided denoising drive an SD UNet's down, mid and up blocks"
    params = {
        "tie_rule": ARGMAX_TIE,
        "asr": Param("learned", "Attention Self-Rectification: learned (W and Upsilon fitted with Eq. 5 against SAM "
                     "pseudo-masks, the paper) or init (W = 1/H, Upsilon = I: no fit, Table 6's ASR-off rows)",
                     choices=("learned", "init"), kind="train"),
        "asr_targets": Param("sam", "G_* of Eq. 5: sam (SAM's masks prompted from A_* without ASR, the paper) or "
                             "attention (A_* without ASR thresholded at fg_threshold: Table 6's SAM-off row)",
                             choices=("sam", "attention"), kind="train"),
        "asr_images": Param(48, "training images the ASR fit traces (the first of the training split)",
                            kind="train", low=1),
        "asr_epochs": Param(20, "ASR fit epochs (the paper: 20)", kind="train", low=1),
        "asr_batch": Param(4, "ASR fit batch size (the paper: 4)", kind="train", low=1),
        "asr_lr": Param(1e-4, "ASR fit Adam learning rate (the paper: 1e-4, betas 0.9 / 0.999)", kind="train",
                        positive=True),
        **{k: PROMPT_PARAMS[k] for k in ("prompt", "template", "attribution")},
        "cross_blocks": Param("16+32", "cross-attention layers whose class maps are rectified (SD resolution "
                              "names; Dataset Diffusion: 16 and 32)", choices=RESOLUTIONS),
        "self_blocks": Param("32", "self-attention layers of the adaptive weight map A_s, one SD resolution name "
                             "(its layers are averaged; Dataset Diffusion: 32)", choices=("16", "32", "64")),
        "rectify": Param(True, "A_* = A_s . A_c (Eq. 3); false: the cross-attention alone (Table 6's all-off row, "
                         "the raw attention masks)"),
        "self_power": Param(1, "power of A_s in A_* = A_s^p . A_c: 1 (FreeGen Eq. 3) or 4 (Dataset Diffusion)"),
        "mask_step": Param("last", "which denoising step the mask comes from: last (FreeGen's Training "
                           "Strategy) or mean (mean of A_* over every step, Dataset Diffusion)",
                           choices=("last", "mean")),
        "fg_threshold": Param(0.6, "foreground where the strongest normalised class map is >= this (Dataset "
                              "Diffusion 0.6; the paper gives none)"),
        "ignore_threshold": Param(0.5, "synthetic masks: ignore (255) between this and fg_threshold, "
                                  "background below (Dataset Diffusion 0.5)"),
        "pseudo_masks": Param("attention", "masks from: attention (A_* thresholded) or sam (SAM prompted with the "
                              "sam_points strongest / farthest points of each class map of A_*: the paper's G_*, "
                              "Eq. 5's targets)", choices=("attention", "sam")),
        "sam": Param("embedded", "SAM for pseudo_masks=sam: embedded (bench/embedded/sam/), a local transformers "
                     "folder or a hub id in the local cache", examples=(str(EMBEDDED_SAM),)),
        "sam_points": Param(3, "point prompts per class map (the paper: 3)"),
        "tff": Param(True, "filter synthetic samples by the Temporal Fluctuation Factor (Eq. 4)"),
        "tff_k": Param(4, "K uniformly spaced denoising steps of Eq. 4 (the paper: 4)"),
        "egd": Param(True, "Stage 2: masks from the Entity-level Grounding Decoder (FreeGen Sec. 3.3, Eq. 6-7) "
                     "fitted on Stage 1's pseudo-masks; false: Stage 1's masks (Table 6's EGD-off rows)",
                     kind="train"),
        "hst": Param(True, "hardness-aware self-training of the EGD (Eq. 8): after pre-training on every pair, "
                     "training continues on the easiest hst_keep of them (Table 6's HST row)", kind="train"),
        "hst_keep": Param(0.5, "fraction of the easiest pairs HST keeps (the paper: 50%)", kind="train",
                          positive=True),
        "egd_images": Param(48, "generated training images the EGD fit annotates with Stage 1 (the first of the "
                            "training split; the TFF filter applies)", kind="train", low=1),
        "egd_epochs": Param(20, "EGD epochs per round (the paper: 20)", kind="train", low=1),
        "egd_batch": Param(4, "EGD batch size (the paper: 4)", kind="train", low=1),
        "egd_lr": Param(1e-4, "EGD Adam learning rate (the paper: 1e-4, betas 0.9 / 0.999)", kind="train",
                        positive=True),
        "egd_dim": Param(32, "EGD embedding width (the paper's is in its supplement; small for CPU)", kind="train",
                         low=8),
        "egd_queries": Param(8, "learnable queries concatenated with the entity embeddings", kind="train", low=1),
        "egd_layers": Param(2, "Eq. 6-7 alignment layers", kind="train", low=1),
        "egd_timestep": Param(1, "the UNet pass of the EGD's features: t (the paper: 1)", kind="train", low=0),
        "tff_threshold": Param(0.05, "synthetic samples with TFF above this are filtered (the paper's value is "
                               "in its supplement, which is not available; ours, from the TFF distribution "
                               "of the embedded model)"),
    }

    # the fit traces its images with these and reads G_* off the ASR-off maps they define
    fit_reads = ("mode", "timestep", "steps", "scheduler", "guidance", "prompt", "template", "attribution",
                 "cross_blocks", "self_blocks", "sam", "sam_points", "fg_threshold")
    # Stage 1's keys that an EGD fit reads too (its training masks are Stage 1's, filtered by the TFF)
    stage1_reads = ("rectify", "self_power", "mask_step", "ignore_threshold", "pseudo_masks", "tff", "tff_k",
                    "tff_threshold")
    egd_keys = ("egd", "hst", "hst_keep", "egd_images", "egd_epochs", "egd_batch", "egd_lr", "egd_dim",
                "egd_queries", "egd_layers", "egd_timestep")
    fit_reads = fit_reads + stage1_reads
    tester_params = {"asr_images": 2, "asr_epochs": 2, "asr_batch": 1, "egd_images": 1, "egd_epochs": 1,
                     "egd_batch": 1, "egd_dim": 16, "egd_queries": 2, "egd_layers": 1,
                     "tff_threshold": 1.0}  # random tiny weights: every mask fluctuates, the EGD would see none

    def __init__(self, backbone=None):
        super().__init__(backbone)
        self._sams: dict = {}  # SAM models by source, loaded on first use
        self._modules: dict[str, AsrModule] = {}  # fitted ASR by train-setting key
        self._keys: dict[tuple, torch.Tensor] = {}  # (text, layer) -> per-head keys
        self._decoders: dict[str, GroundingDecoder] = {}  # fitted EGD by train-setting key
        self._entities: dict[tuple, torch.Tensor] = {}  # class names -> entity embeddings
        self._features: dict[tuple, tuple] = {}  # (image id, prompt, t) -> (image, UNet features at t)

    def learned(self, cfg: Mapping) -> bool:
        return cfg["asr"] == "learned" and bool(cfg["rectify"])

    def uses_fit(self, cfg: Mapping) -> bool:
        """Whether predictions read the fit (rectify=false ignores ASR; synthesis skips the fit then)."""
        return self.learned(cfg) or bool(cfg["egd"])

    def train_setting(self, cfg: Mapping) -> TrainSetting | None:
        """A fit for the learned ASR and / or the EGD (asr=init with egd=false needs none). Without the EGD the
        setting holds the ASR's keys only (Stage 1's post-processing and the EGD's parameters do not split
        ASR fits)."""
        if cfg["asr"] != "learned" and not cfg["egd"]:
            return None
        skip = () if cfg["egd"] else (*self.egd_keys[1:], *self.stage1_reads)  # egd itself: the fit reads it
        weights = ()
        if "sam" in (cfg["asr_targets"], cfg["pseudo_masks"]):  # SAM's masks are what the fit learns from
            from bench.models.identity import folder_identity
            from bench.models.sam import sam_folder

            weights = (("sam", folder_identity(sam_folder(cfg["sam"]))),)
        return TrainSetting(self.name, self.version, tuple((k, cfg[k]) for k in self.train_keys() if k not in skip),
                            weights)

    def load_fit(self, key, tensors):
        super().load_fit(key, tensors)
        self._modules.pop(key, None)
        self._decoders.pop(key, None)

    # -- what to run ---------------------------------------------------------------------------------------
    def cross_layers(self, cfg: Mapping) -> list[str]:
        return attn_layers(cfg["cross_blocks"], "attn2", backbone=self.backbone)

    def self_layers(self, cfg: Mapping) -> list[str]:
        return attn_layers(cfg["self_blocks"], "attn1", backbone=self.backbone)

    def trace_request(self, cfg: Mapping) -> TraceRequest:
        cross = self.cross_layers(cfg)
        # classes absent from the prompt are re-keyed from stored queries (OVAM's attribution)
        absent = cfg["classes"] == "all" or cfg["mode"] == "inversion" and cfg["prompt"] == "caption"
        if self.learned(cfg):  # Eq. 2 re-keys the stored queries; Eq. 1 weights each head
            return request(cross=cross, queries=cross, self_attn=self.self_layers(cfg), self_per_head=True)
        return request(cross=cross, queries=cross if absent else (), self_attn=self.self_layers(cfg))

    def prompt(self, query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
        return build_prompt(query, caption, cfg)

    # -- Stage 1 ---------------------------------------------------------------------------------------------
    def rectified(self, trace: Trace, query: ClassQuery, cfg: Mapping, steps: list[int] | None = None
                  ) -> torch.Tensor:
        """A_* (Eq. 3) per recorded step: (S', K, h, w) at the self-attention grid, un-normalised; `steps`
        selects recorded steps (None: all)."""
        if self.learned(cfg):
            module = self.asr_module(cfg)
            chosen = range(len(trace.timesteps)) if steps is None else steps
            if not self._per_step(trace):
                chosen = [0]
            with torch.no_grad():
                return torch.stack([module(self.asr_inputs(trace, query, cfg, s)) for s in chosen])
        self_names = self.self_layers(cfg)
        grid = trace.spatial_size(self_names[0])
        selfs = [trace.self_attn[n] for n in self_names]  # (S, H, N, N) each
        if steps is not None:
            selfs = [s[steps] for s in selfs]
        a_s = torch.stack([adaptive_self_attention(s) for s in selfs]).mean(0)  # (S', N, N)
        source = AttributionSource(self.backbone, cfg["attribution"], pad=True)
        per_layer = []
        for layer in self.cross_layers(cfg):
            # mean over heads per class (recorded maps are head-averaged, re-keyed ones are not)
            maps = torch.stack([source.class_maps(trace, layer, n, steps).float().mean(1) for n in query.names])
            per_layer.append(resize_maps(maps, grid))  # (K, S', gh, gw)
        a_c = torch.stack(per_layer).mean(0)  # (K, S', gh, gw)
        if a_s.shape[0] != a_c.shape[1]:  # self-attention summed over steps at capture time: one entry
            a_s = a_s.expand(a_c.shape[1], -1, -1)
        if not cfg["rectify"]:
            return a_c.transpose(0, 1)
        a_star = rectified_attention(a_s, a_c.flatten(2).permute(1, 2, 0), cfg["self_power"])  # (S', N, K)
        return a_star.permute(0, 2, 1).unflatten(2, grid)

    def class_scores(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]) -> torch.Tensor:
        """Normalised class maps (K, H, W) of the mask step."""
        if cfg["mask_step"] == "last":
            maps = self.rectified(trace, query, cfg, [len(trace.timesteps) - 1])[0] \
                if self._per_step(trace) else self.rectified(trace, query, cfg)[0]
        else:
            maps = self.rectified(trace, query, cfg).mean(0)
        return normalise(resize_maps(maps, out_size)).clamp(0, 1)

    @staticmethod
    def _per_step(trace: Trace) -> bool:
        some = next(iter(trace.self_attn.values()))
        return some.shape[0] == len(trace.timesteps) > 1

    def synthetic_mask(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]
                       ) -> SyntheticMask:
        """The sample's pseudo-label and its TFF (Eq. 4 over one-hot masks at tff_k uniformly spaced steps)."""
        if cfg["egd"] and query.ids:  # Stage 2's masks (the TFF below still scores Stage 1's)
            decoded = self.egd_predict(trace, query, cfg, out_size)
            label, scores = decoded.labels.cpu().numpy().astype(np.uint8), decoded.scores
        else:
            scores = self.class_scores(trace, query, cfg, out_size)
            if cfg["pseudo_masks"] == "sam":
                label = self.sam_labels(trace, query, cfg, scores).cpu().numpy().astype(np.uint8)
            else:
                label = pseudo_label(scores, query.ids, cfg["fg_threshold"], cfg["ignore_threshold"])
        tff = 0.0
        if self._per_step(trace) and query.ids:
            steps = uniform_steps(len(trace.timesteps), cfg["tff_k"])
            maps = self.rectified(trace, query, cfg, steps)
            local = list(range(1, len(query.ids) + 1))
            masks = []
            for m in maps:
                lab = torch.from_numpy(pseudo_label(normalise(resize_maps(m, out_size)).clamp(0, 1), local,
                                                    cfg["fg_threshold"], cfg["ignore_threshold"]).astype(np.int64))
                masks.append(one_hot(lab, len(local) + 1))
            tff = temporal_fluctuation(torch.stack(masks))
        return SyntheticMask(label, tff, scores)

    def predict(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]) -> Prediction:
        if cfg["egd"]:
            return self.egd_predict(trace, query, cfg, out_size)
        scores = self.class_scores(trace, query, cfg, out_size)
        if cfg["pseudo_masks"] == "sam":
            return Prediction(scores, self.sam_labels(trace, query, cfg, scores))
        best, arg = scores.max(0)
        labels = torch.tensor(query.ids, dtype=torch.long, device=arg.device)[arg]
        labels[best < cfg["fg_threshold"]] = 0
        return Prediction(scores, labels)

    def sam_labels(self, trace: Trace, query: ClassQuery, cfg: Mapping, scores: torch.Tensor) -> torch.Tensor:
        """G_* (FreeGen Sec. 3, Training Strategy): per class, SAM prompted with the `sam_points` strongest /
        farthest points of its map; a pixel takes the class whose SAM mask logit is highest among those > 0,
        background elsewhere. scores: (K, H, W) at the output size."""
        best, arg = self.sam_logits(trace, cfg, scores).max(0)
        labels = torch.tensor(query.ids, dtype=torch.long, device=arg.device)[arg]
        labels[best <= 0] = 0
        return labels

    def sam_logits(self, trace: Trace, cfg: Mapping, scores: torch.Tensor) -> torch.Tensor:
        """SAM's mask logits (K, H, W) of each class, prompted with the strongest / farthest points of its
        normalised map in `scores` (K, H, W)."""
        if trace.image is None:
            raise ValueError("SAM pseudo-masks need the traced image")
        from bench.models.sam import load_sam

        if cfg["sam"] not in self._sams:
            self._sams[cfg["sam"]] = load_sam(cfg["sam"], str(self.backbone.device) if self.backbone else "cpu")
        sam = self._sams[cfg["sam"]]
        image = np.asarray(trace.image, dtype=np.uint8)
        h, w = scores.shape[-2:]
        sy, sx = image.shape[0] / h, image.shape[1] / w
        logits = []
        for k in range(scores.shape[0]):
            points = [((x + 0.5) * sx, (y + 0.5) * sy) for x, y in strongest_far_points(scores[k], cfg["sam_points"],
                                                                                   cfg["fg_threshold"])]
            logits.append(resize_maps(sam.logits(image, points), (h, w)))
        return torch.stack(logits).to(scores.device)

    # -- learned ASR (asr.py) ------------------------------------------------------------------------------------
    def asr_inputs(self, trace: Trace, query: ClassQuery, cfg: Mapping, step: int) -> AsrInputs:
        """One recorded step of a trace as ASR's inputs (per-head self-attention, queries, prompt keys)."""
        self_names = self.self_layers(cfg)
        probs = torch.stack([trace.self_attn[n][step] for n in self_names]).float().mean(0)  # (H, N, N)
        texts, tokens = [], []  # per class: the text whose keys it is read from, its token positions there
        for name in query.names:
            for text in (trace.prompt, cfg["attribution"].format(name=name, prompt=trace.prompt), name):
                idx = token_indices(self.backbone.tokenizer, self.backbone.tokenize([text])[0].tolist(), name)
                if idx:  # in the generation prompt, else re-keyed with the attribution text (OVAM), as ASR-off
                    break
            if not idx:
                raise ValueError(f"class {name!r} has no token of its own in {text!r}")
            texts.append(text)
            tokens.append(idx)
        queries, keys, scales, grids = {}, {}, {}, {}
        for layer in self.cross_layers(cfg):
            q = trace.queries[layer][step].float()  # (H, N_l, d)
            module = trace.modules[layer]
            keys[layer] = [self.text_keys(text, layer, module, q.shape[0]) for text in texts]
            queries[layer], grids[layer], scales[layer] = q, trace.spatial_size(layer), float(module.scale)
        return AsrInputs(probs, trace.spatial_size(self_names[0]), queries, keys, scales, grids, tokens)

    def text_keys(self, text: str, layer: str, module, heads: int) -> torch.Tensor:
        """A layer's per-head keys of a padded text (cached: the same tensor for every class that shares it)."""
        if (text, layer) not in self._keys:
            emb, _ = attribution_embedding(self.backbone, text, pad=True)
            self._keys[(text, layer)] = prompt_keys(module, emb, heads)
        return self._keys[(text, layer)]

    def asr_module(self, cfg: Mapping) -> AsrModule:
        key = self.train_setting(cfg).key
        if key not in self._modules:
            self._modules[key] = AsrModule.from_tensors(self.artefact(cfg)).to(self.device)
        return self._modules[key]

    # -- Stage 2: the EGD (egd.py) ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the decoder runs: the backbone's device (a GPU synthesis trains and runs it there)."""
        return self.backbone.device if self.backbone is not None else torch.device("cpu")

    def egd_module(self, cfg: Mapping) -> GroundingDecoder:
        key = self.train_setting(cfg).key
        if key not in self._decoders:
            self._decoders[key] = GroundingDecoder.from_tensors(self.artefact(cfg)).to(self.device)
        return self._decoders[key]

    def entities(self, names: list[str]) -> torch.Tensor:
        if tuple(names) not in self._entities:
            self._entities[tuple(names)] = entity_embeddings(self.backbone, list(names))
        return self._entities[tuple(names)]

    def egd_samples(self, traces: list[Trace], queries: list[ClassQuery], cfg: Mapping) -> list[EgdSample]:
        """The decoder's inputs: UNet features at t = egd_timestep of each traced image (one UNet pass per image,
        fixed-seed noise: the same image and prompt give the same features in a fit and at prediction) and the
        entity embeddings of its classes."""
        if any(t.image is None for t in traces):
            raise ValueError("the EGD needs the traced image")
        feats = []
        for trace in traces:  # one pass per image: its features do not depend on the batch it came in
            key = (id(trace.image), trace.prompt, cfg["egd_timestep"])
            if key not in self._features:  # configurations sharing a trace share its features (predict_many)
                while len(self._features) >= 8:
                    self._features.pop(next(iter(self._features)))
                image = np.asarray(trace.image, dtype=np.uint8)
                # the image is kept with its features so that its id is not reused while cached
                self._features[key] = (trace.image, unet_features(self.backbone, [image], [trace.prompt],
                                                                  cfg["egd_timestep"])[0])
            feats.append(self._features[key][1])
        return [EgdSample(f, self.entities(q.names)) for f, q in zip(feats, queries)]

    def egd_predict(self, trace: Trace, query: ClassQuery, cfg: Mapping, out_size: tuple[int, int]) -> Prediction:
        """The EGD's masks: entity probabilities (K, H, W) and labels (argmax over background and the classes)."""
        (sample,) = self.egd_samples([trace], [query], cfg)
        probs, local = predict_label(self.egd_module(cfg), sample, out_size)
        return Prediction(probs[1:], torch.tensor([0, *query.ids], dtype=torch.long, device=local.device)[local])

    def fit(self, ctx) -> dict[str, torch.Tensor]:
        """The learned ASR (asr=learned), then the EGD (egd=true), one step per epoch of either; a checkpoint
        after every epoch (an EGD checkpoint carries the fitted ASR, so a resumed fit does not redo it)."""
        cfg = self.resolve(dict(ctx.values))
        restored = ctx.restore()
        done, state = restored if restored is not None else (0, {})
        rounds = 2 if cfg["hst"] else 1
        asr_steps = cfg["asr_epochs"] if cfg["asr"] == "learned" else 0
        ctx.start(asr_steps + (cfg["egd_epochs"] * rounds if cfg["egd"] else 0))
        tensors: dict[str, torch.Tensor] = {}
        if asr_steps:
            tensors = self.fit_asr(ctx, cfg, done, state)
            for stage in (cfg, cfg.replace(egd=False)):  # the EGD's training masks read it as Stage 1's
                self._modules[self.train_setting(stage).key] = AsrModule.from_tensors(tensors).to(self.device)
        if cfg["egd"]:
            tensors.update(self.fit_egd(ctx, cfg, tensors, asr_steps, done, state))
        return tensors

    def fit_egd(self, ctx, cfg, asr: dict, offset: int, done: int, state: dict) -> dict[str, torch.Tensor]:
        """FreeGen Sec. 3.3: the first `egd_images` training images generated and annotated by Stage 1 (the TFF
        filter applied when `tff` is on), the EGD trained on them for egd_epochs; with `hst`, their hardness
        (Eq. 8) under that decoder ranks them and training continues on the easiest `hst_keep` for egd_epochs.
        Every worker trains the same decoder on all samples (they are gathered): the decoder is small."""
        stage1 = cfg.replace(egd=False)
        req = self.trace_request(cfg)
        indices = ctx.shard(list(range(min(cfg["egd_images"], len(ctx.dataset)))))

        total = min(cfg["egd_images"], len(ctx.dataset))  # pairs every worker will hold (gathered)
        budget = egd_features_budget(ctx.world_size)

        def build() -> dict:  # this worker's training pairs, kept by the fit context for a resumed fit
            samples, dropped, stream = [], 0, False
            for start in range(0, len(indices), 4):
                ctx.status(f"EGD training images {start}/{len(indices)}")
                batch = [ctx.dataset[i] for i in indices[start:start + 4]]
                traced = ctx.trace(self, batch, cfg, req)
                keep = []
                for query, trace in zip(traced.queries, traced.traces):
                    if not query.ids or trace.image is None:
                        continue
                    mask = self.synthetic_mask(trace, query, stage1, tuple(np.asarray(trace.image).shape[:2]))
                    if cfg["tff"] and mask.tff > cfg["tff_threshold"]:
                        dropped += 1
                        continue
                    keep.append((query, trace, local_label(mask.label, query.ids)))
                if keep and stream:
                    samples += [self._streamed_record({"entities": self.entities(q.names), "label": label}, t)
                                for q, t, label in keep]
                elif keep:
                    made = self.egd_samples([t for _, t, _ in keep], [q for q, _, _ in keep], cfg)
                    records = [{"features": list(m.features), "entities": m.entities, "label": label}
                               for m, (_, _, label) in zip(made, keep)]
                    each = sum(f.numel() * f.element_size() for f in made[0].features)
                    if not samples and each * total > budget:  # decided on the first kept batch
                        stream = True
                        log.info("EGD fit: %d pairs x %.1f MiB of UNet features exceed %.0f MiB; streaming them",
                                 total, each / 2**20, budget / 2**20)
                        records = [self._streamed_record(r, t) for r, (_, t, _) in zip(records, keep)]
                    samples += records
            return {"samples": samples, "dropped": dropped}

        mine = ctx.cached("egd_samples", build)
        dropped = mine["dropped"]
        samples = [self._egd_training_sample(s, cfg) for part in ctx.gather(mine["samples"]) for s in part]
        log.info("EGD fit: %d training pairs (%d dropped by the TFF on this worker)", len(samples), dropped)
        if not samples:
            raise RuntimeError(f"egd=true: no training image with a class kept by Stage 1 ({dropped} filtered by "
                               f"the TFF); raise egd_images or tff_threshold")
        torch.manual_seed(0)  # the decoder's initialisation
        feats = samples[0].feature_maps()
        model = GroundingDecoder([f.shape[0] for f in feats], samples[0].entities.shape[1], dim=cfg["egd_dim"],
                                 queries=cfg["egd_queries"], layers=cfg["egd_layers"]).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["egd_lr"], betas=(0.9, 0.999))
        kept = list(range(len(samples)))
        if "egd" in state:  # resumed in the EGD phase
            model.load_state_dict(state["egd"])
            opt.load_state_dict(state["egd_optimizer"])
            kept = [int(i) for i in state["kept"]]
        epochs = cfg["egd_epochs"]
        for round_ in range(2 if cfg["hst"] else 1):
            first = offset + round_ * epochs  # steps before this round
            if round_ == 1 and done <= first:  # HST's ranking by the decoder pre-trained once (else resumed)
                model.eval()
                scores = [hardness(pixel_loss_map(*model(s), s.label), s.label) for s in samples]  # Eq. 8
                kept = easiest(scores, cfg["hst_keep"])
            todo = max(0, epochs - max(0, done - first))
            if not todo:
                continue
            chosen = [samples[i] for i in kept]

            def after_epoch(epoch, loss, first=first, skip=epochs - todo):
                step = first + skip + epoch + 1
                ctx.log(step, loss, "egd" if round_ == 0 else "egd+hst")  # noqa: B023 (called within this round)
                ctx.checkpoint(step, {"egd": model.state_dict(), "egd_optimizer": opt.state_dict(),
                                      "kept": torch.tensor(kept), "asr": dict(asr)})  # noqa: B023 (called within this round)

            train_epochs(model, chosen, todo, cfg["egd_lr"], cfg["egd_batch"], seed=1_000 * (round_ + 1)
                         + epochs - todo, step_hook=after_epoch, optimizer=opt)
        return model.state_tensors()

    @staticmethod
    def _streamed_record(record: dict, trace: Trace) -> dict:
        """A training pair kept without its features: the image and prompt they are computed from."""
        return {"image": torch.from_numpy(np.asarray(trace.image, dtype=np.uint8).copy()), "prompt": trace.prompt,
                "entities": record["entities"], "label": record["label"]}

    def _egd_training_sample(self, record: dict, cfg: Mapping) -> EgdSample:
        """A kept training pair as the decoder's input: its features, or (streamed) a function that computes
        them again with the same single-image UNet pass as egd_samples, so both give the same floats."""
        if "features" in record:
            return EgdSample(record["features"], record["entities"], record["label"])
        image, prompt, t = record["image"].numpy(), record["prompt"], cfg["egd_timestep"]
        return EgdSample(lambda: unet_features(self.backbone, [image], [prompt], t)[0], record["entities"],
                         record["label"])

    def fit_asr(self, ctx, cfg, done: int, state: dict) -> dict[str, torch.Tensor]:
        """Eq. 5 on the first `asr_images` training images: each traced once (last denoising step, the paper's
        Training Strategy), G_* = SAM's masks prompted from A_* without ASR; Adam over W and Upsilon, a
        checkpoint after every epoch."""
        if "egd" in state:  # resumed in the EGD phase: the ASR is done
            return {k: v.clone() for k, v in state["asr"].items()}
        plain = cfg.replace(asr="init")
        req = self.trace_request(cfg)
        indices = ctx.shard(list(range(min(cfg["asr_images"], len(ctx.dataset)))))

        def build() -> dict:  # this worker's (inputs, targets), kept by the fit context for a resumed fit
            inputs, targets = [], []
            for start in range(0, len(indices), 4):
                ctx.status(f"ASR training images {start}/{len(indices)}")
                samples = [ctx.dataset[i] for i in indices[start:start + 4]]
                batch = ctx.trace(self, samples, cfg, req)
                for query, trace in zip(batch.queries, batch.traces):
                    if not query.ids or trace.image is None:
                        continue
                    size = tuple(np.asarray(trace.image).shape[:2])
                    step = len(trace.timesteps) - 1 if self._per_step(trace) else 0
                    with torch.no_grad():
                        scores = self.class_scores(trace, query, plain, size)
                        targets.append(self.sam_logits(trace, cfg, scores) > 0 if cfg["asr_targets"] == "sam"
                                       else scores >= cfg["fg_threshold"])
                    inputs.append(asr_record(self.asr_inputs(trace, query, cfg, step)))
            return {"inputs": inputs, "targets": targets}

        kept = ctx.cached("asr_samples", build)  # tensors come back on the CPU: moved to where the traces were
        inputs = [asr_inputs_from(record, self.device) for record in kept["inputs"]]
        targets = [t.to(self.device) for t in kept["targets"]]
        if not inputs:
            raise RuntimeError("asr=learned: no training image with a class in the training split")
        model = AsrModule.like(inputs[0]).to(self.device)
        trained = ctx.prepare(model)
        opt = torch.optim.Adam(model.parameters(), lr=cfg["asr_lr"], betas=(0.9, 0.999))
        start = 0
        if state:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = done
        total = int(ctx.all_sum(torch.tensor([float(len(inputs))])).item())
        steps = -(-total // (ctx.world_size * cfg["asr_batch"]))  # equal on every worker (DDP)
        for epoch in range(start, cfg["asr_epochs"]):
            gen = torch.Generator().manual_seed(1_000 + epoch)
            order = torch.randperm(len(inputs), generator=gen).tolist()
            order = (order * (steps * cfg["asr_batch"] // len(order) + 1))[:steps * cfg["asr_batch"]]
            running = 0.0
            for b in range(steps):
                chunk = order[b * cfg["asr_batch"]:(b + 1) * cfg["asr_batch"]]
                loss = sum(asr_loss(trained(inputs[i]), targets[i]) for i in chunk) / len(chunk)
                opt.zero_grad()
                loss.backward()
                opt.step()
                running += float(loss.detach())
            mean = ctx.all_sum(torch.tensor([running / steps])) / ctx.world_size
            ctx.log(epoch + 1, float(mean))
            ctx.checkpoint(epoch + 1, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        return model.state_tensors()
