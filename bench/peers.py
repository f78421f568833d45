"""End-to-end agreement with the released pipelines: vpulab/ovam and linsun449/iseg.code run their own code, in
their own environments, on one tiny random-weight SD pipeline and a few synthetic images; this project runs the
same inputs with the options that claim to match them; maps and masks are compared.

    python -m bench.peers --iseg-repo /scratch/iseg.code --iseg-python venv-iseg/bin/python \\
        --ovam-repo /scratch/ovam --ovam-python venv-ovam/bin/python --out reports/peers

The repositories are fetched by the caller and imported from the paths given (never copied into this project);
bench/peers_release.py runs inside their environments. reports/peers/README.md reads the numbers.

The pipeline has SD 2.1-base's layout (four UNet levels, 64x64 latents for 512 px images, 5/10/20/20 attention
heads per level, an 8x-downsampling VAE) at toy width, because the releases hard-code it: iSeg indexes its
layers by SD names, reads heads 1 and 2 of a 64x64 self-attention and picks heads out of 30 (32x32) and 100
(16x16); OVAM's extractor interpolates to 64x64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 32
HEADS = (5, 10, 20, 20)  # SD 2.1-base's heads per level (its `attention_head_dim`)
SEED = 0
ISEG_HUB_ID = "stabilityai/stable-diffusion-2-1-base"  # the id base/stable_difusion.py loads
ISEG_TEMPLATE = "a photograph of {classes} and other object and background"  # wsss/iSeg.py test_step's prompt
EXTRA_WORDS = ("object", "plane")

# name, size (h, w), classes (VOC id, name) in id order (the release prompts them in that order, as this project's
# datasets list them): the release's VOC12_NAME spelling, "potted plant" being two tokens
IMAGES = [
    ("cat_dog", (512, 512), [(8, "cat"), (12, "dog")]),
    ("farm", (512, 512), [(10, "cow"), (13, "horse"), (17, "sheep")]),
    ("bird_plant_375x500", (375, 500), [(3, "bird"), (16, "potted plant")]),
]
# iSeg settings: the release's overrides of its VOC defaults (wsss/arguments.py) <-> this project's options
ISEG_SETTINGS = [
    {"name": "voc", "release": {},
     "project": {"lambda": 0.015, "gamma": 1.6, "cross_heads": "voc_release", "background": "power"}},
    {"name": "voc_gamma1", "release": {"enhanced": 1.0},
     "project": {"lambda": 0.015, "gamma": 1.0, "cross_heads": "voc_release", "background": "power"}},
    {"name": "voc_nocluster", "release": {"no_use_cluster": False},
     "project": {"lambda": 0.015, "gamma": 1.6, "cross_heads": "voc_release", "background": "power", "kmeans": 0}},
    {"name": "voc_gamma1_nocluster", "release": {"enhanced": 1.0, "no_use_cluster": False},
     "project": {"lambda": 0.015, "gamma": 1.0, "cross_heads": "voc_release", "background": "power", "kmeans": 0}},
    {"name": "allheads_bg045_gamma1_nocluster",
     "release": {"att_mean": True, "cam_bg_thr": 0.45, "ent": 0.1, "enhanced": 1.0, "no_use_cluster": False},
     "project": {"lambda": 0.1, "gamma": 1.0, "cross_heads": "all", "background": "threshold", "bg_threshold": 0.45,
                 "kmeans": 0}},
]
# the intermediate tensors are compared on one image under one setting (clustering on, Cat-Cross off)
ISEG_DIAGNOSIS = {"setting": "voc_gamma1", "image": "farm"}
ISEG_COMMON = {"variant": "code", "iterations": 10, "timestep": 100, "template": ISEG_TEMPLATE,
               "tie_rule": "argmax", "resize": "code"}
ISEG_SEED = 1101  # wsss/arguments.py --rand_seed
# OVAM: generation (its scripts' protocol: "A photograph of a {classname}", the global seed, then the notebook)
OVAM_JOBS = [
    {"name": "dog", "prompt": "a photograph of a dog", "names": ["dog"], "ids": [12], "seed": 1996},
    {"name": "cat_horse", "prompt": "a photograph of a cat and a horse", "names": ["cat", "horse"], "ids": [8, 13],
     "seed": 7},
]
# taus: the paper's 0.4, and higher ones that cut the nearly flat maps of random weights
OVAM_COMMON = {"steps": 10, "guidance": 7.5, "attribution": "A photograph of a {name}", "taus": [0.4, 0.98, 0.99],
               "alpha": 0.85, "size": [512, 512]}


# -- inputs ----------------------------------------------------------------------------------------------------------
def tiny_sd21_pipeline(seed: int = SEED):
    """SD 2.1-base's layout at toy width, seeded random weights (diffusers' get_dummy_components pattern)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from bench.embedded import build_tokenizer, tiny_text_encoder

    tokenizer = build_tokenizer(max_length=77, extra_words=EXTRA_WORDS)
    torch.manual_seed(seed)
    text_encoder = tiny_text_encoder(tokenizer, HIDDEN)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(40, 40, 80, 80),
        norm_num_groups=4, cross_attention_dim=HIDDEN, attention_head_dim=HEADS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, sample_size=512)
    # SD 2.1-base's scheduler configuration (epsilon prediction)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    for module in (text_encoder, unet, vae):
        module.eval().requires_grad_(False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt from the tokenizer.json save_pretrained wrote: the slow CLIPTokenizer of older
    transformers (the releases' pins) reads these."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def prefixed_text_encoder(folder: Path) -> None:
    """The text encoder's tensors under the `text_model.` prefix of every released SD checkpoint: transformers 5
    saves them without it, and the older transformers of the releases' pins then leave the model random (the
    current one reads both)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def legacy_vae(folder: Path, target: Path) -> None:
    """The VAE with its mid-block attention under the names of diffusers < 0.17 (query/key/value/proj_attn):
    the iSeg release bundles diffusers 0.16.0.dev0, which cannot read the current names. Same tensors."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old) if ".attentions." in key else key
        legacy[key] = value
    save_file(legacy, target / "diffusion_pytorch_model.safetensors")
    (target / "config.json").write_text((folder / "config.json").read_text())


def iseg_hub_cache(pipeline: Path, hf_home: Path) -> None:
    """An offline Hugging Face cache in which ISEG_HUB_ID resolves to the tiny pipeline (the release loads that id
    and nothing else): its code stays as released."""
    import shutil

    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(pipeline.rglob("*")) if p.is_file())).hexdigest()
    repo = hf_home / "hub" / ("models--" + ISEG_HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / digest
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(pipeline, snapshot, ignore=shutil.ignore_patterns("vae"))
    legacy_vae(pipeline / "vae", snapshot / "vae")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(digest)


def save_tiny_sd21(folder: Path, seed: int = SEED) -> Path:
    """tiny_sd21_pipeline as a pipeline folder that this project and the releases' pinned libraries all load."""
    tiny_sd21_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer")
    prefixed_text_encoder(folder / "text_encoder")
    return folder


def synthetic_image(size: tuple[int, int], classes: list[tuple[int, str]], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured background with one ellipse per class (colour and place seeded) and its VOC label map."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    image = (rng.uniform(60, 200, 3)[None, None] + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
    label = np.zeros((h, w), np.uint8)
    for i, (cid, _) in enumerate(classes):
        cx, cy = w * (i + 1) / (len(classes) + 1), h * rng.uniform(0.35, 0.65)
        rx, ry = w * rng.uniform(0.12, 0.18), h * rng.uniform(0.15, 0.3)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        image[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 8, (int(inside.sum()), 3))
        label[inside] = cid
    return image.clip(0, 255).astype(np.uint8), label


def prepare(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    save_tiny_sd21(work / "pipeline")
    iseg_hub_cache(work / "pipeline", work / "hf")
    images = []
    for i, (name, size, classes) in enumerate(IMAGES):
        image, label = synthetic_image(size, classes, seed=100 + i)
        np.save(work / f"{name}.npy", image)
        np.save(work / f"{name}_label.npy", label)
        images.append({"name": name, "file": f"{name}.npy", "label": f"{name}_label.npy",
                       "ids": [c for c, _ in classes], "names": [n for _, n in classes]})
    inputs = {"images": images, "iseg_settings": ISEG_SETTINGS, "iseg_diagnosis": ISEG_DIAGNOSIS,
              "ovam": [{**job, **OVAM_COMMON} for job in OVAM_JOBS]}
    (work / "inputs.json").write_text(json.dumps(inputs, indent=1))
    return inputs


# -- the releases ----------------------------------------------------------------------------------------------------
def release_command(release: str, python: str, repo: Path, work: Path) -> list[str]:
    return [python, str(ROOT / "bench" / "peers_release.py"), release, "--repo", str(repo), "--work", str(work)]


def run_release(release: str, python: str, repo: Path, work: Path) -> tuple[list[str], float]:
    cmd = release_command(release, python, repo, work)
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ""}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=repo / "wsss" if release.startswith("iseg") else repo,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{release} release failed:\n{proc.stderr[-4000:]}")
    # a checkpoint key the release's library does not read leaves that part random: refuse the comparison
    for phrase in ("newly initialized", "were not used when initializing", "missing keys", "unexpected keys"):
        if phrase in proc.stderr:
            raise RuntimeError(f"{release} release did not load every weight ({phrase!r}):\n{proc.stderr[-4000:]}")
    return cmd, time.perf_counter() - start


# -- this project ----------------------------------------------------------------------------------------------------
def project_backbone(work: Path):
    from bench.models import load_pipeline_folder

    return load_pipeline_folder(work / "pipeline", torch.device("cpu"), torch.float32, "peers-tiny-sd21")


def project_iseg(backbone, work: Path, inputs: dict) -> dict[str, np.ndarray]:
    from bench.forward import run_traced
    from methods.base import ClassQuery
    from methods.iseg import ISeg

    out = {}
    method = ISeg(backbone)
    for setting in inputs["iseg_settings"]:
        cfg = ISeg.resolve({**ISEG_COMMON, **setting["project"]})
        for image in inputs["images"]:
            rgb, label = np.load(work / image["file"]), np.load(work / image["label"])
            query = ClassQuery(image["ids"], image["names"])
            prompt = method.prompt(query, None, cfg)
            ids = backbone.tokenize([prompt])[0].tolist()
            weights = method.key_weights(ids, query, cfg)
            trace = run_traced(backbone, method.trace_request(cfg), method.forward_setting(cfg, ISEG_SEED), [prompt],
                               images=[rgb], key_weights=None if weights is None else weights[None]).traces[0]
            pred = method.predict(trace, query, cfg, tuple(label.shape))
            key = f"{setting['name']}/{image['name']}"
            out[key + "/scores"] = pred.scores.float().numpy()
            out[key + "/labels"] = pred.labels.numpy().astype(np.int64)
            out[key + "/prompt"] = np.array(prompt)
    return out


def project_ovam(backbone, inputs: dict) -> dict[str, np.ndarray]:
    from bench.forward import run_traced
    from bench.models.layers import layer_map
    from methods.base import ClassQuery
    from methods.ovam import OVAM, received_attention

    out = {}
    method = OVAM(backbone)
    for job in inputs["ovam"]:
        base = {"mode": "generation", "steps": job["steps"], "guidance": job["guidance"], "branch": "uncond",
                "attribution": job["attribution"], "pad": False, "binarise": "code", "crf": False,
                "alpha": job["alpha"], "tie_rule": "argmax"}
        cfg = OVAM.resolve({**base, "tau": job["taus"][0]})
        trace = run_traced(backbone, method.trace_request(cfg), method.forward_setting(cfg, job["seed"]),
                           [job["prompt"]]).traces[0]
        query = ClassQuery(job["ids"], job["names"])
        out[f"{job['name']}/image"] = np.asarray(trace.image)
        heat = method.heatmaps(trace, query, cfg).float().numpy()
        maps = [trace.self_attn[n] for n in layer_map(backbone).finest("self")]
        out[f"{job['name']}/received"] = received_attention(maps, trace.latent_size).numpy()
        size = tuple(job["size"])
        for tau in job["taus"]:
            for refine in (False, True):
                pred = method.predict(trace, query, OVAM.resolve({**base, "tau": tau, "refine": refine}), size)
                for k, name in enumerate(job["names"]):
                    scores = pred.scores[k].float().numpy()
                    tag = f"{job['name']}/{name}/{'sa' if refine else 'nosa'}"
                    out[f"{tag}_scores"] = scores
                    out[f"{tag}_mask_{tau}"] = scores > tau  # binarise=code: strict, per class
        for k, name in enumerate(job["names"]):
            out[f"{job['name']}/{name}/heat"] = heat[k]
    return out


def diagnose_iseg(backbone, work: Path, inputs: dict, release: dict) -> dict:
    """This project's intermediate tensors against the release's on the diagnosis image (max abs differences,
    with the release's largest value for scale), and this project's clustering on the release's own fused maps."""
    from bench.forward import run_traced
    from bench.models.layers import layer_map
    from methods.base import ClassQuery
    from methods.iseg import CODE_HEADS, RELEASE_VOC_HEADS, ISeg, kl_cluster_means, release_cross

    diagnosis = inputs["iseg_diagnosis"]
    setting = next(s for s in inputs["iseg_settings"] if s["name"] == diagnosis["setting"])
    image = next(i for i in inputs["images"] if i["name"] == diagnosis["image"])
    method, cfg = ISeg(backbone), ISeg.resolve({**ISEG_COMMON, **setting["project"]})
    query = ClassQuery(image["ids"], image["names"])
    prompt = method.prompt(query, None, cfg)
    trace = run_traced(backbone, method.trace_request(cfg), method.forward_setting(cfg, ISEG_SEED), [prompt],
                       images=[np.load(work / image["file"])]).traces[0]

    def diff(ours: torch.Tensor, theirs: np.ndarray) -> dict:
        return {"max_abs_diff": float((ours.float() - torch.from_numpy(theirs)).abs().max()),
                "release_max": float(np.abs(theirs).max())}

    out = {"setting": diagnosis["setting"], "image": diagnosis["image"],
           "embedding": diff(backbone.encode_text([prompt])[0], release["embedding"])}
    levels = {}
    for res, (_, layers) in zip(("16", "32"), method.code_cross(layer_map(backbone))):
        levels[res] = torch.cat([trace.step_mean("cross", layer).float() for layer in layers])  # (L*H, h, w, T)
        out[f"cross_{res}"] = diff(levels[res].permute(0, 3, 1, 2), release[f"cross{res}"][0])
    attn = trace.step_mean("self_attn", method.self_layer(cfg)).float()
    out["self_64_heads_1_2"] = diff(attn[list(CODE_HEADS)].mean(0), release["self64_heads12"])
    heads = RELEASE_VOC_HEADS if cfg["cross_heads"] == "voc_release" else None
    out["fused_token_maps"] = diff(release_cross(levels, (64, 64), heads), release["fused"])
    vectors = torch.from_numpy(release["fused"]).flatten(1).T  # the release's own fused maps, (HW, T)
    clusters = torch.from_numpy(release["clusters"])
    onehot = torch.nn.functional.one_hot(clusters).to(vectors.dtype)
    want = (onehot @ (onehot.T @ vectors)) / onehot.sum(0)[clusters][:, None]
    out["cluster_means_on_release_fused_maps"] = diff(kl_cluster_means(vectors, (64, 64)), want.numpy())
    return out


# -- comparison ------------------------------------------------------------------------------------------------------
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare(inputs: dict, release: dict, ours: dict, kind: str) -> list[dict]:
    rows = []
    if kind == "iseg":
        for setting in inputs["iseg_settings"]:
            for image in inputs["images"]:
                key = f"{setting['name']}/{image['name']}"
                a, b = release[key + "/scores"], ours[key + "/scores"]
                la, lb = release[key + "/labels"], ours[key + "/labels"]
                moved = release.get(key + "/cluster_moved")
                rows.append({"release": "iseg", "setting": setting["name"], "item": image["name"],
                             "map_max_abs_diff": float(np.abs(a - b).max()),
                             "label_agreement": float((la == lb).mean()),
                             "mean_class_iou": float(np.mean([iou(la == c, lb == c) for c in [0, *image["ids"]]])),
                             "release_cluster_moved_by_one_ulp": None if moved is None else float(moved)})
    else:
        from bench.peers_release import notebook_binarise

        for job in inputs["ovam"]:
            same_image = float(np.abs(release[f"{job['name']}/image"].astype(int)
                                      - ours[f"{job['name']}/image"].astype(int)).max())
            sa, received = release[f"{job['name']}/sa"], ours[f"{job['name']}/received"]
            for name in job["names"]:
                key = f"{job['name']}/{name}"
                heat_a, heat_b = release[key + "/heat"], ours[key + "/heat"]
                common = {"release": "ovam", "image_max_abs_diff": same_image,
                          "heat_max_abs_diff": float(np.abs(heat_a - heat_b).max()),
                          "heat_max_rel_diff": float(np.abs(heat_a - heat_b).max() / np.abs(heat_a).max()),
                          "release_sa_range": float(sa.max() - sa.min())}

                def row(setting, scores_a, scores_b, mask_a, mask_b):
                    diff = np.abs(scores_a - scores_b)
                    return {**common, "setting": setting, "item": key,  # noqa: B023 (called within this iteration)
                            "map_max_abs_diff": float(diff.max()) if np.isfinite(diff).all() else float("nan"),
                            "mask_iou": iou(mask_a, mask_b), "label_agreement": float((mask_a == mask_b).mean()),
                            "release_mask_share": float(mask_a.mean()), "project_mask_share": float(mask_b.mean())}

                for tau in job["taus"]:
                    rows.append(row(f"refine=false tau={tau}", release[key + "/scores_nosa"],
                                    ours[key + "/nosa_scores"], release[f"{key}/mask_nosa_{tau}"],
                                    ours[f"{key}/nosa_mask_{tau}"]))
                tau = job["taus"][0]
                rows.append(row(f"refine=true tau={tau}", release[key + "/scores_sa"], ours[key + "/sa_scores"],
                                release[key + "/mask_sa"], ours[f"{key}/sa_mask_{tau}"]))
                for tau in job["taus"]:  # the notebook's formula on the release's heat map and our A_alpha
                    scores, mask = notebook_binarise(heat_a, received, tau, job["alpha"], tuple(job["size"]))
                    rows.append(row(f"refine=true tau={tau}, release formula with received attention", scores,
                                    ours[key + "/sa_scores"], mask, ours[f"{key}/sa_mask_{tau}"]))
    return rows


def versions(python: str) -> dict:
    code = ("import json, importlib.metadata as m, platform\n"
            "out = {'python': platform.python_version()}\n"
            "for p in ('torch', 'diffusers', 'transformers', 'huggingface-hub', 'accelerate', 'numpy', "
            "'pytorch-lightning', 'opencv-python-headless', 'tokenizers'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONPATH": ""}).stdout)


def git_commit(repo: Path) -> str:
    for args in (["git", "-C", str(repo), "rev-parse", "HEAD"], ["git", "--git-dir", str(repo), "rev-parse", "HEAD"]):
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout.strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iseg-repo", type=Path, required=True)
    parser.add_argument("--iseg-python", required=True)
    parser.add_argument("--ovam-repo", type=Path, required=True)
    parser.add_argument("--ovam-python", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/peers-work"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "peers")
    parser.add_argument("--reuse", nargs="*", default=[], choices=("iseg", "ovam"),
                        help="releases whose outputs (theirs and this project's) already in --work are kept")
    args = parser.parse_args(argv)
    for repo in (args.iseg_repo, args.ovam_repo):
        if not repo.is_dir():
            print(f"error: {repo} is not a folder: fetch the repository and give its checkout", file=sys.stderr)
            return 2
    for python in (args.iseg_python, args.ovam_python):
        if not os.access(python, os.X_OK):
            print(f"error: {python} is not an executable Python: give the release environment's interpreter "
                  f"(docs/peers.md)", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    inputs = prepare(args.work)
    commands, seconds = {}, {}
    previous = args.out / "peers.json"
    if args.reuse and previous.exists():  # the reused outputs' run times
        seconds = {k: v for k, v in json.loads(previous.read_text()).get("seconds", {}).items()
                   if k.split("-")[0] in args.reuse}
    for release, repo, python in (("iseg", args.iseg_repo, args.iseg_python),
                                  ("ovam", args.ovam_repo, args.ovam_python)):
        commands[release] = " ".join(release_command(release, python, repo.resolve(), args.work))
        if release in args.reuse and (args.work / f"{release}_release.npz").exists():
            continue
        log.info("running the %s release", release)
        _, seconds[release] = run_release(release, python, repo.resolve(), args.work)
    if "iseg" not in args.reuse or not (args.work / "iseg_diagnosis_release.npz").exists():
        log.info("running the iseg release's diagnosis")
        _, seconds["iseg-diagnosis"] = run_release("iseg-diagnosis", args.iseg_python, args.iseg_repo.resolve(),
                                                   args.work)
    commands["iseg-diagnosis"] = " ".join(release_command("iseg-diagnosis", args.iseg_python,
                                                          args.iseg_repo.resolve(), args.work))
    backbone = project_backbone(args.work)
    log.info("running this project")
    with np.load(args.work / "iseg_diagnosis_release.npz", allow_pickle=False) as theirs:
        diagnosis = diagnose_iseg(backbone, args.work, inputs, dict(theirs))
    rows = []
    for release, run in (("iseg", lambda: project_iseg(backbone, args.work, inputs)),
                         ("ovam", lambda: project_ovam(backbone, inputs))):
        cached = args.work / f"{release}_project.npz"
        if release not in args.reuse or not cached.exists():
            np.savez(cached, **run())
        with np.load(args.work / f"{release}_release.npz", allow_pickle=False) as theirs, \
                np.load(cached, allow_pickle=False) as ours:
            rows += compare(inputs, dict(theirs), dict(ours), release)
    import pandas as pd

    args.out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out / "peers.csv", index=False, float_format="%.6g")
    report = {
        "repositories": {"iseg": {"url": "https://github.com/linsun449/iseg.code", "commit": git_commit(args.iseg_repo)},
                         "ovam": {"url": "https://github.com/vpulab/ovam", "commit": git_commit(args.ovam_repo)}},
        "versions": {"iseg": versions(args.iseg_python), "ovam": versions(args.ovam_python),
                     "project": versions(sys.executable)},
        "commands": {"driver": "python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:]),
                     **commands},
        "pipeline": {"layout": "SD 2.1-base at toy width (bench.peers.tiny_sd21_pipeline)", "seed": SEED,
                     "heads": list(HEADS), "latent": 64, "image": 512},
        "inputs": inputs, "iseg_project_options": {s["name"]: {**ISEG_COMMON, **s["project"]} for s in ISEG_SETTINGS},
        "seconds": seconds, "iseg_diagnosis": diagnosis, "rows": rows,
    }
    (args.out / "peers.json").write_text(json.dumps(report, indent=1) + "\n")
    for row in rows:
        log.info("%s", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
