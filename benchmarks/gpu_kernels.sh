#!/usr/bin/env bash
# The kernel part of the GPU call: benchmarks/gpu_all.sh with the op parts only (info, the bridge decision runs,
# linear CE with its peers, regression, the critic, the whole test suite on the compiled kernels, diag_bridge).
# Knobs and outputs: see gpu_all.sh (OUT, BUDGET_S, DRY_RUN, UNO_COMMIT, ...).
#   bash benchmarks/gpu_kernels.sh          (the GPU machine: .whl/ carried, no network)
exec env PARTS="${PARTS:-info bridge lce regression critic tests diag}" \
  bash "$(dirname "${BASH_SOURCE[0]}")/gpu_all.sh" "$@"
