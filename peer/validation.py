"""Checks every received model passes before any aggregation rule sees it."""

from __future__ import annotations

import math

import torch


def reject_reason(own: torch.Tensor, other: torch.Tensor, max_norm_ratio: float = 100.0) -> str | None:
    """None if `other` may be mixed into `own`, else a short reason code for the counters.

    The norm bound is relative to our own model (floored at 1, so a freshly initialised tiny
    model does not reject everything): a model 100x larger than ours is an attack or a bug.
    """
    if other.shape != own.shape:
        return "wrong_shape"
    if other.dtype != own.dtype:
        return "wrong_dtype"
    norm = float(other.norm())
    # a finite norm means every value is finite (an inf or nan makes the norm inf or nan): the
    # value-by-value check is needed only when it is not
    if not math.isfinite(norm) and not bool(torch.isfinite(other).all()):
        return "non_finite"
    if norm > max_norm_ratio * max(float(own.norm()), 1.0):
        return "norm_too_large"
    return None
