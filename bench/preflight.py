"""Every check of user input that can fail, on the driver, before Ray starts or anything is written.

Each failure is one BenchError line that names the file or key and the fix. In order: the data (every image and
mask opened once: readable, mask matched to its image in size and values), the fits a sweep needs, the weights
(safetensors present, a pickle checkpoint refused), the configuration against the model (timestep within the
scheduler's training timesteps, model.resolution a size the UNet accepts), every prompt tokenised against the
tokenizer's limit, and the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.config import SweepConfig, train_data_config
from bench.data import build_dataset, dataset_options, require_generation_gt
from bench.data.base import IGNORE_INDEX, SegDataset
from bench.errors import BenchError
from bench.faults import trace_fault
from bench.fingerprint import input_fingerprints, model_fingerprint, record_opened, refuse_changed_fit_source
from bench.limits import bounded_images, check_model_files
from bench.models import model_folder_path, model_kind, resolve_hub_id
from bench.plan import Plan, make_plan
from bench.probe import check_ray_address
from methods import METHODS

log = logging.getLogger(__name__)
WEIGHT_PARTS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def preflight(cfg: SweepConfig, cluster_check=None) -> Plan:
    """Checks the sweep against the data, the fits it needs, the model and the machine; returns its plan.
    Notes (nothing wrong, but worth knowing: prompts the tokenizer cuts) go into `plan.notes`, which the run
    records in run.json and its report states once. `cluster_check(plan)`, where given, runs last (the per-node
    probes of check_cluster), so that a failure is the one line on stderr."""
    check_output_dir(cfg)
    check_ray_address(cfg.ray.address)
    dataset = build_dataset(cfg.data)
    plan = make_plan(cfg)
    plan.dataset = dataset  # the engine traces this one (bench.engine.run_engine)
    for mode in sorted({t.params["mode"] for t in plan.trials}):
        require_generation_gt(dataset, mode)
    with bounded_images(), record_opened() as opened:  # the header's size before any image is decoded
        samples = check_images(dataset, cfg.data)
    if plan.fits:
        check_training_data(cfg, dataset)
        if cfg.train.use_gpu and not cfg.ray.address and not torch.cuda.is_available():
            raise BenchError("train.use_gpu=true but this machine has no CUDA GPU; use train.use_gpu=false or "
                             "ray.address=<a cluster with GPUs>")
    if plan.fits or cfg.fit.source is not None:  # the fit stage (and Ray with it) is imported where fits are
        from bench.stages.fit import FAULT_ENV, check_fit_sources, parse_fault

        check_fit_sources(cfg, plan)
        parse_fault(os.environ.get(FAULT_ENV))
    folders, entries = {}, dict(zip((label for label, _ in plan.backbones), cfg.models))
    for label, sub_cfg, sub_plan in backbone_checks(cfg, plan):  # every backbone of a sweep over models
        with naming_entry(entries.get(label)):
            folder = folders[label] = model_folder(sub_cfg)
            if folder is not None:
                check_weights_format(folder, _model_option(sub_cfg))
                check_model_files(folder, _model_option(sub_cfg))
                check_model_fit(sub_cfg, sub_plan, folder)
                check_layer_roles(sub_cfg, sub_plan, folder)
            notes = check_prompts(sub_cfg, sub_plan, dataset, samples, load_tokenizer(sub_cfg, folder))
        plan.notes += [n for n in notes if n not in plan.notes]
    trace_fault(None)
    plan.inputs = input_fingerprints(folders.get(""), cfg.data, opened, train_data_config(cfg) if plan.fits else None)
    if plan.backbones:  # one model fingerprint naming every backbone's files (a resume compares it as one input)
        plan.model_inputs = {label: model_fingerprint(folders[label]) for label, _ in plan.backbones}
        plan.inputs["model"] = {"kind": "files", "mode": "models", "files": {
            f"{label}/{name}": value for label, fp in plan.model_inputs.items()
            for name, value in (fp.get("files") or {"": [fp.get("kind"), fp.get("commit") or fp.get("repo")]}).items()}}
    plan.opened = sorted({str(Path(p).absolute()) for p in opened})
    if cfg.fit.source is not None:
        refuse_changed_fit_source(cfg.fit.source, plan.inputs)
    if cluster_check is not None:
        cluster_check(plan)
    for text in plan.notes:  # said once in the report (run.json "notes"), not as a console warning
        log.debug("%s", text)
    return plan


def backbone_checks(cfg: SweepConfig, plan: Plan) -> list[tuple[str, SweepConfig, Plan]]:
    """(label, config, plan) per backbone of a sweep over models; one part labelled "" for one backbone."""
    if not plan.backbones:
        return [("", cfg, plan)]
    return [(label, sub_cfg, plan.for_backbone(label)) for label, sub_cfg in plan.backbones]


@contextlib.contextmanager
def naming_entry(entry: str | None):
    """A backbone's failure as one line naming its `models` entry (bench.backbones); as it is for one backbone."""
    try:
        yield
    except BenchError as err:
        if entry is None:
            raise
        raise BenchError(f"models entry {entry}: {err}") from None


# -- data ---------------------------------------------------------------------------------------------------------------
def check_images(dataset: SegDataset, data_cfg: dict) -> list:
    """Open every image once: it must decode, and its mask must be a 2-D label map of the image's size whose
    values are class ids (or the dataset's ignore value: 255, or 65535 for the uint16 layouts past 255 classes).
    Returns the samples without their pixels (their classes and captions build the prompts)."""
    where = f"data.name={data_cfg.get('name')}" + (f" data.root={data_cfg['root']}" if data_cfg.get("root") else "")
    num_classes = len(dataset.classes)
    samples = []
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
        except BenchError:
            raise
        except (OSError, ValueError, SyntaxError, KeyError) as err:  # PIL: OSError/SyntaxError on corrupt files
            text = " ".join(str(err).split()) or type(err).__name__
            raise BenchError(f"image {index} of {where} cannot be read ({type(err).__name__}: {text}); replace the "
                             f"file or remove the image from the split list") from None
        image, label = np.asarray(sample.image), np.asarray(sample.label)
        name = f"image {sample.image_id} ({where})"
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise BenchError(f"{name} is not an RGB image (shape {image.shape}, {image.dtype}); convert it to RGB")
        if label.ndim != 2:
            raise BenchError(f"the mask of {name} has shape {label.shape}, not a single-channel label map; save "
                             f"it as a palette (P) or grey (L) PNG of class ids")
        if label.shape != image.shape[:2]:
            raise BenchError(f"the mask of {name} is {label.shape[1]}x{label.shape[0]} but the image is "
                             f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size")
        values = np.unique(label)
        ignore = int(getattr(sample, "ignore_index", IGNORE_INDEX))  # what scoring skips (ImageScorer)
        bad = [int(v) for v in values if not (0 <= v < num_classes or v == ignore)]
        if bad:
            raise BenchError(f"the mask of {name} holds values {bad[:5]} that are no class id of "
                             f"{dataset.name} (0..{num_classes - 1}, {ignore} = ignore); fix the mask")
        # kept for the prompt check without its pixels (a COCO-sized val split would hold gigabytes here): the
        # label's distinct values stand for the label, which is all present_class_ids reads
        samples.append(dataclasses.replace(sample, image=np.empty((0, 0, 3), np.uint8), label=values[None, :]))
    return samples


def check_training_data(cfg: SweepConfig, evaluated_set: SegDataset) -> None:
    """Fits learn from a training split only: it must exist and must not be the evaluated split (of the same
    dataset; `train.data` may name another dataset). A method that predicts a fixed label set
    (`fits_class_ids`) needs the training dataset's classes to be the evaluated dataset's (`evaluated_set`)."""
    name = cfg.data["name"]
    train_cfg = train_data_config(cfg)
    if cfg.train.data is None and "split" not in dataset_options({"name": name}):
        raise BenchError(f"method {cfg.method} is fitted, but dataset {name} has no splits to train on; "
                         f"evaluate it on a dataset with a training split, or fit on another (train.data=...)")
    evaluated, trained = dataset_options(cfg.data), dataset_options(train_cfg)
    if train_cfg["name"] == name and {k: v for k, v in evaluated.items() if k != "split"} == \
            {k: v for k, v in trained.items() if k != "split"} and evaluated.get("split") == trained["split"]:
        raise BenchError(f"method {cfg.method} would be fitted on the evaluated split ({name} {trained['split']}); "
                         f"evaluate another split (data.split=val) or fit on another (train.split=train)")
    train_set = build_dataset(train_cfg)
    if METHODS.get(cfg.method).fits_class_ids:
        evaluated_classes = list(evaluated_set.classes)
        if list(train_set.classes) != evaluated_classes:
            raise BenchError(f"method {cfg.method} predicts the class ids it was fitted on, but the training data "
                             f"({train_cfg['name']}: {', '.join(train_set.classes[:6])}, ...) has other classes "
                             f"than the evaluated data ({name}: {', '.join(evaluated_classes[:6])}, ...); fit on "
                             f"a dataset with the same classes")


# -- model ----------------------------------------------------------------------------------------------------------------
def _model_option(cfg: SweepConfig) -> str:
    return f"model.path={cfg.model.path}" if cfg.model.path else f"model.id={cfg.model.id}" if cfg.model.id \
        else "model=embedded"


def model_folder(cfg: SweepConfig) -> Path | None:
    """The diffusers folder the backbone loads from; None for the in-process random-weight model."""
    model = cfg.model.as_dict()
    if model_kind(model) == "diffusers":
        return model_folder_path(model)
    if model.get("random"):
        return None
    from bench.embedded import shipped_folder

    return shipped_folder()


def check_weights_format(folder: Path, option: str) -> None:
    """Weights load from safetensors only: a part with only a pickle checkpoint (.bin, .ckpt ...) is refused here,
    before any worker starts, instead of after the workers' loading fails."""
    from bench.models.families import detect_family

    family = detect_family(folder) if (folder / "model_index.json").is_file() else "sd"
    parts = [p.replace("unet", "transformer") if family in ("sd3", "flux") else p for p in WEIGHT_PARTS]
    for part in parts + (["text_encoder_2"] if family != "sd" else []):
        files = [p for p in (folder / part).glob("*") if p.is_file()]
        if any(p.suffix == ".safetensors" for p in files):
            continue
        pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise BenchError(f"{option}: {part}/{pickled[0]} is a pickle checkpoint, which is never loaded; convert "
                             f"the folder to safetensors (pipe.save_pretrained(DIR, safe_serialization=True))")
        raise BenchError(f"{option}: {part}/ holds no .safetensors weights; save the pipeline with "
                         f"pipe.save_pretrained(DIR, safe_serialization=True)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_model_fit(cfg: SweepConfig, plan: Plan, folder: Path) -> None:
    """Values that only make sense against the model: the inversion timestep within the scheduler's training
    timesteps, and model.resolution a size whose latent survives every UNet downsampling."""
    from bench.models import SCHEDULERS
    from bench.models.families import FLOW_FAMILIES, check_method_family, detect_family

    steps = int(_read_json(folder / "scheduler" / "scheduler_config.json").get("num_train_timesteps", 1000))
    family = detect_family(folder) if (folder / "model_index.json").is_file() else "sd"
    check_method_family(cfg.method, METHODS.get(cfg.method), family)
    compared = METHODS.get(cfg.method).component_methods()  # `compare`: each method it runs declares its own
    for name in sorted({str(t.params.get("method")) for t in plan.trials} & set(compared)):
        check_method_family(name, METHODS.get(name), family)
    method = METHODS.get(cfg.method)()
    for trial in plan.trials:
        if family not in ("sd", "sdxl") and method.token_weights_on(trial.params) == "embeddings":
            raise BenchError(f"token weights on the text embeddings (iSeg gamma_on=embeddings) scale a UNet's "
                             f"cross-attention keys and values; this model is {family}, whose text runs through "
                             f"joint attention: use gamma_on=keys")
        if trial.params["mode"] == "inversion" and trial.params["timestep"] >= steps:
            raise BenchError(f"parameter timestep={trial.params['timestep']} must be < {steps}, the model's "
                             f"training timesteps ({folder / 'scheduler'})")
        # `timestep` is the position in the training schedule on every family (docs/backbones.md); on flow
        # matching t = 0 is the clean image (sigma 0), which no paper traces
        if family in FLOW_FAMILIES and trial.params["mode"] == "inversion" and trial.params["timestep"] <= 0:
            raise BenchError(f"parameter timestep={trial.params['timestep']}: on a flow-matching model ({family}) "
                             f"timestep must be in 1 .. {steps - 1} (sigma = the scheduler's shifted t / {steps})")
        if family in FLOW_FAMILIES and trial.params["mode"] == "generation" and \
                trial.params.get("scheduler", "auto") != "auto":
            raise BenchError(f"parameter scheduler={trial.params['scheduler']}: {family} generates with its own "
                             f"FlowMatchEulerDiscreteScheduler; use scheduler=auto ({', '.join(SCHEDULERS)} are "
                             f"noise-prediction samplers)")
    if cfg.model.resolution:
        vae = _read_json(folder / "vae" / "config.json").get("block_out_channels") or [0]
        unet = _read_json(folder / "unet" / "config.json").get("down_block_types") or [0]
        multiple = 2 ** (len(vae) - 1) * 2 ** (len(unet) - 1)
        if family in FLOW_FAMILIES:  # transformer patches (SD3's patch_size; Flux packs 2 x 2 latents)
            patch = _read_json(folder / "transformer" / "config.json").get("patch_size") or 1
            multiple *= 2 if family == "flux" else int(patch)
        if cfg.model.resolution % multiple:
            raise BenchError(f"model.resolution={cfg.model.resolution} must be 0 (the model's native size) or a "
                             f"multiple of {multiple} (the VAE's and the denoiser's downsampling of this model)")


def check_layer_roles(cfg: SweepConfig, plan: Plan, folder: Path) -> None:
    """Attention layers the sweep names by role (a resolution, a rank, the finest level) that this UNet lacks:
    each forward group's trace request resolved against the UNet built from its config on the meta device
    (module names only, no weights: bench.models.layers), so such a sweep stops here instead of after the model
    has loaded. A method that needs more of the backbone than its layout to say is left to the run's check."""
    from types import SimpleNamespace

    import diffusers

    from bench.evaluate import group_request
    from bench.models.layers import LayerMap, TransformerLayerMap

    part = "transformer" if (folder / "transformer" / "config.json").is_file() else "unet"
    config = folder / part / "config.json"
    if not config.is_file():
        return
    cls = getattr(diffusers, str(_read_json(config).get("_class_name")), diffusers.UNet2DConditionModel)
    with torch.device("meta"):
        unet = cls.from_config(_read_json(config))
    model = cfg.model
    layers = LayerMap(unet) if part == "unet" else TransformerLayerMap(unet, str(model.depth), model.flux_blocks)
    layout = SimpleNamespace(unet=unet, _layer_map=layers)  # what bench.models.layers.layer_map reads
    try:
        method = METHODS.get(cfg.method)(layout)
    except Exception:  # noqa: BLE001 (a constructor that reads the backbone: nothing to check here)
        return
    for group in plan.groups:
        try:
            group_request(method, group)
        except BenchError:
            raise
        except Exception:  # noqa: BLE001, S112 (the request reads more than the layout)
            continue


def load_tokenizer(cfg: SweepConfig, folder: Path | None):
    from transformers import CLIPTokenizer

    if folder is None:
        from bench.embedded import build_tokenizer

        return build_tokenizer()
    from bench.models.families import detect_family

    # the tokenizer of the attribution columns: CLIP's, T5's on Flux (bench.models.families)
    sub = "tokenizer_2" if (folder / "model_index.json").is_file() and detect_family(folder) == "flux" \
        else "tokenizer"
    try:
        if sub != "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder / sub)
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except (OSError, ValueError) as err:
        raise BenchError(f"{_model_option(cfg)}: cannot load its tokenizer ({type(err).__name__}); the folder "
                         f"needs tokenizer/vocab.json and merges.txt") from None


def check_prompts(cfg: SweepConfig, plan: Plan, dataset: SegDataset, samples: list, tokenizer) -> list[str]:
    """Every prompt of every (image, forward setting), tokenised against the tokenizer's limit. A class name
    cut off by the limit would have no tokens to attend to: refused. Text after the last class name (iSeg's
    background words, the rest of a template) that does not fit is cut by the model as it always is: a warning
    (returned: the plan's notes, stated in the report)."""
    from bench.evaluate import class_query

    limit = int(tokenizer.model_max_length)
    method = METHODS.get(cfg.method)()
    gen_gt = {mode: require_generation_gt(dataset, mode) for mode in {g.trials[0].params["mode"] for g in plan.groups}}
    seen, warnings = set(), []
    for group in plan.groups:
        params = group.trials[0].params
        for sample in samples:
            query = class_query(sample, dataset, params["classes"])
            if gen_gt[params["mode"]]:
                prompt = sample.caption or ""
            else:
                prompt = method.prompt(query, sample.caption, params)
            if prompt in seen:
                continue
            seen.add(prompt)
            length = len(tokenizer(prompt, verbose=False).input_ids)
            if length <= limit:
                continue
            ends = {name: prompt.rfind(name) + len(name) for name in query.names if name in prompt}
            for name, end in sorted(ends.items(), key=lambda item: -item[1]):
                if len(tokenizer(prompt[:end], verbose=False).input_ids) > limit:
                    raise BenchError(f"the prompt of image {sample.image_id} is {length} tokens, over the tokenizer's "
                                     f"limit of {limit}, and cuts off class '{name}': {prompt!r}; shorten the "
                                     f"template, segment fewer classes (classes=gt) or use a model with longer prompts")
            if not warnings:
                warnings.append(f"Prompts are longer than the tokenizer's {limit} tokens; the text after the class "
                                f"names is cut (every class name fits), e.g. {prompt!r} ({length} tokens).")
    return warnings


# -- output -------------------------------------------------------------------------------------------------------------
def check_output_dir(cfg: SweepConfig) -> None:
    """The run directory's parent must be creatable and writable; an object-store run's bucket must exist and
    answer (nothing is created here). Where the run goes: bench.rundir.run_target."""
    from bench.rundir import run_target
    from bench.storage import Location, is_uri

    target = run_target(cfg)
    if is_uri(str(target)):
        loc = Location.of(str(target))
        bucket = loc.path.split("/", 1)[0]
        try:
            info = loc.fs.get_file_info(bucket)
        except Exception as err:  # noqa: BLE001 (pyarrow: OSError with the store's own message)
            raise BenchError(f"output_dir={target}: the storage does not answer ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:160]}); check AWS_ENDPOINT_URL and the credentials "
                             f"(AWS_ACCESS_KEY_ID, ...)") from None
        from pyarrow.fs import FileType

        if info.type == FileType.NotFound:
            raise BenchError(f"output_dir={target}: bucket {bucket} does not exist; create it or choose another "
                             f"output_dir=")
        return
    option = "output_dir=" if cfg.output_dir else "output_dir= (or run from a writable folder)"
    target = Path(target).expanduser().absolute().parent
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BenchError(f"{existing} is not a folder, so the run cannot be written under {target}; choose "
                         f"another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BenchError(f"{existing} is not writable, so the run cannot be written under {target}; choose a "
                         f"writable {option}")


# -- cluster --------------------------------------------------------------------------------------------------------------
def path_identity(path: str) -> dict:
    """What a node sees at a local path: whether it exists, its inode and its first names (sorted). A shared
    mount shows every node the same; a folder only one machine has, or another copy, shows something else."""
    p = Path(path)
    if not p.exists():
        return {"exists": False}
    info = p.stat()
    names = sorted(os.listdir(p))[:64] if p.is_dir() else []
    return {"exists": True, "dir": p.is_dir(), "inode": info.st_ino, "names": names}


def nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_node(checks: list[dict]) -> list[dict]:
    """On one node: each check's path as this node sees it (Ray task; see check_cluster)."""
    out = []
    for check in checks:
        if check["kind"] == "uri":
            from bench.storage import Location

            try:
                loc = Location.of(check["path"])
                loc.fs.get_file_info(loc.path.split("/", 1)[0])
                out.append({"ok": True})
            except Exception as err:  # noqa: BLE001 (any store error becomes this node's one-line refusal)
                out.append({"ok": False, "why": f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"})
        elif check["kind"] == "remote":  # a stored folder this node copies into its cache (bench.node_cache)
            out.append(_probe_stored(check))
        elif check["kind"] == "hub":
            out.append(_probe_hub(check))
        elif check["kind"] == "same":  # a shared mount: this node must see what the driver sees
            seen = path_identity(check["path"])
            out.append({"ok": seen == check["expect"], "why": "it is not the driver's folder there (a folder only "
                        "the driver's machine has)" if seen.get("exists") else "it does not exist there"})
        else:  # "present": the same folder (or an equal copy) at that path, with the driver's content
            seen = path_identity(check["path"])
            ok = seen.get("exists") and seen.get("names") == check["expect"].get("names")
            result = {"ok": bool(ok), "why": "it does not exist there" if not seen.get("exists") else
                      "it holds other files there than on the driver"}
            if ok and check.get("fingerprint"):
                change = fingerprint_change(check["fingerprint"])
                if change:
                    result = {"ok": False, "other": True, "why": change}
            out.append(result)
    return out


def fingerprint_change(spec: dict) -> str | None:
    """What differs between the driver's fingerprint of an input (`spec["expect"]`) and this node's (see
    bench.fingerprint.node_fingerprint; `spec["args"]` are its arguments), or None where they agree."""
    from bench.fingerprint import changed_inputs, node_fingerprint

    key = spec["key"]
    seen = node_fingerprint(**spec["args"])
    changes = changed_inputs({key: spec["expect"]}, seen, keys=(key,))
    return "; ".join(changes) or None


def _fingerprint_spec(plan: Plan, key: str, **args) -> dict | None:
    """The fingerprint part of a check: the driver's fingerprint of input `key` and how a node computes its own."""
    expect = (plan.inputs or {}).get(key)
    if not isinstance(expect, dict) or expect.get("kind") in (None, "none", "generated"):
        return None  # nothing read from files (a generated dataset, the in-process model): nothing to compare
    return {"key": key, "expect": expect, "args": {"model_folder": None, **args}}


def cluster_checks(cfg: SweepConfig, plan: Plan, target) -> list[dict]:
    """What every node must reach: the output storage (a URI), data.root (and the training data's root), the
    model folder, and (fits only) the fit storage: the run's storage, which a local path can be only as a mount
    that every node shares. The model folder, the evaluated images and masks and the training data must also
    have the driver's fingerprint on every node (bench.fingerprint): a node with other weights or another copy
    of the data would mix results silently. A stored input (a URI, which each node copies into its own cache:
    bench.node_cache) is listed by every node at the driver's version; model.id is looked up in each node's own
    Hugging Face cache, at the driver's snapshot."""
    from bench.fingerprint import absolute_options
    from bench.storage import is_uri

    checks = []
    if not target.is_local:
        checks.append({"kind": "uri", "path": target.uri, "what": f"output_dir={target.uri}",
                       "fix": "check the endpoint and credentials in that node's environment (AWS_ENDPOINT_URL, "
                              "AWS_ACCESS_KEY_ID, ...)"})
    data = absolute_options(dict(cfg.data))
    roots = {("data.root", cfg.data.get("root"), "data")}
    if plan.fits:
        roots.add(("train.data root", train_data_config(cfg).get("root"), "train_data"))
    for option, root, key in sorted(roots, key=str):
        if root and is_uri(str(root)):
            checks.append(remote_check(str(root), option, "data", "the node reads the dataset from there into its "
                                       "cache"))
        elif root:
            path = str(Path(root).expanduser().absolute())
            spec = _fingerprint_spec(plan, key, data_files=plan.opened, data_cfg=data) if key == "data" else \
                _fingerprint_spec(plan, key, train_cfg=absolute_options(train_data_config(cfg)))
            checks.append({"kind": "present", "path": path, "expect": path_identity(path), "fingerprint": spec,
                           "what": f"{option}={root}", "fix": "put the dataset on a mount every node shares (or "
                           "the same copy at the same path on every node)"})
    for key in ("captions", "image_list"):  # single stored files of the dataset, copied by each node alike
        value = cfg.data.get(key)
        if isinstance(value, str) and is_uri(value):
            checks.append(remote_check(value, f"data.{key}", "data", "the node reads the file from there into its "
                                       "cache"))
    for label, sub_cfg in plan.backbones or [("", cfg)]:
        folder = model_folder(sub_cfg)
        model_expect = plan.model_inputs.get(label) if label else (plan.inputs or {}).get("model")
        if sub_cfg.model.path and is_uri(str(sub_cfg.model.path)):
            checks.append(remote_check(str(sub_cfg.model.path), "model.path", "models", "the node copies the model "
                                       "folder from there into its cache"))
            continue
        if sub_cfg.model.id and not sub_cfg.model.path:  # each node's own Hugging Face cache, wherever it is there
            checks.append({"kind": "hub", "path": sub_cfg.model.id, "what": _model_option(sub_cfg),
                           "expect": model_expect,
                           "fix": f"copy the snapshot into that node's Hugging Face cache (huggingface-cli download "
                                  f"{sub_cfg.model.id} on the node, or the same HF_HOME on every node), or give "
                                  f"model.path=s3://... (a folder every node copies)"})
            continue
        if folder is None:
            continue
        path = str(Path(folder).absolute())
        spec = _fingerprint_spec(plan, "model", model_folder=path)
        if label and isinstance(plan.model_inputs.get(label), dict):  # a sweep over models: that backbone's own
            spec = {"key": "model", "expect": plan.model_inputs[label], "args": {"model_folder": path}} \
                if plan.model_inputs[label].get("kind") not in (None, "none") else None
        checks.append({"kind": "present", "path": path, "expect": path_identity(path),
                       "what": _model_option(sub_cfg), "fingerprint": spec,
                       "fix": "put the model folder on a mount every node shares (or the same copy at the same "
                              "path on every node)"})
    if plan.fits and target.is_local and cfg.fit.source is None:
        anchor = str(nearest_existing(target.local))
        checks.append({"kind": "same", "path": anchor, "expect": path_identity(anchor),
                       "what": f"the fit storage {target.local} (output_dir)",
                       "fix": "Ray Train's workers write checkpoints there; give output_dir=s3://bucket/... "
                              "(object storage) or a path on a mount every node shares"})
    return checks


def remote_check(uri: str, option: str, kind: str, why: str) -> dict:
    """A stored folder (a URI) that every node copies into its own cache: every node must list it, and list the
    version the driver listed (bench.fingerprint.listing_fingerprint)."""
    from bench.fingerprint import listing_fingerprint
    from bench.node_cache import stored_listing

    key = listing_fingerprint(stored_listing(uri, option))["key"]
    return {"kind": "remote", "path": uri, "expect": key, "what": f"{option}={uri}",
            "fix": f"{why}: check the endpoint and credentials in that node's environment (AWS_ENDPOINT_URL, "
                   f"AWS_ACCESS_KEY_ID, ...)"}


def _probe_stored(check: dict) -> dict:
    """A node's view of a stored folder: listed, and the driver's version."""
    from bench.fingerprint import listing_fingerprint
    from bench.node_cache import read_listing

    try:
        listing = read_listing(check["path"])
    except Exception as err:  # noqa: BLE001 (any store error becomes this node's one-line refusal)
        return {"ok": False, "why": f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"}
    if not listing:
        return {"ok": False, "why": "nothing is stored there"}
    key = listing_fingerprint(listing)["key"]
    if key != check["expect"]:
        return {"ok": False, "other": True, "why": f"stored version {check['expect'][:12]} -> {key[:12]}"}
    return {"ok": True}


def _probe_hub(check: dict) -> dict:
    """A node's own Hugging Face cache: the model id is there, at the driver's snapshot (its commit)."""
    from bench.fingerprint import changed_inputs, model_fingerprint

    try:
        folder = resolve_hub_id(check["path"])
    except BenchError:
        return {"ok": False, "why": "it is not in that node's Hugging Face cache"}
    if isinstance(check.get("expect"), dict):
        changes = changed_inputs({"model": check["expect"]}, {"model": model_fingerprint(folder)}, keys=("model",))
        if changes:
            return {"ok": False, "other": True, "why": "; ".join(changes)}
    return {"ok": True}


NODE_PROBE_SECONDS = 120  # a node's probe without fingerprints: paths and storage only
FINGERPRINT_PROBE_SECONDS = 600  # with fingerprints: a node hashes the model and the data once (then cached)


def check_cluster(cfg: SweepConfig, plan: Plan, target) -> None:
    """On a cluster (Ray started), before any work: one probe task per alive node checks that it reaches what
    it needs, with the driver's content (cluster_checks). The first failure is one BenchError line naming the
    node, the path and the fix."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    checks = cluster_checks(cfg, plan, target)
    if not checks:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(checks) for n in nodes]
    # one deadline for all nodes (they probe in parallel), not one per node
    deadline = time.monotonic() + (FINGERPRINT_PROBE_SECONDS if any(c.get("fingerprint") for c in checks)
                                   else NODE_PROBE_SECONDS)
    failures = []
    for node, ref in zip(nodes, refs):
        name = f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"
        try:
            results = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
        except Exception as err:  # noqa: BLE001 (a node that cannot run the probe cannot run the work)
            failures.append(f"{name} cannot run a probe task ({type(err).__name__}); check that the node runs this "
                            f"project's code and packages")
            continue
        for check, result in zip(checks, results):
            if result.get("other"):  # reachable, but not the driver's content
                failures.append(f"{name} sees other files at {check['what']} ({check['path']}) than the driver "
                                f"({result['why']}); {check['fix']}")
            elif not result["ok"]:
                failures.append(f"{name} cannot reach {check['what']} at {check['path']}: {result['why']}; "
                                f"{check['fix']}")
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise BenchError(failures[0] + more)


