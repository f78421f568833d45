"""The contract between a trained method's `fit` and whoever runs it.

The engine runs fits on Ray Train workers (bench.stages.fit.RayFitContext: DDP, checkpoints in
`<run>/fit/<hash>/`); tests and command-line tools run them in one process (`LocalFitContext`). A fit sees
only this context: its train setting, the training split, the backbone, and helpers to trace training images
(`trace`), shard work, wrap a model for data-parallel training, log its loss curve and checkpoint/restore its
state. Methods import nothing else of the engine (tests/test_method_contract.py checks their imports).

States and artefacts are named tensors (safetensors, never pickle); `pack_state` / `unpack_state` carry nested
optimizer states (tensors plus plain values) through that format.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from methods.base import TrainSetting

log = logging.getLogger(__name__)


@dataclass
class LossPoint:
    step: int
    loss: float
    series: str = ""


class FitContext:
    """What a fit runs in. Subclasses implement the distributed parts; the defaults are one process."""

    def __init__(self, setting: TrainSetting, dataset, backbone, resolution: int = 0):
        self.setting = setting
        self.values: dict[str, Any] = dict(setting.values)
        self.dataset = dataset  # the training split (bench.config.train_data_config); never evaluation data
        self.backbone = backbone
        self.resolution = resolution  # image size fed to the backbone (model.resolution; 0 = native)
        self.curve: list[LossPoint] = []
        self.total_steps: int | None = None

    # -- distribution ----------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def shard(self, items: list) -> list:
        """This worker's share of `items` (every world_size-th, from its rank)."""
        return list(items)[self.rank::self.world_size]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap a model for data-parallel training (DDP across workers); one process: unchanged."""
        return model

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over workers (e.g. the global number of training pixels)."""
        return value

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every worker."""
        return [obj]

    # -- the UNet pass over training images -------------------------------------------------------------------
    def trace(self, method, samples: list, cfg: Mapping, req=None, classes: str = "gt", seed: int = 0):
        """The UNet pass over `samples` of the training split under the forward parameters of `cfg`, exactly as
        evaluation traces its images (bench.evaluate.trace_samples), at the fit's resolution: a TracedBatch of
        `queries` (each image's classes: gt | all), `prompts` and `traces`. `req`: what to record (default: the
        method's `trace_request(cfg)`)."""
        from bench.evaluate import trace_samples  # the engine's tracing, imported when a fit first traces

        return trace_samples(method, self.dataset, list(samples), cfg, seed,
                             req if req is not None else method.trace_request(cfg), self.resolution, classes=classes)

    # -- progress, checkpoints -------------------------------------------------------------------------------
    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps

    def log(self, step: int, loss: float, series: str = "") -> None:
        """One point of the loss curve (saved as loss.csv beside the artefact, plotted in the report)."""
        self.curve.append(LossPoint(int(step), float(loss), series))

    def status(self, text: str) -> None:
        """What the fit does between steps (e.g. "EGD training images 40/200"), shown beside the driver's
        progress bar: long preparation before the first step otherwise looks like a stalled bar."""
        log.debug("fit status: %s", text)

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """`build()`'s result (a nested structure of dicts, lists, tensors and plain values, as checkpoints hold),
        kept beside the fit's checkpoints until the fit finishes, so that a resumed fit reads it back instead of
        building it again: e.g. FreeGen's traced training images, minutes of UNet passes before the first step.
        Per worker (each builds its own shard). One process without checkpoints: built every time."""
        return build()

    def checkpoint(self, step: int, state: dict) -> None:
        """Save the fit's state after `step` steps, so a killed run resumes here (`restore`)."""

    def restore(self) -> tuple[int, dict] | None:
        """(steps done, state) of the last checkpoint of this train setting, or None to start afresh."""
        return None

    def resume(self, **stateful) -> int:
        """Load the last checkpoint's `state[name]` into each named object (model=, optimizer=, scheduler=: all
        with load_state_dict); the number of steps already done (0 when starting afresh)."""
        restored = self.restore()
        if restored is None:
            return 0
        start, state = restored
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        return start


class LocalFitContext(FitContext):
    """One process, no Ray. Checkpoints stay in memory (`checkpoints`); `resume_from` replays one, and
    `fail_after` raises after that many checkpoints (tests of resumption)."""

    def __init__(self, setting, dataset, backbone, resolution: int = 0, progress: Callable | None = None,
                 resume_from: tuple[int, dict, list] | None = None, fail_after: int | None = None,
                 caches: dict | None = None):
        super().__init__(setting, dataset, backbone, resolution)
        self.progress = progress
        self.checkpoints: list[tuple[int, dict, list]] = []
        # `cached` results, packed as on disk; pass an earlier context's to a resumed one (`caches=`)
        self.caches: dict[str, tuple[dict, str]] = caches if caches is not None else {}
        self.resume_from = resume_from
        self.fail_after = fail_after

    def log(self, step, loss, series=""):
        super().log(step, loss, series)
        if self.progress is not None:
            self.progress(step, loss, series)

    def cached(self, name, build):
        if name not in self.caches:
            self.caches[name] = pack_state(build())
        return unpack_state(*self.caches[name])  # the same round trip as on disk, first time included

    def checkpoint(self, step, state):
        tensors, meta = pack_state(state)  # the same round trip as on disk
        self.checkpoints.append((step, unpack_state(tensors, meta), list(self.curve)))
        if self.fail_after is not None and len(self.checkpoints) >= self.fail_after:
            raise InjectedFault(f"injected failure after checkpoint {len(self.checkpoints)} (step {step})")

    def restore(self):
        if self.resume_from is None:
            return None
        step, state, curve = self.resume_from
        self.curve = list(curve)
        # fresh tensors, as read from disk: optimizers adopt the state's tensors and update them in place, which
        # would change the checkpoint under a second resume from it
        return step, unpack_state(*pack_state(state))


class InjectedFault(RuntimeError):
    """Raised by fault injection (tests of resumption); never by normal operation."""


# -- nested states as named tensors -------------------------------------------------------------------------------
def pack_state(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """A nested structure of dicts, lists, tensors and plain values -> (named tensors, JSON of the rest).
    Dict keys keep their type (optimizer states are keyed by int)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path: str):
        if torch.is_tensor(obj):
            tensors[path] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint (tensors and plain values)")

    meta = json.dumps(walk(state, "s"))
    return tensors, meta


def unpack_state(tensors: dict[str, torch.Tensor], meta: str) -> dict:
    def build(node):
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__dict__" in node:
            return {k: build(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(json.loads(meta))
