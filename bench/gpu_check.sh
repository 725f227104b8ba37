#!/usr/bin/env bash
# GPU checks for tfz: every GPU test and GPU benchmark of the repo, in one run of under 8 minutes.
#
# Usage (repo root or anywhere):  bash bench/gpu_check.sh [OUT_DIR]
#   OUT_DIR defaults to $OUT, else ./gpu-out. Written there:
#     results.md       status table of the checks + benchmark tables (also printed at the end)
#     gpu_check.log    full output of every check, one section per check
#     bench-gpu.json   pytest-benchmark JSON of the GPU benchmarks
# Environment:
#   PYTHON=python3            interpreter holding torch + triton (no internet needed)
#   GPU_CHECK_BUDGET_S=470    wall-clock budget of the whole run; a check gets what is left
#   GPU_CHECK_INSTALL=auto    how tfz becomes importable: pip (editable, --no-deps --no-index
#                             --no-build-isolation), shim (PYTHONPATH symlink tree mapping
#                             kernels/ to tfz.kernels) or auto (pip, then shim if import fails)
#   GPU_CHECK_FORCE=1         run the checks even when no GPU is visible (tests the script itself)
#
# To add a check, append "name|timeout_s|command" to CHECKS below. A check passes when its command
# exits 0; a failure or timeout is recorded and the next check runs. Exit status: 0 when every check
# passed or was skipped, 1 otherwise.

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
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/.summary.tsv"
RESULTS="$OUT_DIR/results.md"
BENCH_JSON="$OUT_DIR/bench-gpu.json"
SHIM="${TMPDIR:-/tmp}/tfz-gpu-check-shim"
START_S=$SECONDS
: >"$LOG"
: >"$SUMMARY"
export PY OUT_DIR REPO BENCH_JSON PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ check commands

gpu_env() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    "$PY" - <<'EOF'
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
    print("gpu", torch.cuda.get_device_name(0), "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count)
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
export SHIM INSTALL_MODE

CHECKS=(
    "gpu-env|60|gpu_env"
    "install|180|install_tfz"
    # every test marked gpu in tests/
    "gpu-tests|270|\"\$PY\" -m pytest -m gpu tests -q -rs -p no:cacheprovider"
    # every GPU benchmark in bench/ (wgrad: Triton vs cuBLAS, bf16 LLaMA-8B shapes)
    "gpu-bench|300|\"\$PY\" -m pytest -m gpu bench -q -rs -p no:cacheprovider --benchmark-enable --benchmark-json=\"\$BENCH_JSON\" --benchmark-columns=min,median,rounds --benchmark-time-unit=ms"
)

# ------------------------------------------------------------------ runner

has_gpu() {
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

record() {  # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
    printf '%-12s %-22s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

run_check() {  # name timeout command
    local name="$1" limit="$2" cmd="$3" left rc t0 detail
    left=$((BUDGET_S - (SECONDS - START_S)))
    if [ "$left" -lt 15 ]; then
        record "$name" "skipped (budget)" 0 "time budget of ${BUDGET_S}s spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '\n===== %s (limit %ss) =====\n$ %s\n' "$name" "$limit" "$cmd" >>"$LOG"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$cmd" >>"$LOG" 2>&1
    rc=$?
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
    echo "no GPU: torch sees no CUDA device (set GPU_CHECK_FORCE=1 to run the checks anyway)"
fi
for entry in "${CHECKS[@]}"; do
    name="${entry%%|*}"
    rest="${entry#*|}"
    limit="${rest%%|*}"
    cmd="${rest#*|}"
    if [ "$GPU" = 0 ] && [ "${GPU_CHECK_FORCE:-0}" != 1 ] && [ "$name" != gpu-env ]; then
        record "$name" "skipped (no GPU)" 0 ""
        continue
    fi
    run_check "$name" "$limit" "$cmd"
    if [ "$name" = install ] && ! import_ok >/dev/null 2>&1 && [ -d "$SHIM/tfz" ]; then
        # the shim must win over the repo's own tfz/ (which lacks kernels/): no cwd on sys.path
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    fi
done

# ------------------------------------------------------------------ report

"$PY" - "$SUMMARY" "$BENCH_JSON" "$LOG" >"$RESULTS" <<'EOF'
import json
import os
import sys

summary, bench_json, log = sys.argv[1:4]
print("# tfz GPU check results\n")
env = []
with open(log) as f:
    lines = f.read().split("\n===== ")
for section in lines:
    if section.startswith("gpu-env "):
        env = [ln for ln in section.splitlines()[2:] if ln.strip()]
if env:
    print("Machine:\n")
    print("\n".join(f"    {ln}" for ln in env))
    print()
print("| check | status | seconds | last line of output |")
print("|---|---|---:|---|")
with open(summary) as f:
    for row in f:
        name, status, secs, detail = (row.rstrip("\n").split("\t") + [""] * 4)[:4]
        print(f"| {name} | {status} | {secs} | {detail.replace('|', '/')} |")
if not os.path.exists(bench_json):
    sys.exit(0)
with open(bench_json) as f:
    data = json.load(f)
benches = data.get("benchmarks", [])
gpu_name = data.get("machine_info", {}).get("tfz", {}).get("gpu", "?")
print(f"\nBenchmarks on {gpu_name} (pytest-benchmark wall clock includes a sync; `ms` = CUDA-event median).")

# wgrad: Triton vs cuBLAS at r = 0, and time(r)/time(0) per shape
wg = [b for b in benches if b.get("group") == "wgrad-gpu-bf16"]
if wg:
    ei = lambda b: b.get("extra_info", {})
    keys = sorted({(ei(b)["n_in"], ei(b)["n_out"], ei(b)["tokens"]) for b in wg})
    print("\n### Weight gradient (bf16 in, fp32 main_grad), Triton vs cuBLAS at r = 0\n")
    print("| in -> out | tokens | torch.mm ms | addmm fp32 ms | Triton ms | Triton TFLOP/s | vs mm | vs addmm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in keys:
        rows = {(ei(b)["provider"], ei(b).get("ratio")): ei(b) for b in wg if (ei(b)["n_in"], ei(b)["n_out"], ei(b)["tokens"]) == k}
        mm = rows.get(("torch.mm", 0.0), {}).get("ms")
        am = rows.get(("torch.addmm-fp32", 0.0), {}).get("ms")
        tr = rows.get(("tfz-triton", 0.0), {})
        fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
        vs_mm = tr.get("vs_torch_mm")
        vs_am = tr.get("vs_addmm_fp32")
        print(f"| {k[0]} -> {k[1]} | {k[2]} | {fmt(mm)} | {fmt(am)} | {fmt(tr.get('ms'))} | {fmt(tr.get('tflops'), 0)} "
              f"| {fmt(vs_mm, 2)}x | {fmt(vs_am, 2)}x |")
    ratios = sorted({ei(b)["ratio"] for b in wg if ei(b)["provider"] == "tfz-triton" and ei(b)["ratio"] > 0})
    print("\n### Triton time(r) / time(0) (goal (1 - r) + 0.05; * = goal missed)\n")
    print("| in -> out | tokens | " + " | ".join(f"r={r}" for r in ratios) + " |")
    print("|---|---:|" + "---:|" * len(ratios))
    for k in keys:
        cells = []
        for r in ratios:
            m = [ei(b) for b in wg if ei(b)["provider"] == "tfz-triton" and ei(b)["ratio"] == r
                 and (ei(b)["n_in"], ei(b)["n_out"], ei(b)["tokens"]) == k]
            if not m:
                cells.append("-")
                continue
            tr = m[0]["time_ratio"]
            cells.append(f"{tr:.3f}{'*' if tr > m[0]['goal'] + 1e-9 else ''}")
        print(f"| {k[0]} -> {k[1]} | {k[2]} | " + " | ".join(cells) + " |")

others = [b for b in benches if b.get("group") != "wgrad-gpu-bf16"]
if others:
    print("\n### Other GPU benchmarks\n")
    print("| group | name | median ms | extra |")
    print("|---|---|---:|---|")
    for b in others:
        extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.get("extra_info", {}).items())
        print(f"| {b.get('group')} | {b['name']} | {b['stats']['median'] * 1e3:.3f} | {extra} |")
EOF
[ -s "$RESULTS" ] || echo "(report generation failed: see $LOG)" >"$RESULTS"
echo
cat "$RESULTS"
rm -f "$SUMMARY"
if grep -q "FAILED" "$RESULTS"; then
    exit 1
fi
exit 0
