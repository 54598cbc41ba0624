"""Outer steps: DiLoCo-style rounds on pseudo-gradients, without I/O.

A peer trains H inner steps with the task's optimizer, then runs one outer round:

    Δ_i   = anchor − model                    the pseudo-gradient (what inner steps changed since)
    sent  = decode(compress(Δ_i))             what partners will see
    Δ_j   = partners' last published `sent`   pulled by the daemon, whatever outer step they are at
    Δ_mix = robust rule on {sent, Δ_j}        the rule runs on models anchor − Δ (see below)
    anchor ← anchor − lr · nesterov(Δ_mix)    `NesterovOuter`, torch.optim.SGD(nesterov=True)'s update
    model  ← model + (anchor_new − anchor_old) + sent
                                              what compression left out stays in the model (error
                                              feedback), and so do inner steps taken during the round

The rule sees the candidates as models `anchor − Δ_j` centred on our own `anchor − sent`, so
every rule of `peer.aggregation` (clipping radius, Sybil weights, the loss screen on our own data)
works unchanged: `x_i + Σ w clip(x_j − x_i)` on those models is `anchor − (sent + Σ w clip(Δ_j − sent))`,
a robust mix of the pseudo-gradients, and the loss screen scores "our anchor moved by the
partner's update", which is what mixing it would do to us.

Every `sync_every`-th round is a consensus round instead: the outer step uses our own
pseudo-gradient alone, then the anchor becomes the robust rule's mix of our anchor and partners'
anchors (pulled compressed, int8 by default). Pseudo-gradients alone never pull peers' anchors
together (each peer applies its own mix, so the differences random-walk); NoLoCo's outer step
has the same consensus term. Measured on digits-mlp, 4 peers, H = 10, top-k 10 % int8: final
model spread 0.07-0.15 with a consensus round every 2, 0.14-0.32 every 5, 0.38-0.48 without
(tests/test_outer_swarm.py).

No barrier: a round uses whatever each partner published last; a partner may be some outer steps
behind or ahead (`staleness`). Nothing here touches a socket or a clock: the daemon feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from protocols.compression import Compressed, CompressionSpec, compress, decompress


@dataclass(frozen=True)
class OuterSettings:
    every_steps: int = 0  # H inner steps per outer round; 0: no outer steps (models gossip per step)
    lr: float = 0.7  # DiLoCo's outer learning rate
    momentum: float = 0.9  # DiLoCo's outer Nesterov momentum
    # every this many outer rounds, mix partners' anchors instead of their pseudo-gradients
    # (0: never). Pseudo-gradients alone never pull peers' anchors together: each applies its
    # own mix, and the differences random-walk (the consensus term of NoLoCo's outer step).
    sync_every: int = 10

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"outer-every-steps must be >= 0 (0 turns outer steps off), got {self.every_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"outer-lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"outer-momentum must be in [0, 1), got {self.momentum}")
        if self.sync_every < 0:
            raise ValueError(f"outer-sync-every must be >= 0 (0: never mix anchors), got {self.sync_every}")

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0


class NesterovOuter:
    """SGD with Nesterov momentum on one flat tensor: exactly the update of
    `torch.optim.SGD([p], lr, momentum, nesterov=True)` (dampening 0, no weight decay), with the
    pseudo-gradient as the gradient. The momentum buffer is one model-sized tensor."""

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.buf: torch.Tensor | None = None

    def step(self, params: torch.Tensor, grad: torch.Tensor) -> None:
        """params ← params − lr · (grad + momentum · buf), buf ← momentum · buf + grad; in place."""
        if self.momentum == 0:
            params.add_(grad, alpha=-self.lr)
            return
        if self.buf is None or self.buf.shape != grad.shape:
            self.buf = grad.detach().clone()
        else:
            self.buf.mul_(self.momentum).add_(grad)
        params.add_(grad, alpha=-self.lr).add_(self.buf, alpha=-self.lr * self.momentum)

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """A copy, or with `copy=False` the live buffer (for a writer that keeps every step out
        until it is done, as the daemon's checkpoint does: one model copy less)."""
        return {"momentum_buffer": None if self.buf is None else self.buf.clone() if copy else self.buf}

    def load_state_dict(self, state: dict[str, Any], numel: int) -> None:
        buf = state.get("momentum_buffer")
        if buf is not None and (buf.dim() != 1 or buf.numel() != numel):
            raise ValueError(f"outer momentum buffer has {buf.numel()} elements, the model {numel}")
        self.buf = None if buf is None else buf.float().clone()


@dataclass(frozen=True)
class Published:
    """What a peer serves to partners until its next outer round: its newest pseudo-gradient."""

    outer_step: int
    step: int  # the inner step it was taken at
    payload: Compressed


@dataclass
class OuterRound:
    """One outer round in flight: what we published and our own candidate model."""

    outer_step: int
    step: int  # the inner step the pseudo-gradient was taken at
    own_model: torch.Tensor  # anchor − sent: our candidate for the rule; the live model's change is measured from it
    payload: Compressed
    stepping: Any = None  # the daemon's future for a consensus round's own outer step
    finishing: Any = None  # the daemon's future for `finish`/`change`, once it has started
    applied: bool = False  # whether the daemon has added the round's change to the live model

    def published(self) -> Published:
        return Published(self.outer_step, self.step, self.payload)


class OuterLoop:
    """The outer-step state of one peer: the anchor and the outer optimizer.

    Error feedback lives in the live model: a round moves the live model by the anchor's change
    plus what we sent, so what compression left out stays in the model's deviation from the new
    anchor, and the next pseudo-gradient (anchor − model) carries it again. The model keeps
    training from a point that includes all its own progress; an explicit residual with the model
    reset to the anchor instead was measured worse: synchronous DiLoCo on lm-tiny, 4 replicas,
    H = 25, top-k 1.56 % int8, 600 steps: held-out loss 1.78 against 2.04 (dense int8: 1.59).

    Memory: two model-sized tensors (anchor, momentum buffer) plus, during a round, our candidate
    model; the outer step on a mixed model works in the mixed model's buffer (`finish`), on our
    own candidate (a consensus round, a round with nobody to mix) with one temporary.
    """

    def __init__(self, settings: OuterSettings, compression: CompressionSpec, anchor: torch.Tensor):
        self.settings = settings
        self.compression = compression
        self.anchor = anchor.detach().clone()
        self.optimizer = NesterovOuter(settings.lr, settings.momentum)
        self.outer_step = 0

    def reset(self, model: torch.Tensor) -> None:
        """Start over from `model` (a join's sync, a resumed checkpoint without outer state): the
        next pseudo-gradient measures only steps taken from here."""
        self.anchor.copy_(model)

    def begin(self, model: torch.Tensor, step: int) -> OuterRound:
        """Our pseudo-gradient since the last outer step, compressed. `model` is a snapshot the
        caller gives up (its buffer becomes our candidate model)."""
        delta = model.neg_().add_(self.anchor)  # Δ = anchor − model
        payload = compress(delta, self.compression)
        sent = decompress(payload.header, payload.parts, delta.numel(), out=delta)  # as partners decode it
        self.outer_step += 1
        return OuterRound(self.outer_step, step, self.as_model(sent), payload)

    def as_model(self, delta: torch.Tensor) -> torch.Tensor:
        """`anchor − delta`, in place in `delta`'s buffer: a pseudo-gradient as a candidate model."""
        return delta.neg_().add_(self.anchor)

    def sync_due(self, outer_step: int) -> bool:
        """Whether the round numbered `outer_step` mixes anchors (a consensus round)."""
        return self.settings.sync_every > 0 and outer_step % self.settings.sync_every == 0

    def step(self, mixed_model: torch.Tensor) -> None:
        """The outer step for the robust rule's `mixed_model` (a model near `anchor − Δ`); the
        input is only read."""
        self.optimizer.step(self.anchor, torch.sub(self.anchor, mixed_model))  # Δ_mix = anchor − mixed

    def adopt(self, mixed_anchor: torch.Tensor) -> None:
        """A consensus round's result: the robust mix of our anchor and partners' anchors."""
        self.anchor.copy_(mixed_anchor)

    def change(self, rnd: OuterRound, out: torch.Tensor) -> torch.Tensor:
        """`anchor − own candidate model` (the anchor's change plus what we sent), into `out`: what
        the caller adds to the live model with `Trainer.apply_delta`, which keeps the inner steps
        taken while the round ran, and what compression left out. `out` may be `rnd.own_model`."""
        if out is rnd.own_model:
            return out.neg_().add_(self.anchor)
        return out.copy_(self.anchor).sub_(rnd.own_model)

    def finish(self, rnd: OuterRound, mixed_model: torch.Tensor) -> torch.Tensor:
        """`step`, then the `change` to apply, in `mixed_model`'s buffer (which may be
        `rnd.own_model` itself: a round with nobody to mix)."""
        if mixed_model is rnd.own_model:  # `change` still reads it: the step takes a temporary
            self.step(mixed_model)
        else:  # Δ_mix in the mixed model's own buffer, which `change` overwrites next: no temporary.
            # −mixed + anchor is anchor − mixed bit for bit (IEEE subtraction adds the negation)
            self.optimizer.step(self.anchor, mixed_model.neg_().add_(self.anchor))
        return self.change(rnd, mixed_model)

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """The anchor, outer step and momentum: copies, or with `copy=False` the live tensors, for
        a caller that runs no round step, `adopt` or `reset` until it is done with them."""
        return {"anchor": self.anchor.clone() if copy else self.anchor, "outer_step": self.outer_step,
                "optimizer": self.optimizer.state_dict(copy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """All or nothing: every part is checked on fresh objects before any is adopted."""
        anchor = state["anchor"]
        if anchor.shape != self.anchor.shape:
            raise ValueError(f"outer anchor has shape {tuple(anchor.shape)}, the model {tuple(self.anchor.shape)}")
        optimizer = NesterovOuter(self.settings.lr, self.settings.momentum)
        optimizer.load_state_dict(state.get("optimizer", {}), self.anchor.numel())
        outer_step = int(state.get("outer_step", 0))
        self.anchor.copy_(anchor)
        self.optimizer, self.outer_step = optimizer, outer_step
