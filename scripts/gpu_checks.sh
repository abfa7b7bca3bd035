#!/usr/bin/env bash
# The GPU checks of the Performance and ToyWorld issues, as one prepared script for a lent GPU machine
# that has torch but no internet (and no diffusers, pydantic or omegaconf).
#
#   bash scripts/gpu_checks.sh wheels      # HERE, with a package index: the missing wheels into .whl/
#   bash scripts/gpu_checks.sh bench       # THERE: benchmarks/step_overhead.py --device cuda (about 5 min)
#   bash scripts/gpu_checks.sh toyworld    # THERE: toyworld train --device cuda + bench (about 10 min on an H100)
#   bash scripts/gpu_checks.sh all         # THERE: bench, then toyworld, each stage under its own time limit,
#                                          #        so that the whole fits one 10-minute device call
#
# THERE means the device tool's `run`, carrying .whl, e.g.
#   run(command="bash scripts/gpu_checks.sh bench", carry=[".whl"], timeout_s=540)
# Results are written under $OUT (the folder that comes back), or ./gpu-out without one.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python3}"
# what the GPU image lacks (it has torch, transformers, safetensors, click, tqdm, pluggy, matplotlib)
WHEELS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        omegaconf==2.4.0 importlib-metadata==10.2.0 zipp==4.1.2)

install_there() {
    mkdir -p "$OUT"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    # negguide itself (its plugins/ and adapters/ folders are mapped packages: install, do not just add to the path)
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site .
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        "$PY" -c "import torch, diffusers, negguide; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
        date -u +%Y-%m-%dT%H:%M:%SZ
    } | tee "$OUT/machine.txt"
}

run_bench() {
    timeout "${BENCH_LIMIT:-0}" "$PY" benchmarks/step_overhead.py --device cuda --models sd3,flux,wan \
        --rounds 10 --repeats 3 --warmup 1 2>&1 | tee "$OUT/step_overhead.txt"
}

run_toyworld() {
    # -P: the negguide installed in /tmp/site, not the source tree in the working directory (whose plugins/ and
    # adapters/ are only mapped to negguide.plugins / negguide.adapters by an install).
    # At most 8 files come back from $OUT: the model and the bench folder travel as archives. Scenes are drawn
    # by 12 processes (drawing is Python-bound and would starve the GPU); checkpoints keep a run cut short.
    timeout "${TRAIN_LIMIT:-0}" "$PY" -P -m negguide toyworld train --device cuda --data-workers 12 \
        --checkpoint-every 1000 --out toyworld-gpu-model 2>&1 | tr '\r' '\n' | tee "$OUT/train.txt" || true
    tar czf "$OUT/toyworld-model.tgz" toyworld-gpu-model
    timeout "${TB_LIMIT:-0}" "$PY" -P -m negguide toyworld bench --device cuda --n 256 --model toyworld-gpu-model \
        --out toyworld-gpu-bench 2>&1 | tr '\r' '\n' | tee "$OUT/bench.txt" || true
    tar czf "$OUT/toyworld-bench.tgz" toyworld-gpu-bench
}

case "${1:-}" in
    wheels)
        mkdir -p .whl
        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "${WHEELS[@]}"
        ls -l .whl
        ;;
    bench)
        install_there
        run_bench
        ;;
    toyworld)
        install_there
        run_toyworld
        ;;
    all)
        # stage limits (seconds) for one device call of at most 600 s; a stage cut short keeps what it wrote
        install_there
        BENCH_LIMIT="${BENCH_LIMIT:-300}" run_bench || echo "bench: exit $?" | tee -a "$OUT/machine.txt"
        TRAIN_LIMIT="${TRAIN_LIMIT:-200}" TB_LIMIT="${TB_LIMIT:-100}" run_toyworld \
            || echo "toyworld: exit $?" | tee -a "$OUT/machine.txt"
        ;;
    *)
        echo "usage: bash scripts/gpu_checks.sh wheels|bench|toyworld|all" >&2
        exit 2
        ;;
esac
