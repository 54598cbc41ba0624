# Sourced by quickstart.sh and test.sh: create or reuse .venv and install the project into it.
# Usage: PEER_EXTRAS=dev . scripts/_venv.sh   (a variable, not $1: a sourced file sees the caller's arguments)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "peer needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv ..."
  "$PYTHON" -m venv .venv
fi
spec="."
[ -n "${PEER_EXTRAS:-}" ] && spec=".[$PEER_EXTRAS]"
# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU build already on this disk.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
