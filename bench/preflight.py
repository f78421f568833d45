"""Every check of user input that can fail, on the driver, before Ray starts or anything is written."""

from __future__ import annotations

import os

import torch

from bench.config import SweepConfig, train_data_config
from bench.data import build_dataset, dataset_options, require_generation_gt
from bench.errors import BenchError
from bench.plan import Plan, make_plan
from bench.stages.fit import FAULT_ENV, check_fit_sources, parse_fault


def preflight(cfg: SweepConfig) -> Plan:
    """Checks the sweep against the data, the fits it needs and the machine; returns its plan."""
    dataset = build_dataset(cfg.data)
    plan = make_plan(cfg)
    for mode in sorted({t.params["mode"] for t in plan.trials}):
        require_generation_gt(dataset, mode)
    if plan.fits:
        check_training_data(cfg)
        if cfg.train.use_gpu and not cfg.ray.address and not torch.cuda.is_available():
            raise BenchError("train.use_gpu=true but this machine has no CUDA GPU; use train.use_gpu=false or "
                             "ray.address=<a cluster with GPUs>")
    check_fit_sources(cfg, plan)
    parse_fault(os.environ.get(FAULT_ENV))
    return plan


def check_training_data(cfg: SweepConfig) -> None:
    """Fits learn from the training split only: it must exist and must not be the evaluated split."""
    name = cfg.data["name"]
    if "split" not in dataset_options({"name": name}):
        raise BenchError(f"method {cfg.method} is fitted, but dataset {name} has no splits to train on; "
                         f"evaluate it on a dataset with a training split")
    evaluated = dataset_options(cfg.data)["split"]
    if evaluated == cfg.train.split:
        raise BenchError(f"method {cfg.method} would be fitted on the evaluated split ({name} {evaluated}); "
                         f"evaluate another split (data.split=val) or fit on another (train.split=train)")
    build_dataset(train_data_config(cfg))
