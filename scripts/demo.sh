#!/usr/bin/env bash
# Set up the environment if needed, then run `edgekit demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/edgekit demo "$@"
