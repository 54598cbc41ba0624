"""Hostile behaviours: attacks a real daemon or the simulator can run, FOR EXPERIMENTS ONLY.

`peer join --experiment-attack NAME` (hidden from `--help`, used by `scripts/robustness.py` and
the experiment runner) injects one of these (`peer.behaviour.Behaviour`) into an otherwise normal
daemon, so every attack crosses the real protocol: the attacker discovers peers, pulls their
models, trains, publishes a signed record, and serves what the policy crafts when an honest peer
pulls from it. Attackers mix with a plain mean and never pull their colluders.

Model-space forms of the attacks in the literature (REFERENCE.md section 4). `base` is the
attacker's model before this round's local steps (it mixes honest models with a plain mean, so
`base` tracks the swarm), `u` its own local update since then, `mu` and `sigma` the mean and
per-coordinate standard deviation of the honest models it pulled last round:

- signflip:        base - u                 (the update with its sign flipped)
- signflip100:     base - 100 u
- signflip-liar:   base - u, and reports minus its real history (the direction of what it
                   serves), so that its served models agree with its report
- gaussian:        base + N(0, 10^2) per coordinate
- labelflip:       trains on y -> 9 - y, serves its model
- targeted:        a Sybil cluster; every member trains on the same data (the examples of
                   classes 0 and 1 in its shard, labels swapped) with the same seed, and serves
                   base + 3 u (its poisoned update boosted x3)
- adaptive-sybil:  targeted, and adds fresh noise (3x the history's norm) to the history it reports
- alie:            mu - z sigma, z from the run's n and f (`alie_z`; 0.253 for n = 25, f = 5, 0.366
                   for n = 20, f = 6)
- ipm:             base - 2 (mu - base)     (inner-product manipulation, eps = 2)
- dissensus:       x_r - 1.5 (mu - x_r), x_r the requester's last model it saw (or base)
- replacement:     trains on y -> 9 - y, serves G + 10 (X - G) with G = mu (boosted model replacement)

Attacks on the gossip layer and on the default rule's screens. `seen` is the last model the
attacker pulled from each honest peer, `x_r` the requester's (or `base` if never pulled), `D`
the median distance from `x_r` to the models in `seen`:

- spectral:        the spectral attack of CS+-RG (Gaucher et al., ICML 2025), as far as an attacker
                   that sees only what it pulls can run it. The paper serves node i
                   x_i + c v_i (v^T X), v the Fiedler vector of the honest graph's Laplacian: it
                   pushes the two sides of the graph's slowest-mixing cut apart. Our partner graph
                   is redrawn every round (its expectation is complete, whose Fiedler space is
                   every vector orthogonal to 1), so the attacker takes the cut along which the
                   honest models already disagree most: w the top principal direction of the
                   centred models in `seen` (v^T X_c = sigma_1 w), and serves
                   x_r + D sign(<x_r - mean(seen), w>) w. The paper line-searches c against the
                   defence; against a clipping rule the most that enters unclipped is a step of
                   about a typical honest distance, hence D.
- sleeper:         serves its own (honestly trained) model and reports its true history for the
                   first `sleep_rounds` rounds (default 20), building history and reputation, then
                   serves ALIE; its record keeps its honest history
- hugger:          threshold-hugger: x_r + s e, e = 0.4 h + sqrt(1 - 0.4^2) a, with h the unit
                   direction of its own (honest, truthfully reported) history and a the unit part
                   of ALIE's direction -sigma orthogonal to h (cosine 0.4 with its report: twice
                   the consistency check's full-weight cosine); s is the largest step under every
                   screen's threshold as the attacker estimates it: 0.9 x OUTLIER_FACTOR x D (the
                   distance screen) and, by bisection on a batch of its own training data, a loss
                   rise over x_r of at most 0.9 x FULL_UP_TO x max(median rise of the models in
                   `seen`, UNTRAINED_FRACTION x an untrained model's loss) (the loss screen).
                   Alignment and FoolsGold's reported channel see its honest history.
- framing:         makes honest peers look like Sybils. Each framer picks one honest peer (the
                   framers' sorted ids, each its own rank among the live honest ids) and reports
                   that peer's history sketch, copied bit for bit from its record as of its last
                   lookup (one heartbeat old), in its own validly signed record; it serves the
                   target's last model it pulled, so the target's and its observed deviations
                   align as well
- poisoning:       partner-selection poisoning: serves ALIE and pulls from every live peer every
                   round. `gossip.PartnerPicker` picks among live, unbanned, not backed-off
                   peers, with a weight halved per net refusal by the rule, so the levers are
                   (1) identities (the Byzantine count), (2) never being refused or backed off
                   (ALIE passes the screens at full weight, and the attacker answers every
                   pull), (3) backing honest peers off: its pulls hold
                   honest peers' serving slots (`max_concurrent_serves`), which then refuse honest
                   requesters as busy, who back them off. Fresher records and answering fastest
                   buy nothing: a record is live or not (publishing more often only keeps it live),
                   and no latency enters the pick
"""

from __future__ import annotations

import math

import torch

from peer.behaviour import Behaviour
from peer.tasks import Task

ATTACKS = ("signflip", "signflip100", "signflip-liar", "gaussian", "labelflip", "targeted", "adaptive-sybil",
           "alie", "ipm", "dissensus", "replacement", "spectral", "sleeper", "hugger", "framing", "poisoning")
TARGETED = ("targeted", "adaptive-sybil")
SOURCE_CLASSES = (0, 1)  # the targeted attack swaps these two
SLEEP_ROUNDS = 20  # rounds a sleeper behaves honestly before it attacks
# the hugger sits at this fraction of each screen's estimated threshold, and serves deviations
# with this cosine to its reported history (twice sybil.CONSISTENT_AT: its observed sum is noisy)
HUG_MARGIN = 0.9
HUG_CONSISTENCY = 0.4
MAX_SEEN = 256  # honest models an attacker remembers (the last of each peer)


def alie_z(n: int, f: int) -> float:
    """z of 'A little is enough' (Baruch et al.): Phi^-1((n - f - s) / (n - f)), s = floor(n/2 + 1) - f."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - f - s) / (n - f))


class HostilePolicy(Behaviour):
    honest = False
    aggregator = "mean"  # the attacker tracks the swarm: base and mu are honest averages

    def __init__(self, attack: str, seed: int = 0, n: int = 25, f: int = 5, peer_id: str = "",
                 sleep_rounds: int = SLEEP_ROUNDS):
        super().__init__()
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        self.attack = self.name = attack
        self.peer_id = peer_id
        self.gen = torch.Generator().manual_seed(seed)
        self.z = alie_z(n, f)
        self.sleep_rounds = sleep_rounds
        self.rounds = 0  # gossip rounds begun
        self.base: torch.Tensor | None = None
        self.update: torch.Tensor | None = None
        self.mu: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None
        self.seen: dict[str, torch.Tensor] = {}
        self._last_history: torch.Tensor | None = None
        self._principal: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, unit direction) of `seen`
        self.probe = None  # hugger: a loss probe on its own training data
        self._seen_losses: dict[str, float] = {}
        self.target: str | None = None  # framing: the honest peer it frames
        # partners pulled per round (None: the configured number); the poisoner pulls everyone
        self.fanout: int | None = 1024 if attack == "poisoning" else None
        # Sybils of a targeted attack all train alike: same batches, same init
        self.data_seed = 12345 if attack in TARGETED else None

    @property
    def colluders(self) -> frozenset[str]:
        """Fellow attackers: never pulled, their models are not honest."""
        return self.avoid

    @colluders.setter
    def colluders(self, peers) -> None:
        self.avoid = frozenset(peers)

    # --- what the daemon asks --------------------------------------------------------------

    def poison(self, task: Task) -> None:
        """Rewrite the training labels (data attacks only). Sybils of the targeted attack are
        started with the same shard (the experiment tools give them the whole training set), so
        they all train alike. The hugger keeps a loss probe on its (clean) data."""
        if self.attack in ("labelflip", "replacement"):
            task.y_train = 9 - task.y_train
        elif self.attack in TARGETED:
            keep = (task.y_train == SOURCE_CLASSES[0]) | (task.y_train == SOURCE_CLASSES[1])
            task.x_train, task.y_train = task.x_train[keep], task.y_train[keep]
            y = task.y_train.clone()
            a, b = SOURCE_CLASSES
            y[task.y_train == a], y[task.y_train == b] = b, a
            task.y_train = y
        elif self.attack == "hugger":
            from peer.loss_probe import LossProbe

            self.probe = LossProbe(task, samples=256, seed=int(torch.randint(1 << 30, (1,), generator=self.gen)))

    def round_start(self, model: torch.Tensor, history: torch.Tensor) -> None:
        """Called at each gossip round with the attacker's model and local-update history."""
        self.rounds += 1
        if self._last_history is not None and self._last_history.shape == history.shape:
            self.update = history - self._last_history
        self._last_history = history.clone()
        self.base = model - self.update if self.update is not None else model.clone()

    def observe(self, partner_ids: list[str], models: list[torch.Tensor]) -> None:
        """Honest models the attacker pulled this round: statistics for the omniscient attacks."""
        for p, m in zip(partner_ids, models):
            self.seen.pop(p, None)
            self.seen[p] = m  # most recent last
        while len(self.seen) > MAX_SEEN:
            self.seen.pop(next(iter(self.seen)))
        if models:
            x = torch.stack(models)
            self.mu = x.mean(0)
            self.sigma = x.std(0, unbiased=False) if len(models) > 1 else torch.zeros_like(self.mu)
        self._principal = None
        self._seen_losses = {}

    def serve(self, requester: str, own: torch.Tensor) -> torch.Tensor:
        """The model served to `requester` in place of the attacker's real one."""
        a = self.attack
        base = self.base if self.base is not None and self.base.shape == own.shape else own
        u = self.update if self.update is not None and self.update.shape == own.shape else torch.zeros_like(own)
        mu = self.mu if self.mu is not None and self.mu.shape == own.shape else own
        sigma = self.sigma if self.sigma is not None and self.sigma.shape == own.shape else torch.zeros_like(own)
        if a in ("signflip", "signflip-liar"):
            return base - u
        if a == "signflip100":
            return base - 100 * u
        if a == "gaussian":
            return base + 10 * torch.randn(own.shape, generator=self.gen)
        if a == "alie" or a == "poisoning" or (a == "sleeper" and self.rounds > self.sleep_rounds):
            return mu - self.z * sigma
        if a == "sleeper":
            return own
        if a == "ipm":
            return base - 2 * (mu - base)
        if a == "dissensus":
            x_r = self.seen.get(requester, base)
            return x_r - 1.5 * (mu - x_r)
        if a == "replacement":
            return mu + 10 * (own - mu)
        if a in TARGETED:
            return base + 3 * u  # the poisoned local update, boosted x3 so that plain averaging feels it
        if a == "spectral":
            return self._spectral(requester, base)
        if a == "hugger":
            return self._hug(requester, base, sigma)
        if a == "framing":
            framed = self.seen.get(self.target) if self.target is not None else None
            return framed.clone() if framed is not None and framed.shape == own.shape else own
        return own  # label flip serves its (poisoned) model as it is

    def report_history(self, sketch: torch.Tensor, others: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.attack == "signflip-liar":
            return -sketch
        if self.attack == "adaptive-sybil":
            noise = torch.randn(sketch.shape, generator=self.gen)
            return sketch + noise * (3 * float(sketch.norm()) / max(float(noise.norm()), 1e-12))
        if self.attack == "framing" and others:
            self.target = self._frame_target(others)
            if self.target is not None and others[self.target].shape == sketch.shape:
                return others[self.target].clone()
        return sketch

    # --- the crafted models ----------------------------------------------------------------

    def _distance_scale(self, x_r: torch.Tensor, requester: str) -> float:
        """D: the median distance from the requester's model to the honest models last pulled."""
        d = sorted(float((m - x_r).norm()) for p, m in self.seen.items() if p != requester and m.shape == x_r.shape)
        return d[(len(d) - 1) // 2] if d else 0.0

    def _spectral(self, requester: str, base: torch.Tensor) -> torch.Tensor:
        x_r = self.seen.get(requester, base)
        principal = self._principal_direction(x_r.shape)
        if principal is None:
            return x_r.clone()
        mean, w = principal
        side = 1.0 if float(torch.dot(x_r - mean, w)) >= 0 else -1.0
        return x_r + (side * self._distance_scale(x_r, requester)) * w

    def _principal_direction(self, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, w): w the unit top principal direction of the models in `seen` (through their
        m x m Gram matrix: m is small, the models are not)."""
        if self._principal is None:
            xs = [m for m in self.seen.values() if m.shape == shape]
            if len(xs) < 2:
                return None
            x = torch.stack(xs).double()
            mean = x.mean(0)
            xc = x - mean
            _, vecs = torch.linalg.eigh(xc @ xc.T)
            w = xc.T @ vecs[:, -1]
            norm = float(w.norm())
            if norm == 0:
                return None
            self._principal = (mean.float(), (w / norm).float())
        return self._principal

    def _hug(self, requester: str, base: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        from peer.aggregation.loss import FULL_UP_TO, UNTRAINED_FRACTION
        from peer.aggregation.rules import WeightedGossip

        x_r = self.seen.get(requester, base)
        away = -sigma
        h = self._last_history if self._last_history is not None and self._last_history.shape == x_r.shape else None
        if h is not None and float(h.norm()) > 0:
            h = h / h.norm()
            away = away - torch.dot(away, h) * h
        if float(away.norm()) == 0:
            return x_r.clone()
        e = away / away.norm()
        if h is not None:
            e = HUG_CONSISTENCY * h + math.sqrt(1 - HUG_CONSISTENCY ** 2) * e
        step = HUG_MARGIN * WeightedGossip.OUTLIER_FACTOR * self._distance_scale(x_r, requester)
        if self.probe is None or step == 0:
            return x_r + step * e
        own_loss = self.probe.loss(x_r.clone())
        rises = [self._seen_loss(p, m) - own_loss for p, m in self.seen.items() if p != requester and m.shape == x_r.shape]
        rises.sort()
        scale = max(rises[(len(rises) - 1) // 2] if rises else 0.0, UNTRAINED_FRACTION * self.probe.untrained_loss)
        limit = HUG_MARGIN * FULL_UP_TO * scale
        if self.probe.loss(x_r + step * e) - own_loss > limit:  # bisect for the largest step under the loss screen
            lo, hi = 0.0, step
            for _ in range(10):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.probe.loss(x_r + mid * e) - own_loss <= limit else (lo, mid)
            step = lo
        return x_r + step * e

    def _seen_loss(self, peer: str, model: torch.Tensor) -> float:
        if peer not in self._seen_losses:
            self._seen_losses[peer] = self.probe.loss(model.clone())
        return self._seen_losses[peer]

    def _frame_target(self, others: dict[str, torch.Tensor]) -> str | None:
        """The honest peer this framer frames: framers' sorted ids, each takes its rank among the
        live honest peers' sorted ids (distinct targets while there are enough); kept while live."""
        if self.target in others:
            return self.target
        honest = sorted(set(others) - self.colluders - {self.peer_id})
        if not honest:
            return None
        rank = sorted(self.colluders | {self.peer_id}).index(self.peer_id)
        return honest[rank % len(honest)]


def behaviour_for(attack: str | None, peer_id: str, n: int = 25, f: int = 5) -> Behaviour:
    """The behaviour `--experiment-attack ATTACK` asks for (honest without one); each attacker's
    randomness is seeded by its peer id. `n` and `f`: the run's peers and attackers (ALIE's z)."""
    import zlib

    return HostilePolicy(attack, seed=zlib.crc32(peer_id.encode()), n=n, f=f, peer_id=peer_id) if attack else Behaviour()
