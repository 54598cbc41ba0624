"""Daemon configuration and where it comes from.

Precedence: command-line flags > `PEER_*` environment variables > `--config file.toml` >
`$XDG_CONFIG_HOME/peer/config.toml` > the defaults below. The CLI passes only the values a flag or
environment variable set; `resolve` fills the rest from the files and defaults.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peer.aggregation import DEFAULT_AGGREGATOR  # torch-free: the CLI imports this module


def xdg_data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def xdg_config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def default_data_dir() -> Path:
    return xdg_data_home() / "peer"


@dataclass
class PeerConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    run_id: str = "default"
    task: str = "mnist1d-cnn"
    initial_peers: list[str] = field(default_factory=list)
    # how long `peer join` keeps trying an initial peer given without /p2p/<id> (HOST/tcp/PORT)
    # before it gives up; 0: one try, so a wrong address is said at once. Containers started
    # together with their bootstrap peer (deploy/) set it to outlast the bootstrap's start.
    initial_peer_wait_s: float = 0.0
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce: list[str] = field(default_factory=list)
    # NAT traversal (protocols/transport/nat.py): relay peers to reserve a slot on when AutoNAT
    # finds this peer unreachable (each with /p2p/<id>); with none, auto-relay looks among the
    # peers p2pd knows. Hole punching (DCUtR) upgrades relayed connections to direct ones.
    relays: list[str] = field(default_factory=list)
    auto_relay: bool = True
    hole_punching: bool = True
    # carry other peers' relayed connections (circuit relay v2 hop): off, because it spends this
    # volunteer's bandwidth on strangers' traffic
    relay_service: bool = False
    aggregator: str = DEFAULT_AGGREGATOR
    # fraction of a round's partners assumed Byzantine (robust rules' f and clipping budget)
    byzantine_fraction: float = 0.25
    # EXPERIMENTS ONLY (peer/experiment/attacks.py): run this daemon as an attacker
    experiment_attack: str = ""
    # data: this peer's shard "i/n"; empty means derived from the peer id
    shard: str = ""
    num_shards: int = 4
    split: str = "iid"
    alpha: float = 0.5
    data_seed: int = 0
    # timing
    heartbeat_s: float = 2.0
    gossip_every_s: float = 1.0  # a round at least this often (also when training is paused)
    # ...and one after every this many local steps (0: time only), while the run's step is below
    # `gossip_steps_until` (0: for the whole run). Post-local SGD (peer/cadence.py): mixing often
    # early converges in few samples; local steps between mixes later generalise better.
    # docs/benchmarks.md (convergence) has the measurements: with 3 / 1000 the 4-peer MNIST-1D
    # swarm reached 88 % on 1.2-2.0x central training's samples (time only: 5-8x). It relies on
    # two escapes in the default rule (peer/aggregation): the consistency check is suspended when
    # our own model is the odd one out, and a far partner that passes every other check is
    # clipped, not dropped as a distance outlier; without them tests/test_real_swarm.py's churn
    # test fails about half its runs with this cadence. 0: time-only rounds.
    gossip_every_steps: int = 3
    gossip_steps_until: int = 1000
    # examples of this peer's own training data on which partners' models are evaluated each round
    # (the default rule's loss screen, peer/aggregation/loss.py); 0 turns the screen off
    loss_probe_samples: int | None = None  # None: the task's (`Task.loss_probe_samples`)
    partners: int = 4  # robust rules need several partners per round to tell outliers apart
    # Outer steps (peer/outer.py): a round every this many inner steps exchanges compressed
    # pseudo-gradients and applies a Nesterov outer step; 0: rounds exchange whole models on the
    # cadence above. None: the task's default (`Task.outer_every_steps`).
    outer_every_steps: int | None = None
    # outer learning rate and Nesterov momentum (None: the task's; DiLoCo used 0.7 and 0.9)
    outer_lr: float | None = None
    outer_momentum: float | None = None
    # outer rounds between two that mix partners' anchors (0: never); None: the task's
    outer_sync_every: int | None = None
    # with outer steps, whether training waits once an outer round is still unfinished H inner
    # steps after it was due (peer/cadence.py, RoundBacklog): every H inner steps then make one
    # outer step however slow the link, at the cost of idle training time; False: training goes
    # on and the next round's pseudo-gradient covers the extra steps
    outer_wait_for_round: bool = False
    # how anchors travel (consensus rounds and joiners' sync): a dense method (fp32, fp16, bf16, int8)
    outer_anchor_compression: str = "int8"
    # what outer rounds send (protocols/compression.py): fp32, fp16, bf16, int8, topk[:FRACTION[:CHUNK]],
    # topk-int8[:FRACTION[:CHUNK]], topk-2bit[:FRACTION[:CHUNK]]; empty: the task's default (`Task.compression`)
    compression: str = ""
    # caps the daemon itself enforces on its gossip traffic, in Mbit/s (0: none); pull deadlines
    # follow the payload size and the measured link rate (protocols/ratelimit.py)
    max_upload_mbps: float = 0.0
    max_download_mbps: float = 0.0
    # deadline to connect and read a reply's header; the payload then gets a deadline from its
    # size and the measured link rate (protocols/ratelimit.py), at most `max_pull_s`
    pull_timeout_s: float = 20.0
    max_pull_s: float = 600.0
    checkpoint_every_s: float = 30.0
    eval_every_s: float = 2.0
    join_sync_timeout_s: float = 15.0
    max_steps: int | None = None
    step_delay_s: float = 0.0
    # niceness of the training thread (0-19; 0: the process's own): the daemon's networking and
    # the rest of the machine go first, as BOINC-style volunteer computing does (peer/trainer.py)
    train_nice: int = 10
    max_concurrent_serves: int = 8
    max_serves_per_peer: int = 2  # one peer cannot take every serving slot
    read_timeout_s: float = 10.0  # no byte for this long ends a transfer (slow-loris)
    # closed run: a file of admitted peer ids, one per line; others' records and requests are dropped
    allow_peers: str = ""
    log_format: str = "text"
    # Prometheus endpoint (peer/metrics.py): None is off, 0 picks a free port (status says which)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @property
    def socket_path(self) -> Path:
        return Path(self.data_dir) / "control.sock"

    @property
    def identity_path(self) -> Path:
        return Path(self.data_dir) / "identity.key"


_FIELDS = {f.name: f for f in fields(PeerConfig)}


def load_allowed_peers(path: str) -> frozenset[str] | None:
    """Peer ids admitted to a closed run (one per line, '#' comments), or None for an open run."""
    if not path:
        return None
    try:
        lines = Path(os.path.expanduser(path)).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--allow-peers {path}: {e.strerror or e}") from None
    ids = {line.split("#", 1)[0].strip() for line in lines} - {""}
    bad = [i for i in ids if not i.isalnum() or len(i) > 128]
    if bad:
        raise ValueError(f"--allow-peers {path}: not a peer id: {bad[0][:40]!r}")
    if not ids:
        raise ValueError(f"--allow-peers {path}: no peer ids in the file")
    return frozenset(ids)


def _coerce(name: str, value: Any) -> Any:
    kind = str(_FIELDS[name].type)
    if name == "data_dir":
        return Path(os.path.expanduser(str(value)))
    if kind.startswith("list"):
        if isinstance(value, str):
            return value.split()
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return list(value)
    if value is None:
        return None
    if kind == "bool" and not isinstance(value, bool):
        raise TypeError("expected true or false")
    if isinstance(value, bool) and kind != "bool":
        raise TypeError("expected a number" if "int" in kind or "float" in kind else "expected a string")
    if "int" in kind:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError("expected a whole number")
        return int(value)
    if "float" in kind:
        return float(value)
    if kind == "str" and not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def settings_by_field(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`PeerConfig` field -> value from setting names (dashes or underscores) and raw values; an
    unknown name or a value of the wrong kind raises ValueError naming `source`."""
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, list(_FIELDS), n=1)
            hint = f"did you mean {close[0].replace('_', '-')!r}?" if close else "README.md lists the settings"
            raise ValueError(f"{source}: unknown setting {key!r} ({hint})")
        try:
            out[name] = _coerce(name, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {key} = {value!r}: {e}") from None
    return out


def load_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    return settings_by_field(raw, str(path))


def resolve(explicit: dict[str, Any], config_file: Path | None = None) -> PeerConfig:
    """Merge flag/env values (`explicit`, None meaning unset) over config files and defaults."""
    merged: dict[str, Any] = {}
    user_file = xdg_config_home() / "peer" / "config.toml"
    if user_file.exists():
        merged.update(load_toml(user_file))
    if config_file is not None:
        merged.update(load_toml(Path(config_file)))
    for name, value in explicit.items():
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            merged[name] = _coerce(name, value)
    return PeerConfig(**merged)
