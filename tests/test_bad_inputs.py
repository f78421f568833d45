"""The bad-input matrix: every kind of bad input is exit 2, exactly one `error:` line on stderr naming the key or
file and the fix, no traceback, and nothing written (no run directory, no .partial, the inputs untouched).
Every kind fails in composition or preflight, before Ray starts. Run twice: in-process through `bench.run.main`
(fast), and as the user runs it, `python -m bench.run` in a subprocess, where the whole of stderr must be that one
line (log lines included): the full subprocess matrix is slow, a representative few run in the fast suite."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.config import compose
from bench.faults import TRACE_FAULT_ENV
from bench.preflight import preflight
from bench.run import main

ROOT = Path(__file__).resolve().parents[1]
ISEG = "method: iseg\ndata: {name: shapes, limit: 2, size: 32}\n"
VOC_GOOD = ["2007_000001", "2007_000002"]


# -- fixtures written per case ---------------------------------------------------------------------------------------
def write_voc(root: Path, defect: str | None = None) -> Path:
    """A two-image VOCdevkit/VOC2012 with 64x64 images whose masks hold class 8 (cat); `defect` breaks one."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    for k, image_id in enumerate(VOC_GOOD):
        Image.fromarray(np.full((64, 64, 3), 60 + 40 * k, np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        label = np.zeros((64, 64), np.uint8)
        label[16:48, 16:48] = 8
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(VOC_GOOD) + "\n")
    bad = VOC_GOOD[1]
    if defect == "corrupt jpeg":
        (voc / "JPEGImages" / f"{bad}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif defect == "missing mask":
        (voc / "SegmentationClass" / f"{bad}.png").unlink()
    elif defect == "rgb mask":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(voc / "SegmentationClass" / f"{bad}.png")
    elif defect == "small mask":
        png = Image.fromarray(np.zeros((32, 32), np.uint8), mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{bad}.png")
    elif defect in ("huge image", "bomb image"):  # only the header: the file is a few bytes
        side = (9000, 9000) if defect == "huge image" else (100_000, 100_000)
        huge_png(voc / "JPEGImages" / f"{bad}.jpg", *side)
    elif defect == "mask values":
        label = np.full((64, 64), 100, np.uint8)
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{bad}.png")
    return root / "VOCdevkit"


def huge_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height grey pixels (its data would not decode: open is lazy)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def voc_sweep(inputs: Path, defect: str | None, extra: str = "") -> str:
    root = write_voc(inputs, defect)
    return f"method: iseg\ndata: {{name: voc2012, root: {root}}}\nparams: {{background_words: ''{extra}}}\n"


def pickle_weights(inputs: Path, tiny_model: Path) -> str:
    """The tiny pipeline with its UNet saved as a pickle checkpoint (.bin) instead of safetensors."""
    import shutil

    folder = inputs / "sd-bin"
    shutil.copytree(tiny_model, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded: only its name is checked")
    return str(folder)


def damaged_model(inputs: Path, tiny_model: Path, how: str) -> str:
    """The tiny pipeline with one file damaged: its UNet weights cut short or replaced by other bytes, or its
    UNet config no longer JSON."""
    import shutil

    folder = inputs / f"sd-{how}"
    shutil.copytree(tiny_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage":
        weights.write_bytes(os.urandom(4096))
    else:
        (folder / "unet" / "config.json").write_text('{"sample_size": 8,')
    return str(folder)


def no_weights(inputs: Path, tiny_model: Path) -> str:
    import shutil

    folder = inputs / "sd-empty"
    shutil.copytree(tiny_model, folder)
    for f in (folder / "vae").glob("*.safetensors"):
        f.unlink()
    return str(folder)


# kind -> (sweep text or a builder(inputs, tiny_model) -> text, overrides, the message the line must contain)
CASES: dict[str, tuple] = {
    # YAML and composition
    "malformed yaml": ("name: x\nmethod: [iseg\n", [], "malformed YAML"),
    "duplicate yaml key": ("method: iseg\nmethod: daam\n", [], "duplicate key 'method'"),
    "unknown reference": (ISEG + "description: ${nope}\n", [], "nope"),
    "oc.env in the file": (ISEG + "description: ${oc.env:HOME}\n", [], "resolver interpolation"),
    "oc.env nested in a list": (ISEG + "seeds: [0]\npaper: {note: ['${oc.env:HOME}']}\n", [],
                                "resolver interpolation"),
    "oc.env in an override": (ISEG, ["description=${oc.env:HOME}"], "resolver interpolation"),
    "oc.decode in the file": (ISEG + "description: '${oc.decode:1}'\n", [], "resolver interpolation"),
    "name escapes reports/runs": (ISEG + "name: ../../x\n", [], "one folder name"),
    "absolute name": (ISEG + "name: /tmp/x\n", [], "one folder name"),
    "hidden name": (ISEG, ["name=.x"], "one folder name"),
    # config types and ranges of sections
    "data.limit=abc": (ISEG, ["data.limit=abc"], "data.limit='abc' must be int"),
    "data.limit=0": (ISEG, ["data.limit=0"], "data.limit=0 must be >= 1"),
    "data.size=0": (ISEG, ["data.size=0"], "data.size=0 must be >= 1"),
    "data.size=abc": (ISEG, ["data.size=abc"], "data.size='abc' must be int"),
    "data.num_images=-4": (ISEG, ["data.num_images=-4"], "data.num_images=-4 must be >= 1"),
    "data.seed=-1": (ISEG, ["data.seed=-1"], "data.seed=-1 must be >= 0"),
    "shapes objects inverted": (ISEG, ["data.min_objects=3", "data.max_objects=1"], "min_objects"),
    "ray.num_actors=-1": (ISEG, ["ray.num_actors=-1"], "ray.num_actors=-1 must be >= 0"),
    "ray.batch_size=0": (ISEG, ["ray.batch_size=0"], "ray.batch_size=0 must be >= 1"),
    "ray.object_store_mb=1": (ISEG, ["ray.object_store_mb=1"], "ray.object_store_mb=1 must be >= 64"),
    "ray.max_retries=-1": (ISEG, ["ray.max_retries=-1"], "ray.max_retries=-1 must be >= 0"),
    "model.resolution=7": (ISEG, ["model.resolution=7"], "model.resolution=7 must be 0"),
    "model.resolution=-64": (ISEG, ["model.resolution=-64"], "model.resolution=-64 must be >= 0"),
    "report.bootstrap=-5": (ISEG, ["report.bootstrap=-5"], "report.bootstrap=-5 must be >= 0"),
    "report.qualitative=-1": (ISEG, ["report.qualitative=-1"], "report.qualitative=-1 must be >= 0"),
    "negative seed": (ISEG + "seeds: [-1]\n", [], "must be an integer >= 0"),
    "num_samples=0": (ISEG, ["num_samples=0"], "num_samples must be an integer >= 1"),
    # method parameters: declared bounds (Param low/high/positive) and templates
    "timestep=5000": (ISEG, ["params.timestep=5000"], "timestep=5000 must be < 1000"),
    "timestep=-1": (ISEG, ["params.timestep=-1"], "timestep=-1 must be >= 0"),
    "lambda=-1": (ISEG, ["params.lambda=-1"], "lambda=-1.0 must be >= 0"),
    "iterations=-1": (ISEG, ["params.iterations=-1"], "iterations=-1 must be >= 0"),
    "bg_threshold=2.0": (ISEG, ["params.bg_threshold=2.0"], "bg_threshold=2.0 must be <= 1"),
    "gamma=0": (ISEG, ["params.gamma=0"], "gamma=0.0 must be > 0"),
    "lambda=nan": (ISEG, ["params.lambda=nan"], "must be a finite number"),
    "swept value out of bounds": (ISEG + "sweep: {lambda: [0, -0.1]}\n", [], "lambda=-0.1 must be >= 0"),
    "uniform range reversed": (ISEG + "sweep: {lambda: {uniform: [0.5, 0.1]}}\n", [], "needs low < high"),
    "uniform range out of bounds": (ISEG + "sweep: {bg_threshold: {uniform: [0, 2]}}\n", [],
                                    "bg_threshold=2.0 must be <= 1"),
    "loguniform from 0": (ISEG + "sweep: {lambda: {loguniform: [0, 0.1]}}\n", [], "needs low > 0"),
    "template typo {klasses}": (ISEG, ["params.template='A photo of {klasses}'"], "names {klasses}"),
    "template unbalanced brace": (ISEG + "params: {template: 'A photo of {classes'}\n", [], "not a valid template"),
    "template without {classes}": (ISEG + "params: {template: 'A photo of {{classes}}'}\n", [],
                                   "must contain {classes}"),
    "daam tau=1.5": ("method: daam\n", ["params.tau=1.5"], "tau=1.5 must be <= 1"),
    "ovam attribution {nme}": ("method: ovam\n", ["params.attribution='a {nme}'"], "names {nme}"),
    "ovam crf_gt_prob=1.5": ("method: ovam\n", ["params.crf_gt_prob=1.5"], "crf_gt_prob=1.5 must be <= 1"),
    "attn2mask step=2": ("method: attn2mask\n", ["params.step=2"], "step=2.0 must be <= 1"),
    "linear_probe lr=0": ("method: linear_probe\n", ["params.lr=0"], "lr=0.0 must be > 0"),
    # prompts against the tokenizer's limit (16 tokens on the embedded and tiny models)
    "class name cut by the prompt limit": (ISEG + "params: {background_words: '', template: '" + "and " * 14
                                           + "{classes}'}\n", [], "cuts off class"),
    "classes=all longer than the limit": (lambda i, m: voc_sweep(i, None), ["params.classes=all"],
                                          "cuts off class"),
    # data: every image opened once, masks matched to images
    "corrupt jpeg": (lambda i, m: voc_sweep(i, "corrupt jpeg"), [], "cannot be read"),
    "image without mask": (lambda i, m: voc_sweep(i, "missing mask"), [], "cannot be read"),
    "rgb mask": (lambda i, m: voc_sweep(i, "rgb mask"), [], "not a palette PNG"),
    "mask smaller than its image": (lambda i, m: voc_sweep(i, "small mask"), [], "masks must have their image's size"),
    "mask values no class ids": (lambda i, m: voc_sweep(i, "mask values"), [], "no class id"),
    "missing dataset root": ("method: iseg\ndata: {name: voc2012, root: /nonexistent/voc}\n", [], "VOC 2012"),
    # weights
    "pickle (.bin) weights": (lambda i, m: ISEG + f"model: {{path: {pickle_weights(i, m)}}}\n", [],
                              "pickle checkpoint"),
    "no weights in a part": (lambda i, m: ISEG + f"model: {{path: {no_weights(i, m)}}}\n", [],
                             "vae/ holds no .safetensors"),
    "missing weights folder": (ISEG, ["model.path=/nonexistent/sd"], "model_index.json"),
    "truncated weights": (lambda i, m: ISEG + f"model: {{path: {damaged_model(i, m, 'truncated')}}}\n", [],
                          "truncated"),
    "weights that are not safetensors": (lambda i, m: ISEG + f"model: {{path: {damaged_model(i, m, 'garbage')}}}\n",
                                         [], "cannot be loaded"),
    "malformed model config": (lambda i, m: ISEG + f"model: {{path: {damaged_model(i, m, 'json')}}}\n", [],
                               "unet/config.json is not valid JSON"),
    "a resolution the model lacks": ("method: ovam\ndata: {name: voc_sim, limit: 2, size: 64}\n"
                                     "params: {mode: generation, steps: 2, blocks: '64'}\n", [],
                                     "no cross-attention at rank 2"),
    # output
    "output_dir under a file": (ISEG, ["output_dir={inputs}/a-file/run"], "is not a folder"),
    "output_dir exists": (ISEG, ["output_dir={inputs}"], "already exists"),
    # the test-only fault hook, malformed
    "malformed fault hook": (ISEG, [], f"{TRACE_FAULT_ENV}='abc'"),
    # bounded parsing (bench.limits): each would hang, overflow the stack or exhaust memory
    "sweep file over 1 MiB": (ISEG + "# " + "x" * (1 << 20) + "\n", [], "over the limit of 1048576 bytes"),
    "yaml alias bomb": ("method: iseg\n" + "".join(
    f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}" if k else "x"] * 10) + "]\n" for k in range(7)), [], "expands to more than"),
    "20000 levels of nesting": (ISEG + "params: {x: " + "[" * 20000 + "]" * 20000 + "}\n", [], "levels deep"),
    "nesting in an override": (ISEG, ["params.x=" + "[" * 5000 + "]" * 5000], "levels deep"),
    "override of 100 kB": (ISEG, ["description=" + "x" * 100_000], "over the limit of 65536"),
    "latin-1 sweep file": ((ISEG + "description: caf\xe9\n").encode("latin-1"), [], "not UTF-8"),
    "utf-16 sweep file": (ISEG.encode("utf-16"), [], "is UTF-16"),
    "template format spec": (ISEG, ["params.template='A {classes:>9999999999}'"], "plain fields only"),
    "template conversion": (ISEG, ["params.template='A {classes!r}'"], "plain fields only"),
    "template attribute": (ISEG, ["params.template='A {classes.__class__}'"], "plain fields only"),
    "grid of 10^6 points": (ISEG + "sweep: {" + ", ".join(f"{p}: [{', '.join(str((v + 1) / 100) for v in range(100))}]"
                                                           for p in ("lambda", "gamma", "bg_threshold")) + "}\n",
                             [], "configurations"),
    "num_samples of 10^9": (ISEG + "sweep: {lambda: {uniform: [0, 1]}}\n", ["num_samples=1000000000"],
                            "configurations"),
    "data.size=100000": (ISEG, ["data.size=100000"], "over the limit of 8192 pixels a side"),
    "model.resolution=16384": (ISEG, ["model.resolution=16384"], "over the limit of 8192 pixels a side"),
    "image over the pixel limit": (lambda i, m: voc_sweep(i, "huge image"), [], "9000x9000 pixels"),
    "image over PIL's bomb limit": (lambda i, m: voc_sweep(i, "bomb image"), [], "over the limit of"),
    # seeds: distinct integers in [0, 2**32)
    "repeated seed": (ISEG + "seeds: [0, 0]\n", [], "repeats 0"),
    "seed 2**63": (ISEG + f"seeds: [{2**63}]\n", [], "< 2**32"),
    "seed 2**32": (ISEG + f"seeds: [{2**32}]\n", [], "< 2**32"),
    "boolean seed": (ISEG + "seeds: [true]\n", [], "must be a non-empty list of integers"),
    "string seed": (ISEG + "seeds: ['1']\n", [], "must be a non-empty list of integers"),
    "empty seeds": (ISEG + "seeds: []\n", [], "must be a non-empty list of integers"),
    "search_seed=2**40": (ISEG, [f"search_seed={2**40}"], "< 2**32"),
    "boolean num_samples": (ISEG, ["num_samples=true"], "num_samples must be an integer"),
    # the cluster: refused within seconds, before anything is written
    "unreachable ray.address": (ISEG, ["ray.address=127.0.0.1:1"], "no Ray cluster answers there"),
    "unknown ray.address host": (ISEG, ["ray.address=nohost.invalid:6379"], "no Ray cluster answers there"),
    "ray.address without port": (ISEG, ["ray.address=headnode"], "is not host:port"),
    "ray.address port 70000": (ISEG, ["ray.address=10.0.0.1:70000"], "is not host:port"),
    "template with an empty field": (ISEG, ["params.template='A {} of {classes}'"], "plain fields only"),
    "utf-32 sweep file": (ISEG.encode("utf-32"), [], "is UTF-32"),
    "control bytes in the sweep file": (ISEG.encode() + b"description: \x00\x07\n", [], "malformed YAML"),
    # one line even where the preflight warning (prompts cut) has fired before the refusal
    "output_dir exists after a warning": (ISEG + "params: {background_words: 'a, b, c, d, e, f, g, h, i, j'}\n",
                                          ["output_dir={inputs}"], "already exists"),
}
# The kinds the fast suite also runs as a subprocess (the rest: slow).
FAST_SUBPROCESS = ("yaml alias bomb", "20000 levels of nesting", "latin-1 sweep file", "repeated seed",
                   "output_dir exists after a warning")


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(kind, tmp_path, tiny_model, capsys, monkeypatch):
    message = CASES[kind][2]
    if kind == "malformed fault hook":
        monkeypatch.setenv(TRACE_FAULT_ENV, "abc")
    sweep, overrides = write_case(kind, tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "inputs")
    code = main([str(sweep), *overrides])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err[-2000:]
    assert message.lower() in lines[0].lower(), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]  # no run directory, no .partial, no reports/
    assert snapshot(tmp_path / "inputs") == before


def write_case(kind: str, tmp_path: Path, tiny_model: Path) -> tuple[Path, list[str]]:
    """The case's inputs under tmp_path/inputs: its sweep file (text or bytes) and its overrides."""
    text, overrides, _ = CASES[kind]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a-file").write_text("not a folder")
    sweep = inputs / "sweep.yaml"
    content = text(inputs, tiny_model) if callable(text) else text
    if isinstance(content, bytes):
        sweep.write_bytes(content)
    else:
        sweep.write_text(content)
    overrides = [o.replace("{inputs}", str(inputs)) for o in overrides]
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append(f"output_dir={tmp_path / 'out' / 'run'}")
    return sweep, overrides


@pytest.mark.parametrize("kind", [pytest.param(k, marks=() if k in FAST_SUBPROCESS else pytest.mark.slow)
                                  for k in sorted(CASES)])
def test_bad_input_from_the_command_line_is_the_only_line_on_stderr(kind, tmp_path, tiny_model):
    """The user's view: `python -m bench.run` in a fresh process; stderr holds exactly the one `error:` line (no
    warning, no log line, no traceback before it), exit 2, nothing written."""
    sweep, overrides = write_case(kind, tmp_path, tiny_model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_FINGERPRINT_CACHE": str(tmp_path.parent / f"{tmp_path.name}.db")}
    if kind == "malformed fault hook":
        env[TRACE_FAULT_ENV] = "abc"
    before = snapshot(tmp_path / "inputs")
    done = subprocess.run([sys.executable, "-m", "bench.run", str(sweep), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr[-2000:]
    assert CASES[kind][2].lower() in lines[0].lower(), lines[0]
    assert done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]
    assert snapshot(tmp_path / "inputs") == before


def test_the_matrix_covers_at_least_90_kinds():
    assert len(CASES) >= 90


@pytest.mark.parametrize("extra", ["", ", classes: gt"])
def test_the_good_inputs_behind_the_matrix_pass_preflight(extra, tmp_path, tiny_model):
    """The fixtures without their defect pass, so each case fails for its own defect only."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(voc_sweep(tmp_path, None, extra))
    plan = preflight(compose(sweep, [f"output_dir={tmp_path / 'out'}"]))
    assert plan.trials
    sweep.write_text(ISEG)
    preflight(compose(sweep, [f"model.path={tiny_model}", "model.resolution=64", "params.timestep=999"]))


def test_prompt_whose_tail_is_cut_runs_with_a_note(tmp_path, caplog):
    """iSeg's background words after the class names do not fit the embedded model's 16 tokens: the model cuts
    them as it always cuts prompts; preflight notes it once in the plan (the report states it), warns nothing on
    the console, and lets the run go on."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(ISEG)
    caplog.set_level("WARNING")
    plan = preflight(compose(sweep, []))
    assert len(plan.notes) == 1 and "text after the class names is cut" in plan.notes[0]
    assert not caplog.records


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_unwritable_output_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(ISEG)
    code = main([str(sweep), f"output_dir={locked / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not writable" in err[0]
    assert list(locked.iterdir()) == []


def test_a_utf8_byte_order_mark_is_allowed(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_bytes(b"\xef\xbb\xbf" + ISEG.encode())
    assert compose(sweep, []).method == "iseg"


@pytest.mark.parametrize("grpc_installed", [True, False], ids=["with-grpcio", "without-grpcio"])
def test_a_port_where_something_else_listens_is_no_ray_cluster(tmp_path, monkeypatch, grpc_installed):
    """A TCP listener that is not a Ray GCS (it accepts and hangs up): refused within the probe's bound, whether or
    not `grpcio` (Ray's `default` extra, absent from a plain install) is there to ask the GCS itself."""
    import socket
    import sys
    import threading
    import time

    from bench.errors import BenchError
    from bench.probe import check_ray_address

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve():
        for _ in range(4):
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    if not grpc_installed:
        monkeypatch.setitem(sys.modules, "grpc", None)  # import grpc raises ImportError
    threading.Thread(target=serve, daemon=True).start()
    start = time.time()
    with pytest.raises(BenchError, match="no Ray cluster answers there"):
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=3)
    assert time.time() - start < 10
    server.close()


def test_only_what_the_run_wrote_is_published(tmp_path):
    from bench.hygiene import foreign_entries

    run = tmp_path / "run.partial"
    for name in ("config.yaml", "run.json", "results.parquet", "report.html", "plot_mIoU_lambda.png",
                 "qualitative/a%20b.g000.npz", "fit/abc/done", "fit/abc/weights.safetensors", "work/lock"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    planted = ["tune/tuner.pkl", "evil.pkl", ".hidden", "results.csv.tmp", "qualitative/.a.g000.npz.1.tmp",
               "fit/unfinished/weights.safetensors", "fit/abc/.weights.safetensors.tmp"]
    for name in planted:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    found = {p.relative_to(run).as_posix() for p in foreign_entries(run)}
    assert found == {"tune", "evil.pkl", ".hidden", "results.csv.tmp", "qualitative/.a.g000.npz.1.tmp",
                     "fit/unfinished", "fit/abc/.weights.safetensors.tmp"}
