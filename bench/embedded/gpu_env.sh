# Sourced by the lent-GPU scripts (bench/embedded/gpu_lease.sh, bench/gpu_perf_real.sh), from the repository root:
# puts the repository and, where the machine's image lacks them, the carried wheels (.whl/, written by
# bench/embedded/gpu_wheels.sh) on PYTHONPATH. The machine reaches no package registry (the device notes list
# none), so nothing is fetched there. Returns non-zero, with a one-line error, where that cannot work.
gpu_env() {
    local py=${PYTHON:-python3}
    if ! $py -c "import diffusers, hydra, omegaconf" 2>/dev/null; then
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "error: diffusers/hydra/omegaconf are missing and no .whl/ was carried; run bash bench/embedded/gpu_wheels.sh here and carry .whl"
            return 2
        fi
        local site
        site=$(mktemp -d /tmp/site.XXXXXX)
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || { echo "error: installing the carried wheels (.whl/) failed"; return 3; }
        export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
}
