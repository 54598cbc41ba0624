"""A simulator of many peers on a virtual clock: the daemon's decisions, no sockets, no sleeps.

- `events.py`: the clock, a heap of timestamped events run in order;
- `links.py`: per-peer bandwidth and latency, and how long a pull takes;
- `dht.py`: the run's records in one shared store with expiry (what a DHT lookup returns);
- `learners.py`: what trains a peer's model (the real `Trainer`, or a NumPy twin of it for
  the `mnist1d-linear` task that lets 1,000 peers run in minutes), and either's test
  predictions (the targeted attack's success rate);
- `swarm.py`: the simulation: each peer a `PeerCore` (peer/core.py) with a learner, a
  `Behaviour` (honest, or a hostile policy of `peer.experiment.attacks`) and a link; steps,
  rounds, heartbeats and churn as events, from a scenario file of `scripts/experiment.py`
  (its `[sim]` table: speeds, links);
- `lockstep.py`: lock-step rounds (every peer takes H local steps, then the whole swarm gossips
  at one instant: no latency, no jitter, no churn), the same peers with per-peer settings and
  behaviours, driven without the event loop: the `sim` engine of `scripts/robustness.py`;
- `report.py`: the run's files and summary, written as the real runner's
  (`peer.experiment.collect`).

`scripts/simulate.py SCENARIO.toml` runs one; `scripts/robustness.py` runs lock-step swarms
under attack; docs/simulation.md has figures and findings.
"""
