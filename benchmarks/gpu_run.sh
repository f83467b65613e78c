#!/usr/bin/env bash
# The one GPU run of uno_engine: benchmarks/gpu_all.sh with every part (ops, tests, critic, step_throughput on
# the real-shaped presets, the other families, diag_bridge, the compile providers), most needed first, inside
# one budget. Knobs and outputs: see gpu_all.sh (OUT, BUDGET_S, PARTS, STEP_PRESETS, DRY_RUN, UNO_COMMIT, ...).
#   bash benchmarks/gpu_run.sh              (the GPU machine: .whl/ carried, no network)
#   DRY_RUN=1 bash benchmarks/gpu_run.sh    (anywhere: print the stages and commands)
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_all.sh" "$@"
