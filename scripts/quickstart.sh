#!/usr/bin/env bash
# README command 1: install into .venv, run a 4-peer swarm on 127.0.0.1 training MNIST-1D,
# show `peer status` live, and end with every peer's test accuracy.
# Extra arguments go to scripts/local_swarm.py (e.g. --peers 6, --task digits-mlp).
. "$(dirname "$0")/_venv.sh"
exec .venv/bin/python scripts/local_swarm.py "$@"
