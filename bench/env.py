"""The one place that sets up the process environment (threads, offline hubs, a quiet local Ray) and starts
Ray. Used by every command-line tool and by the tests."""

from __future__ import annotations

import atexit
import logging
import os
import platform
import stat
import sys
import tempfile
from importlib import metadata

QUIET_ENV = {
    # Attention code runs several times slower with 2 torch threads on 2 cores.
    "OMP_NUM_THREADS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_AUTH_MODE": "disabled",  # a local, short-lived cluster: no token file
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # a finished fit is noticed at once, not after 2 s
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # a Tune trial (one fit) works where the run was started
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # fits write their own records; no TensorBoard/CSV/JSON loggers
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar: the run's own bar shows progress
}
# glibc malloc: keep freed memory for reuse (allocations below 32 MiB from the heap, up to 256 MiB of free heap
# kept, 64 MiB of padding when it grows) instead of returning it to the OS and page-faulting it back on the next
# tensor of that size. Measured on the iSeg K = 24 per-image path (CPU): without these, 3 of 9
# processes paid 2.5-6 ms more per image in the tiled labelling (bimodal across processes: page faults on fresh
# tensors); with them none of 9 did. glibc reads them at start (Ray's workers get them in their environment); a
# running process applies them with mallopt (tune_allocator).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                 "MALLOC_TOP_PAD_": str(64 << 20)}
NOISY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "filelock", "urllib3", "diffusers", "transformers",
                 "matplotlib", "mlflow", "alembic")


def private_temp_dir(name: str) -> str:
    """`<tmp>/<name>-<uid>`, created 0700 and owned by this user: never a predictable shared path another user
    could create first (and so read or plant files in). When a folder of that name is owned by someone else or
    open to others, a fresh mkdtemp folder is used instead. Kept short: Ray puts unix sockets under it (a path limit of ~107 bytes)."""
    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        # taken by someone else (or opened up): a fresh unpredictable folder of our own instead
        fresh = tempfile.mkdtemp(prefix=f"{name}-{os.getuid()}-")
        logging.getLogger(__name__).warning("%s is not a private folder of this user; using %s", path, fresh)
        return fresh
    return path


def quiet_environment(ray_tmp: str = "ray-bench") -> None:
    """Environment defaults (never overriding what the user set): one thread, offline, a private Ray temp dir,
    the allocator settings (ALLOCATOR_ENV), applied to this process too."""
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = private_temp_dir(ray_tmp)
    for key, value in {**QUIET_ENV, **ALLOCATOR_ENV}.items():
        os.environ.setdefault(key, value)
    tune_allocator()


def tune_allocator() -> bool:
    """Apply ALLOCATOR_ENV's settings (or the user's values of those variables) to this running process with
    glibc's mallopt; False where the C library is not glibc (nothing to do: other allocators ignore them)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    options = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2, "MALLOC_MMAP_THRESHOLD_": -3}  # M_* of malloc.h
    done = True
    for name, option in options.items():
        try:
            value = int(os.environ.get(name, ALLOCATOR_ENV[name]))
        except ValueError:
            continue  # glibc ignored the malformed variable at start too
        done = bool(mallopt(option, value)) and done
    return done


def init_ray(address: str | None = None, object_store_mb: int = 256, quiet: bool = True) -> None:
    """Start (or join, with `address` or the RAY_ADDRESS a submitted job gets) Ray once per process, without
    dashboard, logs kept off the driver. A joined cluster keeps its own object store size."""
    import ray  # here, not at module top: tools that never start Ray do not pay for importing it
    from ray.data import DataContext

    if ray.is_initialized():
        return
    quiet_environment()
    worker_env = {k: os.environ[k] for k in {**QUIET_ENV, **ALLOCATOR_ENV} if k in os.environ}
    worker_env["PYTHONWARNINGS"] = "ignore"
    joining = bool(address or os.environ.get("RAY_ADDRESS"))
    if not joining:  # a Ray of this machine: its workers reach the run's object storage as this process does
        worker_env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    kwargs = dict(include_dashboard=False, log_to_driver=not quiet, configure_logging=True,
                  logging_level=logging.WARNING if quiet else logging.INFO,
                  runtime_env={"env_vars": worker_env})
    if address:
        ray.init(address=address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):  # a submitted job (or a shell pointed at a cluster): join it as it is
        ray.init(**kwargs)
    else:
        ray.init(object_store_memory=int(object_store_mb) * 1024 * 1024, **kwargs)
    from bench.errors import restore_terminate

    restore_terminate()  # ray.init's SIGTERM handler exits without a word; the command's says how to resume
    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    if quiet:  # a failed map worker's exception is the run's one-line error (its traceback in the run's
        # error.log): Ray Data's own report of it would print that traceback, and its record would keep the
        # exception, and with it the failed dataset's actors, alive
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    # a map worker's exception comes back as itself (RayTaskError.cause, bench.run.root_cause), not wrapped in
    # a UserCodeException that crosses the process boundary as its formatted traceback only
    ctx.raise_original_map_exception = True


VERSIONED = ("torch", "diffusers", "transformers", "ray")


def package_versions(names=VERSIONED) -> dict[str, str]:
    """{"python": ..., package: version} from the installed packages' metadata, without importing them
    (importing diffusers and transformers alone takes seconds)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def auto_num_actors(num_images: int, use_gpu: bool) -> int:
    """`ray.num_actors=auto` (after Ray started): one actor per GPU of the cluster where the backbone runs on
    GPUs, else one single-threaded actor per CPU but one, never fewer than one; never more actors than images.
    Why a core is left on CPU: the driver works too (Ray Data's scheduling, gathering the shards, scoring), and
    every actor pays its own start-up (Python, diffusers, the weights: 5-15 s of CPU) before its first image,
    against ~0.1 s per image on the embedded model; on 2 cores a second actor halves neither (measured with 2
    actors: first image after ~90 s instead of ~41 s; reports/perf/overhead-cpu.md)."""
    import ray

    resources = ray.cluster_resources()
    slots = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 1)) - 1
    return max(1, min(slots, num_images))


def local_slots(use_gpu: bool) -> int:
    """Tracing actors a local Ray would run, counted before starting it: GPUs where the backbone runs on
    GPUs, else usable CPU cores but one (the same rule as auto_num_actors)."""
    if use_gpu:
        import torch

        return torch.cuda.device_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 1


def resolve_execution(execution: str, num_actors: int | str, address: str | None, num_images: int,
                      use_gpu: bool) -> str:
    """`ray.execution` -> "driver" or "actors", before Ray starts.

    auto picks the driver where an actor pool cannot win: a local run (no `ray.address`) whose pool would hold
    one actor (one GPU, or two CPU cores, or one image). One actor does the driver's work one image at a time
    too, but first pays Ray's start, a process, the imports and its own model load (~15 s of CPU before its
    first image on the embedded model against ~0.2 s per image; reports/perf/overhead-cpu.md). A number of
    actors given (`ray.num_actors=N >= 1`) asks for the pool; `ray.num_actors=0` for the driver."""
    if execution != "auto":
        return execution
    if num_actors == 0:
        return "driver"
    if num_actors != "auto" or address:
        return "actors"
    return "driver" if min(local_slots(use_gpu), num_images) <= 1 else "actors"


def settle_execution(ray_cfg, num_images: int, use_gpu: bool) -> tuple[str, int | str]:
    """`ray.execution` and `ray.num_actors` as the run settles them: (execution, num_actors). "driver" comes
    with 0 actors; "actors" keeps the given count, or `auto` for auto_num_actors once Ray has started. The
    config is not changed: the run records the decision beside it (bench.resolved)."""
    execution = resolve_execution(ray_cfg.execution, ray_cfg.num_actors, ray_cfg.address, num_images, use_gpu)
    return execution, 0 if execution == "driver" else ray_cfg.num_actors


def exit_process(code: int) -> None:
    """End a finished command-line process at once: exit handlers run (Ray's shutdown, logging's flush), then
    the interpreter's teardown of every module and object (torch, diffusers, transformers: 1-2 s of CPU after
    the work is on disk) is skipped. Only for `__main__` after everything is written and closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    # the result (a run directory) was the last line on stdout: what Ray's shutdown prints (a raylet's
    # warning relayed by the driver) must not follow it, so stdout ends here
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    atexit._run_exitfuncs()  # the handlers sys.exit would run; os._exit alone would leave a local Ray running
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
