"""Parts of the experiment runner (`scripts/experiment.py`, docs/experiments.md).

    scenario.py     scenario files: parse, check, and draw the churn schedule from the seed (pure)
    network.py      per-peer network namespaces: bridge + tc (netem, tbf), or the delay switch
    delayswitch.py  userspace switch over TUN devices: latency, loss and caps without netem
    collect.py      data dirs -> summary.json, summary.md and plots (pure function of the files)
    compare.py      real runs and simulations of one scenario side by side (scripts/compare_runs.py)
    robustness.py   lock-step runs under attack on the simulator or real daemons, and the 30 % grid
                    (scripts/robustness.py)
    attacks.py      EXPERIMENTS ONLY: hostile behaviours (peer.behaviour.Behaviour) a daemon or
                    the simulator can run, for `--experiment-attack` and scripts/robustness.py
"""
