#!/usr/bin/env bash
# Entrypoint of the bacor_fuselip_train image: fine-tune FuseLIP on ROCOv2 with all visible GPUs.
#   docker run --gpus all ... bacor_fuselip_train small|base [--set key=value ...] [--resume]
# Everything after the size goes to `fuselip-med finetune` unchanged.
set -euo pipefail

# ---- paths and names (the one place to change them) -------------------------------------------------
DATA_DIR="${FUSELIP_MED_DATA_DIR:-/workspace/ROCOv2_data}"      # ROCOv2, official layout (download image)
MODELS_DIR="${FUSELIP_MED_MODELS_DIR:-/workspace/models}"       # checkpoints: $MODELS_DIR/fuselip_rocov2_<size>
LOGS_DIR="${FUSELIP_MED_LOGS_DIR:-/workspace/logs}"             # metrics, tracker files
RECIPE="${FUSELIP_MED_RECIPE:-rocov2}"                          # recipes/rocov2.yaml
SET_DATA_ROOT="data.root"                                       # recipe keys set from the paths above
SET_OUTPUT_DIR="output.dir"
SET_LOGGING_DIR="logging.dir"
LAUNCH="${FUSELIP_MED_LAUNCH:-accelerate launch}"               # word-split; tests put a recorder here
NVIDIA_SMI="${FUSELIP_MED_NVIDIA_SMI:-nvidia-smi}"
MOUNTINFO="${FUSELIP_MED_MOUNTINFO:-/proc/self/mountinfo}"
WARN_UNMOUNTED="${FUSELIP_MED_WARN_UNMOUNTED:-0}"                # 1 in the image: warn when outputs are not mounted
TRAIN_IMAGE="${FUSELIP_MED_TRAIN_IMAGE:-bacor_fuselip_train}"   # image names, for the messages only
DOWNLOAD_IMAGE="${FUSELIP_MED_DOWNLOAD_IMAGE:-bacor_fuselip_download}"
# -------------------------------------------------------------------------------------------------------

usage() {
    cat <<EOF
usage: docker run --gpus all --shm-size=16g -u \$(id -u):\$(id -g) \\
         -v "\$PWD/ROCOv2_data:$DATA_DIR" -v "\$PWD/models:$MODELS_DIR" -v "\$PWD/logs:$LOGS_DIR" \\
         $TRAIN_IMAGE small|base [--set key=value ...] [--resume]

Fine-tunes FuseLIP (small: FuseLIP-S, base: FuseLIP-B) on ROCOv2 with the '$RECIPE' recipe, one process per
visible GPU (accelerate). Checkpoints go to $MODELS_DIR/fuselip_rocov2_<size>, logs to $LOGS_DIR.
Arguments after the size are passed to 'fuselip-med finetune' unchanged, e.g.
  --set <key>=<value>   change a value of the recipe      --resume   continue from the newest checkpoint
Processes: one per GPU in CUDA_VISIBLE_DEVICES or 'nvidia-smi -L' (1 without GPUs); NUM_PROCESSES_PER_MACHINE
overrides. Multi-node: set NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT (docker run -e ...).
EOF
}

case "${1:-}" in
    small | base) SIZE="$1"; shift ;;
    -h | --help) usage; exit 0 ;;
    *)
        echo "error: the first argument must be 'small' or 'base', got '${1:-}'" >&2
        usage >&2
        exit 2
        ;;
esac

# ---- the data mount must hold ROCOv2 ------------------------------------------------------------------
shopt -s nullglob
parquet=("$DATA_DIR"/data/train-*.parquet)
shopt -u nullglob
if [[ ! -f "$DATA_DIR/train_captions.csv" && ${#parquet[@]} -eq 0 ]]; then
    cat >&2 <<EOF
error: no ROCOv2 data in $DATA_DIR (looked for $DATA_DIR/train_captions.csv and $DATA_DIR/data/train-*.parquet).
Mount a host folder holding ROCOv2 there. To download it into ./ROCOv2_data (about 19 GB), run
  docker run --rm -u \$(id -u):\$(id -g) -v "\$PWD/ROCOv2_data:/workspace/ROCOv2_data" $DOWNLOAD_IMAGE
then start this image again with -v "\$PWD/ROCOv2_data:$DATA_DIR".
EOF
    exit 1
fi

# ---- one process per visible GPU -----------------------------------------------------------------------
count_gpus() {
    local devices="${CUDA_VISIBLE_DEVICES-unset}" n
    if [[ "$devices" != unset ]]; then
        devices="${devices//[[:space:]]/}"
        if [[ -z "$devices" || "$devices" == -1 || "$devices" == none ]]; then
            echo 1  # no GPU: one process on the CPU
        else
            IFS=, read -r -a ids <<<"$devices"
            echo "${#ids[@]}"
        fi
        return
    fi
    if n=$("$NVIDIA_SMI" -L 2>/dev/null | grep -c '^GPU '); [[ "$n" -gt 0 ]]; then
        echo "$n"
    else
        echo 1
    fi
}
GPUS="${NUM_PROCESSES_PER_MACHINE:-$(count_gpus)}"
MACHINES="${NUM_MACHINES:-1}"
for value in "$GPUS" "$MACHINES"; do
    if [[ ! "$value" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NUM_PROCESSES_PER_MACHINE and NUM_MACHINES must be positive integers, got '$value'" >&2
        exit 2
    fi
done
launch_args=(--num_processes "$((GPUS * MACHINES))" --num_machines "$MACHINES" --dynamo_backend no)
if ((GPUS * MACHINES > 1)); then
    launch_args+=(--multi_gpu)
fi
if ((MACHINES > 1)); then
    : "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (the address of machine rank 0) for a multi-node run}"
    launch_args+=(--machine_rank "${MACHINE_RANK:?set MACHINE_RANK (0..NUM_MACHINES-1) for a multi-node run}")
    launch_args+=(--main_process_ip "$MAIN_PROCESS_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}")
fi

for dir in "$MODELS_DIR" "$LOGS_DIR"; do
    if ! mkdir -p "$dir" 2>/dev/null || [[ ! -w "$dir" ]]; then
        echo "error: $dir is not writable by uid $(id -u); mount a folder you own there and pass -u \$(id -u):\$(id -g)" >&2
        exit 1
    fi
done

# Checkpoints written inside the container vanish with it: say so before hours of training.
is_mounted() {  # $1 or one of its parents (other than /) is a mount point
    local dir
    dir=$(realpath -m "$1")
    while [[ "$dir" != / ]]; do
        if awk -v d="$dir" '$5 == d { found = 1 } END { exit !found }' "$MOUNTINFO" 2>/dev/null; then
            return 0
        fi
        dir=$(dirname "$dir")
    done
    return 1
}
if [[ "$WARN_UNMOUNTED" == 1 && -r "$MOUNTINFO" ]]; then
    for dir in "$MODELS_DIR" "$LOGS_DIR"; do
        if ! is_mounted "$dir"; then
            echo "warning: $dir is not a mounted host folder; what is written there is lost with the container (add -v \"\$PWD/$(basename "$dir"):$dir\")" >&2
        fi
    done
fi

read -r -a launcher <<<"$LAUNCH"
echo "fuselip_med: $SIZE on $GPUS GPU(s) x $MACHINES machine(s); data $DATA_DIR, checkpoints $MODELS_DIR/fuselip_rocov2_$SIZE" >&2
exec "${launcher[@]}" "${launch_args[@]}" -m fuselip_med.cli finetune \
    --recipe "$RECIPE" --size "$SIZE" \
    --set "$SET_DATA_ROOT=$DATA_DIR" \
    --set "$SET_OUTPUT_DIR=$MODELS_DIR/fuselip_rocov2_$SIZE" \
    --set "$SET_LOGGING_DIR=$LOGS_DIR" \
    "$@"
