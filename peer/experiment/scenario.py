"""Scenario files for `scripts/experiment.py`: parse, check, and turn churn rates into a schedule.

A scenario is a TOML file (see `scripts/scenarios/*.toml` and docs/experiments.md). Everything
here is pure: no processes, no clock, so the schedule and the checks are unit-tested directly.
The schedule is drawn from the scenario's `seed`, so the same file gives the same churn.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ACTIONS = ("kill", "leave", "join")


class ScenarioError(ValueError):
    """A bad scenario file: the message is one line that says what and where."""


@dataclass(frozen=True)
class Event:
    at: float     # seconds since the swarm was up
    action: str   # kill (SIGKILL), leave (graceful, what `peer leave` does) or join (come back)
    peer: int     # peer slot


@dataclass
class Churn:
    leave_per_min: float = 0.0   # rate at which each up, churn-eligible peer leaves (0.3: 30 % per minute)
    rejoin_per_min: float = 2.0  # rate at which each peer that left comes back (2.0: mean 30 s away)
    kill_fraction: float = 0.5   # share of leaves done with SIGKILL; the rest are graceful `peer leave`
    keep_identity: bool = True   # a returning peer reuses its data dir (identity, checkpoint) or comes back fresh
    start_s: float = 20.0        # no churn before this
    stop_s: float | None = None  # no new leaves after this (default: duration - 60 s, so returners can catch up)
    min_up: int = 2              # never let fewer honest peers than this be up
    protect: list[int] = field(default_factory=lambda: [0])  # slots that never churn (the bootstrap peer)
    events: list[Event] = field(default_factory=list)        # explicit events replace the random schedule


@dataclass
class Attack:
    count: int = 0
    name: str = ""
    start_s: float = 0.0  # attackers join this long after the honest swarm is up


@dataclass
class Slow:
    peers: list[int]
    step_delay_s: float = 0.0     # a sleep after every training step
    delay_ms: float = 0.0         # network conditions (need root: peer/experiment/network.py; never skipped silently)
    rate_mbit: float = 0.0
    loss_pct: float = 0.0


@dataclass
class Scenario:
    name: str
    peers: int = 8                # honest peers
    task: str = "mnist1d-cnn"
    split: str = "iid"
    alpha: float = 0.5
    aggregator: str = ""          # empty: the daemon's default
    duration_s: float = 300.0
    target_accuracy: float = 0.85
    catchup_tolerance: float = 0.02  # a joiner has caught up at swarm accuracy minus this
    seed: int = 0
    step_delay_s: float = 0.0     # for every peer unless a [[heterogeneity]] group says otherwise
    peer_settings: dict[str, Any] = field(default_factory=dict)  # [peer]: any PeerConfig setting
    churn: Churn = field(default_factory=Churn)
    attack: Attack = field(default_factory=Attack)
    heterogeneity: list[Slow] = field(default_factory=list)
    sim: dict[str, Any] = field(default_factory=dict)  # [sim]: the simulator's settings (peer/sim); real runs ignore it

    @property
    def total_peers(self) -> int:
        return self.peers + self.attack.count

    def role(self, slot: int) -> str:
        return "attacker" if slot >= self.peers else "honest"

    def settings_for(self, slot: int) -> Slow:
        """The throttle and network conditions of one peer slot (the last group naming it wins)."""
        found = Slow(peers=[slot], step_delay_s=self.step_delay_s)
        for g in self.heterogeneity:
            if slot in g.peers:
                found = g
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _take(table: dict, cls, where: str):
    known = set(cls.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    try:
        return cls(**table)
    except TypeError as e:
        raise ScenarioError(f"{where}: {e}") from None


def parse_scenario(raw: dict[str, Any], name: str = "scenario") -> Scenario:
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    raw.setdefault("name", name)
    churn = raw.pop("churn", {})
    attack = raw.pop("attack", {})
    groups = raw.pop("heterogeneity", [])
    peer_settings = raw.pop("peer", {})
    sim = raw.pop("sim", {})
    if not all(isinstance(t, dict) for t in (churn, attack, peer_settings, sim)) or not isinstance(groups, list):
        raise ScenarioError("[churn], [attack], [peer] and [sim] are tables, [[heterogeneity]] a list of tables")
    events = [_take(e, Event, f"churn.events[{i}]") for i, e in enumerate(churn.pop("events", []))]
    s = _take(raw, Scenario, "scenario")
    s.churn = _take(churn, Churn, "[churn]")
    s.churn.events = events
    s.attack = _take(attack, Attack, "[attack]")
    s.heterogeneity = [_take(g, Slow, f"heterogeneity[{i}]") for i, g in enumerate(groups)]
    s.peer_settings = peer_settings
    s.sim = sim
    check(s)
    return s


def check(s: Scenario) -> None:
    if s.peers < 1:
        raise ScenarioError(f"peers must be >= 1, got {s.peers}")
    if s.split not in ("iid", "dirichlet"):
        raise ScenarioError(f"split must be iid or dirichlet, got {s.split!r}")
    if s.duration_s <= 0:
        raise ScenarioError(f"duration_s must be > 0, got {s.duration_s}")
    c = s.churn
    if not 0 <= c.kill_fraction <= 1:
        raise ScenarioError(f"churn.kill_fraction must be in [0, 1], got {c.kill_fraction}")
    if c.leave_per_min < 0 or c.rejoin_per_min < 0:
        raise ScenarioError("churn rates must be >= 0")
    for e in c.events:
        if e.action not in ACTIONS:
            raise ScenarioError(f"churn event action must be one of {', '.join(ACTIONS)}, got {e.action!r}")
        if not 0 <= e.peer < s.peers:
            raise ScenarioError(f"churn event peer {e.peer} is not an honest peer slot (0..{s.peers - 1})")
    if s.attack.count < 0 or (s.attack.count and not s.attack.name):
        raise ScenarioError("[attack] needs a name when count > 0")
    if s.attack.name:
        from peer.experiment.attacks import ATTACKS

        if s.attack.name not in ATTACKS:
            raise ScenarioError(f"unknown attack {s.attack.name!r}; choose from {', '.join(ATTACKS)}")
    for g in s.heterogeneity:
        bad = [p for p in g.peers if not 0 <= p < s.total_peers]
        if bad:
            raise ScenarioError(f"heterogeneity group names peer slot(s) {bad} outside 0..{s.total_peers - 1}")
    from peer.config import _FIELDS

    unknown = [k for k in s.peer_settings if k.replace("-", "_") not in _FIELDS]
    if unknown:
        raise ScenarioError(f"[peer]: unknown setting(s) {', '.join(unknown)}")


def load_scenario(path: Path) -> Scenario:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    try:
        return parse_scenario(raw, Path(path).stem)
    except ScenarioError as e:
        raise ScenarioError(f"{path}: {e}") from None


def churn_schedule(s: Scenario) -> list[Event]:
    """The churn events of a scenario, sorted by time.

    Explicit `[[churn.events]]` are used as they are. Otherwise a two-state Markov process per
    eligible honest peer, simulated exactly (Gillespie): an up peer leaves at `leave_per_min`,
    a peer that left returns at `rejoin_per_min`; each leave is a SIGKILL with probability
    `kill_fraction`. A leave that would drop the up count below `min_up` is not drawn. Every peer
    still away at the end of the leave window comes back before the run ends.
    """
    c = s.churn
    if c.events:
        return sorted(c.events, key=lambda e: (e.at, e.peer))
    if c.leave_per_min <= 0:
        return []
    rng = random.Random(s.seed)
    stop = c.stop_s if c.stop_s is not None else max(c.start_s, s.duration_s - 60.0)
    eligible = [p for p in range(s.peers) if p not in c.protect]
    up = set(range(s.peers))
    down: set[int] = set()
    lam_leave, lam_join = c.leave_per_min / 60.0, c.rejoin_per_min / 60.0
    t = c.start_s
    events: list[Event] = []
    while True:
        leavers = [p for p in eligible if p in up] if len(up) > c.min_up else []
        rate = lam_leave * len(leavers) + lam_join * len(down)
        if rate <= 0:
            break
        t += rng.expovariate(rate)
        if t >= s.duration_s - 1.0 or (t >= stop and not down):
            break
        if rng.random() < lam_leave * len(leavers) / rate:
            if t >= stop:
                continue  # past the leave window only returns happen
            p = rng.choice(sorted(leavers))
            up.discard(p)
            down.add(p)
            events.append(Event(round(t, 2), "kill" if rng.random() < c.kill_fraction else "leave", p))
        else:
            p = rng.choice(sorted(down))
            down.discard(p)
            up.add(p)
            events.append(Event(round(t, 2), "join", p))
    for p in sorted(down):  # nobody stays away at the end: everyone is measured at the finish
        events.append(Event(round(max(stop, events[-1].at) + 1.0, 2), "join", p))
    return events

