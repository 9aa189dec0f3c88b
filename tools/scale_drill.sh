#!/usr/bin/env bash
# The scale drill (docs/scale.md): 16 gloo ranks on the local SLURM cluster (4 nodes x 4 tasks), a killed rank
# named, requeued on 3 nodes (12 ranks) and resumed through the universal conversion. CPU-heavy: niced.
#   tools/scale_drill.sh            # grows the shared test cluster to 4 x 4 CPUs if smaller; ~10-20 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec nice -n 10 "${PYTHON:-python}" -m pytest -m scale -s -q -p no:cacheprovider tests/test_scale.py "$@"
