#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels that bench/embedded/gpu_lease.sh installs on a lent GPU
# machine: that machine reaches no registry, and its image (python3 3.12, torch, transformers, safetensors,
# huggingface_hub, scipy, PyYAML, Pillow, tqdm) lacks diffusers, Hydra and OmegaConf, which the trainer, the
# evaluation and the sweep-file loader import. Pure-Python wheels (py3-none-any), so they install under any
# Python 3 there; antlr4-python3-runtime 4.9 (Hydra's pin) is published as a source archive only and is built
# into a wheel here. The versions are the ones this project is tested with.
#
#   bash bench/embedded/gpu_wheels.sh            # writes .whl/ in the repository root (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-python3 -m pip}
rm -rf .whl && mkdir -p .whl
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 importlib_metadata==8.7.0
$PIP wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
du -sh .whl
