"""The command line: `python -m bench.run` (a sweep, `--list`, `--help`, `--dry-run`) and the `diffseg-bench`
console script, whose subcommands (`run`, `report`, `data`, `synthesize`, `perf`, `track`, `list`) are the
`python -m bench.<module>` tools under one name.

What exists is read from the registries and the sweep files themselves (`--list`); the config keys from the
declarations that validate them (bench.config_reference); whether a sweep runs on the embedded default model
from the same checks a run makes before it starts (bench.preflight).
"""

from __future__ import annotations

import difflib
import logging
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import BenchError, cli_exit

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"  # the shipped sweep files
RUN_USAGE = "python -m bench.run SWEEP.yaml [key=value ...] [--dry-run]   (e.g. data.limit=8 output_dir=/tmp/x)"
WIDTH = 110


# -- sweep files ----------------------------------------------------------------------------------------------------
def shipped_sweeps() -> list[Path]:
    return sorted(SWEEPS.glob("*.yaml"))


def resolve_sweep(arg: str) -> str:
    """A sweep argument as a file path: the path as given, or a shipped sweep's bare name (`iseg_lambda`). A
    file that does not exist is a BenchError with the closest sweep files ("did you mean")."""
    path = Path(arg)
    if path.is_file():
        return arg
    if path.suffix == "" and (SWEEPS / f"{arg}.yaml").is_file():
        return str((SWEEPS / f"{arg}.yaml").relative_to(Path.cwd()) if SWEEPS.is_relative_to(Path.cwd())
                   else SWEEPS / f"{arg}.yaml")
    if path.suffix not in ("", ".yaml", ".yml"):
        return arg  # bench.config.compose says what a sweep file is
    candidates: dict[str, str] = {}  # name as the user would type it -> the same
    folders = [path.parent] if path.parent.is_dir() else []
    folders.append(SWEEPS)
    for folder in folders:
        for found in sorted(folder.glob("*.y*ml")):
            shown = str(found.relative_to(Path.cwd())) if found.is_relative_to(Path.cwd()) else str(found)
            candidates.setdefault(found.name if folder == path.parent else shown, shown)
            candidates.setdefault(found.stem, shown)
    close = difflib.get_close_matches(path.name if path.suffix else path.stem, list(candidates), n=3, cutoff=0.6)
    if not close and path.suffix:
        close = difflib.get_close_matches(path.stem, list(candidates), n=3, cutoff=0.6)
    hint = " Did you mean " + " or ".join(dict.fromkeys(candidates[c] for c in close)) + "?" if close else ""
    raise BenchError(f"sweep file {arg} not found.{hint} python -m bench.run --list shows every sweep")


ABBREVIATIONS = ("Eq", "Eqs", "Fig", "Sec", "Tab", "e.g", "i.e", "et al", "vs", "cf", "No")


def first_sentence(text: str, limit: int = 150) -> str:
    """A description's first sentence (a full stop before a space, not after Eq./Fig./et al.), cut at `limit`
    characters on a word boundary."""
    text = " ".join(str(text or "").split())
    start = 0
    while (cut := text.find(". ", start)) > 0:
        if not text[:cut].endswith(ABBREVIATIONS) or cut >= limit:
            text = text[:cut + 1]
            break
        start = cut + 2
    return text if len(text) <= limit else text[:limit - 1].rsplit(" ", 1)[0] + " …"


def first_paragraph(doc: str) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def read_sweep(path: Path) -> dict:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


class EmbeddedCheck:
    """Whether a sweep runs on the embedded default model as shipped, by the checks a run makes before it
    starts (bench.preflight): the configuration, the dataset (its files, where it reads some), the layers the
    method names by role against the embedded UNet. The embedded UNet's layout is built once (meta device)."""

    def __init__(self):
        self._layout = None

    def layout(self):
        if self._layout is None:
            from types import SimpleNamespace

            import torch
            from diffusers import UNet2DConditionModel

            from bench.embedded import shipped_folder
            from bench.models.layers import LayerMap
            from bench.preflight import _read_json

            folder = shipped_folder()
            if folder is None:
                from bench.embedded import build_components

                unet = build_components(seed=0)["unet"]
            else:
                with torch.device("meta"):
                    unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
            self._layout = SimpleNamespace(unet=unet, _layer_map=LayerMap(unet))
        return self._layout

    def needs(self, path: Path) -> str | None:
        """None when the sweep passes those checks on the default; else what stops it, as the check says."""
        from bench.data import build_dataset
        from bench.evaluate import group_request
        from bench.plan import make_plan
        from methods import METHODS

        try:
            cfg = quick_compose(path)  # a model folder (model.path / model.id) the file names is checked here
            build_dataset({**cfg.data, "limit": 1})
            plan = make_plan(cfg)
            if cfg.model.path or cfg.model.id or cfg.model.name != "embedded":
                return None  # another backbone than the embedded one: its layers are checked when it runs
            try:
                method = METHODS.get(cfg.method)(self.layout())
            except Exception:  # noqa: BLE001 (a constructor that reads more than the layout: the run checks it)
                return None
            for group in plan.groups:
                try:
                    group_request(method, group)
                except BenchError:
                    raise
                except Exception:  # noqa: BLE001, S112 (the request reads more than the layout)
                    continue
        except BenchError as err:
            return needs_text(str(err))
        return None


def quick_compose(path: Path):
    """`bench.config.compose(path, [])` without Hydra where Hydra has nothing to do (no defaults list, no
    interpolation): the same merge over the defaults and the same validation, ~0.05 s instead of ~0.3 s a file.
    A file that fails, or needs Hydra, goes through compose itself, whose message is the one a run gives."""
    from omegaconf import OmegaConf

    from bench.config import SweepConfig, compose, defaults, validate

    try:
        text = path.read_text()
        raw = read_sweep(path)
        if not raw or "defaults" in raw or "${" in text or not isinstance(raw.get("name", ""), (str, type(None))):
            return compose(path, [])
        data = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(defaults()), OmegaConf.create(raw)))
        data.update(name=data.get("name") or path.stem, overrides=[], sweep_file=str(path))
        cfg = SweepConfig.from_dict(data)
        validate(cfg)
        return cfg
    except Exception:  # noqa: BLE001 (whatever the shortcut trips on, the real composition decides)
        return compose(path, [])


def needs_text(message: str) -> str:
    """A preflight error as what the sweep needs: the check's own words, without its advice."""
    if "this UNet has no" in message:
        found = message[:message.rfind("): ") + 1] if "): " in message else message
        return ("a backbone with more attention levels than the embedded model (model.path=<a Stable Diffusion "
                f"folder>); on the embedded model: {found}")
    if "not found at" in message:
        name = message.split("dataset ", 1)[-1].split(" ", 1)[0]
        how = message.split("; ", 1)[-1] if "; " in message else ""
        return f"dataset {name}'s files (data.root=<folder>)" + (f"; {how}" if how else "")
    return message


# -- --list ---------------------------------------------------------------------------------------------------------
def wrap(text: str, indent: int, first: str = "") -> list[str]:
    lines = textwrap.wrap(text, WIDTH - indent) or [""]
    return [first.ljust(indent) + lines[0]] + [" " * indent + line for line in lines[1:]]


def list_sweeps(out=None, check: bool = True) -> None:
    """Every shipped sweep with its description's first sentence, printed as it is checked."""
    out = out or sys.stdout
    sweeps = shipped_sweeps()
    width = max(len(p.stem) for p in sweeps) + 4
    print(f"Sweeps ({SWEEPS.relative_to(ROOT)}/; run one with python -m bench.run sweeps/NAME.yaml):", file=out)
    checker = EmbeddedCheck() if check else None
    for path in sweeps:
        raw = read_sweep(path)
        lines = wrap(first_sentence(raw.get("description") or "(no description)", 200), width, "  " + path.stem)
        if checker is not None:
            needs = checker.needs(path)
            if needs:
                lines += wrap("needs " + needs, width + 2, "")
        print("\n".join(lines), file=out, flush=True)


GENERATED = ("voc_sim", "coco_cap")  # generation-mode datasets: images made by the model, no files needed


def list_registries(out=None) -> None:
    from bench.data import DATASETS
    from bench.models import MODELS
    from methods import METHODS

    out = out or sys.stdout
    print("\nMethods (method=NAME; python -m bench.run --help NAME lists its parameters):", file=out)
    names = METHODS.names()
    width = max(map(len, names)) + 4
    for name in names:
        cls = METHODS.get(name)
        doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
        print("\n".join(wrap(first_sentence(first_paragraph(doc), 120), width, "  " + name)), file=out)
    print("\nDatasets (data.name=NAME; data.KEY= its options):", file=out)
    names = DATASETS.names()
    width = max(map(len, names)) + 4
    for name in names:
        options = DATASETS.get(name)[0]
        files = ("" if "root" not in options else "optional data.root=<annotations>; " if name in GENERATED
                 else "reads files: data.root=<folder>; ")
        print("\n".join(wrap(files + "options: " + ", ".join(options), width, "  " + name)), file=out)
    print("\nBackbones (model.name=NAME, or model.path=<diffusers folder> / model.id=<hub id in the cache>):", file=out)
    names = MODELS.names()
    width = max(map(len, names)) + 4
    for name in names:
        doc = first_sentence(first_paragraph(MODELS.get(name).__doc__ or ""), 120)
        if not doc and name == "diffusers":
            doc = "any diffusers Stable Diffusion folder (model.path=) or hub id in the local cache (model.id=)"
        print("\n".join(wrap(doc or "-", width, "  " + name)), file=out)


def list_all(check: bool = True) -> int:
    list_sweeps(check=check)
    list_registries()
    return 0


# -- --help ---------------------------------------------------------------------------------------------------------
def print_help(topic: str | None = None) -> int:
    from bench.config_reference import format_keys, method_params, sweep_keys

    if topic:
        from methods import METHODS

        method = METHODS.get(topic)  # an unknown name: one line with "did you mean"
        print(f"Parameters of method {topic} (params.NAME=VALUE, or swept under sweep:): type (kind), default, "
              f"meaning")
        print("  kinds: forward = changes the UNet pass; post = post-processing; train = part of a fit")
        doc = first_sentence((method.__doc__ or "").strip(), 200)
        if doc:
            print(f"  {topic}: {doc}")
        print(format_keys(method_params(topic), WIDTH))
        return 0
    print("python -m bench.run: run a sweep and write its run directory (the last line on stdout is its path).")
    print(f"\nusage: {RUN_USAGE}")
    print("       python -m bench.run --list          sweeps (with what each needs), methods, datasets, backbones")
    print("       python -m bench.run --list --no-check   the same without checking each sweep (faster)")
    print("       python -m bench.run --help METHOD   a method's parameters")
    print("       diffseg-bench {run,report,data,synthesize,perf,track,list} ...   the same tools under one name")
    print("\n  --dry-run   print the plan (configurations, forward settings, UNet passes, fits) and an estimated "
          "cost\n              from a measured pass on the chosen backbone and device; runs nothing")
    print("\nSweep keys (key=value on the command line overrides the file): key, type, default, meaning")
    print(format_keys(sweep_keys(), WIDTH))
    return 0


# -- --dry-run ------------------------------------------------------------------------------------------------------
def dry_run(sweep: str, overrides: list[str]) -> int:
    """The plan of a sweep, checked as a run checks it, and an estimated tracing cost from one measured pass."""
    from bench.config import compose
    from bench.preflight import preflight

    cfg = compose(sweep, overrides)
    plan = preflight(cfg)
    images = len(plan.dataset)  # the dataset preflight built and checked
    passes = 0
    modes: dict[str, int] = {}
    for group in plan.groups:
        p = group.trials[0].params
        per_image = int(p["steps"]) if p["mode"] == "generation" else 1
        passes += per_image * images
        modes[p["mode"]] = modes.get(p["mode"], 0) + per_image * images
    print(f"sweep {cfg.name} ({sweep}): method {cfg.method} on {cfg.data['name']}, {images} images")
    print(f"  configurations   {len(plan.trials)}")
    if plan.backbones:  # a sweep over models: the estimate measures the first backbone's pass for every one
        print(f"  backbones        {len(plan.backbones)}  ({', '.join(label for label, _ in plan.backbones)}; "
              f"the estimate times the first)")
    print(f"  forward settings {len(plan.groups)}  ({', '.join(sorted({g.trials[0].params['mode'] for g in plan.groups}))})")
    print(f"  UNet passes      {passes}  (" + ", ".join(f"{m}: {n}" for m, n in modes.items())
          + ("; a guided generation step counts once" if "generation" in modes else "") + ")")
    print(f"  fits             {len(plan.fits)}" + (" (trained method; fit.from= reuses another run's)"
                                                     if plan.fits else ""))
    for note in plan.notes:
        print("  note: " + note)
    per_pass, post, device, what = measure_pass(plan.backbones[0][1] if plan.backbones else cfg, plan, plan.dataset)
    total = per_pass * passes + post * images * len(plan.groups)
    print(f"  estimate         {fmt_seconds(total)} on {device}: {per_pass:.3g} s a UNet pass"
          + f", {post:.3g} s per image and forward setting besides"
          + f" (measured now on {what}; an estimate, and a low one: " + ("fits, " if plan.fits else "")
          + "Ray's and the model's start-up, writing results and the report are not included)")
    return 0


def fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measure_pass(cfg, plan, dataset) -> tuple[float, float, str, str]:
    """(seconds per UNet pass, seconds of post-processing and scoring per image and forward setting) of the
    sweep's first forward setting on its backbone and device: one image after a warm-up (generation: two
    denoising steps), timed with the tracer attached; the post-processing of every configuration of that
    setting where the method needs no fit (0 where it does: fits are not run here)."""
    import dataclasses

    import torch

    from bench.evaluate import evaluate_batch, group_request, trace_samples
    from bench.models import load_backbone
    from methods import METHODS

    backbone = load_backbone(cfg.model.as_dict())
    method = METHODS.get(cfg.method)(backbone)
    group = plan.groups[0]
    if group.trials[0].params["mode"] == "generation":  # two steps stand for the setting's many
        group = dataclasses.replace(group, trials=[dataclasses.replace(t, params=t.params.replace(steps=2))
                                                   for t in group.trials])
    params = group.trials[0].params
    req = group_request(method, group)
    sample = [dataset[0]]

    def timed(work) -> float:
        start = time.perf_counter()
        result = work()
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        timed.result = result
        return time.perf_counter() - start

    trace = lambda: trace_samples(method, dataset, sample, params, group.seed, req, cfg.model.resolution)
    timed(trace)  # warm-up: lazy set-up, first-call allocations
    seconds = min(timed(trace), timed(trace))
    passes = max(1, timed.result.image_passes)
    per_pass, post = seconds / passes, 0.0
    if not plan.fits:  # what the engine does per image besides the pass: labels, scores, tie counts
        evaluate = lambda: evaluate_batch(method, dataset, sample, group, req, cfg.model.resolution,
                                          protocol=cfg.metric.protocol, ties=[])
        timed(evaluate)
        post = max(0.0, timed(evaluate) - seconds)
    post += timed(lambda: dataset[min(1, len(dataset) - 1)])  # reading (or rendering) an image
    what = f"{passes} UNet pass{'es' if passes > 1 else ''} of one image, " + \
        ("reading it" if plan.fits else "reading and post-processing it")
    return per_pass, post, f"{backbone.name} on {backbone.device}", what


# -- running a sweep ------------------------------------------------------------------------------------------------
def setup_logging() -> None:
    from bench.env import NOISY_LOGGERS

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in NOISY_LOGGERS:  # at least WARNING: a level set higher (init_ray's quiet Ray Data) is kept
        logger = logging.getLogger(noisy)
        logger.setLevel(max(logger.level, logging.WARNING))


def report_line(final: Path, shown: Path | str | None = None) -> str | None:
    """The run's report warnings and notes as one line for stderr, or None (the report itself says them in
    full). `shown`: where the run is for the user (its URI, where `final` is a local copy of its files)."""
    from bench.reporting import load_run, warning_summary

    try:
        summary = warning_summary(load_run(final))
    except BenchError:
        return None
    return f"report: {summary}; see {str(shown or final).rstrip('/')}/report.md" if summary else None


RUN_HEAD = ("config.yaml", "run.json", "results.parquet")  # what the report line and the tracking check read


@contextmanager
def readable_run(final: Path | str, names: tuple[str, ...] | None = None) -> Iterator[Path]:
    """A local folder holding the finished run `final`: itself where it is local; for a URI (s3://...) a
    temporary copy of its files `names` (all of them where None)."""
    from bench.storage import Location, is_uri, local_copy

    if not is_uri(str(final)):
        yield Path(final)
        return
    if names is None:
        with local_copy(str(final)) as copy:
            yield copy
        return
    run = Location.of(str(final))
    with tempfile.TemporaryDirectory(prefix="diffseg-head-") as tmp:
        for name in names:
            if (run / name).is_file():
                (Path(tmp) / name).write_bytes((run / name).read_bytes())
        yield Path(tmp)


def run_sweep(sweep: str, overrides: list[str], work) -> int:
    """`work(sweep, overrides)` (bench.run.run); then, with `tracking=mlflow`, the finished run logged to MLflow
    (bench.track); then the one-line summary of the report's warnings on stderr, and the run directory's path (or
    URI) as the last line on stdout. A tracking failure is one `error:` line (exit 1): the run is finished and
    kept."""
    from bench.storage import is_uri

    result = work(resolve_sweep(sweep), overrides)
    final = str(result) if is_uri(str(result)) else Path(result)  # Path() would fold s3:// into s3:/
    status = 0
    with readable_run(final, RUN_HEAD) as head:
        tracking = (read_sweep(head / "config.yaml").get("tracking") or {})
        line = report_line(head, shown=final)
    if tracking.get("name") == "mlflow":
        from bench.track import log_run

        try:
            if is_uri(str(final)) and not tracking.get("uri"):  # the default store sits beside the run folder
                raise BenchError(f"tracking=mlflow of a run on object storage needs tracking.uri= (an MLflow "
                                 f"server, or sqlite:///<path>/mlflow.db): the default store sits beside a local "
                                 f"run folder; the run itself is finished in {final}")
            with readable_run(final) as copy:
                log_run(copy)
        except BenchError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
    if line:
        print(line, file=sys.stderr, flush=True)
    print(final, flush=True)
    return status


def run_main(argv: list[str] | None, work) -> int:
    """`python -m bench.run`: a sweep, or --list / --help [METHOD] / --dry-run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if not argv:
        print(f"usage: {RUN_USAGE}\n       python -m bench.run --list | --help [METHOD]")
        return 2
    if argv[0] in ("-h", "--help"):
        return plain_exit(lambda: print_help(argv[1] if len(argv) > 1 else None))
    if argv[0] == "--list":
        return plain_exit(lambda: list_all(check="--no-check" not in argv))
    dry = "--dry-run" in argv
    args = [a for a in argv if a != "--dry-run"]
    flags = [a for a in args if a.startswith("--")]
    if flags:
        close = difflib.get_close_matches(flags[0], ["--list", "--help", "--dry-run"], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"error: unknown option {flags[0]}{hint}; see python -m bench.run --help", file=sys.stderr)
        return 2
    if dry:
        return plain_exit(lambda: dry_run(resolve_sweep(args[0]), args[1:]))
    # cli_exit, not plain_exit: SIGTERM is Ctrl-C (the resume command, no lock left) and log lines wait until
    # the run claims its directory, so that a refusal is the only line
    return cli_exit(lambda: run_sweep(args[0], args[1:], work), hold_logs=True, prints_result=True)


def plain_exit(work) -> int:
    """A command that prints its own output (--list, --help, --dry-run): its exit status, or one `error:` line
    and the error's status."""
    try:
        return int(work() or 0)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


# -- diffseg-bench --------------------------------------------------------------------------------------------------
SUBCOMMANDS = {
    "run": ("bench.run", "run a sweep: run SWEEP.yaml [key=value ...] [--dry-run] (or --list, --help)"),
    "list": ("bench.run", "sweeps, methods, datasets and backbones (= run --list)"),
    "report": ("bench.report", "regenerate or combine reports: report RUN_DIR [RUN_DIR ...] [--out DIR]"),
    "data": ("bench.data.__main__", "check or describe a dataset folder"),
    "synthesize": ("bench.synthesize", "generate a synthetic training set: synthesize SWEEP.yaml [key=value ...]"),
    "perf": ("bench.perf", "measure throughput and overheads"),
    "track": ("bench.track", "log a finished run to MLflow: track RUN_DIR [--uri URI]"),
}


def console_main(argv: list[str] | None = None) -> int:
    """`diffseg-bench SUBCOMMAND ...`: the module's own main() with the remaining arguments."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: diffseg-bench SUBCOMMAND [...]\n")
        width = max(map(len, SUBCOMMANDS)) + 4
        for name, (_, text) in SUBCOMMANDS.items():
            print(f"  {name:<{width}}{text}")
        print("\nEach subcommand is also `python -m <module>`; `diffseg-bench SUBCOMMAND --help` for its options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown subcommand {name!r}.{hint} Known: {', '.join(SUBCOMMANDS)}.", file=sys.stderr)
        return 2
    if name == "list":
        rest = ["--list", *rest]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


def script() -> None:
    """The `diffseg-bench` console script's entry point (exits the process as `python -m bench.run` does)."""
    from bench.env import exit_process, quiet_environment

    quiet_environment()
    exit_process(console_main())
