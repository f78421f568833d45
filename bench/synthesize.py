"""`python -m bench.synthesize SWEEP.yaml [key=value ...]`: synthesise an image-mask dataset (FreeGen).

The sweep names a synthesis method (`freegen`), a generation dataset for the prompts (`voc_sim`: class-name
templates; `coco_cap`: a caption list, `data.captions=`) and one configuration (`params`, no `sweep`).
Images are generated (mode=generation, guided DDIM) on a Ray Data actor pool (`ray.num_actors`, one GPU each
where there are GPUs; `ray.batch_size` prompts per UNet batch), or in this process where a local pool would hold
one actor (`ray.execution=auto|actors|driver`, as `bench.run`), each annotated by the method's pseudo-mask and
scored by its Temporal Fluctuation Factor. The result is a PASCAL VOC-layout folder that the `voc2012` loader
(and MMSegmentation's VOC dataset) read directly (its files: bench.stages.synthesis).

A configuration that needs a fit (FreeGen's learned ASR, `asr=learned`) is fitted first by the fit stage, as in
`bench.run` (Ray Train, on the data's training split `train.split`), into the folder's `fit/<hash>/`; a resumed
synthesis reuses it.

This is a shell over the runner of `bench.run`: the same checks, the same storage (`output_dir=` a path or an
s3://, gs:// URI), the same claim and resume (the same command with `output_dir=<out>` resumes an interrupted
synthesis without regenerating finished images; a changed configuration is refused), the folder published
complete or not at all. The last line on stdout is the dataset folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.env import quiet_environment

quiet_environment()  # before torch is imported below

from bench.config import compose
from bench.rundir import in_ray_job, run_target, unique_default_dir
from bench.stages.synthesis import drop_ignored_fit, synthesis_params, synthesize_into
from bench.stages.synthesis import voc_palette  # noqa: F401 (re-exported: the segmenter's tests import it from here)
from bench.storage import STORAGE_ENV


def synthesize(sweep_path: str, overrides: list[str]) -> Path | str:
    from bench.run import run_command

    cfg = compose(sweep_path, overrides)  # nothing is written before this, synthesis_params and preflight pass
    synthesis_params(cfg)
    default = not cfg.output_dir and not os.environ.get(STORAGE_ENV) and not in_ray_job()
    final = unique_default_dir(Path("reports") / "synthetic", cfg.name) if default else run_target(cfg)
    return run_command(cfg, sweep_path, overrides, synthesize_into, final=final, module="bench.synthesize",
                       noun="dataset folder", plan_hook=lambda plan: drop_ignored_fit(cfg, plan))


def main(argv: list[str] | None = None) -> int:
    from bench.run import sweep_command

    return sweep_command(argv, __doc__, "python -m bench.synthesize SWEEP.yaml [key=value ...]   "
                         "(e.g. data.seeds_per_class=4 output_dir=synthetic/x)", synthesize)


if __name__ == "__main__":
    sys.exit(main())
