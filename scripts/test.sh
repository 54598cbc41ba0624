#!/usr/bin/env bash
# README command 2: install into .venv with the dev extras and run the whole test suite.
# Extra arguments go to pytest. A run that collects no tests fails (pytest exits 5).
PEER_EXTRAS=dev . "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
