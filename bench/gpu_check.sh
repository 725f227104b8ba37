#!/usr/bin/env bash
# GPU checks for tfz: a smoke test, the GPU benchmarks, then every GPU test, in under 8 minutes.
#
# Usage (repo root or anywhere):  bash bench/gpu_check.sh [OUT_DIR]
#   OUT_DIR defaults to $OUT, else ./gpu-out. Written there, and rewritten after every stage (so a
#   run killed at any point leaves the results of the stages before it):
#     results.md       machine, status of every stage, benchmark tables (printed at the end)
#     gpu_check.log    full output of every stage, one section per stage
#     bench-gpu.jsonl  one line per GPU measurement, appended as soon as it is made
#     bench-gpu.json   pytest-benchmark JSON of the GPU benchmarks (only when that stage finishes)
# Environment:
#   PYTHON=python3              interpreter holding torch + triton (no internet needed)
#   GPU_CHECK_BUDGET_S=470      wall-clock budget of the whole run; a stage gets at most what is left
#   GPU_CHECK_LIMITS=           per-stage time limits, e.g. "gpu-bench=200,gpu-tests=150"
#   GPU_CHECK_STAGES=           comma list of the stages to run (default: all); others are skipped
#   GPU_CHECK_INSTALL=auto      how tfz becomes importable: pip (editable, --no-deps --no-index
#                               --no-build-isolation), shim (PYTHONPATH symlink tree mapping
#                               kernels/ to tfz.kernels) or auto (pip, then shim if import fails)
#   GPU_CHECK_FAKE_DEVICE=1     rehearsal without a GPU: the stages run on the CPU (GPU tests skip,
#                               the GPU benchmarks run at tiny shapes with TFZ_FAKE_GPU=1, install only
#                               checks the import), so the script's own logic can be tested
#
# GPU presence is decided by torch.cuda.is_available(). Stages: gpu-env, install, gpu-smoke (a few
# kernel checks: a broken kernel makes the benchmarks meaningless), gpu-bench, gpu-tests (the long
# tail). Only the configs of tfz.kernels' table are compiled (no autotuning). Exit status: 0 when
# every stage passed or was skipped, 1 otherwise.

set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT_DIR="${1:-${OUT:-$REPO/gpu-out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")"
case "$PY" in /*) ;; *) PY="$REPO/$PY" ;; esac
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
INSTALL_MODE="${GPU_CHECK_INSTALL:-auto}"
FAKE="${GPU_CHECK_FAKE_DEVICE:-0}"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/.summary.tsv"
RESULTS="$OUT_DIR/results.md"
BENCH_JSON="$OUT_DIR/bench-gpu.json"
BENCH_RECORD="$OUT_DIR/bench-gpu.jsonl"
SHIM="${TMPDIR:-/tmp}/tfz-gpu-check-shim-$$"
START_S=$SECONDS
CURRENT=""
: >"$LOG"
: >"$SUMMARY"
rm -f "$BENCH_JSON" "$BENCH_RECORD"
export PY OUT_DIR REPO BENCH_JSON PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TFZ_BENCH_RECORD="$BENCH_RECORD"
if [ "$FAKE" = 1 ]; then
    export TFZ_FAKE_GPU=1
fi

# ------------------------------------------------------------------ stage commands

gpu_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$PY" - <<'EOF'
import os
import platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    smem = getattr(p, "shared_memory_per_block_optin", 0)
    print("gpu", torch.cuda.get_device_name(0), "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count,
          "smem/block", smem)
elif os.environ.get("TFZ_FAKE_GPU") == "1":
    print("gpu: none (GPU_CHECK_FAKE_DEVICE=1: rehearsal on the CPU)")
else:
    print("gpu: none visible to torch")
EOF
}

make_shim() {
    # tfz/* and kernels/ (as tfz/kernels) symlinked into one package directory
    rm -rf "$SHIM" && mkdir -p "$SHIM/tfz" || return 1
    local f
    for f in "$REPO"/tfz/*; do ln -s "$f" "$SHIM/tfz/$(basename "$f")"; done
    ln -s "$REPO/kernels" "$SHIM/tfz/kernels"
}

import_ok() {
    (cd / && "$PY" -c "import tfz, tfz.kernels; print('tfz', tfz.__version__, 'at', tfz.__file__)")
}

install_tfz() {
    if [ "$FAKE" = 1 ]; then
        import_ok  # rehearsal: the environment is the caller's, left as it is
        return
    fi
    if [ "$INSTALL_MODE" != shim ]; then
        "$PY" -m pip install --no-deps --no-index --no-build-isolation -q -e "$REPO" && import_ok && return 0
        echo "editable install did not give an importable tfz"
        [ "$INSTALL_MODE" = pip ] && return 1
    fi
    make_shim || return 1
    echo "using the PYTHONPATH shim $SHIM"
    PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" import_ok
}
export -f gpu_env make_shim import_ok install_tfz
export SHIM INSTALL_MODE FAKE

PYTEST="\"\$PY\" -m pytest -q -rs -p no:cacheprovider"
GPU_BENCH="bench/bench_wgrad.py bench/bench_timer.py bench/bench_nn.py"  # every file with GPU benchmarks, kernels first
STAGES=(
    "gpu-env|60|gpu_env"
    "install|180|install_tfz"
    "gpu-smoke|90|$PYTEST -m gpu tests/test_wgrad_gpu.py -k smoke"
    "gpu-bench|220|$PYTEST -m gpu $GPU_BENCH --benchmark-enable --benchmark-json=\"\$BENCH_JSON\" --benchmark-columns=min,median,rounds --benchmark-time-unit=ms"
    "gpu-tests|300|$PYTEST -m gpu tests"
)

# ------------------------------------------------------------------ report (rewritten after every stage)

write_report() {
    "$PY" - "$SUMMARY" "$BENCH_RECORD" "$LOG" "$CURRENT" >"$RESULTS.tmp" 2>>"$LOG" <<'EOF'
import json
import os
import sys

summary, record, log, running = sys.argv[1:5]
print("# tfz GPU check results\n")
env = []
with open(log) as f:
    for section in f.read().split("\n===== "):
        if section.startswith("gpu-env "):
            env = [ln for ln in section.splitlines()[2:] if ln.strip()]
if env:
    print("Machine:\n")
    print("\n".join(f"    {ln}" for ln in env))
    print()
print("| stage | status | seconds | last line of output |")
print("|---|---|---:|---|")
with open(summary) as f:
    for row in f:
        name, status, secs, detail = (row.rstrip("\n").split("\t") + [""] * 4)[:4]
        print(f"| {name} | {status} | {secs} | {detail.replace('|', '/')} |")
if running:
    print(f"| {running} | NOT FINISHED (the run stopped during this stage) | - | see gpu_check.log |")
rows = []
if os.path.exists(record):
    with open(record) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
if not rows:
    sys.exit(0)
fmt = lambda v, p=3, unit="": "-" if v is None else f"{v:.{p}f}{unit}"
wg = [r for r in rows if r.get("group") == "wgrad-gpu-bf16"]
if wg:
    keys = sorted({(r["layer"], r["n_in"], r["n_out"], r["tokens"]) for r in wg}, key=lambda k: (k[3], k[1], k[2]))
    print("\n### Weight gradient, bf16 operands, fp32 main_grad: tfz at r = 0 against cuBLAS\n")
    print("| layer | in -> out | tokens | torch.mm ms | addmm fp32 ms | tfz ms | tfz TFLOP/s | vs mm | vs addmm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in keys:
        r0 = next((r for r in wg if (r["layer"], r["n_in"], r["n_out"], r["tokens"]) == k and r["ratio"] == 0.0), None)
        if r0 is None:
            continue
        print(f"| {k[0]} | {k[1]} -> {k[2]} | {k[3]} | {fmt(r0.get('mm_ms'))} | {fmt(r0.get('addmm_ms'))} | "
              f"{fmt(r0['ms'])} | {fmt(r0['tflops'], 0)} | {fmt(r0.get('vs_mm'), 2, 'x')} | {fmt(r0.get('vs_addmm'), 2, 'x')} |")
    ratios = sorted({r["ratio"] for r in wg if r["ratio"] > 0})
    print("\n### tfz time(r) / time(0), masks of random 64-row units (goal (1 - r) + 0.05; * = missed)\n")
    print("| layer | in -> out | tokens | " + " | ".join(f"r={x}" for x in ratios) + " |")
    print("|---|---|---:|" + "---:|" * len(ratios))
    for k in keys:
        cells = []
        for x in ratios:
            m = [r for r in wg if (r["layer"], r["n_in"], r["n_out"], r["tokens"]) == k and r["ratio"] == x]
            cells.append("-" if not m else f"{m[0]['time_ratio']:.3f}{'*' if m[0]['time_ratio'] > m[0]['goal'] + 1e-9 else ''}")
        print(f"| {k[0]} | {k[1]} -> {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
calls = [r for r in rows if r.get("group") == "wgrad-call-gpu"]
if calls:
    print("\n### Per-call cost at GQA k/v shapes (kernel ms = CUDA events; host us = queueing one call)\n")
    providers = ["tfz-r0.5", "tfz-r0", "torch.mm", "addmm"]
    print("| in -> out | tokens | " + " | ".join(f"{p} ms / host us" for p in providers) + " |")
    print("|---|---:|" + "---:|" * len(providers))
    for r in calls:
        cells = [f"{fmt(r.get(p + '_ms'), 4)} / {fmt(r.get(p + '_host_us'), 1)}" for p in providers]
        print(f"| {r['n_in']} -> {r['n_out']} | {r['tokens']} | " + " | ".join(cells) + " |")
steps = {r["variant"]: r for r in rows if r.get("group") == "adamw-step-gpu"}
if steps:
    base = steps.get("torch_fused", {}).get("ms")
    print("\n### AdamW step with row freezing, LLaMA-8B MLP (4096 -> 14336 -> 4096, fp32), step + sync\n")
    print("| variant | ms | / torch fused |")
    print("|---|---:|---:|")
    for name, r in steps.items():
        print(f"| {name} | {fmt(r['ms'])} | {fmt(r['ms'] / base if base else None, 2, 'x')} |")
EOF
    mv -f "$RESULTS.tmp" "$RESULTS" 2>/dev/null || true
}

CHILD=""
on_signal() {
    trap - TERM INT
    [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null  # timeout passes it on to the stage
    write_report
    rm -rf "$SHIM"
    exit 143
}
trap on_signal TERM INT

# ------------------------------------------------------------------ runner

has_gpu() {
    [ "$FAKE" = 1 ] && return 0
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

record() {  # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
    printf '%-10s %-22s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

limit_of() {  # name default
    local item
    local limits="${GPU_CHECK_LIMITS:-}"
    for item in ${limits//,/ }; do
        [ "${item%%=*}" = "$1" ] && { echo "${item#*=}"; return; }
    done
    echo "$2"
}

selected() {
    [ -z "${GPU_CHECK_STAGES:-}" ] && return 0
    case ",$GPU_CHECK_STAGES," in *",$1,"*) return 0 ;; esac
    return 1
}

run_stage() {  # name limit command
    local name="$1" limit="$2" cmd="$3" left rc t0 detail
    left=$((BUDGET_S - (SECONDS - START_S)))
    if [ "$left" -lt 15 ]; then
        record "$name" "skipped (budget)" 0 "time budget of ${BUDGET_S}s spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '\n===== %s (limit %ss) =====\n$ %s\n' "$name" "$limit" "$cmd" >>"$LOG"
    CURRENT="$name"
    write_report
    t0=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$cmd" >>"$LOG" 2>&1 &
    CHILD=$!
    wait "$CHILD"  # in the background, so a TERM to this script is handled at once
    rc=$?
    CHILD=""
    CURRENT=""
    detail="$(grep -v '^\s*$' "$LOG" | tail -n 1 | cut -c1-150)"
    if [ "$rc" -eq 0 ]; then
        record "$name" "ok" $((SECONDS - t0)) "$detail"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" "FAILED (timeout)" $((SECONDS - t0)) "$detail"
    else
        record "$name" "FAILED (rc=$rc)" $((SECONDS - t0)) "$detail"
    fi
}

echo "tfz GPU checks -> $OUT_DIR (budget ${BUDGET_S}s)"
GPU=1
if ! has_gpu; then
    GPU=0
    echo "no GPU: torch.cuda.is_available() is False (GPU_CHECK_FAKE_DEVICE=1 rehearses on the CPU)"
fi
for entry in "${STAGES[@]}"; do
    name="${entry%%|*}"
    rest="${entry#*|}"
    limit="$(limit_of "$name" "${rest%%|*}")"
    cmd="${rest#*|}"
    if ! selected "$name"; then
        record "$name" "skipped (not selected)" 0 ""
    elif [ "$GPU" = 0 ] && [ "$name" != gpu-env ]; then
        record "$name" "skipped (no GPU)" 0 ""
    else
        run_stage "$name" "$limit" "$cmd"
    fi
    if [ "$name" = install ] && [ -d "$SHIM/tfz" ] && ! import_ok >/dev/null 2>&1; then
        # the shim must win over the repo's own tfz/ (which lacks kernels/): no cwd on sys.path
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    fi
    write_report
done

trap - TERM INT
write_report
[ -s "$RESULTS" ] || echo "(report generation failed: see $LOG)" >"$RESULTS"
echo
cat "$RESULTS"
rm -f "$SUMMARY"
rm -rf "$SHIM"
if grep -q "FAILED\|NOT FINISHED" "$RESULTS"; then
    exit 1
fi
exit 0
