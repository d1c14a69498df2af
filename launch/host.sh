#!/usr/bin/env bash
# A plain machine over ssh (e.g. a GPU host for the eval job).
#   launch/host.sh install|eval|logs|stop --host=USER@HOST [FLAGS] [--dry-run]
set -euo pipefail
# Relative paths (e.g. --source) stay relative to where this was started.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m optconsist_jax.tools.launch host "$@"
