#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with pinned dependencies.
# Re-installs only when pyproject.toml or constraints.txt changed since the last set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "edgekit needs Python >= 3.10 (found: $("$PY" --version 2>&1))" >&2; exit 1
fi
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f .venv/.edgekit-stamp ] && [ "$(cat .venv/.edgekit-stamp)" = "$stamp" ]; then exit 0; fi
echo "setting up .venv (pinned dependencies from constraints.txt)..." >&2
"$PY" -m venv .venv
# pip -q still prints a warning per missing entry of some machines' local index mirrors.
quiet_pip() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }
# torch first, so the CPU build is chosen before anything asks for an unpinned torch.
quiet_pip -c constraints.txt "torch==2.13.0"
quiet_pip -c constraints.txt -e ".[dev]"
echo "$stamp" > .venv/.edgekit-stamp
