"""Instruments the benchmark and fuzz scripts (scripts/bench*.py, scripts/fuzz.py) and their tests share.

    probe.py         built-in tasks with a start gate and an evaluation log, loaded by real
                     `peer join` processes as `--task peer.bench.probe:mnist1d` (or `:digits`)
    eval_log.py      the evaluation logs those peers write: read while written, merged into the
                     swarm's timeline, summarised as time and samples to a threshold
    fuzz_targets.py  every decoder and handler a stranger can reach, as fuzz targets (the
                     hypothesis tests and scripts/fuzz.py drive the same ones)

Nothing in the daemon imports this package.
"""
