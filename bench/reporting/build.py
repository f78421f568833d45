"""Assemble a run's (or several runs') report from tables, figures and provenance, and write it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from bench.reporting.backbones import backbone_blocks
from bench.reporting.dataset_card import dataset_card_blocks
from bench.reporting.fits import fits_table, load_fits, loss_figure
from bench.reporting.model import PROTOCOL_TEXT, RunData, fmt_value, summarize_run
from bench.reporting.plots import Figure, class_bars, figures_for_run, overlay_plot
from bench.reporting.qualitative import qualitative_figure
from bench.reporting.render import Code, Defs, Heading, Para, to_html, to_markdown
from bench.reporting.model import SEEN_UNSEEN_COLUMNS
from bench.reporting.tables import (combined_class_table, combined_table, details_table, main_table, per_class_table,
                                   seen_unseen_table)
from bench.results import config_hash, schema_version


def _get(d: dict, *keys, default="–"):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def backbone_label(prov: dict) -> str:
    """The backbone family, and a warning where its weights are random (run.json `backbone`; a sweep over models:
    each backbone's, `backbones`)."""
    several = prov.get("backbones")
    if isinstance(several, dict) and several:
        return "; ".join(f"{label}: {backbone_label({'backbone': info})}" for label, info in several.items())
    backbone = prov.get("backbone") or {}
    if not backbone:
        return "–"
    text = str(backbone.get("family", "–"))
    if backbone.get("random_weights"):
        text += " — RANDOM WEIGHTS: these numbers test the plumbing only; draw no conclusion from them"
    return text


def provenance_pairs(run: RunData) -> list[tuple[str, str]]:
    cfg, prov = run.cfg, run.prov
    data = prov.get("dataset") or {}
    model = cfg.get("model") or {}
    model_bits = [f"{k}={fmt_value(v)}" for k, v in model.items() if v not in (None, "", False, 0)]
    if cfg.get("models"):  # a sweep over models: the entries replace name / path / id
        model_bits = [f"models={', '.join(map(str, cfg['models']))}",
                      *(b for b in model_bits if b.split("=", 1)[0] not in ("name", "path", "id"))]
    data_cfg = cfg.get("data") or {}
    n_img = data.get("num_images", prov.get("num_images"))
    wall, trace = prov.get("wall_seconds"), prov.get("trace_seconds")
    per_img = f"{n_img / trace:.3g} images/s" if isinstance(n_img, (int, float)) and trace else "–"
    classes = run.classes
    pairs = [
        ("sweep", f"{run.name} ({cfg.get('sweep_file', '–')})"),
        ("method", str(cfg.get("method"))),
        ("model", ", ".join(model_bits) or "–"),
        ("backbone", backbone_label(prov)),
        ("dataset", str(data.get("name", data_cfg.get("name", "–")))),
        ("dataset root", str(data.get("root") or data_cfg.get("root") or "none (generated in memory)")),
        ("dataset split", str(data.get("split") or data_cfg.get("split") or "–")),
        ("images", f"{n_img}" + (f" (data.limit={data_cfg['limit']})" if data_cfg.get("limit") else "")),
        ("classes", f"{len(classes)}: " + ", ".join(classes)),
        ("metric protocol", f"{run.protocol}: {PROTOCOL_TEXT.get(run.protocol, 'unknown protocol')}"),
        ("seeds", ", ".join(fmt_value(s) for s in (prov.get("seeds") or cfg.get("seeds") or [])) or "–"),
        ("configurations / forward settings", f"{prov.get('num_trials', '–')} / {prov.get('num_forward_settings', '–')}"),
        ("UNet passes", str(prov.get("unet_passes", "–"))),
        ("fits (trained / reused)", f"{prov['fits']} ({prov.get('fits_trained', 0)} / {prov.get('fits_reused', 0)})"
                                    if "fits" in prov else "–"),
        ("method versions", ", ".join(f"{k} {v}" for k, v in (prov.get("method_versions") or {}).items()) or "–"),
        ("run schema", str(prov.get("schema_version", 1))),
        ("wall time", f"{wall} s" if wall is not None else "–"),
        ("tracing time", f"{trace} s, {per_img}, {prov.get('images_per_second', '–')} image-passes/s "
                         f"(images × forward settings)" if trace else "–"),
        ("bootstrap draws", str(_get(cfg, "report", "bootstrap"))),
        ("overrides", " ".join(map(str, prov.get("overrides") or cfg.get("overrides") or [])) or "none"),
        ("config hash", str(prov.get("config_hash", "–")) + " (sha256 of the resolved config without "
                        "output_dir, first 16 hex digits)"),
        ("git", str(prov.get("git_sha", "not recorded"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()) or "–"),
        ("devices", ", ".join(prov.get("devices") or []) or "–"),
        ("platform", str(prov.get("platform", "–"))),
        ("finished", str(prov.get("finished", "–"))),
    ]
    search = prov.get("search")
    if search:  # adaptive search (bench.search): every row is a searched configuration
        pairs.insert(12, ("search", f"{search.get('algo')} with {search.get('scheduler', 'ASHA')} over images (grace {search.get('grace_images')}, "
                                    f"reduction factor {search.get('reduction_factor')}): {prov.get('num_trials')} "
                                    f"configurations searched, {search.get('pairs_scored')} (configuration × image) "
                                    f"pairs scored; each row's metrics cover its images_scored images"))
    if run.path is not None:
        # While the engine writes the report the run still lives under <run>.partial; name the final place.
        final = run.cfg.get("output_dir") if run.path.name.endswith(".partial") else None
        pairs.append(("run directory", str(Path(final).resolve()) if final else str(run.path.resolve())))
    return pairs


def _hash_check(run: RunData) -> str | None:
    """A warning when config.yaml no longer matches the hash recorded at run time."""
    recorded = run.prov.get("config_hash")
    if not recorded or not run.extra.get("loaded"):
        return None
    try:
        now = config_hash(run.cfg, schema_version(run.prov))
    except Exception:  # noqa: BLE001 (a config the current code cannot hash gets no verdict; the report still builds)
        return None
    if now != recorded:
        return (f"config.yaml hashes to {now}, but the run recorded {recorded}: the file was edited after the "
                f"run, so the configuration shown may not be the one that produced these numbers.")
    return None


# Above this share of tied cells a configuration's labels are partly the tie-breaking's: a few percent of the
# pixels changing class moves mIoU by points on these benchmarks (iSeg at N = 10 on the embedded model: 72%).
TIED_WARN = 5.0


def tie_warning(summary: pd.DataFrame) -> str | None:
    from methods.maps import TIE

    """A warning naming the configurations whose labels tie-breaking decided on more than TIED_WARN% of the
    class-score cells (bench.metrics.tied_percent), or None."""
    if "tied" not in summary.columns:
        return None
    tied = pd.to_numeric(summary["tied"], errors="coerce")
    over = summary[tied > TIED_WARN]
    if not len(over):
        return None
    worst = over.loc[tied[over.index].idxmax()]
    names = "; ".join(str(x) for x in over["label"].head(6)) + ("; ..." if len(over) > 6 else "")
    return (f"Labels without margin: in {len(over)} of {len(summary)} configurations ({names}) more than "
            f"{TIED_WARN:g}% of the class-score cells of multi-class images have their two best classes within "
            f"{TIE:g} (most: {float(worst['tied']):.1f}% at {worst['label']}); the tie rule (or, under "
            f"tie_rule=argmax, rounding) decided those labels, so these configurations' scores, and differences "
            f"between them, are not evidence about their settings.")


def run_notes(run: RunData) -> list[str]:
    """What the run's checks found worth knowing but not wrong (run.json "notes": prompts the tokenizer cut, ...)."""
    notes = run.prov.get("notes") or []
    return [str(n) for n in notes] if isinstance(notes, list) else []


def warning_summary(run: RunData, summary: pd.DataFrame | None = None) -> str | None:
    """The report's warnings and notes as one line for the console (the end of `python -m bench.run`), or None
    where the report has none: each one's first clause, the tie warning as its counts."""
    s = summarize_run(run) if summary is None else summary
    parts = []
    if _hash_check(run):
        parts.append("config.yaml was edited after the run")
    if len(s) and tie_warning(s):
        tied = pd.to_numeric(s["tied"], errors="coerce")
        over = int((tied > TIED_WARN).sum())
        parts.append(f"labels without margin in {over} of {len(s)} configurations (over {TIED_WARN:g}% of "
                     f"class-score cells tied, up to {float(tied.max()):.0f}%)")
    parts += [note[:1].lower() + note[1:].split(";")[0].rstrip(".") for note in run_notes(run)]
    return "; ".join(parts) if parts else None


def run_blocks(run: RunData, out: Path, prefix: str = "", level: int = 1, summary: pd.DataFrame | None = None,
               max_qualitative: int = 4) -> list:
    s = summarize_run(run) if summary is None else summary
    h = level
    blocks: list = []
    if h == 1:
        blocks.append(Heading(1, f"{run.name}: {run.cfg.get('method')} on {run.dataset_label}"))
    else:
        blocks.append(Heading(h, f"{run.label or run.name}: {run.cfg.get('method')} on {run.dataset_label}, "
                                 f"{run.model_label}"))
    if run.cfg.get("description"):
        blocks.append(Para(str(run.cfg["description"])))
    warning = _hash_check(run)
    if warning:
        blocks.append(Para(warning, "warning"))
    if not len(s):
        blocks.append(Para("This run has no results.", "warning"))
        return blocks
    blocks.append(main_table(run, s))
    ties = tie_warning(s)
    if ties:
        blocks.append(Para(ties, "warning"))
    blocks += [Para(note, "note") for note in run_notes(run)]
    seen_unseen = seen_unseen_table(run, s)
    if seen_unseen is not None:
        blocks.append(seen_unseen)
    blocks += figures_for_run(run, s, out, prefix)
    blocks += backbone_blocks(run, s, out, prefix, level=h)
    blocks.append(Heading(h + 1, "Per-class IoU" if h == 1 else f"Per-class IoU ({run.label})"))
    blocks.append(per_class_table(run, s))
    bars = class_bars(run, s, out, prefix)
    if bars:
        blocks.append(bars)
    qual_dir = run.path if run.path is not None else out
    qual = qualitative_figure(qual_dir, s, out / f"{prefix}qualitative.png", max_images=max_qualitative)
    if qual:
        blocks.append(Heading(h + 1, "Qualitative results" if h == 1 else f"Qualitative results ({run.label})"))
        blocks.append(Figure(qual[0], "qualitative results", qual[1]))
    fits = load_fits(run.path)
    if fits:
        blocks.append(Heading(h + 1, "Fits" if h == 1 else f"Fits ({run.label})"))
        blocks.append(fits_table(run, fits))
        curves = loss_figure(fits, out / f"{prefix}fit_loss.png")
        if curves:
            blocks.append(curves)
    blocks += dataset_card_blocks(run, out, prefix, level=h)
    blocks.append(Heading(h + 1, "All metrics" if h == 1 else f"All metrics ({run.label})"))
    blocks.append(details_table(run, s))
    blocks.append(Heading(h + 1, "Provenance" if h == 1 else f"Provenance ({run.label})"))
    blocks.append(Defs(provenance_pairs(run)))
    blocks.append(Code(yaml.safe_dump(run.cfg, sort_keys=False, allow_unicode=True), "resolved configuration"))
    return blocks


def write_files(out: Path, blocks: list, title: str, summary: pd.DataFrame) -> None:
    (out / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks, title), encoding="utf-8")
    summary.to_csv(out / "summary.csv", index=False)


def _summary_csv(s: pd.DataFrame, run: RunData) -> pd.DataFrame:
    keep = ["trial", *run.swept, "label", "n_seeds", "seeds", "mean", "std", "ci_low", "ci_high", "ci_kind",
            "paper", "delta", "verdict", "paper_hidden", "best", "tied", *SEEN_UNSEEN_COLUMNS]
    out = s[[c for c in keep if c in s.columns]].rename(columns={"mean": run.metric})
    return out.assign(metric=run.metric)


def write_single(run: RunData, out: Path, max_qualitative: int = 4) -> None:
    s = summarize_run(run)
    blocks = run_blocks(run, out, summary=s, max_qualitative=max_qualitative)
    write_files(out, blocks, f"{run.name}: {run.cfg.get('method')} on {run.dataset_label}", _summary_csv(s, run))


def write_combined(runs: list[RunData], out: Path, max_qualitative: int = 2) -> None:
    summaries = [summarize_run(r) for r in runs]
    title = f"Comparison of {len(runs)} runs: " + ", ".join(dict.fromkeys(r.name for r in runs))
    blocks: list = [Heading(1, title), Defs([(r.label, f"{r.cfg.get('method')} on {r.dataset_label}, {r.model_label}, "
                                                      f"protocol {r.protocol}: {r.path}") for r in runs])]
    blocks.append(combined_table(runs, summaries))
    classes = combined_class_table(runs, summaries)
    if classes is not None:
        blocks.append(classes)
    overlay = overlay_plot(runs, summaries, out)
    if overlay:
        blocks.append(overlay)
    for k, (run, s) in enumerate(zip(runs, summaries), 1):
        blocks += run_blocks(run, out, prefix=f"run{k}_", level=2, summary=s, max_qualitative=max_qualitative)
    frames = [_summary_csv(s, r).assign(run=r.label, method=r.cfg.get("method"), dataset=r.dataset_label,
                                        model=r.model_label) for r, s in zip(runs, summaries)]
    write_files(out, blocks, title, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())


def write_report(run_dir: Path, cfg: dict, frame: pd.DataFrame, provenance: dict) -> None:
    """The end of `python -m bench.run`: report.md, report.html, summary.csv and the figures in run_dir."""
    run_dir = Path(run_dir)
    label = Path(str(cfg.get("output_dir") or run_dir)).name
    run = RunData(cfg=cfg, frame=frame, prov=json.loads(json.dumps(provenance, default=str)), path=run_dir,
                  label=label)
    write_single(run, run_dir, int(_get(cfg, "report", "qualitative", default=4)))


