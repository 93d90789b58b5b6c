#!/usr/bin/env bash
# The one GPU run: the pytest suite on CUDA (large shapes), `hf-flash check`, then the benchmarks, writing logs,
# JSON and PNG files into OUT_DIR and printing a short summary table last. Fits in ~9 minutes: every stage runs
# under a time budget and the whole run under a global deadline (a stage cut short is reported as TIMEOUT).
#
#   benchmarks/gpu_run.sh [--quick] [--only STAGES] [--skip STAGES] [--deadline SECONDS] [OUT_DIR]
#
# STAGES: comma-separated from tests,check,kernels,decode,e2e (the default), distributed (2+ GPUs, only when
# named: --only distributed on a multi-GPU machine) and probes (only when named: the decode chain with PDL / fused
# variants, the attention forward / backward variants and tile configs (wall and GPU time), a GPT-2 small training
# step, the flat GEMM against cuBLAS, the Hopper forwards (Gluon, Triton, cuDNN), the generate() host-time
# ablation; see benchmarks/NOTES.md).
# OUT_DIR defaults to benchmarks/results. --quick passes --quick to the benchmarks (a few points, files named
# <name>_quick.*).
# Test selection: PYTEST_ARGS (default "tests"), e.g. PYTEST_ARGS="tests/test_decode.py -k paged" (split on spaces);
# PYTEST_WORKERS (default: one per 12 GiB of GPU memory, at most 8; 1 = one process) parallel pytest processes when pytest-xdist is installed.
# Budgets (seconds): BUDGET_TESTS, BUDGET_CHECK, BUDGET_KERNELS, BUDGET_DECODE, BUDGET_E2E, BUDGET_DISTRIBUTED,
# BUDGET_PROBES.
set -uo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=""
ONLY="tests,check,kernels,decode,e2e"
SKIP=""
DEADLINE=540
OUT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK="--quick" ;;
        --only) ONLY="${2:?--only needs a list of stages}"; shift ;;
        --skip) SKIP="${2:?--skip needs a list of stages}"; shift ;;
        --deadline) DEADLINE="${2:?--deadline needs seconds}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_run.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT_DIR="$1" ;;
    esac
    shift
done
for s in ${ONLY//,/ } ${SKIP//,/ }; do
    case "$s" in tests|check|kernels|decode|e2e|distributed|probes) ;; *) echo "gpu_run.sh: error: unknown stage '$s' (accepted: tests,check,kernels,decode,e2e,distributed,probes)" >&2; exit 2 ;; esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT_DIR:-benchmarks/results}"
mkdir -p "$OUT_DIR/logs"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STAGES_TSV="$OUT_DIR/logs/stages.tsv"
: > "$STAGES_TSV"
T0=$SECONDS

declare -A BUDGET=([tests]="${BUDGET_TESTS:-240}" [check]="${BUDGET_CHECK:-60}" [kernels]="${BUDGET_KERNELS:-200}"
                   [decode]="${BUDGET_DECODE:-240}" [e2e]="${BUDGET_E2E:-120}"
                   [distributed]="${BUDGET_DISTRIBUTED:-500}" [probes]="${BUDGET_PROBES:-300}")

want() { [[ ",$ONLY," == *",$1,"* ]] && [[ ",$SKIP," != *",$1,"* ]]; }

# --- environment ------------------------------------------------------------------------------------------------
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_run.sh: error: no CUDA GPU visible to torch" >&2
    exit 2
fi
unset TRITON_INTERPRET
# hf_flash must import with hf_flash.kernels -> kernels/ ; install it editable without touching dependencies,
# or, where pip cannot, point PYTHONPATH at a folder of links with the installed layout.
if ! python -c "import hf_flash.kernels, hf_flash.patches" >/dev/null 2>&1; then
    if ! pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/logs/pip.log" 2>&1; then
        SHIM="$(mktemp -d)"
        mkdir "$SHIM/hf_flash"
        for f in "$REPO"/hf_flash/*; do ln -s "$f" "$SHIM/hf_flash/"; done
        ln -s "$REPO/kernels" "$SHIM/hf_flash/kernels"
        ln -s "$REPO/patches" "$SHIM/hf_flash/patches"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
python - <<'PY' | tee "$OUT_DIR/logs/env.txt"
import torch, triton, transformers, hf_flash
p = torch.cuda.get_device_properties(0)
print(f"device {torch.cuda.get_device_name()} ({p.total_memory / 2**30:.0f} GiB)  torch {torch.__version__}  "
      f"triton {triton.__version__}  transformers {transformers.__version__}  hf_flash {hf_flash.__version__} "
      f"({hf_flash.__file__})")
PY

# --- stages -----------------------------------------------------------------------------------------------------
run_stage() {  # name, command...
    local name="$1"; shift
    local left=$(( DEADLINE - (SECONDS - T0) ))
    local budget="${BUDGET[$name]}"
    if [ "$left" -le 5 ]; then
        printf '%s\t%s\t%s\n' "$name" "NOT RUN (deadline)" 0 >> "$STAGES_TSV"
        echo "=== $name: not run, the ${DEADLINE}s deadline is reached"
        return
    fi
    [ "$budget" -gt "$left" ] && budget=$left
    echo "=== $name (budget ${budget}s): $*"
    local t=$SECONDS
    timeout -s INT -k 15 "$budget" "$@" 2>&1 | tee "$OUT_DIR/logs/$name.log"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t ))" >> "$STAGES_TSV"
    echo "=== $name: $status in $(( SECONDS - t ))s"
}

if want tests; then
    PYTEST_TIMEOUT_ARG=""
    # per test: the example scripts compile every training kernel in a subprocess; on a fresh machine, next to 5
    # other compiling processes, the LoRA example took more than 200 s (eighth session)
    python -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST_TIMEOUT_ARG="--timeout=360"
    # On a fresh machine the suite is compile-bound (Triton builds each kernel variant on the CPU: ~8 s per test,
    # 37 tests in 293 s in the fifth session), so it runs in PYTEST_WORKERS processes (pytest-xdist, on the GPU
    # image) sharing the one GPU and Triton's on-disk cache.
    # Default workers: one per 12 GiB of GPU memory, at most 8 (8 on an 80 GiB H100 ran the example scripts out of
    # memory in the eighth session; 6 there, 8 on an H200).
    WORKERS_DEFAULT=$(python -c "import torch; print(max(1, min(8, int(torch.cuda.get_device_properties(0).total_memory / 2**30 // 12))))")
    WORKERS="${PYTEST_WORKERS:-$WORKERS_DEFAULT}"
    PYTEST_XDIST_ARG=""
    python -c "import xdist" >/dev/null 2>&1 && [ "$WORKERS" -gt 1 ] && PYTEST_XDIST_ARG="-n $WORKERS"
    # shellcheck disable=SC2086
    run_stage tests python -m pytest -q -p no:cacheprovider --durations=15 $PYTEST_TIMEOUT_ARG $PYTEST_XDIST_ARG \
        --junitxml="$OUT_DIR/logs/pytest.xml" ${PYTEST_ARGS:-tests}
fi
want check && run_stage check python -m hf_flash check --device cuda
for b in kernels decode e2e distributed; do
    # shellcheck disable=SC2086
    want "$b" && run_stage "$b" python -m hf_flash bench "$b" --out "$OUT_DIR" $QUICK
done

probes() {
    python benchmarks/probe_decode.py --chain --out "$OUT_DIR/logs/probe_decode.json" &&
    python benchmarks/probe_gqa_bwd.py --out="$OUT_DIR/logs/probe_attn.json" &&
    python benchmarks/probe_bwd_configs.py --out "$OUT_DIR/logs/probe_bwd_configs.json" &&
    python benchmarks/probe_gpt2_train.py --out "$OUT_DIR/logs/probe_gpt2_train.json" &&
    python benchmarks/probe_flat_gemm.py --out "$OUT_DIR/logs/probe_flat_gemm.json" &&
    OUTDIR="$OUT_DIR/logs" python benchmarks/probe_gluon_fwd.py &&
    python benchmarks/probe_generate.py --ablation --layers 8 --context 4096 --steps 16 \
        --out "$OUT_DIR/logs/probe_ablation.json"
}
want probes && run_stage probes probes

# --- summary ----------------------------------------------------------------------------------------------------
echo
echo "=================================== summary ($(( SECONDS - T0 ))s) ==================================="
python - "$OUT_DIR" "${QUICK:+1}" <<'PY'
import json, os, sys
import xml.etree.ElementTree as ET

out_dir, quick = sys.argv[1], bool(sys.argv[2]) if len(sys.argv) > 2 else False
rows = []
env = open(os.path.join(out_dir, "logs", "env.txt")).read().strip()
for line in open(os.path.join(out_dir, "logs", "stages.tsv")):
    name, status, secs = line.rstrip("\n").split("\t")
    detail = ""
    if name == "tests":
        try:
            s = ET.parse(os.path.join(out_dir, "logs", "pytest.xml")).getroot()
            s = s if s.tag == "testsuite" else s[0]
            n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
            detail = f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped"
        except Exception:
            detail = "no junit report"
    elif name == "check":
        log = open(os.path.join(out_dir, "logs", "check.log")).read().splitlines()
        detail = next((l for l in reversed(log) if l.startswith("check ")), "no verdict")
    else:
        log = open(os.path.join(out_dir, "logs", f"{name}.log")).read().strip().splitlines() if \
            os.path.exists(os.path.join(out_dir, "logs", f"{name}.log")) else []
        if status != "ok" and log:
            detail = log[-1][:100]
    rows.append((name, status, f"{secs}s", detail))
    if name in ("kernels", "decode", "e2e", "distributed"):
        path = os.path.join(out_dir, f"{name}{'_quick' if quick else ''}.json")
        if status == "ok" and os.path.exists(path):
            for label, value in json.load(open(path)).get("summary") or []:
                rows.append(("", "", "", f"{label}: {value}"))
print(env)
w = [max(len(r[i]) for r in rows) for i in range(3)]
for r in rows:
    print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
PY
