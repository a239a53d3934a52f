#!/usr/bin/env bash
# posttrain's prepared GPU check (issue 15), run ON THE DEVICE MACHINE from the repository root, in about 5
# minutes: the CUDA equality tests, the whole test suite, and the GPU benchmark against TRL 1.16.
#
# The next session that is lent an H200 (benchmarks/README.md, "The GPU check"):
#   1. here, first:   bash benchmarks/fetch_gpu_wheels.sh     (wheels into .whl/, the commit into .whl/COMMIT)
#   2. one device `run` call:  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 420
#   3. here: copy <date>-gpu.md / .json from files_at into benchmarks/results/, read summary.md, commit.
#
# Stages, each under its own `timeout` (seconds; environment variables override them):
#   setup   (SETUP_LIMIT 40)   install .whl/*.whl into /tmp/site (--no-deps), check the imports, record the
#                              device, driver and package versions
#   tests   in parallel, the GPU shared, the CPU split (16 cores):
#           equality (EQ_LIMIT 120)    tests/test_layout.py, tests/test_logps.py and every tests/*span*.py and
#                                      tests/*attention*.py: the CUDA equality tests, first in line
#           suite    (SUITE_LIMIT 120) every other test file with pytest -n 6, test_distributed.py left out
#           distributed (DIST_LIMIT 120) tests/test_distributed.py (two-process tests), in its own pytest
#   extra   (EXTRA_LIMIT 60)   only when EXTRA_CMD is set: one more GPU command, alone, e.g.
#                              EXTRA_CMD="python3 benchmarks/span_kernels.py --device cuda"
#   bench   (BENCH_LIMIT 150)  python3 benchmarks/run.py --gpu $BENCH_ARGS, alone on the machine, after every
#                              test process is gone; it stops starting runs at BENCH_LIMIT - 25 s (--budget) and
#                              writes its report after every run, so a cut-short benchmark still reports
# STAGES (default "setup,tests,bench") picks stages, e.g. STAGES=setup,bench BENCH_LIMIT=280 for a second call
# that completes the benchmark. TOTAL_LIMIT (default 300) caps the whole: no stage starts with its full limit
# past it. A timed-out pytest gets SIGINT first (it prints its summary), then SIGKILL; every stage's process
# group is killed when the stage ends, so nothing of a stage outlives it.
#
# Files back under $OUT (the device returns at most 8 files, 16 MiB each, 2 folders deep): summary.md (stage
# results, failures, the benchmark table), logs.tar.gz (every stage's log, the junit XML files, the benchmark's
# per-run spec/log/result files, the environment), and the benchmark's <date>-gpu.md and <date>-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
LOGS=$WORK/logs
STAGES=${STAGES:-setup,tests,bench}
TOTAL_LIMIT=${TOTAL_LIMIT:-300}
SETUP_LIMIT=${SETUP_LIMIT:-40}
EQ_LIMIT=${EQ_LIMIT:-120}
SUITE_LIMIT=${SUITE_LIMIT:-120}
DIST_LIMIT=${DIST_LIMIT:-120}
BENCH_LIMIT=${BENCH_LIMIT:-150}
EXTRA_LIMIT=${EXTRA_LIMIT:-60}
EXTRA_CMD=${EXTRA_CMD:-}
BENCH_ARGS=${BENCH_ARGS:---warmup 2 --steps 6 --child-timeout 120}
PYTHON=${PYTHON:-python3}
export PYTHON
STARTED=$(date +%s)
rm -rf "$WORK"
mkdir -p "$OUT" "$LOGS"
SUMMARY=$OUT/summary.md
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ -f .whl/COMMIT ]; then # the commit measured (this copy of the tree has no .git); run.py reports it
    BENCH_GIT_COMMIT=$(head -1 .whl/COMMIT)
    BENCH_GIT_STATUS=$(tail -n +2 .whl/COMMIT)
    export BENCH_GIT_COMMIT BENCH_GIT_STATUS
fi

# A command started with & by a non-interactive shell ignores SIGINT, and so would pytest: give it back its
# default, so that a timed-out pytest stops with its summary (GNU env >= 8.31; otherwise SIGKILL 15 s later).
RESET_INT=()
env --default-signal=INT true 2>/dev/null && RESET_INT=(env --default-signal=INT)

elapsed() { echo $(($(date +%s) - STARTED)); }
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[$(elapsed) s] $*" | tee -a "$LOGS/stages.log"; }

# limit SECONDS: a stage's limit, cut to what TOTAL_LIMIT leaves (at least 10 s).
limit() {
    local left=$((TOTAL_LIMIT - $(elapsed)))
    local want=$1
    [ "$want" -gt "$left" ] && want=$left
    [ "$want" -lt 10 ] && want=10
    echo "$want"
}

# run_stage NAME SECONDS CMD...: CMD under `timeout` (its own process group: timeout makes one), output to
# $LOGS/NAME.log, exit status and seconds to $LOGS/NAME.rc; the group is killed afterwards (stray workers).
run_stage() {
    local name=$1 seconds=$2
    shift 2
    local t0
    t0=$(date +%s)
    log "start $name (limit ${seconds} s): $*"
    timeout -s INT -k 15 "$seconds" "${RESET_INT[@]}" "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
    local tpid=$!
    wait "$tpid"
    local rc=$?
    kill -KILL -- "-$tpid" 2>/dev/null
    echo "$rc $(($(date +%s) - t0))" >"$LOGS/$name.rc"
    log "end $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (timed out)') after $(($(date +%s) - t0)) s"
}

# pytest_line NAME: the last summary line of a pytest log ("3 failed, 120 passed in 50.1s"), or the counts of
# the verbose lines so far when pytest was killed before it wrote one.
pytest_line() {
    local f=$LOGS/$1.log
    local line
    line=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$f" 2>/dev/null | tail -1)
    if [ -n "$line" ]; then
        echo "$line" | sed -E 's/^=+ //; s/ =+$//'
    else
        echo "no pytest summary; verbose lines so far: $(grep -cE ' PASSED' "$f" 2>/dev/null) passed," \
            "$(grep -cE ' (FAILED|ERROR)' "$f" 2>/dev/null) failed/error"
    fi
}

stage_status() { # NAME -> "exit RC, S s" or "not run"
    if [ -f "$LOGS/$1.rc" ]; then
        read -r rc secs <"$LOGS/$1.rc"
        echo "exit $rc$([ "$rc" -eq 124 ] && echo ', TIMED OUT'), ${secs} s"
    else
        echo "not run"
    fi
}

write_summary() {
    {
        echo "# posttrain GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s so far)"
        echo
        echo "Commit: ${BENCH_GIT_COMMIT:-unknown (no .whl/COMMIT)}; stages: $STAGES; total limit $TOTAL_LIMIT s."
        echo
        grep -E '^(gpu|driver|torch|python|import|package)' "$LOGS/env.txt" 2>/dev/null | sed 's/^/    /'
        echo
        echo "| stage | status | result |"
        echo "|---|---|---|"
        echo "| setup | $(stage_status setup) | $(tail -1 "$LOGS/setup.log" 2>/dev/null) |"
        for name in equality suite distributed; do
            [ -f "$LOGS/$name.rc" ] && echo "| $name | $(stage_status $name) | $(pytest_line $name) |"
        done
        [ -f "$LOGS/extra.rc" ] && echo "| extra | $(stage_status extra) | $(tail -1 "$LOGS/extra.log" | cut -c1-200) |"
        echo "| bench | $(stage_status bench) | $(grep -cE '^\[ *[0-9]+ s\] .* samples/s' "$LOGS/bench.log" 2>/dev/null) tool runs done, $(grep -cE 'FAILED \(exit' "$LOGS/bench.log" 2>/dev/null) failed |"
        for name in equality suite distributed; do
            if [ -f "$LOGS/$name.log" ] && grep -qE '^(FAILED|ERROR) ' "$LOGS/$name.log"; then
                echo
                echo "## $name: failures"
                echo
                grep -E '^(FAILED|ERROR) ' "$LOGS/$name.log" | head -60 | sed 's/^/    /'
            fi
        done
        if [ -f "$LOGS/bench.log" ]; then
            echo
            echo "## bench (run.py's progress; the table is in the <date>-gpu.md beside this file)"
            echo
            grep -E '^\[|^fixtures|^bf16 matmul|^peak|FAILED|Error|^wrote' "$LOGS/bench.log" | tail -40 | sed 's/^/    /'
        fi
    } >"$SUMMARY"
}

finish() {
    trap - EXIT INT TERM
    write_summary
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >"$LOGS/gpu-apps-at-end.txt" 2>&1
    cp "$SUMMARY" "$LOGS/" 2>/dev/null
    # The benchmark's per-run files (spec, log, result, posttrain's metrics and summary), not its models or data.
    tar czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
        --exclude='bench/models' --exclude='bench/data' --exclude='bench/hfcache' --exclude='bench/trl-out' \
        --exclude='bench/refcache' --exclude='bench/posttrain-cache' logs $(cd "$WORK" && ls -d bench 2>/dev/null)
    ls -l "$OUT"
    cat "$SUMMARY"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---- setup: wheels, imports, environment
if has_stage setup; then
    run_stage setup "$(limit "$SETUP_LIMIT")" bash -c '
        set -e
        ls -l .whl/
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        "$PYTHON" -c "import datasets, trl, bitsandbytes, gguf, posttrain, transformers, torch
print(\"imports ok: trl\", trl.__version__, \"datasets\", datasets.__version__, \"bitsandbytes\",
      bitsandbytes.__version__, \"cuda\", torch.cuda.is_available())"'
fi
{
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -1)"
    echo "python: $($PYTHON --version 2>&1) at $(command -v $PYTHON); cores: $(nproc --all)"
    echo "torch: $($PYTHON -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -1)"
    echo "import: $(tail -1 "$LOGS/setup.log" 2>/dev/null)"
    $PYTHON -c '
from importlib.metadata import PackageNotFoundError, version
for name in ("torch transformers trl datasets accelerate peft bitsandbytes gguf pyarrow fsspec huggingface_hub "
             "pytest pytest-xdist pytest-timeout dill multiprocess safetensors tokenizers numpy pandas").split():
    try:
        print(f"package: {name} {version(name)}")
    except PackageNotFoundError:
        print(f"package: {name} MISSING")' 2>&1
    echo "PYTHONPATH=$PYTHONPATH"
    nvidia-smi 2>&1
} >"$LOGS/env.txt"
write_summary

# ---- tests: the equality tests, the suite and the two-process tests side by side (the GPU has room for all)
if has_stage tests; then
    shopt -s nullglob
    EQUALITY=(tests/test_layout.py tests/test_logps.py)
    for f in tests/*span*.py tests/*attention*.py; do
        [[ " ${EQUALITY[*]} " == *" $f "* ]] || EQUALITY+=("$f")
    done
    IGNORES=(--ignore=tests/test_distributed.py)
    for f in "${EQUALITY[@]}"; do IGNORES+=("--ignore=$f"); done
    log "equality files: ${EQUALITY[*]}"
    # 6 workers x 2 threads + 2 + 2 x 1: the 16 cores, no oversubscription.
    OMP_NUM_THREADS=2 run_stage equality "$(limit "$EQ_LIMIT")" $PYTHON -m pytest -v -rfE -p no:cacheprovider \
        --junitxml="$LOGS/equality.xml" --durations=15 "${EQUALITY[@]}" &
    OMP_NUM_THREADS=2 run_stage suite "$(limit "$SUITE_LIMIT")" $PYTHON -m pytest -v -rfE -p no:cacheprovider -n 6 \
        --junitxml="$LOGS/suite.xml" --durations=30 tests "${IGNORES[@]}" &
    OMP_NUM_THREADS=1 run_stage distributed "$(limit "$DIST_LIMIT")" $PYTHON -m pytest -v -rfE -p no:cacheprovider \
        --junitxml="$LOGS/distributed.xml" --durations=10 tests/test_distributed.py &
    wait
    write_summary
fi

# ---- extra: one more command of the caller's, alone on the machine (its output in logs.tar.gz)
if [ -n "$EXTRA_CMD" ]; then
    run_stage extra "$(limit "$EXTRA_LIMIT")" bash -c "$EXTRA_CMD"
    write_summary
fi

# ---- bench: alone on the machine
if has_stage bench; then
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >"$LOGS/gpu-apps-before-bench.txt" 2>&1
    seconds=$(limit "$BENCH_LIMIT")
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    run_stage bench "$seconds" $PYTHON benchmarks/run.py --gpu --budget $((seconds - 25)) --out "$OUT" \
        --workdir "$WORK/bench" $BENCH_ARGS
    write_summary
fi
