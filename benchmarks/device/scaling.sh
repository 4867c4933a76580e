#!/usr/bin/env bash
# The scaling lane on a lent GPU machine's CPU cores (issue 16, item 4): 1, 2, 4 and 8 CPU worker
# processes (prefork -c 1 each) behind the router, saturated by stock apply_async clients; req/s,
# efficiency per added worker and CPU per request, into $OUT/scaling.json.
#
#   bash benchmarks/device/bundle.sh      # here, once: builds .gpu/ (git-ignored)
#   bash benchmarks/device/scaling.sh     # there, with .gpu carried; results in $OUT
#
# With the run tool: command "bash benchmarks/device/scaling.sh", carry [".gpu"], timeout_s 540.
# It takes run.sh's wheels, bundled RabbitMQ + Redis, facts and weights steps, then the lane
# alone (run.sh scaling); about 460 s at most, 4 to 5 minutes expected.  Then, here:
#
#   cp <files_at>/scaling.json benchmarks/results/gpu-h100-<date>-scaling.json
#   python -m benchmarks.report benchmarks/results/gpu-h100-<date>-scaling.json --doc docs/benchmarks.md
#
# (after adding that file's results markers to docs/benchmarks.md).  Knobs: run.sh's, and
#   SCALING_ARGS          the lane's options     --workers 1,2,4,8 --rounds 3 --seconds 8
#   DEVICE_SCALING_LIMIT  seconds for the lane   330
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export SCALING_ARGS=${SCALING_ARGS:---workers 1,2,4,8 --rounds 3 --seconds 8}
exec bash benchmarks/device/run.sh scaling
