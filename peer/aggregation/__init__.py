"""Aggregation: how a peer mixes partners' models into its own.

    __init__.py     the registry's names and descriptions (no torch import), lazy access to the rest
    rules.py        the rules a daemon runs, built from the blocks below
    baselines.py    server-style rules: mean, median, trimmed mean, Krum, Multi-Krum, geomed, NNM
    clipping.py     centred clipping and self-centred clipping (ClippedGossip), adaptive radii
    sybil.py        FoolsGold over update-history sketches; the consistency and alignment checks
    loss.py         the loss screen: partners' loss on our data against the recent window
    norms.py        norms and distances accurate at any length (float64 sums over float32 slices)

One registry: `AGGREGATORS` maps each name that `peer join --aggregator NAME` accepts to a factory
for the rule (`peer.aggregation.rules`). Compositions are spelled with `+`, in the order they
apply: `sybilwall+scc` weighs partners by SybilWall, then mixes with self-centred clipping.
Names and descriptions live here without importing torch, so the CLI can list them cheaply;
everything else loads on first use.
"""

from __future__ import annotations

DEFAULT_AGGREGATOR = "sybilwall+scc"

DESCRIPTIONS: dict[str, str] = {
    "mean": "plain gossip averaging (not robust)",
    "median": "coordinate-wise median of own + partners",
    "trimmed-mean": "drop f largest and smallest per coordinate",
    "krum": "the input with the lowest Krum score",
    "multi-krum": "mean of the n-f inputs with the lowest Krum scores",
    "geomed": "geometric median (smoothed Weiszfeld)",
    "nnm+median": "nearest-neighbour mixing, then median",
    "nnm+trimmed-mean": "nearest-neighbour mixing, then trimmed mean",
    "nnm+krum": "nearest-neighbour mixing, then Krum",
    "nnm+multi-krum": "nearest-neighbour mixing, then Multi-Krum",
    "nnm+geomed": "nearest-neighbour mixing, then geometric median",
    "cc": "centred clipping, server style (centre kept across rounds)",
    "nnm+cc": "nearest-neighbour mixing, then centred clipping",
    "scc": "self-centred clipping (ClippedGossip, adaptive radius)",
    "cs+rg": "self-centred clipping with the CS+-RG radius",
    "sybilwall": "SybilWall similarity weights, weighted gossip",
    "sybilwall+scc": "SybilWall weights, then self-centred clipping (default)",
    "sybilwall+scc+movecap": "sybilwall+scc with the radius also capped at 3 x our own movement between rounds "
                             "(lock-step rounds only: see docs/robustness.md)",
    "sybilwall+cs+rg": "SybilWall weights, then CS+-RG clipping",
}

_LAZY = {"AGGREGATORS", "RoundContext", "make_aggregator", "coordinate_median", "Aggregator",
         "WeightedGossip", "SybilWallWeights", "ServerRule", "CenteredClippingRule"}


def __getattr__(name: str):
    if name == "coordinate_median":
        from peer.aggregation import baselines

        return baselines.coordinate_median
    if name in _LAZY:
        from peer.aggregation import rules

        return getattr(rules, name)
    raise AttributeError(f"module 'peer.aggregation' has no attribute {name!r}")


def check_byzantine_fraction(value: float) -> float:
    """The fraction of a round's partners the rules assume Byzantine, if it is usable.

    Robust rules tolerate fewer than half faulty inputs, so 0.5 and above promise nothing; a
    negative or NaN fraction would silently turn every rule's f and clipping budget off."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:  # NaN fails too
        raise ValueError(f"byzantine-fraction must be a number with 0 <= f < 0.5, got {value!r}")
    return float(value)


def help_text() -> str:
    return ", ".join(DESCRIPTIONS)
