#!/usr/bin/env bash
# Cloud TPU launcher; needs only python3 (3.11+) and gcloud on this machine.
#   launch/tpu.sh create|install|fetch|stage|train|eval|logs|stop|delete|up|supervise [FLAGS] [--dry-run]
# Flags: python -m optconsist_jax.tools.launch tpu VERB --help
set -euo pipefail
# Relative paths (e.g. --source) stay relative to where this was started.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m optconsist_jax.tools.launch tpu "$@"
