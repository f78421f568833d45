"""Bounds on what a sweep can ask for, checked before Ray starts: each is one BenchError line that names the
limit and the fix, instead of a hang, a RecursionError or a MemoryError minutes later.

    sweep file      at most MAX_SWEEP_BYTES, UTF-8 (a UTF-8 byte-order mark is allowed)
    YAML            at most MAX_YAML_DEPTH levels of nesting (counted on the token stream, before any recursive
                    parsing) and MAX_YAML_NODES values once aliases are expanded (an alias bomb is refused
                    before anything copies it: Hydra and OmegaConf expand every alias)
    overrides       at most MAX_OVERRIDE_CHARS characters and MAX_YAML_DEPTH brackets deep each
    configurations  at most MAX_CONFIGURATIONS (grid points x random draws x seeds)
    images          at most MAX_IMAGE_PIXELS pixels, read from the file's header before it is decoded
    generated sizes data.size and model.resolution at most MAX_IMAGE_SIDE pixels a side
    model files     every safetensors file's header read and its tensors inside the file (a truncated or
                    foreign file), every JSON config parsed: before any worker starts loading
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import warnings
from pathlib import Path

import yaml

from bench.errors import BenchError

MAX_SWEEP_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 20_000
MAX_OVERRIDE_CHARS = 64 << 10
MAX_CONFIGURATIONS = 100_000
MAX_IMAGE_PIXELS = 8192 * 8192  # ~67 MP: 200 MB decoded as RGB; every method works at the model's 512-1024 px
MAX_IMAGE_SIDE = 8192
BOMS = {b"\xef\xbb\xbf": None, b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
        b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def read_sweep_text(path: Path) -> str:
    """The sweep file's text: bounded in size, UTF-8 (with or without a byte-order mark)."""
    size = path.stat().st_size
    if size > MAX_SWEEP_BYTES:
        raise BenchError(f"sweep file {path} is {size} bytes, over the limit of {MAX_SWEEP_BYTES} bytes; a sweep "
                         f"lists values, not data: move large lists into a file the dataset reads")
    raw = path.read_bytes()
    for bom, encoding in BOMS.items():
        if raw.startswith(bom):
            if encoding is not None:
                raise BenchError(f"sweep file {path} is {encoding}, not UTF-8; save it as UTF-8 (e.g. iconv -f "
                                 f"{encoding} -t UTF-8 {path.name} > fixed.yaml)")
            raw = raw[len(bom):]
            break
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise BenchError(f"sweep file {path} is not UTF-8 (byte 0x{raw[err.start]:02x} at line {line}); save it "
                         f"as UTF-8 (e.g. iconv -f latin1 -t UTF-8 {path.name} > fixed.yaml)") from None


def check_yaml_shape(text: str, where: str) -> None:
    """Nesting depth on the token stream (PyYAML's scanner is iterative; its composer recurses), then the
    node count with every alias expanded, walked without recursion and with a memo of shared nodes."""
    depth = 0
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if isinstance(token, (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
                                  yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    line = token.start_mark.line + 1
                    raise BenchError(f"{where} nests more than {MAX_YAML_DEPTH} levels deep (line {line}); "
                                     f"flatten it")
            elif isinstance(token, (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)):
                depth -= 1
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # malformed: the loader's own error says where
    if root is None:
        return
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in sizes:
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[id(node)] > MAX_YAML_NODES:
            raise BenchError(f"{where} expands to more than {MAX_YAML_NODES} values (aliases included); a sweep "
                             f"needs far fewer: remove the repeated aliases")


def check_override(item: str) -> None:
    if len(item) > MAX_OVERRIDE_CHARS:
        raise BenchError(f"override {item[:40]!r}... is {len(item)} characters, over the limit of "
                         f"{MAX_OVERRIDE_CHARS}; put long values in the sweep file")
    depth = deepest = 0
    for char in item:
        depth += char in "[{"
        depth -= char in "]}"
        deepest = max(deepest, depth)
    if deepest > MAX_YAML_DEPTH:
        raise BenchError(f"override {item[:40]!r}... nests more than {MAX_YAML_DEPTH} levels deep; flatten it")


def count_configurations(grid_sizes: list[int], num_samples: int, seeds: int) -> None:
    """Grid points x random draws x seeds, multiplied before anything is expanded."""
    total = math.prod(grid_sizes) * num_samples * seeds
    if total > MAX_CONFIGURATIONS:
        raise BenchError(f"the sweep asks for {total:.3g} configurations ({' x '.join(map(str, grid_sizes)) or '1'} "
                         f"grid points x num_samples={num_samples} x {seeds} seeds), over the limit of "
                         f"{MAX_CONFIGURATIONS}; sweep fewer values, or search adaptively (search.algo=optuna)")


def check_side(name: str, value) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_IMAGE_SIDE:
        raise BenchError(f"{name}={value} is over the limit of {MAX_IMAGE_SIDE} pixels a side; use a smaller size "
                         f"(the models work at 512-1024 px)")


@contextlib.contextmanager
def bounded_images():
    """While active, PIL's Image.open refuses an image above MAX_IMAGE_PIXELS from its header (open is lazy:
    the pixels are decoded later), and PIL's own decompression-bomb warning and error become that line."""
    from PIL import Image

    original = Image.open

    def bounded(fp, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = original(fp, *args, **kwargs)
            except Image.DecompressionBombError:
                image = None
        if image is None or image.width * image.height > MAX_IMAGE_PIXELS:
            size = f"{image.width}x{image.height}" if image is not None else "larger than PIL's bomb limit"
            if image is not None:
                image.close()
            raise BenchError(f"image {fp} is {size} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                             f"({MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}); downscale it (the models see 512-1024 px)")
        return image

    Image.open = bounded
    try:
        yield
    finally:
        Image.open = original


MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own bound on its JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file cannot load (read from its header only), or None: the header is an 8-byte length
    and a JSON table whose tensors' data_offsets must end exactly at the file's end."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            if size < 8:
                return f"it is {size} bytes, shorter than a safetensors header"
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(MAX_SAFETENSORS_HEADER, size - 8):
                return "its header length is not a safetensors header's (not a safetensors file, or truncated)"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as err:
        return f"its header does not parse ({type(err).__name__})"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    data = size - 8 - length
    if ends and max(ends) != data:
        return f"its tensors need {max(ends)} bytes of data but the file holds {data} (truncated or padded)"
    return None


def check_model_files(folder: Path, option: str) -> None:
    """Every safetensors file and every JSON config of a model folder, before anything loads them."""
    for path in sorted(folder.rglob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise BenchError(f"{option}: {path.relative_to(folder)} cannot be loaded: {problem}; copy the file "
                             f"again or save the pipeline anew (pipe.save_pretrained(DIR, safe_serialization=True))")
    for path in sorted(folder.rglob("*.json")):
        if path.stat().st_size > MAX_SWEEP_BYTES * 16:
            continue  # a tokenizer's vocabulary: parsed by its loader
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise BenchError(f"{option}: {path.relative_to(folder)} is not valid JSON ({type(err).__name__}: "
                             f"{str(err).splitlines()[0]}); restore the file from the model's source") from None
