#!/usr/bin/env bash
# The one prepared run on a lent CUDA GPU (issue 26): kernel tests compiled on CUDA, bench/kernels.py, serving
# (berry-26m- and SmolLM2-135M-shaped random-weight models at 1/16/64/256 streams), bench/train.py with and
# without --compile, and the quick checks of shared/gpu-review.md (the hybrid served on CUDA, strawberry-1.8m
# trained 20 steps with an eval, eager and compiled). Everything lands in one markdown file.
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only a,b] [--skip a,b]
#
# Steps, in order: env tests kernels hybrid serve-26m serve-smollm2 train-26m train-26m-compile train-hybrid
# train-hybrid-compile. Each runs under `timeout`, a failure is recorded and the run goes on, and the
# whole run stops starting steps once --budget (default 480 s) is spent. The report is rewritten after every
# step, so a run cut short still leaves one. Writes DIR/gpu-report.md (summary table + each step's output),
# DIR/gpu-raw.log (all output) and DIR/kernels.md; DIR defaults to $OUT (the GPU machine's) else out/gpu-check.
#
# The GPU machine has no network: its python3 holds torch and triton, and the missing pure-Python deps travel as
# wheels in .whl/ (installed with --target into a temp dir). SmolLM2's config + real tokenizer travel in
# .gpu/smollm2-135m/ (python -m berrylm.bench.gpu_check prepare-smollm2 GGUF .gpu/smollm2-135m); weights are drawn there.
# --dry-run runs every step on this CPU machine at toy sizes (kernels under TRITON_INTERPRET=1 --smoke) so that
# no command line, path or import can fail on the GPU for a typo; its figures mean nothing.
set -uo pipefail

DRY=0
OUTDIR="${OUT:-}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
ONLY=""
SKIP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --skip) SKIP="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

INVOKE_DIR="$PWD"
ROOT="$(cd "$(dirname "$0")" && pwd)"
while [ ! -f "$ROOT/pyproject.toml" ] && [ "$ROOT" != / ]; do ROOT="$(dirname "$ROOT")"; done
cd "$ROOT" || exit 2
OUTDIR="${OUTDIR:-$ROOT/out/gpu-check}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
REPORT="$OUTDIR/gpu-report.md"
RAW="$OUTDIR/gpu-raw.log"
BODY="$WORK/body.md"
: >"$RAW"
: >"$BODY"
SUMMARY=()
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# layout: before the namespace move the packages sit at the root (python -m bench.x, berry.py); after it under
# berrylm/ (python -m berrylm.bench.x, python -m berrylm)
if [ -d berrylm/bench ]; then PKG="berrylm."; EMB="berrylm/model/embedded"; else PKG=""; EMB="model/embedded"; fi
if [ -z "${PY:-}" ]; then
    if [ $DRY = 1 ] && [ -x .venv/bin/python ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if [ -f berry.py ]; then BERRY="$PY berry.py"; else BERRY="$PY -m berrylm"; fi
COMMIT="${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
if [ -n "$COMMIT" ] && ! git diff --quiet HEAD 2>/dev/null; then COMMIT+=" + uncommitted changes"; fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# the carried .whl/ and .gpu/: in the checkout's root, else where the script was started (a copied tree inside
# the checkout that travels, e.g. .gpurun/, run from the checkout's root)
WHL="$ROOT/.whl"; [ -d "$WHL" ] || WHL="$INVOKE_DIR/.whl"
GPUFIX="$ROOT/.gpu"; [ -d "$GPUFIX" ] || GPUFIX="$INVOKE_DIR/.gpu"

if [ $DRY = 1 ]; then
    MODE="DRY RUN on CPU (toy sizes; no figure here means anything)"
    DEV=cpu
    LEVELS=1,2; SERVE_TOKENS=8; BERRY_ARGS="--device cpu"
    TRAIN_BENCH=(--device cpu --seq-len 64 --micro-batch 2 --steps 2 --warmup 1)
    HYBRID_STEPS=2; HYBRID_MB=4
else
    MODE="GPU"
    DEV=cuda
    LEVELS=1,16,64,256; SERVE_TOKENS=64; BERRY_ARGS="--device cuda --kv-cache-mb 4096"
    TRAIN_BENCH=(--device cuda --seq-len 1024 --micro-batch 32 --steps 20 --warmup 3)
    HYBRID_STEPS=20; HYBRID_MB=32
fi

# ---------------------------------------------------------------- report plumbing

write_report() {
    {
        echo "# GPU check: ${GPU_NAME:-?} ($(date -u +%Y-%m-%d))"
        echo
        echo "Mode: $MODE. Commit ${COMMIT:-unknown (no git there; set GPU_CHECK_COMMIT)},"
        echo "\`bash bench/gpu_check.sh${ARGS_TEXT}\`, $(( $(date +%s) - START )) s so far of a ${BUDGET} s budget."
        echo "Serving figures are ours alone (no vLLM / llama.cpp CUDA build installs without a network there)."
        echo
        echo "| step | status | seconds | headline |"
        echo "|---|---|---|---|"
        for row in "${SUMMARY[@]}"; do echo "$row"; done
        echo
        cat "$BODY"
    } >"$REPORT"
}

wanted() {  # wanted NAME: selected by --only / --skip
    local n=",$1,"
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *"$n"* ]]; then return 1; fi
    if [ -n "$SKIP" ] && [[ ",$SKIP," == *"$n"* ]]; then return 1; fi
    return 0
}

# step NAME LIMIT_S TITLE -- COMMAND...   runs COMMAND (a program or an exported function) under timeout, output
# to $WORK/NAME.log. Set before the call: EMBED (a markdown file to paste into the report; else the last TAIL lines
# of the output go in a fence) and HEADLINE_CMD (a command over the log file, printing the summary's headline).
step() {
    local name=$1 limit=$2 title=$3
    shift 4
    STEP_RC=
    if ! wanted "$name"; then return 0; fi
    local now left t0 t1 status log="$WORK/$name.log"
    now=$(date +%s)
    left=$((DEADLINE - now))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("| $name | skipped: budget spent | 0 | |")
        printf '## %s\n\nskipped: the %s s budget was spent\n\n' "$title" "$BUDGET" >>"$BODY"
        write_report
        STEP_RC=125
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] $(printf '%q ' "$@")(limit ${limit}s)" | tee -a "$RAW"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >"$log" 2>&1
    fi
    STEP_RC=$?
    t1=$(date +%s)
    cat "$log" >>"$RAW"
    case $STEP_RC in
        0) status=ok ;;
        124|137) status="TIMEOUT (${limit}s)" ;;
        *) status="FAILED (rc $STEP_RC)" ;;
    esac
    echo "=== [$name] $status in $((t1 - t0))s" | tee -a "$RAW"
    {
        printf '## %s\n\n`%s` - %s, %s s\n\n' "$title" "$(printf '%q ' "$@" | sed 's/ $//')" "$status" "$((t1 - t0))"
        if [ -n "${EMBED:-}" ] && [ -s "$EMBED" ]; then
            sed 's/^#/###/' "$EMBED"  # its headings below this step's
            echo
            if [ $STEP_RC != 0 ]; then printf '```\n%s\n```\n' "$(tail -n 40 "$log")"; fi
        else
            printf '```\n%s\n```\n' "$(tail -n "${TAIL:-40}" "$log")"
        fi
        echo
    } >>"$BODY"
    local head=""
    if [ -n "${HEADLINE_CMD:-}" ]; then
        head="$(bash -c "$HEADLINE_CMD" _ "$log" 2>/dev/null | tr '\n|' '; ' | sed 's/  */ /g; s/; *$//' | cut -c1-240)"
    fi
    SUMMARY+=("| $name | $status | $((t1 - t0)) | $head |")
    EMBED=""
    TAIL=40
    HEADLINE_CMD=""
    write_report
}

ARGS_TEXT=""
[ $DRY = 1 ] && ARGS_TEXT+=" --dry-run"
[ -n "$ONLY" ] && ARGS_TEXT+=" --only $ONLY"
[ -n "$SKIP" ] && ARGS_TEXT+=" --skip $SKIP"

# ---------------------------------------------------------------- 0. environment

# carried wheels: on the GPU run, or in a dry run with GPU_CHECK_WHEELS=1 (to rehearse the GPU machine's set-up)
if { [ $DRY = 0 ] || [ -n "${GPU_CHECK_WHEELS:-}" ]; } && ls "$WHL"/*.whl >/dev/null 2>&1; then
    echo "=== installing $(ls "$WHL"/*.whl | wc -l) carried wheels from $WHL into $WORK/site" | tee -a "$RAW"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHL"/*.whl >>"$RAW" 2>&1 || echo "=== wheel install FAILED (see above); going on" | tee -a "$RAW"
    export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)")' 2>/dev/null || echo '?')"

export PY PKG WORK EMB BERRY HYBRID_STEPS HYBRID_MB
env_info() {
    echo "- host: $(uname -srm), $(nproc) CPUs; python: $PY"
    if command -v nvidia-smi >/dev/null; then
        echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
            --format=csv,noheader 2>&1 | head -n 2 | tr '\n' ' ')"
    else
        echo "- nvidia-smi: not found"
    fi
    "$PY" -m "${PKG}bench.gpu_check" env
}
export -f env_info
EMBED="$WORK/env.log"
HEADLINE_CMD='grep -E "^- (cuda:0|triton) " "$1" | sed "s# (/[^)]*)##g"'
step env 90 "Environment" -- env_info

# the random-weight serving models: built in the background while the kernel tests run (CPU + a little GPU)
MODELS_LOG="$WORK/models.log"
if wanted serve-26m || wanted serve-smollm2; then
    # SmolLM2's config + tokenizer: carried in .gpu/ (no GGUF there), or read here from `make install-test`'s GGUF
    SMOL="$GPUFIX/smollm2-135m"
    GGUF=.cache/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf
    (
        if [ ! -f "$SMOL/config.json" ] && [ -f "$GGUF" ]; then
            SMOL="$WORK/smollm2-src"
            "$PY" -m "${PKG}bench.gpu_check" prepare-smollm2 "$GGUF" "$SMOL"
        fi
        [ -f "$SMOL/config.json" ] || echo "no SmolLM2 config: run python -m ${PKG}bench.gpu_check prepare-smollm2 $GGUF $SMOL"
        timeout -k 10 180 "$PY" -m "${PKG}bench.gpu_check" make-models "$WORK/models" \
            $([ -f "$SMOL/config.json" ] && echo "--smollm2 $SMOL")
        echo "rc $?"
    ) >"$MODELS_LOG" 2>&1 &
    MODELS_PID=$!
fi

# ---------------------------------------------------------------- 1. kernel tests, compiled on CUDA

TEST_ARGS=(-q -rs -p no:cacheprovider --durations=10 tests/test_triton_kernels.py tests/test_kernels.py)
# on CPU the interpreter suite (a 5-10 min subprocess) is CI's job; the dry run checks the command and the rest
[ $DRY = 1 ] && TEST_ARGS+=(-k "not test_all_under_interpreter")
TAIL=60
HEADLINE_CMD='grep -E "[0-9]+ (passed|failed|error)" "$1" | tail -n 1'
step tests 240 "Kernel tests (Triton compiled on CUDA vs the PyTorch references)" -- "$PY" -m pytest "${TEST_ARGS[@]}"

# ---------------------------------------------------------------- 2. kernel benchmark

if [ $DRY = 1 ]; then KB=(env TRITON_INTERPRET=1 "$PY" -m "${PKG}bench.kernels" --smoke); else
    # shellcheck disable=SC2206
    KB=("$PY" -m "${PKG}bench.kernels" ${KERNELS_ARGS:-}); fi
EMBED="$OUTDIR/kernels.md"  # written at the end; cut short, the report shows the tables printed so far
rm -f "$EMBED"
TAIL=150
HEADLINE_CMD='grep -ciE "skipped a baseline|error|traceback" "$1" | sed "s/^/baseline skips or errors in the log: /"' 
step kernels 240 "Kernel benchmark (bench/kernels.py)" -- "${KB[@]}" --out "$OUTDIR/kernels.md"

# ---------------------------------------------------------------- 3. the hybrid served on the GPU (gpu-review)

EMBED="$WORK/hybrid.log"
HEADLINE_CMD='grep -E "^\| (server up|first request|JSON)" "$1" | cut -d"|" -f2,3 | sed "s/ (.*)//"'
step hybrid 120 "The hybrid (strawberry-1.8m-chat) served on $DEV: start-up, first request, JSON mode" -- \
    "$PY" -m "${PKG}bench.gpu_check" hybrid --device "$DEV"

# ---------------------------------------------------------------- 4. serving benchmarks

if [ -n "${MODELS_PID:-}" ]; then
    wait "$MODELS_PID"
    cat "$MODELS_LOG" | tee -a "$RAW"
    printf '## Random-weight serving models\n\n```\n%s\n```\n\n' "$(cat "$MODELS_LOG")" >>"$BODY"
fi
serve_bench() {  # serve_bench NAME MODEL_DIR TITLE
    if [ ! -f "$2/config.json" ]; then
        wanted "$1" && SUMMARY+=("| $1 | FAILED: no model ($2) | 0 | |") && \
            printf '## %s\n\nno model at %s (see the models section)\n\n' "$3" "$2" >>"$BODY"
        return
    fi
    TAIL=12
    HEADLINE_CMD='awk -F"|" "/^ *[0-9]+ [|] +berry/ {printf \"%s: %s tok/s, \", \$1, \$3}" "$1"'
    step "$1" 200 "$3" -- "$PY" -m "${PKG}bench.serve" --model "$2" --concurrency "$LEVELS" \
        --max-tokens "$SERVE_TOKENS" --ctx 512 --berry-args "$BERRY_ARGS"
}
serve_bench serve-26m "$WORK/models/berry-26m" \
    "Serving berry-26m (random weights, berry-chat tokenizer) on $DEV, streams $LEVELS, ours alone"
serve_bench serve-smollm2 "$WORK/models/smollm2-135m" \
    "Serving SmolLM2-135M (random weights, SmolLM2's tokenizer and chat template) on $DEV, streams $LEVELS, ours alone"

# ---------------------------------------------------------------- 5. training throughput, eager and compiled

train_bench() {  # train_bench NAME LIMIT TITLE [--compile]
    local name=$1 limit=$2 title=$3
    shift 3
    TAIL=8
    HEADLINE_CMD='grep -E "^berry-26m" "$1"'
    step "$name" "$limit" "$title" -- "$PY" -m "${PKG}bench.train" --presets berry-26m "${TRAIN_BENCH[@]}" "$@"
}
train_bench train-26m 90 "Training throughput: berry-26m, bf16 autocast, eager"
train_bench train-26m-compile 180 "Training throughput: berry-26m, bf16 autocast, torch.compile" --compile

# ---------------------------------------------------------------- 6. the hybrid trained on the GPU (gpu-review)

hybrid_train() {  # hybrid_train RUN_DIR [--compile]: tiny corpus -> shards (once), then N steps with one eval
    local run=$1
    shift
    if [ ! -f "$WORK/shards/meta.json" ]; then
        $BERRY data build --input tests/fixtures/tiny_corpus.txt --out "$WORK/corpus" --val-fraction 0.1 \
            && $BERRY data tokenize "$WORK/corpus" --tokenizer "$EMB/strawberry-1.8m-chat" \
                --out "$WORK/shards" || return 1
    fi
    $BERRY train pretrain --data "$WORK/shards" --preset strawberry-1.8m --steps "$HYBRID_STEPS" \
        --eval-every "$HYBRID_STEPS" --log-every 5 --ckpt-every 1000 --sample-every 1000 --warmup 5 \
        --seq-len 256 --micro-batch "$HYBRID_MB" --batch-tokens $((256 * HYBRID_MB)) --val-tokens 4096 \
        --out "$run" "$@" || return 1
    echo
    echo "| run | steps | loss | tokens/s | MFU | val loss |"
    echo "|---|---|---|---|---|---|"
    "$PY" -m "${PKG}bench.gpu_check" train-summary "$run" --label "$(basename "$run")"
}
export -f hybrid_train
TAIL=16
HEADLINE_CMD='grep -E "^[|] hybrid-" "$1"'
step train-hybrid 120 "strawberry-1.8m trained $HYBRID_STEPS steps on $DEV with one eval (eager)" -- \
    hybrid_train "$WORK/hybrid-eager"
TAIL=16
HEADLINE_CMD='grep -E "^[|] hybrid-" "$1"'
step train-hybrid-compile 180 "strawberry-1.8m trained $HYBRID_STEPS steps on $DEV with one eval (--compile)" -- \
    hybrid_train "$WORK/hybrid-compile" --compile

# ---------------------------------------------------------------- summary

write_report
echo
echo "wrote $REPORT ($(( $(date +%s) - START )) s); raw output in $RAW"
echo
echo "| step | status | seconds | headline |"
echo "|---|---|---|---|"
for row in "${SUMMARY[@]}"; do echo "$row"; done
rm -rf "$WORK"
# exit 0 when every step ran clean: the caller reads the table either way
for row in "${SUMMARY[@]}"; do [[ "$row" == *"| ok |"* ]] || exit 1; done
exit 0
