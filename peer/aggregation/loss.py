"""Loss screen: a partner's model must not do far worse on our own data than partners usually do.

A label flipper trains honestly on poisoned labels and reports that training truthfully, so
nothing about its history is inconsistent, and on the history sketch it looks like an honest
peer with unusual data (docs/robustness.md). What it cannot hide is what its model predicts:
evaluated on a batch of *our* training data, its model's loss rises far more above our own
model's than an honest partner's does. Measured over 100 rounds (20 honest Dirichlet(0.5) peers
+ 5 label flippers, MNIST-1D CNN, 256 samples): the partner-minus-own loss of honest partners had
a median of +1.9 (90th percentile +3.9; non-IID partners know our classes less well than we do),
of label flippers +5.4 (10th percentile +3.2) from round 60 on.

The screen is relative (whatever the task's loss scale and however non-IID the run): full weight
up to FULL_UP_TO x the scale, 0 from ZERO_FROM x, linear between, where the scale is the largest
of three terms:

- the median of this peer's recent partner deltas: what partners usually do on our data;
- UNTRAINED_FRACTION x an untrained model's loss on the batch (the task's loss scale): once an IID
  swarm has memorised its data, own loss and deltas are ~1e-4 to 1e-2, and against their median
  alone honest partners were cut 14-98 times per peer in a minute (4-peer convergence bench). The
  floor is not our own model's loss, which vanishes once we have memorised our shard (label flip,
  3-seed average gap: -3.1 with that floor, -2.6 with this one; CHANGELOG.md, 2026-11-24);
- with two or more partners, this round's smallest delta / FULL_UP_TO (at most an untrained
  model's loss), so the closest partner is not cut: when a whole swarm changes phase at once
  (post-local SGD's switch to time-only rounds, many local steps between mixes), every delta
  jumps past a window that still remembers the old ones; without this term, peers whose every
  partner was cut trained alone at 85 % with a training loss near 1e-8 (4-peer quickstart).

Pure: it takes the losses the daemon measured (`peer/loss_probe.py`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

FULL_UP_TO, ZERO_FROM = 1.5, 2.5
# the scale is at least this x an untrained model's loss on the batch (0.58 nats for MNIST-1D's
# ln 10); label flippers' deltas are 3.2+ nats (10th percentile, measured above)
UNTRAINED_FRACTION = 0.25


class LossScreen:
    """Weight factors in [0, 1] from partners' loss deltas; remembers the last `window` deltas."""

    def __init__(self, window: int = 64):
        self.recent: deque[float] = deque(maxlen=window)
        # the last call's scale without this round's deltas (the window before it, at least the
        # floor; no closest-partner term), or 0 with fewer than 4 remembered deltas before it
        self.plain_scale = 0.0

    def factors(self, deltas: Sequence[float | None], untrained_loss: float = 0.0) -> list[float]:
        """One factor per partner; `None` (not measured) passes. A non-finite delta gets 0: the model
        blew up on our data. Needs 4 remembered deltas before it screens anyone. `untrained_loss`:
        a freshly initialised model's loss on the batch the deltas were measured on."""
        finite = [d for d in deltas if d is not None and math.isfinite(d)]
        floor = UNTRAINED_FRACTION * untrained_loss if math.isfinite(untrained_loss) else 0.0
        self.plain_scale = max(self._median(), floor) if len(self.recent) >= 4 else 0.0
        self.recent.extend(finite)
        out = []
        median = self._median()
        # of two or more partners, the closest gets full weight: when every partner does far worse
        # on our data than the window's partners did, the likelier story is that we (or the whole run's
        # phase) changed, not that every partner turned hostile at once. Not for a lone partner
        # (it would never be screened), and never past an untrained model's loss (a round of
        # label flippers only is still cut)
        cap = untrained_loss if math.isfinite(untrained_loss) and untrained_loss > 0 else math.inf
        closest = min(min(finite) / FULL_UP_TO, cap) if len(finite) >= 2 else 0.0
        scale = max(median, closest, floor)
        for d in deltas:
            if d is None:
                out.append(1.0)
            elif d != d or d == math.inf:
                out.append(0.0)
            elif len(self.recent) < 4 or scale <= 0:
                out.append(1.0)  # nothing to compare with yet
            else:
                out.append(min(1.0, max(0.0, (ZERO_FROM - d / scale) / (ZERO_FROM - FULL_UP_TO))))
        return out

    def _median(self) -> float:
        """The lower median of the remembered deltas, or 0 with fewer than 4."""
        return sorted(self.recent)[(len(self.recent) - 1) // 2] if len(self.recent) >= 4 else 0.0

    def usual(self, delta: float | None) -> bool:
        """Whether `delta`, from the last call, was within what partners usually do on our data:
        at most FULL_UP_TO x the scale of the window before that round (at least the floor),
        without the closest-partner term, so a round whose partners are all bad exempts none."""
        return delta is not None and math.isfinite(delta) and self.plain_scale > 0 and delta <= FULL_UP_TO * self.plain_scale
