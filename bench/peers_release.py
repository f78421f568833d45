"""The released pipelines' side of the peer comparison (bench.peers): run inside the release's own environment
(its own venv and pins), it imports the fetched repository from the path given and runs the release's code on
the inputs bench.peers prepared, writing maps and masks to an .npz (no pickles).

    python bench/peers_release.py iseg --repo /scratch/iseg.code --work WORK
    python bench/peers_release.py ovam --repo /scratch/ovam --work WORK
    python bench/peers_release.py iseg-diagnosis --repo /scratch/iseg.code --work WORK

It imports nothing of this project (the release environments do not have its dependencies). What it does besides
calling the release's code, each named in reports/peers/README.md:
- iSeg: the release's VOC loader is re-expressed in three lines (np.float32(img) / 255, cv2.resize to
  test_mask_size, HWC -> CHW; data/voc/voc_datasets.py + data/dataset.py), since importing it unpickles
  data/voc/cls_labels.npy and needs the VOC folder layout; `Tensor.cuda` is the identity when no GPU exists
  (iSeg.get_text_embedding moves the prompt's ids with `.cuda()`); the model is built with half=False (float32,
  as this project's CPU runs) and its hub id resolves, offline, to the tiny pipeline through HF_HOME.
- OVAM: the release's evaluation notebook's binarisation (experiments/evaluation/ovam_sa/
  evaluation_ovam_sa.ipynb: bilinear to 512, self-attention min-max scaled to [min_sa, 1],
  heatmap / heatmap.max() * sa > threshold) is re-expressed, since a notebook cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = str(Path(__file__).resolve().parent)


def _clean_path() -> None:
    # this folder holds modules (data/, config.py, ...) whose names the releases also use
    sys.path[:] = [p for p in sys.path if p not in (HERE, "")]


# -- iSeg (linsun449/iseg.code) ------------------------------------------------------------------------------------
def run_iseg(repo: Path, work: Path) -> dict[str, np.ndarray]:
    import torch

    sys.path[:0] = [str(repo / "wsss"), str(repo), str(repo / "base")]  # wsss/shell_main.sh: root on PYTHONPATH
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # get_text_embedding's .cuda() on a CPU machine
    import arguments  # wsss/arguments.py
    import iSeg as release  # wsss/iSeg.py (its iSeg subclasses base/iSeg.py's)

    inputs = json.loads((work / "inputs.json").read_text())
    out: dict[str, np.ndarray] = {}
    for setting in inputs["iseg_settings"]:
        parser = argparse.ArgumentParser()
        for add in (arguments.add_base_args, arguments.add_voc_dataset_args, arguments.add_train_args,
                    arguments.add_test_args, arguments.add_shell_args):
            parser = add(parser)
        config = parser.parse_args([])
        for key, value in setting["release"].items():  # the setting's overrides of the VOC defaults
            setattr(config, key, value)
        model = release.iSeg(config=config, half=False)
        model.on_test_start()
        captured: dict[str, object] = {}
        cam_to_label = release.cam_to_label

        def capture_cam(cam, cls_label, bkg_thre=0.3, cls_thre=0.4):
            # the class maps as cam_to_label normalises them, before its background rule
            flat = cam.flatten(2)
            flat = flat - flat.amin(-1, keepdim=True)
            captured["scores"] = (flat / (flat.amax(-1, keepdim=True) + 1e-6)).view_as(cam)  # noqa: B023 (called within this iteration)
            valid, labels = cam_to_label(cam, cls_label=cls_label, bkg_thre=bkg_thre, cls_thre=cls_thre)  # noqa: B023 (called within this iteration)
            captured["labels"] = labels  # noqa: B023 (called within this iteration)
            return valid, labels

        class ProbedDFC(release.DFC_KL):
            """The release's KL k-means, also run on its input moved by one float32 ulp: the share of pixels
            whose cluster that moves measures how far rounding decides the clustering."""

            def forward(self, x):
                cluster, n = super().forward(x)
                moved, _ = super().forward(torch.nextafter(x, torch.full_like(x, float("inf"))))
                same = (cluster[:, None] == cluster[None]) == (moved[:, None] == moved[None])  # same partition?
                captured["cluster_moved"] = float(1 - same.all(1).float().mean())  # noqa: B023 (called within this iteration)
                return cluster, n

        release.cam_to_label, dfc = capture_cam, release.DFC_KL
        release.DFC_KL = ProbedDFC
        for image in inputs["images"]:
            with torch.no_grad():
                model.test_step(release_batch(work, image, config.test_mask_size), 0)
            key = f"{setting['name']}/{image['name']}"
            classes = [c - 1 for c in image["ids"]]  # the release's cam has the 20 VOC classes, background apart
            out[key + "/scores"] = captured["scores"][0][classes].float().numpy()
            out[key + "/labels"] = captured["labels"][0].numpy().astype(np.int64)
            if "cluster_moved" in captured:
                out[key + "/cluster_moved"] = np.array(captured.pop("cluster_moved"))
        release.cam_to_label, release.DFC_KL = cam_to_label, dfc
    return out


def release_batch(work: Path, image: dict, size: int) -> tuple:
    """One image as the release's test_step takes it: (RGB resized to its test_mask_size in [0, 1], label, name)."""
    import cv2
    import torch

    rgb = np.load(work / image["file"])
    img = cv2.resize(rgb.astype(np.float32) / 255.0, dsize=(size, size))
    return (torch.from_numpy(img.transpose(2, 0, 1).copy())[None],
            torch.from_numpy(np.load(work / image["label"]).astype(np.int64))[None], [image["name"]])


def diagnose_iseg(repo: Path, work: Path) -> dict[str, np.ndarray]:
    """One image under one setting (inputs.json `iseg_diagnosis`), keeping what the release computes on the way:
    the prompt's embedding, the cross-attention of its 16x16 and 32x32 layers, the mean of heads 1 and 2 of its
    64x64 self-attention, and the fused token maps with the clusters its KL k-means gives them."""
    import torch

    sys.path[:0] = [str(repo / "wsss"), str(repo), str(repo / "base")]
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    import arguments
    import iSeg as release

    inputs = json.loads((work / "inputs.json").read_text())
    diagnosis = inputs["iseg_diagnosis"]
    setting = next(s for s in inputs["iseg_settings"] if s["name"] == diagnosis["setting"])
    image = next(i for i in inputs["images"] if i["name"] == diagnosis["image"])
    parser = argparse.ArgumentParser()
    for add in (arguments.add_base_args, arguments.add_voc_dataset_args, arguments.add_train_args,
                arguments.add_test_args, arguments.add_shell_args):
        parser = add(parser)
    config = parser.parse_args([])
    for key, value in setting["release"].items():
        setattr(config, key, value)
    model = release.iSeg(config=config, half=False)
    model.on_test_start()
    out: dict[str, np.ndarray] = {}
    sd = model.stable_diffusion
    get_attention_map = sd.get_attention_map

    def capture_maps():
        cross, self_maps = get_attention_map()
        out["cross16"], out["cross32"] = cross[16].float().numpy(), cross[32].float().numpy()
        out["self64_heads12"] = self_maps[64][:, [1, 2]].mean(1).flatten(-2, -1).permute(0, 2, 1)[0].float().numpy()
        return cross, self_maps

    class KeptDFC(release.DFC_KL):
        def forward(self, x):
            cluster, n = super().forward(x)
            out["fused"], out["clusters"] = x.float().numpy(), cluster.numpy()
            return cluster, n

    sd.get_attention_map, dfc = capture_maps, release.DFC_KL
    release.DFC_KL = KeptDFC
    with torch.no_grad():
        model.test_step(release_batch(work, image, config.test_mask_size), 0)
    release.DFC_KL = dfc
    out["embedding"] = model.test_t_embedding[0].float().numpy()
    return out


# -- OVAM (vpulab/ovam) --------------------------------------------------------------------------------------------
def notebook_binarise(heatmap: np.ndarray, sa: np.ndarray | None, threshold: float, min_sa: float,
                      size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """evaluation_ovam_sa.ipynb, per image: heat map and self-attention bilinear to `size`, the latter min-max
    scaled to [min_sa, 1], heatmap / heatmap.max() * sa > threshold (sa None: without the self-attention)."""
    import torch

    def interpolate(x):
        t = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=size, mode="bilinear")
        return t.squeeze().squeeze().numpy()

    heatmap = interpolate(heatmap)
    heatmap = heatmap / heatmap.max()
    if sa is not None:
        sa = interpolate(sa)
        sa = (sa - sa.min()) / (sa.max() - sa.min())
        sa = sa * (1 - min_sa) + min_sa
        heatmap = heatmap * sa
    return heatmap, heatmap > threshold


def run_ovam(repo: Path, work: Path) -> dict[str, np.ndarray]:
    import torch

    sys.path[:0] = [str(repo)]
    from diffusers import StableDiffusionPipeline
    from ovam import StableDiffusionHooker  # the self-attention hooker (ovam/__init__.py)
    from ovam.utils import set_seed

    inputs = json.loads((work / "inputs.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(work / "pipeline", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, np.ndarray] = {}
    for job in inputs["ovam"]:
        with StableDiffusionHooker(pipe, extract_self_attentions=True) as hooker:
            set_seed(job["seed"])  # as experiments/*/generate_*.py: the global RNG draws the initial latents
            image = pipe(job["prompt"], num_inference_steps=job["steps"], guidance_scale=job["guidance"]).images[0]
        out[f"{job['name']}/image"] = np.asarray(image)
        evaluator = hooker.get_ovam_callable(expand_size=None)  # per block bilinear to the latent size, summed
        sa = hooker.get_self_attention_map().float().numpy()  # generate_voc_sim_sa.py's extractor
        out[f"{job['name']}/sa"] = sa
        for name in job["names"]:
            text = job["attribution"].format(name=name)
            with torch.no_grad():
                maps = evaluator(text)[0].float().numpy()  # (tokens incl. SoT/EoT, 64, 64)
            ids = pipe.tokenizer(text).input_ids
            token = ids.index(pipe.tokenizer.convert_tokens_to_ids(name + "</w>"))
            heat = maps[token]
            out[f"{job['name']}/{name}/heat"] = heat
            size = tuple(job["size"])
            scores, mask = notebook_binarise(heat, sa, job["taus"][0], job["alpha"], size)
            out[f"{job['name']}/{name}/scores_sa"], out[f"{job['name']}/{name}/mask_sa"] = scores, mask
            for tau in job["taus"]:  # without the self-attention map: the heat map's own binarisation
                scores, mask = notebook_binarise(heat, None, tau, job["alpha"], size)
                out[f"{job['name']}/{name}/scores_nosa"] = scores.astype(np.float32)
                out[f"{job['name']}/{name}/mask_nosa_{tau}"] = mask
    return out


def main(argv: list[str] | None = None) -> int:
    _clean_path()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", choices=("iseg", "ovam", "iseg-diagnosis"))
    parser.add_argument("--repo", type=Path, required=True, help="the fetched repository (its root)")
    parser.add_argument("--work", type=Path, required=True, help="bench.peers' work folder (inputs.json)")
    args = parser.parse_args(argv)
    run = {"iseg": run_iseg, "ovam": run_ovam, "iseg-diagnosis": diagnose_iseg}[args.release]
    out = run(args.repo.resolve(), args.work.resolve())
    np.savez(args.work / f"{args.release.replace('-', '_')}_release.npz", **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
