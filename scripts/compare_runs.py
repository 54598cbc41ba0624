#!/usr/bin/env python3
"""Real runs and simulations of one scenario, side by side.

    scripts/compare_runs.py runs/experiments/real-vs-sim-1 runs/simulations/real-vs-sim-seed1 ... [--json]

Each DIR is a run of scripts/experiment.py or scripts/simulate.py (a simulation has a sim.json);
every one is summarised with a real run's time windows (peer/experiment/compare.py). Prints a
markdown table (honest final accuracy, the honest mean on the way, steps and rounds per honest
peer) and the gap between the medians of the two kinds; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("dirs", type=Path, nargs="+", help="run directories (real or simulated)")
    ap.add_argument("--json", action="store_true", help="print runs and comparison as one JSON object")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args()
    from peer.experiment import compare

    try:
        runs = [compare.run_figures(d) for d in args.dirs]
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.debug:
            raise
        print(f"compare_runs: {e} (give directories written by scripts/experiment.py or scripts/simulate.py)", file=sys.stderr)
        return 2
    cmp = compare.compare(runs)
    if args.json:
        print(json.dumps({"runs": runs, "comparison": cmp}))
    else:
        print(compare.markdown(runs, cmp), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
