#!/usr/bin/env bash
# One lent GPU machine, one call: train the embedded v3 recipe for a wall-clock budget, evaluate it beside the
# shipped v2 weights on the same device, and leave weights, training state and a report in $OUT.
#
# Before the call (here, with a package registry): `bash bench/embedded/gpu_wheels.sh` writes .whl/ (diffusers,
# Hydra, OmegaConf: the machine's image lacks them and reaches no registry). The call (device tool `run`):
#
#   command:   bash bench/embedded/gpu_lease.sh
#   carry:     [".whl"]                 (plus ".lease" when resuming, below)
#   timeout_s: 600                      (the script ends by itself after LEASE_LIMIT = 480 s)
#
# Timeline on the machine (LEASE_LIMIT seconds from the start): install the wheels (~10 s); the trainer renders
# 200k shapes images on 12 processes and encodes them (the v2 run: ~1 min); UNet training until
# LEASE_LIMIT - LEASE_EVAL_RESERVE or for LEASE_BUDGET seconds, whichever ends first (`--stop-at`), with the
# resumable state written to $OUT/state every minute and at the end; then v3 and v2 are evaluated at once
# (`python -m bench.embedded.evaluate`: localisation and binding by inversion at t = 100 and 200, generation,
# and the main job `sweeps/iseg_lambda.yaml`: mIoU and tied labels per lambda). A run cut off anywhere after its
# first minute of training still returns $OUT/state; a trainer killed by its own time limit is exported from it.
#
# $OUT afterwards (at most 8 files, each under 16 MiB, as the device tool returns them):
#   state/{model,ema,adam_m,adam_v}.safetensors   resumable training state (bench.embedded.train_state)
#   weights.tar       the v3 pipeline folder (fp16, as bench/embedded/weights is laid out)
#   report.json       device, versions, training summary, both evaluations, the bar's verdict
#   lease.log         everything printed
#   capture-real-cuda.json   (LEASE_PERF=1) bench.perf_real's report: render its Markdown with
#                     python -c "import json,bench.perf_real as p; print(p.render_markdown(json.load(open(F))))"
#
# Resuming a cut-off run in a later lease: copy the returned state/ into .lease/state in the repository (ignored
# by git), add ".lease" to carry, and call `LEASE_RESUME=.lease/state bash bench/embedded/gpu_lease.sh`.
# Size: what travels is capped at 64 MiB. The tracked tree is ~56 MiB (reports/ alone ~45 MiB) and .whl/ 6.2 MiB,
# so the first call fits with ~2 MiB to spare, but the state (~52 MiB) does not: for a resuming call, move
# reports/ out of the checkout for the call's duration (nothing here reads it) and put it back afterwards.
#
# Environment (defaults for the GPU run; the CPU smoke test sets them small):
#   OUT                  where results go (the device tool sets it)
#   LEASE_DEVICE         cuda | cpu                         (cuda)
#   LEASE_LIMIT          seconds the whole script may take  (480)
#   LEASE_EVAL_RESERVE   seconds kept for evaluation and the report at the end (150)
#   LEASE_BUDGET         seconds of UNet training at most   (300)
#   LEASE_TRAIN_ARGS     extra trainer flags                ("")
#   LEASE_EVAL_ARGS      evaluation flags                   (--num-images 100 --t 100 200 --generate 16)
#   LEASE_RESUME         a training state folder to continue ("")
#   LEASE_BASELINE       the model v3 is compared with      (bench/embedded/weights)
#   LEASE_PERF           1: afterwards, bench.perf_real in what is left of LEASE_CALL_LIMIT (585 s) (1)
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that receives the results}"
START=$(date +%s)
DEVICE=${LEASE_DEVICE:-cuda}
LIMIT=${LEASE_LIMIT:-480}
RESERVE=${LEASE_EVAL_RESERVE:-150}
BUDGET=${LEASE_BUDGET:-300}
TRAIN_ARGS=${LEASE_TRAIN_ARGS:-}
EVAL_ARGS=${LEASE_EVAL_ARGS:---num-images 100 --t 100 200 --generate 16}
RESUME=${LEASE_RESUME:-}
BASELINE=${LEASE_BASELINE:-bench/embedded/weights}
PERF=${LEASE_PERF:-1}
CALL_LIMIT=${LEASE_CALL_LIMIT:-585}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/lease.XXXXXX)
mkdir -p "$OUT"

left() { echo $((START + LIMIT - $(date +%s))); }

run_lease() {
    echo "== lease start $(date -u +%FT%TZ), limit ${LIMIT} s, device ${DEVICE}"
    # 1. environment: the machine's own packages, plus the carried wheels for what it lacks
    # shellcheck source=bench/embedded/gpu_env.sh
    source bench/embedded/gpu_env.sh && gpu_env || return $?
    $PY - <<'EOF' | tee "$WORK/device.json"
import json, platform, subprocess
import diffusers, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    smi = ""
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "diffusers": diffusers.__version__, "transformers": transformers.__version__, "gpu": gpu,
                  "nvidia_smi": smi, "cpu_count": __import__("os").cpu_count()}))
EOF
    echo "== environment ready after $(( $(date +%s) - START )) s"

    # 2. train: UNet training ends at the budget or LEASE_EVAL_RESERVE seconds before the limit
    local stop_at=$((START + LIMIT - RESERVE)) hard=$(( $(left) - RESERVE + 60 ))
    local cmd=(-m bench.embedded.train --out "$WORK/v3" --state-dir "$OUT/state" --device "$DEVICE"
               --time-budget "$BUDGET" --stop-at "$stop_at")
    if [ -n "$RESUME" ]; then cmd+=(--resume "$RESUME"); else cmd+=(--recipe v3); fi
    # shellcheck disable=SC2206
    cmd+=($TRAIN_ARGS)
    echo "== train (hard limit ${hard} s): $PY ${cmd[*]}"
    timeout -k 10 "$hard" $PY "${cmd[@]}" > "$WORK/train.log" 2>&1
    local train_rc=$?
    tr '\r' '\n' < "$WORK/train.log" | grep -v -e '^unet: ' -e '^render: ' -e '^encode: ' -e '^vae: ' \
        -e 'Writing model shards' -e 'should be kept in float32'
    echo "== train exit ${train_rc} after $(( $(date +%s) - START )) s"
    if [ ! -f "$WORK/v3/model_index.json" ]; then
        [ -f "$OUT/state/model.safetensors" ] || { echo "error: training left no state to export"; return 4; }
        echo "== exporting the last training state"
        $PY -m bench.embedded.train --export-state "$OUT/state" --out "$WORK/v3" 2>&1 | tail -2
    fi
    tar -C "$WORK" --exclude v3/checkpoints -cf "$OUT/weights.tar" v3

    # 3. evaluate v3 and the baseline at once, on the same device
    local eval_limit=$(( $(left) - 20 ))
    echo "== evaluate (limit ${eval_limit} s each): ${EVAL_ARGS}"
    for name in v3 baseline; do
        local model="$WORK/v3"; [ "$name" = baseline ] && model="$BASELINE"
        # shellcheck disable=SC2086
        timeout -k 5 "$eval_limit" $PY -m bench.embedded.evaluate --model "$model" --device "$DEVICE" $EVAL_ARGS \
            --main-job sweeps/iseg_lambda.yaml --json "$WORK/eval_$name.json" > "$WORK/eval_$name.log" 2>&1 &
    done
    wait
    for name in v3 baseline; do
        [ -s "$WORK/eval_$name.json" ] || { echo "-- eval $name wrote no report; its log ends:"; tail -5 "$WORK/eval_$name.log"; }
    done

    # 4. the report
    $PY - "$WORK" "$OUT" "$START" "$BASELINE" <<'EOF'
import json, sys, time
from pathlib import Path
work, out, start, baseline = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
from bench.embedded.train_state import read_meta

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

meta = read_meta(out / "state")
cfg = meta["config"]
log = (work / "train.log").read_text(errors="replace") if (work / "train.log").exists() else ""
lines = [line.split(": ", 1)[-1] for line in log.splitlines() if " bench.embedded.train: " in line]
pick = ("step time", "unet: ", "rendered", "vae done", "warm start", "resumed", "stopping", "parameters")
report = {"device": load(work / "device.json"), "seconds": round(time.time() - start, 1),
          "train": {"step": meta["step"], "total_steps": meta["total_steps"], "batch": cfg["batch"],
                    "samples": meta["step"] * cfg["batch"], "log": [x for x in lines if x.startswith(pick)],
                    "config": cfg},
          "v3": load(work / "eval_v3.json"), "baseline": {"model": baseline, **(load(work / "eval_baseline.json") or {})}}

def job(rows, lam):
    return next((r for r in (rows or {}).get("main_job", {}).get("rows", []) if r.get("lambda") == lam), None)

v3, v2 = job(report["v3"], 0.01), job(report["baseline"], 0.01)
if v3 and v2:  # the bar: iSeg's default (lambda = 0.01, N = 10) above v2's, and under 5% of labels tied
    report["verdict"] = {"iseg_default_mIoU": {"v3": v3["mIoU"], "baseline": v2["mIoU"]},
                         "tied_percent": {"v3": v3["tied"], "baseline": v2["tied"]},
                         "beats_baseline": v3["mIoU"] > max(v2["mIoU"], 50.0) and v3["tied"] < 5.0}
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
train = {k: v for k, v in report["train"].items() if k != "config"}
print(json.dumps({"seconds": report["seconds"], "train": train}, indent=1))
for name in ("v3", "baseline"):
    r = report[name] or {}
    for inv in r.get("inversion", []):
        print(f"{name} inversion t={inv['t']}: raw IoU {inv['iou']['raw@0.4']:.3f}, refined {inv['iou']['refined@0.4']:.3f},"
              f" binding {inv['binding']['raw']['rate']}")
    if "generation" in r:
        print(f"{name} generation: {r['generation']['accepted']:.2f} of {r['generation']['num_images']} accepted")
    for row in r.get("main_job", {}).get("rows", []):
        print(f"{name} main job lambda={row['lambda']}: mIoU {row['mIoU']:.1f}, tied {row['tied']:.1f}%")
print("verdict:", json.dumps(report.get("verdict")))
EOF
    echo "== embedded part done after $(( $(date +%s) - START )) s"

    # 5. with the time the call has left: the capture cost on real-size SDXL / SD3-medium / Flux (bench.perf_real)
    local perf_limit=$(( CALL_LIMIT - $(date +%s) + START ))
    if [ "$PERF" = 1 ] && [ "$DEVICE" = cuda ] && [ "$perf_limit" -gt 60 ]; then
        echo "== perf_real (limit ${perf_limit} s)"
        timeout -k 5 "$perf_limit" $PY -m bench.perf_real --size 1024 --device cuda --repeats 5 --out "$WORK/perf" 2>&1 \
            | grep -v -e 'Loading' -e 'it/s'
        cp "$WORK/perf/capture-real-cuda.json" "$OUT/" 2>/dev/null || echo "perf_real wrote no report"
    fi
    echo "== lease done after $(( $(date +%s) - START )) s"
}

run_lease 2>&1 | tee "$OUT/lease.log"
rc=${PIPESTATUS[0]:-1}
rm -rf "$WORK"
ls -l "$OUT" "$OUT/state" 2>/dev/null
exit "$rc"
