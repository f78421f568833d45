"""Does the embedded model's attention localise the objects its caption names?

    python -m bench.embedded.evaluate --model bench/embedded/weights [--num-images 100] [--t 200]
    python -m bench.embedded.evaluate --model DIR --num-images 0 --main-job sweeps/iseg_lambda.yaml  # main job only

Inversion mode on held-out `shapes` val images at the model's native resolution: image -> VAE posterior mean
-> noised to timestep t with a fixed seed -> one UNet pass with the caption. For each object, the
head-averaged cross-attention map of its shape word (its own token position in the caption), upsampled and
summed over the cross-attention layers at the two finest attention resolutions, is compared with the
object's pixel mask:
  raw      thresholded at 0.4 x max (and the best of a few fixed thresholds, chosen on the whole set);
  refined  the same map propagated by the last decoder self-attention (`LayerMap.decoder_self(-1)`);
baselines: the whole image; a centred disk (best radius of a few).
Binding rate: in two-object images, the share of objects whose word map puts more mass on its own object
than on the other one. Attention is recorded with the bench's own tracer (`bench.capture.AttentionTracer`).

`--main-job SWEEP` also scores a sweep file's configurations on the model the way the bench does (the engine's
`evaluate_batch` in this process, no Ray): mIoU and the share of labels decided by tie-breaking (`tied`), per
configuration. `--generate N` samples N test captions and checks them (`generation_check`). `--device cuda` runs
it all on a GPU (the numbers then differ from CPU runs in the last digits).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger("bench.embedded.evaluate")
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def token_positions(tokenizer, caption: str, objects: list[dict]) -> list[int]:
    """Token index of each object's shape word (objects appear in caption order, one word each)."""
    ids = tokenizer(caption).input_ids
    out, start = [], 0
    for obj in objects:
        word_id = tokenizer.convert_tokens_to_ids(obj["shape"] + "</w>")
        k = ids.index(word_id, start)
        out.append(k)
        start = k + 1
    return out


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def normalise(m: np.ndarray, how: str = "max") -> np.ndarray:
    """"max": divide by the maximum (thresholds are fractions of the max, as specified);
    "minmax": subtract the minimum first (a near-uniform map still spreads over [0, 1])."""
    if how == "minmax":
        m = m - m.min()
    return m / m.max() if m.max() > 0 else m


@torch.no_grad()
def evaluate(model: Path, num_images: int = 100, t: int = 200, seed: int = 0, data_seed: int = 0,
             device: str = "cpu") -> dict:
    from bench.data.shapes import ShapesDataset
    from bench.data.shapes_gt import object_masks
    from bench.models import load_pipeline_folder
    from bench.models.layers import LayerMap
    from bench.capture import AttentionTracer, attention_layers, request

    bb = load_pipeline_folder(Path(model), torch.device(device), torch.float32, name="embedded-eval")
    size = bb.resolution
    cross_layers = [n for n, kind in attention_layers(bb.unet).items() if kind == "cross"]
    self_layer = LayerMap(bb.unet).decoder_self(-1)
    req = request(cross=cross_layers, self_attn=[self_layer])
    ds = ShapesDataset(num_images=num_images, size=size, seed=data_seed, split="val")
    gen = torch.Generator().manual_seed(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disks = {r: np.hypot(xx - size / 2, yy - size / 2) < r * size for r in (0.15, 0.2, 0.25, 0.3, 0.35)}
    rows = []  # one per object
    binding = {"raw": [], "refined": []}
    binding_same = {"raw": [], "refined": []}
    for i in tqdm(range(len(ds)), desc="evaluate", unit="img", mininterval=2.0):
        sample = ds[i]
        objects = sample.extra["objects"]
        masks = object_masks(objects, size)
        latents = bb.encode_images([sample.image], size)
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        tt = torch.tensor([t], device=latents.device)
        noisy = bb.scheduler.add_noise(latents, noise, tt)
        with AttentionTracer(bb.unet, req) as tracer:
            bb.unet(noisy, tt, encoder_hidden_states=bb.encode_text([sample.caption]))
        trace = tracer.traces([sample.caption], bb.tokenize([sample.caption]))[0]
        store = {name: trace.cross[name][0, 0].float().cpu() for name in cross_layers}  # (h, w, T), heads averaged
        res = {name: m.shape[0] for name, m in store.items()}
        finest = sorted(set(res.values()), reverse=True)[:2]
        cross = torch.zeros(size, size, store[cross_layers[0]].shape[-1])
        cross_finest = torch.zeros_like(cross)
        cross_native = None  # summed maps at the finest resolution, for the refinement
        for name, r in res.items():
            if r not in finest:
                continue
            m = store[name].permute(2, 0, 1)[:, None]  # (T, 1, r, r)
            up = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[:, 0].permute(1, 2, 0)
            cross += up
            if r == finest[0]:
                cross_finest += up
            m_fine = F.interpolate(m, size=(finest[0], finest[0]), mode="bilinear", align_corners=False)
            cross_native = m_fine if cross_native is None else cross_native + m_fine
        self_attn = trace.self_attn[self_layer][0, 0].float().cpu()  # (N, N) rows: queries
        n_fine = round(self_attn.shape[0] ** 0.5)
        a = cross_native[:, 0].reshape(cross_native.shape[0], -1)  # (T, N)
        refined = (self_attn @ a.T).T.reshape(-1, 1, n_fine, n_fine)
        refined = F.interpolate(refined, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        positions = token_positions(bb.tokenizer, sample.caption, objects)
        maps = {}
        for how, suffix in (("max", ""), ("minmax", "_minmax")):
            maps["raw" + suffix] = [normalise(cross[..., k].numpy(), how) for k in positions]
            maps["refined" + suffix] = [normalise(refined[k].numpy(), how) for k in positions]
            maps["raw_finest_only" + suffix] = [normalise(cross_finest[..., k].numpy(), how) for k in positions]
        for j, (obj, gt) in enumerate(zip(objects, masks)):
            row = {"image": i, "n_objects": len(objects), "shape": obj["shape"],
                   "whole": iou(np.ones_like(gt), gt), **{f"disk{r}": iou(d, gt) for r, d in disks.items()}}
            for kind in maps:
                for th in THRESHOLDS:
                    row[f"{kind}@{th}"] = iou(maps[kind][j] >= th, gt)
            rows.append(row)
        if len(objects) == 2:
            same = objects[0]["colour"] == objects[1]["colour"]
            for kind in ("raw", "refined"):  # binding does not depend on the normalisation
                for j in range(2):
                    m = maps[kind][j]
                    ok = float((m * masks[j]).sum() > (m * masks[1 - j]).sum())
                    binding[kind].append(ok)
                    if same:
                        binding_same[kind].append(ok)

    def mean(key, subset=rows):
        return float(np.mean([r[key] for r in subset]))

    report = {"model": str(model), "resolution": size, "t": t, "num_images": num_images,
              "num_objects": len(rows), "iou": {}}
    for kind in ("raw", "refined", "raw_minmax", "refined_minmax", "raw_finest_only",
                 "raw_finest_only_minmax"):
        best = max(THRESHOLDS, key=lambda th: mean(f"{kind}@{th}"))
        report["iou"][f"{kind}@0.4"] = mean(f"{kind}@0.4")
        report["iou"][f"{kind}@best"] = {"threshold": best, "iou": mean(f"{kind}@{best}")}
        if "_" in kind:
            continue
        report["iou"][f"{kind}@0.4_by_n_objects"] = {
            n: mean(f"{kind}@0.4", [r for r in rows if r["n_objects"] == n]) for n in (1, 2, 3)
            if any(r["n_objects"] == n for r in rows)}
    best_disk = max(disks, key=lambda r: mean(f"disk{r}"))
    report["baselines"] = {"whole_image": mean("whole"),
                           "centred_disk": {"radius": best_disk, "iou": mean(f"disk{best_disk}")}}
    report["binding"] = {kind: {"rate": float(np.mean(v)) if v else None, "objects": len(v)}
                         for kind, v in binding.items()}
    report["binding_same_colour"] = {kind: {"rate": float(np.mean(v)) if v else None, "objects": len(v)}
                                     for kind, v in binding_same.items()}
    report["iou_by_shape_raw@0.4"] = {s: mean("raw@0.4", [r for r in rows if r["shape"] == s])
                                      for s in sorted({r["shape"] for r in rows})}
    return report


@torch.no_grad()
def generation_check(model: Path, num_images: int = 20, steps: int = 25, guidance: float = 4.0,
                     seed: int = 0, device: str = "cpu") -> dict:
    """Sample val captions with DDIM + classifier-free guidance; share accepted by `generated_ground_truth`."""
    from bench.data.shapes import ShapesDataset
    from bench.data.shapes_gt import generated_ground_truth
    from bench.models import load_pipeline_folder

    bb = load_pipeline_folder(Path(model), torch.device(device), torch.float32, name="embedded-eval")
    size = bb.resolution
    ds = ShapesDataset(num_images=num_images, size=size, seed=1, split="test")
    gen = torch.Generator().manual_seed(seed)
    sched = bb.scheduler
    sched.set_timesteps(steps)
    latent = bb.unet.config.sample_size
    uncond = bb.encode_text([""])
    reasons, images = [], []
    for i in tqdm(range(len(ds)), desc="generate", unit="img", mininterval=2.0):
        caption = ds[i].caption
        cond = bb.encode_text([caption])
        x = torch.randn((1, 4, latent, latent), generator=gen).to(device)
        for t in sched.timesteps:
            out = bb.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            u, c = out.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
        img = bb.vae.decode(x / bb.vae.config.scaling_factor).sample[0]
        img = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        images.append(img)
        _, why = generated_ground_truth(img, caption)
        reasons.append(why)
    return {"num_images": num_images, "steps": steps, "guidance": guidance,
            "accepted": sum(r is None for r in reasons) / len(reasons),
            "reasons": [r for r in reasons if r], "images": images, "captions": [ds[i].caption for i in range(len(ds))]}


@torch.no_grad()
def main_job(model: Path, sweep: Path, overrides: list[str] = (), device: str = "cpu") -> dict:
    """A sweep file's configurations scored on `model` as the bench scores them (its dataset, metric protocol,
    seeds and forward grouping; the engine's `evaluate_batch` in this process): per configuration the swept
    values, mIoU and `tied`, the percentage of labels decided by tie-breaking (`bench.metrics.tied_percent`)."""
    from bench.config import compose
    from bench.data import build_dataset
    from bench.evaluate import evaluate_batch
    from bench.metrics import summarize, tied_percent
    from bench.models import load_pipeline_folder
    from bench.plan import make_plan
    from methods import METHODS

    cfg = compose(sweep, list(overrides))
    if cfg.model.name != "embedded":
        raise ValueError(f"{sweep} runs on model {cfg.model.name!r}; --main-job scores embedded-model sweeps")
    plan = make_plan(cfg)
    if plan.fits:
        raise ValueError(f"{sweep} trains its method; --main-job scores training-free sweeps")
    bb = load_pipeline_folder(Path(model), torch.device(device), torch.float32, name="embedded")
    cls = METHODS.get(cfg.method)
    method = cls(bb)
    dataset = build_dataset(cfg.data)
    rows, batch = [], int(cfg.ray.batch_size)  # the engine's batches: batching changes float sums, so labels
    for group in plan.groups:                    # decided by ties can change with it
        totals, ties = [0] * len(group.trials), []
        for start in tqdm(range(0, len(dataset), batch), desc=f"{cfg.name} seed {group.seed}", unit="batch"):
            samples = [dataset[i] for i in range(start, min(len(dataset), start + batch))]
            hists, _ = evaluate_batch(method, dataset, samples, group, protocol=cfg.metric.protocol, ties=ties)
            for k, hist in enumerate(hists):  # sample-major
                totals[k % len(group.trials)] += hist
        per_trial = np.asarray(ties).reshape(-1, len(group.trials), 2)
        for j, (trial, total) in enumerate(zip(group.trials, totals)):
            rows.append({"trial": trial.trial_id, "seed": group.seed, **trial.swept,
                         "mIoU": summarize(total, dataset.classes, cfg.metric.protocol)["mIoU"],
                         "tied": tied_percent(per_trial[:, j])})
    return {"sweep": str(sweep), "overrides": list(overrides), "images": len(dataset),
            "protocol": cfg.metric.protocol, "device": device, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--t", type=int, nargs="+", default=[200])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generate", type=int, default=0, help="also sample N images and check them")
    parser.add_argument("--grid", type=Path, default=None, help="save generated samples as a PNG grid")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    parser.add_argument("--main-job", type=Path, default=None,
                        help="also score this sweep file's configurations on the model (mIoU, tied labels)")
    parser.add_argument("--main-job-override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the --main-job sweep (e.g. data.limit=40)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model} is not a pipeline folder (no model_index.json)")
    if args.main_job is not None and not args.main_job.is_file():
        parser.error(f"--main-job {args.main_job} not found; give a sweep file such as sweeps/iseg_lambda.yaml")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible; use --device cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    reports = [evaluate(args.model, args.num_images, t, args.seed, device=args.device) for t in args.t
               if args.num_images > 0]
    out = {"inversion": reports}
    if args.main_job is not None:
        out["main_job"] = main_job(args.model, args.main_job, args.main_job_override, args.device)
    if args.generate:
        gen = generation_check(args.model, args.generate, seed=args.seed, device=args.device)
        if args.grid:
            from PIL import Image
            ims = gen["images"]
            cols = min(8, len(ims))
            rows = (len(ims) + cols - 1) // cols
            s = ims[0].shape[0]
            grid = np.zeros((rows * s, cols * s, 3), np.uint8)
            for k, im in enumerate(ims):
                grid[(k // cols) * s:(k // cols + 1) * s, (k % cols) * s:(k % cols + 1) * s] = im
            Image.fromarray(grid).save(args.grid)
        out["generation"] = {k: v for k, v in gen.items() if k not in ("images",)}
    text = json.dumps(out, indent=2)
    log.info("report:\n%s", text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
