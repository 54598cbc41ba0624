"""The gossip protocol `/peer/gossip/1`: pull another peer's model. Logic and messages, no sockets.

Exchange (one stream per pull):
    client -> {"type": "get_model", "run_id": R, "task": T}
    server -> {"type": "model", "step": S, "tensors": [spec...]} + raw tensor bytes
           or {"type": "error", "reason": "busy" | "wrong_run" | ...}

With outer steps (peer/outer.py) a round pulls the partner's last published pseudo-gradient,
compressed (protocols/compression.py), instead of its model:
    client -> {"type": "get_delta", "run_id": R, "task": T, "since": OUTER_STEP}
    server -> {"type": "delta", "outer_step": O, "step": S, "compression": {...}, "tensors": [spec...]}
              + the compressed parts' raw bytes
           or {"type": "error", "reason": "not_ready" | "not_newer" | ...}
`since` is the partner's outer step we mixed last (-1: none): a server whose newest pseudo-gradient
is not newer answers "not_newer" without sending it, so nobody downloads the same update twice.

`PartnerPicker` decides whom to pull from each round: k live peers at random, skipping peers
that failed recently (exponential back-off per peer, reset by a success). It takes `now` and an
explicit RNG so tests and simulations drive it without clocks or sockets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from protocols.codec import Limits, ProtocolError, TensorSpec, parse_tensor_specs

PROTOCOL = "/peer/gossip/1"


def model_request(run_id: str, task: str) -> dict[str, Any]:
    return {"type": "get_model", "run_id": run_id, "task": task}


def delta_request(run_id: str, task: str, since: int = -1) -> dict[str, Any]:
    return {"type": "get_delta", "run_id": run_id, "task": task, "since": int(since)}


def check_request(header: dict[str, Any], run_id: str, task: str) -> str:
    """The request's type ("get_model" or "get_delta") once it names our run and task."""
    kind = header.get("type")
    if kind not in ("get_model", "get_delta"):
        raise ProtocolError("bad_request", f"type {str(kind)[:32]!r}")
    if header.get("run_id") != run_id:
        raise ProtocolError("wrong_run", "")
    if header.get("task") != task:
        raise ProtocolError("wrong_task", "")
    if kind == "get_delta":
        since = header.get("since")
        if not isinstance(since, int) or isinstance(since, bool) or since < -1:
            raise ProtocolError("bad_request", "since")
    return kind


def model_header(step: int, specs: list[TensorSpec], compression: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model reply; with `compression` the tensors are that payload's parts (outer steps serve
    their anchor this way), without it one dense float32 tensor."""
    header = {"type": "model", "step": int(step), "tensors": [s.to_wire() for s in specs]}
    if compression is not None:
        header["compression"] = compression
    return header


def delta_header(outer_step: int, step: int, compression: dict[str, Any], specs: list[TensorSpec]) -> dict[str, Any]:
    return {"type": "delta", "outer_step": int(outer_step), "step": int(step), "compression": compression,
            "tensors": [s.to_wire() for s in specs]}


def _nonneg_int(header: dict[str, Any], key: str) -> int:
    v = header.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError("bad_header", key)
    return v


def check_model_reply(header: dict[str, Any], expected: list[TensorSpec], limits: Limits) -> tuple[int, dict[str, Any] | None, list[TensorSpec]]:
    """A model reply, dense or compressed: (step, compression header or None, part specs)."""
    if header.get("type") == "model" and "compression" in header:
        step = _nonneg_int(header, "step")
        comp, specs = _compressed_parts(header, expected[0].numel, limits)
        if str(comp.get("method", "")).startswith("topk"):  # a model is sent whole (dense methods)
            raise ProtocolError("bad_compression", "a model reply cannot be top-k")
        return step, comp, specs
    return check_model_header(header, expected, limits), None, expected


def _compressed_parts(header: dict[str, Any], numel: int, limits: Limits) -> tuple[dict[str, Any], list[TensorSpec]]:
    from protocols.compression import expected_parts

    comp = header.get("compression")
    if not isinstance(comp, dict):
        raise ProtocolError("bad_header", "compression")
    expected = expected_parts(comp, numel, limits)
    specs = parse_tensor_specs(header.get("tensors"), limits)
    if [(s.dtype, s.shape) for s in specs] != [(s.dtype, s.shape) for s in expected]:
        raise ProtocolError("wrong_shape", "parts differ from what the compression header implies")
    return comp, expected


def check_delta_header(header: dict[str, Any], numel: int, limits: Limits) -> tuple[int, int, dict[str, Any], list[TensorSpec]]:
    """Validate a pseudo-gradient reply before reading its payload: (outer_step, step,
    compression header, part specs). The parts must be exactly what the compression header
    implies for a model of `numel` elements (`compression.expected_parts`), so no size a peer
    announces is trusted on its own."""
    _expect_type(header, "delta")
    outer_step, step = _nonneg_int(header, "outer_step"), _nonneg_int(header, "step")
    comp, specs = _compressed_parts(header, numel, limits)
    return outer_step, step, comp, specs


def _expect_type(header: dict[str, Any], kind: str) -> None:
    """A reply of type `kind`; a partner's error reply is raised as `remote_error` with its reason."""
    got = header.get("type")
    if got == "error":
        reason = header.get("reason")
        raise ProtocolError("remote_error", str(reason)[:64] if isinstance(reason, str) else "?")
    if got != kind:
        raise ProtocolError("bad_header", f"type {str(got)[:32]!r}")


def error_header(reason: str) -> dict[str, Any]:
    return {"type": "error", "reason": reason}


def check_model_header(header: dict[str, Any], expected: list[TensorSpec], limits: Limits) -> int:
    """Validate a reply before reading its payload; returns the sender's step.

    Every peer of a run trains the same model, so the announced tensors must equal ours exactly:
    this rejects a 10^9-element claim before a single byte is allocated.
    """
    _expect_type(header, "model")
    step = _nonneg_int(header, "step")
    specs = parse_tensor_specs(header.get("tensors"), limits)
    if specs != expected:
        raise ProtocolError("wrong_shape", "tensors differ from this run's model")
    return step


@dataclass
class _Backoff:
    failures: int = 0  # network failures in a row (a time back-off)
    until: float = 0.0
    refusals: int = 0  # the rule's refusals of its model, net of the rounds it was mixed

    def idle(self, now: float) -> bool:
        return self.until <= now and not self.refusals


# a partner's chance to be picked halves with each net refusal, down to 2^-MAX_REFUSALS of a
# partner with none
MAX_REFUSALS = 10


@dataclass
class PartnerPicker:
    """Chooses gossip partners; remembers failures to avoid hammering dead or broken peers, and
    refusals to spend fewer pulls on partners the rule will not mix.

    Two memories, for two kinds of evidence:

    - a pull that failed on the network backs the peer off in time (2 s, doubling to 60 s): a dead
      or overloaded peer is not worth asking again at once;
    - a model the rule refused as a Sybil or an outlier halves the partner's weight in the draw,
      a model it mixed doubles it back (never above 1). A peer meets a given partner only about
      every n / k rounds, so a back-off in seconds ran out long before the next meeting and the
      refused attackers kept their share of the pulls (a 30 % Byzantine swarm of 20: 24-30 % of
      honest pulls went to attackers whatever the rule did with them; docs/robustness.md). A
      weight never reaches 0, so a small swarm whose rule refuses honest partners now and then
      never leaves a peer without partners, as a back-off of all of them did.
    """

    k: int
    rng: random.Random = field(default_factory=random.Random)
    base_backoff: float = 2.0
    max_backoff: float = 60.0
    max_entries: int = 4096
    _state: dict[str, _Backoff] = field(default_factory=dict)

    def pick(self, candidates: list[str], now: float) -> list[str]:
        state = self._state  # O(candidates) per round at 1,000 peers: no allocation per candidate
        usable = [p for p in candidates if p not in state or state[p].until <= now]
        usable.sort()  # deterministic given the RNG, whatever order the DHT returned
        k = min(self.k, len(usable))
        refused = [state[p].refusals if p in state else 0 for p in usable]
        if not any(refused):
            return self.rng.sample(usable, k)
        # weighted draw without replacement, weight 2^-refusals (Efraimidis and Spirakis: the k
        # largest u^(1/weight), u uniform)
        keys = sorted(((self.rng.random() ** (2.0 ** r), p) for r, p in zip(refused, usable)), reverse=True)
        return [p for _, p in keys[:k]]

    def _entry(self, peer: str, now: float) -> _Backoff:
        if peer not in self._state and len(self._state) >= self.max_entries:
            # bounded memory under a flood of identities: forget entries with nothing left to
            # say, then the back-off that ends first
            self._state = {p: s for p, s in self._state.items() if not s.idle(now)}
            if len(self._state) >= self.max_entries:
                self._state.pop(min(self._state, key=lambda p: self._state[p].until))
        return self._state.setdefault(peer, _Backoff())

    def failed(self, peer: str, now: float) -> float:
        """Record a network failure; returns how long the peer is skipped for."""
        st = self._entry(peer, now)
        st.failures += 1
        delay = min(self.max_backoff, self.base_backoff * 2 ** (st.failures - 1))
        st.until = now + delay
        return delay

    def succeeded(self, peer: str) -> None:
        """A pull that arrived: the time back-off ends (refusals are kept)."""
        st = self._state.get(peer)
        if st is not None:
            st.failures, st.until = 0, 0.0
            self._forget_if_empty(peer, st)

    def refused(self, peer: str, now: float) -> None:
        """The rule refused the partner's model (a Sybil, an outlier): half the weight in the draw."""
        st = self._entry(peer, now)
        st.refusals = min(MAX_REFUSALS, st.refusals + 1)

    def mixed(self, peer: str) -> None:
        """The rule mixed the partner's model: twice the weight, up to 1."""
        st = self._state.get(peer)
        if st is not None and st.refusals:
            st.refusals -= 1
            self._forget_if_empty(peer, st)

    def _forget_if_empty(self, peer: str, st: _Backoff) -> None:
        if not st.failures and not st.refusals:  # no failures: `until` was never set or was reset
            del self._state[peer]

    def refusals(self, peer: str) -> int:
        st = self._state.get(peer)
        return st.refusals if st is not None else 0

    def backing_off(self, now: float) -> list[str]:
        return [p for p, st in self._state.items() if st.until > now]
