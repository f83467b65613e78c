#!/usr/bin/env bash
# The one GPU run of uno_engine (issue 8): install, info, kernel tests on the compiled kernels, the kernel
# benchmarks, then step_throughput on the real-shaped presets. Every stage runs under `timeout` inside one
# overall budget, so one hang cannot eat the lease; results are tarred into $OUT after every stage, so a run
# cut short still brings back what it measured.
#
#   bash benchmarks/gpu_run.sh                 # on the GPU machine, from anywhere (offline; wheels in .whl/)
#   DRY_RUN=1 bash benchmarks/gpu_run.sh       # on a CPU: the same plumbing, CPU-sized, GPU-only parts skipped
#
# Environment knobs:
#   OUT         where results.tgz and log.txt go (default /tmp/uno_gpu_out)
#   BUDGET_S    overall wall-clock budget in seconds (default 450: the lead's ~8 minutes, less margin)
#   PRESETS     step_throughput presets, in order (default "janus-pro-1b sd15-llava7b")
#   PROVIDERS1  providers of the first preset (default all four: eager,engine,eager+compile,engine+compile)
#   PROVIDERS   providers of the other presets (default eager,engine: compiling a 7B critic takes minutes)
#   STEPS       timed steps per provider (default 20, the minimum for a reported median)
#   MAXBATCH    max-batch trials per provider (eager, engine), first preset only (default 5; 0 = off)
#   SHARE1      percent of the step_throughput time the first preset may use (default 60)
# Back in $OUT: results.tgz (benchmarks/results/ + per-stage logs) and log.txt (everything). The summary table
# is printed last.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN="${DRY_RUN:-0}"
OUT="${OUT:-/tmp/uno_gpu_out}"
BUDGET_S="${BUDGET_S:-450}"
STEPS="${STEPS:-20}"
PRESETS="${PRESETS:-janus-pro-1b sd15-llava7b}"
PROVIDERS1="${PROVIDERS1:-eager,engine,eager+compile,engine+compile}"
PROVIDERS="${PROVIDERS:-eager,engine}"
MAXBATCH="${MAXBATCH:-5}"
SHARE1="${SHARE1:-60}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
# a dry run writes nothing into the repository: its results and logs go under $OUT
if [[ "$DRY_RUN" == 1 ]]; then RESULTS="$OUT/results"; else RESULTS="$ROOT/benchmarks/results"; fi
STAGE_LOGS="$RESULTS/logs"
mkdir -p "$STAGE_LOGS"
: > "$LOG"
MARK="$OUT/.start"; touch "$MARK"
START=$(date +%s)
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

pack() {  # results + stage logs -> $OUT/results.tgz (cheap; after every stage)
  tar -czf "$OUT/results.tgz.tmp" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null \
    && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

# stage NAME CAP_S [RESERVE_S] -- CMD...: run CMD under timeout min(CAP_S, budget left - RESERVE_S)
stage() {
  local name="$1" cap="$2" reserve="$3"; shift 4
  local left=$(( BUDGET_S - $(elapsed) - reserve ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 10 )); then
    say "=== [$name] skipped: ${left}s of budget left after reserving ${reserve}s for later stages"
    SUMMARY+=("$name|skipped (budget)|0")
    return 0
  fi
  say "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$STAGE_LOGS/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  cat "$STAGE_LOGS/$name.log" >> "$LOG"
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then status="exit $rc"; fi
  say "=== [$name] $status in ${dt}s"
  SUMMARY+=("$name|$status|$dt")
  pack
  return 0
}

say "uno_engine gpu_run: $(date -u +%FT%TZ), budget ${BUDGET_S}s, DRY_RUN=$DRY_RUN, root $ROOT"
say "$(git rev-parse --short HEAD 2>/dev/null || echo no-git) $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified tracked files"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"

# ------------------------------------------------------------------------------------------------- install
# `python -m` puts the working directory on sys.path; from the repo root that would make kernels/ importable
# as a top-level `kernels`, which transformers takes for the Hub kernels library. -P (Python >= 3.11) prevents it.
PYM=("$PY" -P -m)
if [[ "$DRY_RUN" != 1 ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    stage install-wheels 60 360 -- "${PYM[@]}" pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no .whl/ wheels here: using the installed packages"
  fi
  stage install-editable 90 330 -- "${PYM[@]}" pip install -q --no-deps --no-build-isolation -e .
  if ! (cd /tmp && "$PY" -c "import uno_engine.kernels, uno_engine.step" >> "$LOG" 2>&1); then
    # fallback: a copy of the package with kernels/ in place as uno_engine.kernels (never a top-level kernels)
    say "editable install not importable; using a copy of the package under /tmp/uno_pkg"
    rm -rf /tmp/uno_pkg && mkdir -p /tmp/uno_pkg && cp -r uno_engine /tmp/uno_pkg/ && cp -r kernels /tmp/uno_pkg/uno_engine/kernels
    export PYTHONPATH="/tmp/uno_pkg:${PYTHONPATH:-}"
  fi
fi
stage info 30 300 -- "${PYM[@]}" uno_engine.info

# --------------------------------------------------------------------------------------------- kernel tests
# the compiled kernels, not the interpreter: TRITON_INTERPRET must be unset (tests/conftest.py sets it only
# when there is no CUDA)
unset TRITON_INTERPRET
TESTS=()
for f in tests/test_bridge*.py tests/test_linear_cross_entropy*.py tests/test_regression*.py tests/test_ops*.py \
         tests/test_critic*.py tests/test_step*.py tests/test_memory*.py; do
  [[ -f "$f" ]] && TESTS+=("$f")
done
if (( ${#TESTS[@]} )); then
  if [[ "$DRY_RUN" == 1 ]]; then
    stage kernel-tests 60 240 -- "${PYM[@]}" pytest -q --co "${TESTS[@]}"   # collection only on a CPU
  else
    stage kernel-tests 100 270 -- "${PYM[@]}" pytest -q -rfE --durations=10 -p no:cacheprovider \
      --junitxml="$STAGE_LOGS/kernel-tests.xml" "${TESTS[@]}"
  fi
else
  say "no kernel test files found"; SUMMARY+=("kernel-tests|no files|0")
fi

# ------------------------------------------------------------------------------------------ kernel benchmarks
for b in bench_bridge bench_linear_cross_entropy bench_regression bench_critic; do
  if [[ -f "benchmarks/$b.py" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then  # the benches write into benchmarks/results: a dry run only imports them
      stage "$b" 30 220 -- "$PY" "benchmarks/$b.py" --help
    else
      stage "$b" 60 220 -- "$PY" "benchmarks/$b.py"
    fi
  else
    say "benchmarks/$b.py not present"; SUMMARY+=("$b|not present|0")
  fi
done

# -------------------------------------------------------------------------------------- the main benchmark
n=0
for preset in $PRESETS; do
  n=$((n + 1))
  if [[ "$DRY_RUN" == 1 ]]; then
    preset=tiny
    args=(--preset tiny --steps 2 --warmup 1 --profile-steps 1 --allow-few-steps --quick-ceilings --tag dryrun
          --out-dir "$RESULTS")
  else
    provs="$PROVIDERS"; (( n == 1 )) && provs="$PROVIDERS1"
    args=(--preset "$preset" --steps "$STEPS" --profile-steps 3 --providers "$provs" --verbose)
    if (( n == 1 && MAXBATCH > 0 )); then
      args+=(--max-batch-search "$MAXBATCH" --max-batch-time 20 --max-batch-providers eager,engine)
    fi
  fi
  # the first preset gets SHARE1% of what is left, the next ones the rest (results are written as they come,
  # so a preset cut short by its timeout still leaves its finished providers in results/)
  remaining=$(( BUDGET_S - $(elapsed) - 15 ))
  if (( n == 1 )); then cap=$(( remaining * SHARE1 / 100 )); else cap=$remaining; fi
  stage "step_throughput-$preset" "$cap" 0 -- "$PY" benchmarks/step_throughput.py "${args[@]}"
  [[ "$DRY_RUN" == 1 ]] && break
done

if "$PY" -c "import matplotlib" 2>/dev/null; then
  stage plot 30 0 -- "$PY" benchmarks/plot.py $(find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$MARK" | sort) \
    --out "$RESULTS/step_throughput.png"
fi
pack

# ------------------------------------------------------------------------------------------------- summary
echo
# the tables again, from the results files this run wrote (also those of a preset cut short by its timeout)
for f in $(find "$RESULTS" -name 'step_throughput-*.json' -newer "$MARK" 2>/dev/null | sort); do
  echo "--- $(basename "$f")"
  timeout 60 "$PY" benchmarks/step_throughput.py --from-results "$f" 2>/dev/null | grep -v '^total \|^wrote '
done
echo
{
  echo "gpu_run summary ($(elapsed)s of ${BUDGET_S}s; results in $OUT/results.tgz, full log $OUT/log.txt)"
  printf '%-34s %-28s %6s\n' stage status seconds
  for s in "${SUMMARY[@]}"; do IFS='|' read -r a b c <<< "$s"; printf '%-34s %-28s %6s\n' "$a" "$b" "$c"; done
} | tee -a "$LOG"
exit 0
