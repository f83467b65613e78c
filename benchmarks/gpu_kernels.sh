#!/usr/bin/env bash
# One GPU call for the kernel issues (3-6): install from the offline wheels, the kernel tests on the compiled
# kernels, then (most needed first) bench_critic, bench_bridge, diag_bridge (two-pass against the opt-in
# fused kernels), bench_regression and bench_linear_cross_entropy. Every stage runs under `timeout`; after
# each one, benchmarks/results/ (new files) and the logs are packed into $OUT/results.tgz, so a call cut
# short still brings back what it measured.
#   OUT=/tmp/out bash benchmarks/gpu_kernels.sh      (the GPU machine: .whl/ carried, no network)
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/uno_gpu_out}"; mkdir -p "$OUT"
LOG="$OUT/log.txt"; : > "$LOG"
MARK=$(mktemp); START=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }
pack() { find benchmarks/results -newer "$MARK" -type f | tar -czf "$OUT/results.tgz" -T - 2>/dev/null; }
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 lim=$2; shift 2
  say "=== [$name] t=$(( $(date +%s) - START ))s limit ${lim}s: $*"
  timeout -k 5 "$lim" "$@" 2>&1 | grep -v -E "XFORMERS|reinstall xformers|PyTorch 2.10.0|Python  3.10|Memory-efficient attention|XFORMERS_MORE|^\s*$" >> "$LOG"
  say "=== [$name] rc=${PIPESTATUS[0]} t=$(( $(date +%s) - START ))s"
  pack
}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH=/tmp/site
fi
UNO_SKIP_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1
unset TRITON_INTERPRET
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
stage info 20 python3 -P -m uno_engine.info
stage kernel-tests 150 python3 -P -m pytest -q -n 8 -p no:cacheprovider -rfE tests/test_bridge.py \
  tests/test_regression.py tests/test_linear_cross_entropy.py
stage critic-fused-tests 45 python3 -P -m pytest -q -p no:cacheprovider -rfE tests/test_critics.py \
  tests/test_checkpointing.py tests/test_step.py -k "fused or fuse_ or compile or selective"
stage bench_critic 95 python3 benchmarks/bench_critic.py --device cuda --budget-s 75
stage bench_bridge 45 python3 benchmarks/bench_bridge.py --rep 20
F='UNO_BRIDGE_FORWARD=fused&UNO_BRIDGE_BACKWARD=fused'
stage diag_bridge_fused 75 env DIAG="default|$F|UNO_BRIDGE_FORWARD=fused_loads|$F&UNO_BRIDGE_FUSED_TILE=32,128,4&UNO_BRIDGE_FUSED_BWD_TILE=16,32,4|$F&UNO_BRIDGE_FUSED_TILE=128,128,8&UNO_BRIDGE_FUSED_BWD_TILE=64,64,8" \
  python3 benchmarks/diag_bridge.py
stage bench_regression 45 python3 benchmarks/bench_regression.py
stage bench_lce 75 python3 benchmarks/bench_linear_cross_entropy.py --n 2048 8192 \
  --providers eager cce_exact liger ours ours_recompute --gif-chunk-rows 128 512 --rep 5 --no-check
say "done in $(( $(date +%s) - START ))s"
