#!/usr/bin/env bash
# One script for a lent GPU: installs the wheels `make gpu-wheels` put into .whl/ (next to the machine's own
# torch, never a second one), then checks the CUDA path in about 8 minutes and prints one markdown table.
#
#   benchmarks/gpu_check.sh                     # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --out my_check/     # logs and the table there (default gpu_check_out/)
#   benchmarks/gpu_check.sh --dry-run           # list every step; CUDA steps are skipped with the reason
#
# Steps (seconds each may take): install (120), cuda-tests (90: bf16 vs fp32 embeddings, a CUDA training step
# against the CPU step, fused AdamW skips under fp32/bf16/fp16), finetune (120: rocov2_demo, 50 bf16 steps),
# bench-train (300: FuseLIP-S/B, paired and caption shapes, cached/pixels, compile off/on), bench-encode (60).
# PYTHON picks the interpreter (default python3). Exit status: 0 when no step failed.
set -uo pipefail

OUT=gpu_check_out
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
mkdir -p "$OUT"
TABLE="$OUT/summary.md"
ROWS=()
FAILED=0

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    NO_CUDA=""
else
    NO_CUDA="no CUDA device (torch.cuda.is_available() is False)"
fi

# step NAME NEEDS_CUDA SECONDS COMMAND...: run COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
    local name="$1" needs_cuda="$2" seconds="$3"
    shift 3
    local log="$OUT/$name.log" status start elapsed
    echo "== $name: $*"
    if [[ "$needs_cuda" == 1 && -n "$NO_CUDA" ]]; then
        ROWS+=("| $name | skipped: $NO_CUDA | - | \`$*\` |")
        echo "   skipped: $NO_CUDA"
        return
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        ROWS+=("| $name | dry run: not run (limit ${seconds} s) | - | \`$*\` |")
        echo "   dry run: not run"
        return
    fi
    start=$(date +%s)
    if timeout "$seconds" "$@" >"$log" 2>&1; then
        status="ok"
    else
        status="FAILED (exit $?; see $log)"
        FAILED=1
    fi
    elapsed=$(( $(date +%s) - start ))
    ROWS+=("| $name | $status | $elapsed | \`$*\` |")
    echo "   $status in ${elapsed} s"
}

# shellcheck disable=SC2329  # invoked through step
install_wheels() {
    if [[ ! -d .whl ]] || ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "no wheels in .whl/: run 'make gpu-wheels' on a machine with network first" >&2
        return 1
    fi
    local constraint
    constraint="$(mktemp)"
    # the machine's own torch stays: a wheel that needs another torch makes pip fail instead of replacing it
    "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$constraint" || return 1
    "$PY" -m pip install --no-index --find-links .whl -c "$constraint" 'fuselip-med[test]'
}

step install 0 120 install_wheels
step cuda-tests 1 90 "$PY" -m pytest -q -m cuda tests/test_cuda_paths.py
step finetune 1 120 "$PY" -m fuselip_med.cli finetune --recipe rocov2_demo --set train.steps=50 \
    --set train.precision=bf16 --set "output.dir=$OUT/finetune_run"
step bench-train 1 300 "$PY" benchmarks/bench_train.py --device cuda --steps 10 --warmup 3
step bench-encode 1 60 "$PY" benchmarks/bench_encode.py --devices cuda

{
    echo "| step | status | seconds | command |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$TABLE"
echo
cat "$TABLE"
for log in "$OUT"/bench-train.log "$OUT"/bench-encode.log; do
    [[ -s "$log" ]] && { echo; echo "## $(basename "$log" .log)"; grep '^|' "$log"; }
done
exit "$FAILED"
