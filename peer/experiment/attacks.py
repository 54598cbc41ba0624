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
- alie:            mu - z sigma, z = 0.253 (n = 25, f = 5)
- ipm:             base - 2 (mu - base)     (inner-product manipulation, eps = 2)
- dissensus:       x_r - 1.5 (mu - x_r), x_r the requester's last model it saw (or base)
- replacement:     trains on y -> 9 - y, serves G + 10 (X - G) with G = mu (boosted model replacement)
"""

from __future__ import annotations

import math

import torch

from peer.behaviour import Behaviour
from peer.tasks import Task

ATTACKS = ("signflip", "signflip100", "signflip-liar", "gaussian", "labelflip", "targeted", "adaptive-sybil",
           "alie", "ipm", "dissensus", "replacement")
TARGETED = ("targeted", "adaptive-sybil")
SOURCE_CLASSES = (0, 1)  # the targeted attack swaps these two


def alie_z(n: int, f: int) -> float:
    """z of 'A little is enough' (Baruch et al.): Phi^-1((n - f - s) / (n - f)), s = floor(n/2 + 1) - f."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf((n - f - s) / (n - f))


class HostilePolicy(Behaviour):
    honest = False
    aggregator = "mean"  # the attacker tracks the swarm: base and mu are honest averages

    def __init__(self, attack: str, seed: int = 0, n: int = 25, f: int = 5):
        super().__init__()
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
        self.attack = self.name = attack
        self.gen = torch.Generator().manual_seed(seed)
        self.z = alie_z(n, f)
        self.base: torch.Tensor | None = None
        self.update: torch.Tensor | None = None
        self.mu: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None
        self.seen: dict[str, torch.Tensor] = {}
        self._last_history: torch.Tensor | None = None
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
        they all train alike."""
        if self.attack in ("labelflip", "replacement"):
            task.y_train = 9 - task.y_train
        elif self.attack in TARGETED:
            keep = (task.y_train == SOURCE_CLASSES[0]) | (task.y_train == SOURCE_CLASSES[1])
            task.x_train, task.y_train = task.x_train[keep], task.y_train[keep]
            y = task.y_train.clone()
            a, b = SOURCE_CLASSES
            y[task.y_train == a], y[task.y_train == b] = b, a
            task.y_train = y

    def round_start(self, model: torch.Tensor, history: torch.Tensor) -> None:
        """Called at each gossip round with the attacker's model and local-update history."""
        if self._last_history is not None and self._last_history.shape == history.shape:
            self.update = history - self._last_history
        self._last_history = history.clone()
        self.base = model - self.update if self.update is not None else model.clone()

    def observe(self, partner_ids: list[str], models: list[torch.Tensor]) -> None:
        """Honest models the attacker pulled this round: statistics for the omniscient attacks."""
        for p, m in zip(partner_ids, models):
            self.seen[p] = m
        if models:
            x = torch.stack(models)
            self.mu = x.mean(0)
            self.sigma = x.std(0, unbiased=False) if len(models) > 1 else torch.zeros_like(self.mu)

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
        if a == "alie":
            return mu - self.z * sigma
        if a == "ipm":
            return base - 2 * (mu - base)
        if a == "dissensus":
            x_r = self.seen.get(requester, base)
            return x_r - 1.5 * (mu - x_r)
        if a == "replacement":
            return mu + 10 * (own - mu)
        if a in TARGETED:
            return base + 3 * u  # the poisoned local update, boosted x3 so that plain averaging feels it
        return own  # label flip serves its (poisoned) model as it is

    def report_history(self, sketch: torch.Tensor) -> torch.Tensor:
        if self.attack == "signflip-liar":
            return -sketch
        if self.attack == "adaptive-sybil":
            noise = torch.randn(sketch.shape, generator=self.gen)
            return sketch + noise * (3 * float(sketch.norm()) / max(float(noise.norm()), 1e-12))
        return sketch


def behaviour_for(attack: str | None, peer_id: str) -> Behaviour:
    """The behaviour `--experiment-attack ATTACK` asks for (honest without one); each attacker's
    randomness is seeded by its peer id."""
    import zlib

    return HostilePolicy(attack, seed=zlib.crc32(peer_id.encode())) if attack else Behaviour()
