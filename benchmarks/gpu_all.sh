#!/usr/bin/env bash
# The hardware-truth GPU call: every GPU figure of docs/benchmarks.md re-measured on the current code, in one call of at
# most 8 minutes, most needed first. Parts, in order (each stage under `timeout`, all inside BUDGET_S):
#   info        python -m uno_engine.info (the kernels' choices and their reasons)
#   bridge      bench_bridge.py with --kernel two_pass, --kernel fused (the decision), then the default (auto)
#   lce         bench_linear_cross_entropy.py: eager, native, CCE exact, Liger, ours, ours_recompute, chunk sweep
#   regression  bench_regression.py
#   critic      bench_critic.py (llava-1.5-7b shapes, bf16, B=8)
#   tests       the whole test suite on the compiled kernels (TRITON_INTERPRET unset), xdist; after the op
#               benchmarks (about 30 s each) because it is the longest part (2 minutes or more)
#   steps       step_throughput.py on STEP_PRESETS (sd15-llava7b, janus-pro-1b), the templated critic and the latent provider included
#   families    step_throughput.py on FAMILY_PRESETS (the other real-shape generator/critic pairs)
#   diag        diag_bridge.py: GPU-only and host time of the two-pass and one-launch bridge kernels (log only)
#   compile     step_throughput.py on janus-pro-1b with the compile providers
# A part that does not fit in what is left of the budget is skipped and named in the summary, with the command
# for a second call (PARTS=...). After every stage the results files it wrote get the run's commit (taken
# before anything is written, so the results themselves cannot make it "+dirty"), and the results and logs are
# packed into $OUT, so a call cut short still brings back what it measured.
#
#   bash benchmarks/gpu_all.sh                        # the GPU machine (offline; wheels in .whl/ carried)
#   UNO_COMMIT=abc1234 bash benchmarks/gpu_all.sh     # when .git does not travel: the commit to record
#   PARTS="steps families" bash benchmarks/gpu_all.sh # a second call: only these parts
#   DRY_RUN=1 bash benchmarks/gpu_all.sh              # anywhere: print the stages and commands, run nothing
#
# Knobs: OUT (default /tmp/uno_gpu_out), BUDGET_S (default 470), PARTS (default all), STEP_PRESETS,
# FAMILY_PRESETS, STEPS (timed steps, default 20), PYTHON (default python3), TEST_WORKERS (default 14).
# Back in $OUT (at most 8 files): results.tgz (results/: the files this run wrote + logs/gpu_all-*; unpack
# with `tar -xzf results.tgz -C benchmarks/`),
# log.txt (everything), summary.txt (the stage table), run.json (device, versions, commit, stages).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY_RUN="${DRY_RUN:-0}"
OUT="${OUT:-/tmp/uno_gpu_out}"
BUDGET_S="${BUDGET_S:-470}"
ALL_PARTS="info bridge lce regression critic tests steps families diag compile"
PARTS="${PARTS:-$ALL_PARTS}"
STEP_PRESETS="${STEP_PRESETS:-sd15-llava7b janus-pro-1b}"
FAMILY_PRESETS="${FAMILY_PRESETS:-sdxl-qwen3vl8b sd3.5-medium-qwen3vl8b flux.2-klein-4b-qwen3vl8b qwen-image-qwen3vl8b flux.1-dev-qwen3vl8b sana-siglip-qwen2}"
STEPS="${STEPS:-20}"
PY="${PYTHON:-python3}"
TEST_WORKERS="${TEST_WORKERS:-14}"
RESULTS="${GPU_ALL_RESULTS:-$ROOT/benchmarks/results}"  # (tests point this and SKIP_SETUP=1 elsewhere)
LOGS="$RESULTS/logs"
# the scripts write their results where this run packs and stamps them: the committed folder (--record, how the
# README's figures are made) or the one the tests point GPU_ALL_RESULTS at
if [[ "$RESULTS" == "$ROOT/benchmarks/results" ]]; then REC=(--record); else REC=(--out-dir "$RESULTS"); fi
SKIP_SETUP="${SKIP_SETUP:-0}"
START=$(date +%s)
SUMMARY=()
LEFT_OUT=()

for p in $PARTS; do
  [[ " $ALL_PARTS " == *" $p "* ]] || { echo "gpu_all: unknown part '$p' (parts: $ALL_PARTS)" >&2; exit 2; }
done
want() { [[ " $PARTS " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - START )); }

if [[ "$DRY_RUN" == 1 ]]; then
  LOG=/dev/null
else
  mkdir -p "$OUT" "$LOGS"
  LOG="$OUT/log.txt"; : > "$LOG"
  MARK="$OUT/.start"; touch "$MARK"
  : > "$LOGS/gpu_all-stages.tsv"
fi
say() { echo "$*" | tee -a "$LOG"; }

# ------------------------------------------------------------------------------ the commit, before any write
COMMIT="${UNO_COMMIT:-}"
if git rev-parse --git-dir > /dev/null 2>&1; then
  head=$(git rev-parse --short HEAD)
  dirty=$(git status --porcelain --untracked-files=no | wc -l)
  if [[ -n "$COMMIT" && "$COMMIT" != "$head"* && "$head" != "$COMMIT"* ]]; then
    say "WARNING: UNO_COMMIT=$COMMIT but HEAD is $head; recording $head"
  fi
  COMMIT="$head"
  if (( dirty > 0 )); then
    COMMIT="$head+dirty"
    say "modified tracked files ($dirty):"; git status --porcelain --untracked-files=no | head -20 | tee -a "$LOG"
  fi
fi
COMMIT="${COMMIT:-unknown}"
[[ "$COMMIT" == *dirty* || "$COMMIT" == unknown ]] && say "WARNING: commit '$COMMIT': commit before you run (figures from a dirty or unknown tree are marked so in the README)"

pack() {  # the results files this run wrote + its logs -> $OUT/results.tgz
  [[ "$DRY_RUN" == 1 ]] && return 0
  (cd "$RESULTS/.." && find "$(basename "$RESULTS")" -type f -newer "$MARK" | sort \
    | tar -czf "$OUT/results.tgz.tmp" -T - 2>/dev/null) && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}

stamp() {  # record the run's commit in the results JSON files written since the start
  [[ "$DRY_RUN" == 1 ]] && return 0
  UNO_RUN_COMMIT="$COMMIT" UNO_RUN_MARK="$MARK" UNO_RUN_PART="$1" "$PY" - "$RESULTS" <<'EOF' >> "$LOG" 2>&1
import json, os, sys
from pathlib import Path
mark = os.path.getmtime(os.environ["UNO_RUN_MARK"])
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    if p.stat().st_mtime < mark:
        continue
    try:
        d = json.loads(p.read_text())
    except ValueError:
        continue
    meta = d.get("meta") if isinstance(d, dict) else None
    if not isinstance(meta, dict) or meta.get("run", {}).get("script") == "gpu_all.sh":
        continue
    if meta.get("commit") != os.environ["UNO_RUN_COMMIT"]:
        meta["commit_seen"] = meta.get("commit")
    meta["commit"] = os.environ["UNO_RUN_COMMIT"]
    meta["run"] = {"script": "gpu_all.sh", "part": os.environ["UNO_RUN_PART"]}
    p.write_text(json.dumps(d, indent=2, default=str) + "\n")
    print(f"stamped {p.name}: commit {meta['commit']}")
EOF
}

# stage PART NAME CAP_S -- CMD...: CMD under timeout min(CAP_S, what is left of BUDGET_S less a margin)
stage() {
  local part="$1" name="$2" cap="$3"; shift 4
  local left=$(( BUDGET_S - $(elapsed) - 20 ))
  local limit=$(( cap < left ? cap : left ))
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '[%s] %s: timeout %ss: %s\n' "$part" "$name" "$cap" "$*"
    return 0
  fi
  if (( limit < 15 )); then
    say "=== [$name] skipped: ${left}s of the budget left"
    SUMMARY+=("$name|skipped (budget)|0"); LEFT_OUT+=("$part")
    printf '%s\t%s\tskipped\t0\t%s\n' "$part" "$name" "$*" >> "$LOGS/gpu_all-stages.tsv"
    return 0
  fi
  say "=== [$name] t=$(elapsed)s timeout ${limit}s: $*"
  local t0; t0=$(date +%s)
  # SIGINT first: pytest prints its summary, the benchmarks their KeyboardInterrupt; then KILL
  timeout -s INT -k 15 "$limit" "$@" > "$LOGS/gpu_all-$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 )) status=ok
  grep -v -E "XFORMERS|reinstall xformers|Memory-efficient attention|^\s*$" "$LOGS/gpu_all-$name.log" >> "$LOG"
  if (( rc == 124 || rc == 137 || rc == 130 )); then status="TIMEOUT after ${limit}s"; LEFT_OUT+=("$part")
  elif (( rc != 0 )); then status="exit $rc"; fi
  say "=== [$name] $status in ${dt}s"
  SUMMARY+=("$name|$status|$dt")
  printf '%s\t%s\t%s\t%s\t%s\n' "$part" "$name" "$status" "$dt" "$*" >> "$LOGS/gpu_all-stages.tsv"
  stamp "$part"
  pack
}

say "uno_engine gpu_all: $(date -u +%FT%TZ), commit $COMMIT, budget ${BUDGET_S}s, parts: $PARTS"

# ----------------------------------------------------------------------------------------------- install
# `python -m` from the repo root would make kernels/ importable as a top-level `kernels` (which transformers
# takes for the Hub kernels library): -P (Python >= 3.11) keeps the working directory off sys.path.
PYM=("$PY" -P -m)
if [[ "$SKIP_SETUP" == 1 ]]; then
  say "setup skipped (SKIP_SETUP=1)"
elif [[ "$DRY_RUN" == 1 ]]; then
  echo "[setup] pip install .whl/*.whl --target /tmp/site (if carried); UNO_SKIP_EXT=1 pip install -e ."
else
  command -v nvidia-smi > /dev/null && say "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader)"
  if compgen -G ".whl/*.whl" > /dev/null; then
    "${PYM[@]}" pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
      || say "WARNING: wheel install failed (see log)"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "no .whl/ wheels: Liger, CCE, diffusers are what the image has"
  fi
  UNO_SKIP_EXT=1 "${PYM[@]}" pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 \
    || say "WARNING: editable install failed (see log)"
  if ! (cd /tmp && "$PY" -c "import uno_engine.kernels, uno_engine.step" >> "$LOG" 2>&1); then
    say "editable install not importable: a copy of the package under /tmp/uno_pkg"
    rm -rf /tmp/uno_pkg && mkdir -p /tmp/uno_pkg && cp -r uno_engine /tmp/uno_pkg/ && cp -r kernels /tmp/uno_pkg/uno_engine/kernels
    export PYTHONPATH="/tmp/uno_pkg:${PYTHONPATH:-}"
  fi
  say "setup done at t=$(elapsed)s"
fi
unset TRITON_INTERPRET  # compiled kernels everywhere below (tests/conftest.py sets it only without CUDA)

# options that exist only in some versions of the scripts: read from the source (no import, no device time)
has() { grep -q -- "$2" "benchmarks/$1" 2>/dev/null; }
LATENT=""; has _step.py '"latent"' && LATENT=",latent"
BRIDGE_ONLY=(); has bench_bridge.py '"--providers"' && BRIDGE_ONLY=(--providers triton)

# ------------------------------------------------------------------------------------------------- parts
want info && stage info info 30 -- "${PYM[@]}" uno_engine.info

if want bridge; then  # the decision first: both kernels at both shapes, then the default for the README
  stage bridge bridge-two_pass 30 -- "$PY" benchmarks/bench_bridge.py --kernel two_pass --rep 20 "${BRIDGE_ONLY[@]}" "${REC[@]}"
  stage bridge bridge-fused 30 -- "$PY" benchmarks/bench_bridge.py --kernel fused --rep 20 "${BRIDGE_ONLY[@]}" "${REC[@]}"
  stage bridge bridge-auto 40 -- "$PY" benchmarks/bench_bridge.py --rep 20 "${REC[@]}"
fi

want lce && stage lce lce 45 -- "$PY" benchmarks/bench_linear_cross_entropy.py --n 2048 8192 \
  --providers eager native cce_exact liger ours ours_recompute --chunk-rows 128 512 --rep 5 --no-check "${REC[@]}"

want regression && stage regression regression 30 -- "$PY" benchmarks/bench_regression.py "${REC[@]}"

want critic && stage critic critic 55 -- "$PY" benchmarks/bench_critic.py --device cuda --budget-s 40 "${REC[@]}"

if want tests; then
  # the README-equals-results test is left out: this run has just rewritten the results (regenerate here after)
  TOPTS=(-q -rfE -p no:cacheprovider --durations=15 -n "$TEST_WORKERS" --junitxml="$LOGS/gpu_all-tests.xml"
         --deselect tests/test_readme_tables.py::test_readme_tables_equal_the_results_files)
  if [[ "$DRY_RUN" == 1 ]] || "$PY" -c "import pytest_timeout" 2> /dev/null; then TOPTS+=(--timeout 60); fi
  stage tests tests 150 -- "${PYM[@]}" pytest "${TOPTS[@]}" tests
fi

if want steps; then
  for preset in $STEP_PRESETS; do
    stage steps "step-$preset" 65 -- "$PY" benchmarks/step_throughput.py --preset "$preset" \
      --providers "eager,engine,engine-template$LATENT" --steps "$STEPS" --profile-steps 3 --no-plot --verbose "${REC[@]}"
  done
fi

if want families; then
  for preset in $FAMILY_PRESETS; do
    stage families "step-$preset" 60 -- "$PY" benchmarks/step_throughput.py --preset "$preset" \
      --providers "eager,engine" --steps "$STEPS" --profile-steps 0 --no-plot --verbose "${REC[@]}"
  done
fi

F='UNO_BRIDGE_FORWARD=fused&UNO_BRIDGE_BACKWARD=fused'
T='UNO_BRIDGE_FORWARD=two_pass&UNO_BRIDGE_BACKWARD=two_pass'
want diag && stage diag diag_bridge 40 -- env "DIAG=default|$T|$F" "$PY" benchmarks/diag_bridge.py

want compile && stage compile step-janus-pro-1b-compile 120 -- "$PY" benchmarks/step_throughput.py \
  --preset janus-pro-1b --providers eager+compile,engine+compile --steps "$STEPS" --profile-steps 0 \
  --tag compile --no-plot --verbose "${REC[@]}"

[[ "$DRY_RUN" == 1 ]] && exit 0

# ------------------------------------------------------------------------------------------------ record
"$PY" - "$OUT/run.json" "$LOGS/gpu_all-stages.tsv" "$COMMIT" "$BUDGET_S" "$(elapsed)" <<'EOF' >> "$LOG" 2>&1
import datetime, importlib.metadata, json, platform, subprocess, sys
out, tsv, commit, budget, wall = sys.argv[1:]
run = {"script": "benchmarks/gpu_all.sh", "commit": commit, "budget_s": int(budget), "wall_s": int(wall),
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "python": platform.python_version()}
try:
    q = "name,memory.total,driver_version"
    run["device"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # noqa: BLE001
    run["device"] = f"nvidia-smi failed: {e}"
for dist in ("torch", "triton", "transformers", "diffusers", "liger-kernel", "cut-cross-entropy", "xformers"):
    try:  # versions from the installed metadata: nothing imported
        run[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        run[dist] = None
run["stages"] = [dict(zip(("part", "name", "status", "seconds", "command"), line.rstrip("\n").split("\t")))
                 for line in open(tsv) if line.strip()]
json.dump(run, open(out, "w"), indent=2)
EOF
cp "$OUT/run.json" "$LOGS/gpu_all-run.json" 2> /dev/null
pack

# ------------------------------------------------------------------------------------------------ summary
{
  echo
  echo "gpu_all summary: commit $COMMIT, $(elapsed)s of ${BUDGET_S}s; results in $OUT/results.tgz"
  printf '%-36s %-26s %6s\n' stage status seconds
  for s in "${SUMMARY[@]}"; do IFS='|' read -r a b c <<< "$s"; printf '%-36s %-26s %6s\n' "$a" "$b" "$c"; done
  if (( ${#LEFT_OUT[@]} )); then
    echo "not finished: next call: PARTS=\"$(printf '%s\n' "${LEFT_OUT[@]}" | awk '!seen[$0]++' | tr '\n' ' ' | sed 's/ $//')\" bash benchmarks/gpu_all.sh"
  fi
  echo "here: tar -xzf <files_at>/results.tgz -C benchmarks/ && python benchmarks/readme_tables.py"
} | tee "$OUT/summary.txt" | tee -a "$LOG"
exit 0
