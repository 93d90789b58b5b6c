#!/usr/bin/env bash
# Train a Llama with attn_implementation="flashtri" on the GPUs of this machine through accelerate.
#
#   examples/accelerate/launch.sh ddp|fsdp [NUM_GPUS] [-- ARGS FOR train_llama_distributed.py]
#
# NUM_GPUS defaults to every visible GPU; with 1 the script runs in one process with the same bf16 mixed
# precision (no DDP/FSDP): the single-GPU baseline.
# Default script arguments: a Llama-3-8B-shape model with 4 layers, sequence 4096, 1 row per GPU, 20 steps;
# anything after "--" is appended (later flags win), e.g.
#   examples/accelerate/launch.sh fsdp 2 -- --activation-checkpointing --compile
#   examples/accelerate/launch.sh ddp 2 -- --attn sdpa --out /tmp/ddp_sdpa.json
#   examples/accelerate/launch.sh ddp 1 -- --grad-accum 2    # the same global batch as 2 GPUs
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
HERE="$(cd "$(dirname "$0")" && pwd)"

MODE="${1:-}"
case "$MODE" in
    ddp|fsdp) shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "launch.sh: error: first argument must be ddp or fsdp, got '${MODE}' (see --help)" >&2; exit 2 ;;
esac
NGPU=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then NGPU="$1"; shift; fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift

VISIBLE="$(python -c 'import torch; print(torch.cuda.device_count())')"
NGPU="${NGPU:-$VISIBLE}"
if ! [[ "$NGPU" =~ ^[0-9]+$ ]] || [ "$NGPU" -lt 1 ]; then
    echo "launch.sh: error: NUM_GPUS must be a positive integer, got '$NGPU'" >&2; exit 2
fi
if [ "$VISIBLE" -lt "$NGPU" ]; then
    echo "launch.sh: error: $NGPU GPUs asked, torch sees $VISIBLE" >&2; exit 2
fi
if [ "$MODE" = fsdp ]; then
    python - <<'PY' || exit 2
import sys
import accelerate, torch
from packaging.version import Version
if Version(accelerate.__version__) < Version("1.6") or Version(torch.__version__.split("+")[0]) < Version("2.6"):
    sys.exit(f"launch.sh: error: fsdp.yaml uses FSDP2 (fsdp_version: 2), which needs accelerate >= 1.6 and "
             f"torch >= 2.6; installed: accelerate {accelerate.__version__}, torch {torch.__version__}")
PY
fi
unset TRITON_INTERPRET

DEFAULTS=(--model llama3-8b-shape --num-layers 4 --seq-len 4096 --batch-size 1 --steps 20)
SCRIPT="$HERE/train_llama_distributed.py"
if [ "$NGPU" -eq 1 ]; then
    exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
        "$SCRIPT" "${DEFAULTS[@]}" "$@"
fi
exec accelerate launch --config_file "$HERE/$MODE.yaml" --num_processes "$NGPU" "$SCRIPT" "${DEFAULTS[@]}" "$@"
