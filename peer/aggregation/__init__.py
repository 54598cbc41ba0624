"""Aggregation rules: how a peer mixes partners' models into its own.

Each rule is a pure function of flat float32 tensors (no I/O, no global state):
`rule(own, others) -> new_own`. Stateful rules keep their state in the object the factory
returns. `AGGREGATORS` is the one registry: `peer join --aggregator NAME` accepts exactly its keys.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch


class Aggregator(Protocol):
    name: str

    def __call__(self, own: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor: ...


class Mean:
    """Plain gossip averaging: own model and partners' models with equal weight."""

    name = "mean"

    def __call__(self, own: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
        if not others:
            return own.clone()
        total = own.clone()
        for x in others:
            total.add_(x)
        return total.div_(len(others) + 1)


class CoordinateMedian:
    """Coordinate-wise median of own and partners' models (also used to sync a joiner's model)."""

    name = "median"

    def __call__(self, own: torch.Tensor, others: Sequence[torch.Tensor]) -> torch.Tensor:
        return coordinate_median([own, *others])


def coordinate_median(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Median per coordinate; for an even count, the mean of the two middle values (numpy's rule)."""
    return torch.quantile(torch.stack(list(xs)), 0.5, dim=0) if len(xs) > 1 else xs[0].clone()


AGGREGATORS: dict[str, Callable[[], Aggregator]] = {
    "mean": Mean,
    "median": CoordinateMedian,
}

DEFAULT_AGGREGATOR = "mean"


def make_aggregator(name: str) -> Aggregator:
    try:
        return AGGREGATORS[name]()
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}") from None
