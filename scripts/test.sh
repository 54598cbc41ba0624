#!/usr/bin/env bash
# README command 2: install into .venv with the dev extras, lint, and run the whole test suite.
# Extra arguments go to pytest (e.g. `-m "not slow"` for the fast tier). A run that collects no
# tests fails (pytest exits 5).
set -e
PEER_EXTRAS=dev . "$(dirname "$0")/_venv.sh"
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
