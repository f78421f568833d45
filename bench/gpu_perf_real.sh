#!/usr/bin/env bash
# The capture cost on real-size SDXL, SD3-medium and Flux.1 (bench.perf_real: random weights, random text
# embeddings, bf16, 1024 px) on a lent GPU machine, on its own (bench/embedded/gpu_lease.sh also runs it after the
# embedded training when time is left). Before the call: `bash bench/embedded/gpu_wheels.sh` (writes .whl/).
#
#   device tool run: command "bash bench/gpu_perf_real.sh", carry [".whl"], timeout_s 300
#
# $OUT receives capture-real-cuda.{json,md} and perf_real.log. SD3 and Flux need the joint-attention capture of the
# transformer-backbone support; without it they are reported as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
# shellcheck source=bench/embedded/gpu_env.sh
source bench/embedded/gpu_env.sh && gpu_env || exit $?
timeout -k 5 "${PERF_LIMIT:-280}" "${PYTHON:-python3}" -m bench.perf_real --size "${PERF_SIZE:-1024}" --device cuda \
    --repeats "${PERF_REPEATS:-5}" --out "$OUT" 2>&1 | tee "$OUT/perf_real.log"
exit "${PIPESTATUS[0]}"
