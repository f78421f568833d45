"""Qualitative figures (iSeg Fig. 7): image | ground truth | score map | mask per configuration.

File format, written by the engine through `save_qualitative` for the first `report.qualitative` images:
`<run>/qualitative/<image key>.g<forward group>.npz` (one file per image and forward group, so workers never
write the same file), plain arrays, no pickles:
    image_id         0-d str        the dataset's image id
    image            (H, W, 3) uint8 RGB as fed to the method
    label            (H, W) uint8   ground truth (uint16 when the dataset has more than 255 classes)
    ignore_index     0-d int64      the label value that is not evaluated (255, or 65535 for uint16 layouts)
    class_names      (C,) str       the dataset's classes, index = class id
    prompt           0-d str        the prompt of this forward group ("" if none)
    seed             0-d int64      the group's noise seed
    trials           (K,) str       trial ids (rows of results.parquet) of the group's configurations
    score_class_ids  (S,) int64     the class id of each score channel (the classes queried for this image)
    scores           (K, S, h, w) float16 per-class score maps in [0, 1], area-averaged to at most SCORE_SIDE
                     pixels a side (a figure panel is ~150 px; full-size maps of every configuration made
                     saving cost more than scoring: 24 configurations x 512 px, 9 of a K = 24 run's 43 s)
    preds            (K, H, W) uint8 predicted label maps (class ids; uint16 like label)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

QUALITATIVE_DIR = "qualitative"
SCORE_SIDE = 128
# largest side of an image or label map drawn in a figure panel (~170 px at the figure's size and dpi): matplotlib
# resamples whatever it is given to the panel, and at 512 px that resampling was a third of a small run's report
PANEL_SIDE = 256


def _score_maps(x) -> np.ndarray:
    """(S, h, w) float16 score maps, area-averaged to at most SCORE_SIDE a side (aspect kept)."""
    import torch
    import torch.nn.functional as F

    t = x.detach().cpu().float() if hasattr(x, "detach") else torch.as_tensor(np.asarray(x), dtype=torch.float32)
    h, w = t.shape[-2:]
    scale = SCORE_SIDE / max(h, w)
    if scale < 1 and t.ndim == 3 and t.numel():
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        t = F.interpolate(t[None], size=size, mode="area")[0]
    return t.numpy().astype(np.float16)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _key(image_id: str) -> str:
    """A file name for an image id, injective: characters outside [A-Za-z0-9_.-] (and a leading '.') are
    percent-encoded ('a b' -> 'a%20b', never 'a_b'); an id whose name would pass 80 characters is cut there and
    followed by '~' (which no encoded name holds) and a hash of the whole id."""
    key = quote(str(image_id), safe="").replace("~", "%7E")
    if key.startswith("."):
        key = "%2E" + key[1:]
    if len(key) > 80:
        key = key[:80] + "~" + hashlib.blake2b(str(image_id).encode(), digest_size=8).hexdigest()
    return key or "%"


def save_qualitative(directory: str | Path, sample, class_names: list[str], trials: list[str], predictions,
                     query_ids: list[int], seed: int, group: int = 0, prompt: str = "") -> Path:
    """Write one image's predictions for the configurations of one forward group (see the module docstring).

    sample: has .image_id, .image (H, W, 3) and .label (H, W); predictions: one per trial, each with
    .scores (len(query_ids), h, w) and .labels (H, W) (torch tensors or arrays). The file appears atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name, arrays = qualitative_arrays(sample, class_names, trials, predictions, query_ids, seed, group, prompt)
    final = directory / name
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill: no partial file stays behind
        raise
    return final


def qualitative_arrays(sample, class_names: list[str], trials: list[str], predictions, query_ids: list[int],
                       seed: int, group: int = 0, prompt: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """The file name and arrays of one image's qualitative record (see the module docstring); what a tracing
    worker sends back to the driver, which writes it into the run (bench.stages.trace)."""
    if len(predictions) != len(trials):
        raise ValueError(f"{len(predictions)} predictions for {len(trials)} trials")
    scores = [_score_maps(p.scores) for p in predictions]
    shape = max((s.shape for s in scores), key=lambda t: t[-1] * t[-2]) if scores else (0, 1, 1)
    scores = np.stack([s if s.shape == shape else _resize_scores(s, shape) for s in scores]) if scores \
        else np.zeros((0, 0, 1, 1), np.float16)
    # 459/847-class layouts label with uint16 and ignore 65535: a uint8 cast would wrap their ids
    ignore = int(getattr(sample, "ignore_index", 255))
    dtype = np.uint8 if len(class_names) <= 255 and ignore == 255 else np.uint16
    preds = np.stack([_numpy(p.labels).astype(dtype) for p in predictions]) if predictions \
        else np.zeros((0, *np.shape(sample.label)), dtype)
    arrays = {"image_id": np.array(str(sample.image_id)), "image": np.asarray(sample.image, dtype=np.uint8),
              "label": np.asarray(sample.label).astype(dtype), "ignore_index": np.array(ignore, dtype=np.int64),
              "class_names": np.array([str(c) for c in class_names]),
              "prompt": np.array(str(prompt or "")), "seed": np.array(int(seed), dtype=np.int64),
              "trials": np.array([str(t) for t in trials]), "score_class_ids": np.array(query_ids, dtype=np.int64),
              "scores": scores, "preds": preds}
    return f"{_key(sample.image_id)}.g{int(group):03d}.npz", arrays


def qualitative_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A qualitative record as the .npz file's bytes (compressed, plain arrays, no pickles)."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _resize_scores(s: np.ndarray, shape: tuple) -> np.ndarray:
    out = np.zeros(shape, np.float16)
    for k in range(min(len(s), shape[0])):
        yy = (np.arange(shape[1]) * s.shape[1] // shape[1])
        xx = (np.arange(shape[2]) * s.shape[2] // shape[2])
        out[k] = s[k][np.ix_(yy, xx)]
    return out


@dataclass
class QualImage:
    image_id: str
    image: np.ndarray
    label: np.ndarray
    class_names: list[str]
    ignore_index: int = 255
    prompts: dict = field(default_factory=dict)  # (trial, seed) -> prompt
    entries: dict = field(default_factory=dict)  # (trial, seed) -> (scores (S,h,w), class ids (S,), pred (H,W))


def load_qualitative(run_dir: str | Path) -> list[QualImage]:
    """Every saved image, in file-name order; unreadable files are skipped."""
    folder = Path(run_dir) / QUALITATIVE_DIR
    images: dict[str, QualImage] = {}
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - a figure is not worth failing a report for
            continue
        image_id = str(d["image_id"])
        ignore = int(d["ignore_index"]) if "ignore_index" in d else 255  # files written before it was recorded
        q = images.setdefault(image_id, QualImage(image_id, d["image"], d["label"], [str(c) for c in d["class_names"]],
                                                  ignore))
        for k, trial in enumerate(d["trials"]):
            key = (str(trial), int(d["seed"]))
            q.entries[key] = (d["scores"][k].astype(np.float32), d["score_class_ids"], d["preds"][k])
            q.prompts[key] = str(d["prompt"])
    return list(images.values())


def for_panel(array: np.ndarray, nearest: bool) -> np.ndarray:
    """An image (H, W, 3) or label map (H, W) reduced by an integer factor to at most PANEL_SIDE a side:
    labels by taking every f-th pixel (ids are not averaged), images by averaging f x f blocks."""
    h, w = array.shape[:2]
    f = -(-max(h, w) // PANEL_SIDE)
    if f <= 1:
        return array
    if nearest:
        return array[::f, ::f]
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).reduce(f))


def palette(n: int) -> np.ndarray:
    """PASCAL VOC's colour map (class 0 black), (n, 3) uint8."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(len(out)):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colorize(label: np.ndarray, n: int, ignore_index: int = 255) -> np.ndarray:
    """RGB image of a label map: VOC colours per id, white where ignored."""
    ignored = label == ignore_index
    pal = palette(max(n, int(label[~ignored].max(initial=0)) + 1))
    out = pal[np.where(ignored, 0, label)]
    out[ignored] = (255, 255, 255)
    return out


def pick_configurations(summary, limit: int = 4) -> list[str]:
    """Trials to show: all when few, else the best, the first (baseline row), the worst; in table order."""
    trials = list(summary["trial"])
    if len(trials) <= limit:
        return trials
    means = summary["mean"].to_numpy(dtype=float)
    chosen = {trials[int(np.nanargmax(means))], trials[0], trials[int(np.nanargmin(means))]}
    return [t for t in trials if t in chosen]


def qualitative_figure(run_dir: str | Path, summary, out_path: Path, title: str = "", max_images: int = 4):
    """Render the figure; returns (path, caption) or None when the run saved no qualitative data."""
    from bench.reporting.plots import _plt, tx

    images = load_qualitative(run_dir)[:max_images]
    if not images or not len(summary):
        return None
    labels = dict(zip(summary["trial"], summary["label"]))
    trials = [t for t in pick_configurations(summary) if any(t == k[0] for q in images for k in q.entries)]
    if not trials:
        return None
    plt = _plt()
    from matplotlib.patches import Patch

    ncol = 2 + 2 * len(trials)
    fig, axes = plt.subplots(len(images), ncol, figsize=(1.55 * ncol, 1.65 * len(images) + 0.9), squeeze=False)
    captions, present = [], set()
    for i, q in enumerate(images):
        n = len(q.class_names)
        fg = [c for c in np.unique(q.label) if c not in (0, q.ignore_index)]
        present.update(int(c) for c in np.unique(q.label) if c != q.ignore_index)
        axes[i, 0].imshow(for_panel(q.image, nearest=False))
        axes[i, 1].imshow(colorize(for_panel(q.label, nearest=True), n, q.ignore_index), interpolation="nearest")
        shown_class = None
        for k, trial in enumerate(trials):
            key = next((kk for kk in sorted(q.entries) if kk[0] == trial), None)
            ax_s, ax_m = axes[i, 2 + 2 * k], axes[i, 3 + 2 * k]
            if key is None:
                ax_s.text(0.5, 0.5, "not saved", ha="center", va="center", fontsize=7)
                ax_m.text(0.5, 0.5, "not saved", ha="center", va="center", fontsize=7)
                continue
            scores, ids, pred = q.entries[key]
            ids = [int(c) for c in ids]
            if shown_class is None:
                areas = {int(c): int((q.label == c).sum()) for c in fg}
                shown_class = next((c for c in sorted(areas, key=lambda c: -areas[c]) if c in ids),
                                   ids[0] if ids else None)
            if shown_class is not None and shown_class in ids:
                ax_s.imshow(scores[ids.index(shown_class)], cmap="jet", vmin=0, vmax=1, interpolation="bilinear")
            present.update(int(c) for c in np.unique(pred) if c != q.ignore_index)
            ax_m.imshow(colorize(for_panel(pred, nearest=True), n, q.ignore_index), interpolation="nearest")
        cname = q.class_names[shown_class] if shown_class is not None and shown_class < n else "?"
        axes[i, 0].set_ylabel(tx(_lines(q.image_id, 14)), fontsize=7)
        prompts = sorted({p for p in q.prompts.values() if p})
        captions.append(f"row {i + 1}: image {q.image_id!s}, score maps of class '{cname}'"
                        + (f", prompt '{prompts[0]}'" if prompts else ""))
        for k in range(len(trials)):
            axes[i, 2 + 2 * k].set_xlabel(tx(_short(cname, 16)), fontsize=6)
    heads = ["image", "ground truth"]
    for t in trials:
        heads += [f"score\n{_short(labels.get(t, t), 18)}", f"mask\n{_short(labels.get(t, t), 18)}"]
    for j, h in enumerate(heads):
        axes[0, j].set_title(tx(h), fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    names = images[0].class_names
    pal = palette(len(names)) / 255.0
    handles = [Patch(color=pal[c], label=tx(_short(names[c], 20))) for c in sorted(present) if c < len(names)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(tx(title), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(out_path, dpi=130, metadata={"Software": None})
    plt.close(fig)
    seeds = sorted({k[1] for q in images for k in q.entries})
    caption = ("Qualitative results (seed " + ", ".join(map(str, seeds[:1])) + "): image | ground truth | "
               "score map (jet, 0 to 1) and mask per configuration. " + "; ".join(captions) + ".")
    return out_path, caption


def _lines(text: str, n: int, lines: int = 2) -> str:
    """An image id on up to `lines` lines of `n` characters, broken after '-', '_' or '/' where it can be (ids
    like voc_sim-circle-00000 stay whole); cut with '…' only past that."""
    import re

    out, line = [], ""
    for piece in re.findall(r"[^-_/]+[-_/]?|[-_/]", str(text)):
        if line and len(line) + len(piece) > n:
            out.append(line)
            line = ""
        line += piece
    out.append(line)
    out = [_short(x, n) for x in out]
    return "\n".join(out if len(out) <= lines else out[:lines - 1] + [_short("".join(out[lines - 1:]), n)])


def _short(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"
