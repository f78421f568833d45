#!/usr/bin/env bash
# Submit a sweep to a running Ray cluster with Ray's job client (needs `pip install -e ".[cluster]"` here and
# the same packages on the cluster's nodes). The job's driver runs on the head node; the run directory goes to
# object storage, which every node reaches, so fits (Ray Train checkpoints) and results survive the job.
#
#   RAY_ADDRESS      the cluster's dashboard, e.g. http://head-node:8265
#   DIFFSEG_STORAGE  where runs go, e.g. s3://my-bucket/diffseg-runs (each run gets its own folder below it)
#
# Endpoint and credentials of the object store come from the nodes' own environment (AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, ... or an instance role); they are not put into the job's runtime_env here.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard, e.g. http://head-node:8265}"
: "${DIFFSEG_STORAGE:?set DIFFSEG_STORAGE to the runs folder on object storage, e.g. s3://my-bucket/diffseg-runs}"

ray job submit \
  --address "$RAY_ADDRESS" \
  --working-dir . \
  --runtime-env-json "{\"env_vars\": {\"DIFFSEG_STORAGE\": \"$DIFFSEG_STORAGE\", \"OMP_NUM_THREADS\": \"1\"}}" \
  --entrypoint-num-cpus 1 \
  -- python -m bench.run sweeps/linear_probe.yaml data.limit=16 train.num_workers=2
# The job's last stdout line is the run directory (s3://.../linear_probe-<date>-<time>); read its report with
#   python -m bench.report s3://my-bucket/diffseg-runs/linear_probe-...
