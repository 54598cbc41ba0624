"""hivemind's DHT RPCs (`DHTProtocol.rpc_ping`, `rpc_store`, `rpc_find`), served under bounds and counted.

hivemind registers them as p2pd *unary* handlers. p2pd then reads each remote request itself, with
no deadline, and hands every complete one to this process over its one control connection, where
hivemind starts a task for it with no cap and answers a failure with the exception's `repr`
(a protobuf parser's message included). Nothing is counted.

Here the same protocol ids are registered as p2pd *stream* handlers that speak the unary wire
format themselves: one varint-length-delimited `p2pd.pb.PersistentConnectionRequest` each way,
{callId, callUnary {peer, proto, data}} in and {callId, unaryResponse {response | error}} out
(go-libp2p-daemon's persistent_stream.go; `protocols/transport/light.py` is the caller's side). A
caller's p2pd cannot tell the difference, so other hivemind nodes keep working unchanged. This
process now sees each stream from its first byte, so:

- `RpcPolicy.admit` caps concurrent streams per peer and in total, before anything is read; a
  refused stream gets the word `busy` and is closed;
- the whole request must arrive within `read_deadline_s` and be at most `max_request_bytes`;
- handling and writing the reply must end within `reply_deadline_s`;
- every failure is answered with a fixed word (`busy`, `malformed request`, `request failed`),
  never an exception's text; a handler's own `Refusal` is answered `refused: <its text>`;
- each RPC counts requests, served, refused, timed_out, malformed, failed and disconnected.

The same bounds and counters cover every unary handler registered through `add_protobuf_handler`
on a guarded P2P, ours included: dial-back (`protocols/dialback.py`) shares the per-peer and total
stream caps with the DHT RPCs, so a peer cannot hold more streams by spreading them across both.

What must stay true: every admitted stream releases its slot exactly once, whatever happens to
it (`RpcPolicy.release` in a `finally`); a peer-controlled value never becomes a counter name (the
RPC names come from hivemind's servicer, the outcomes from `OUTCOMES`); the peer a request is
attributed to is the one p2pd authenticated for the stream, never the `peer` field the caller wrote.

The policy and the counters do no I/O and read no clock; `serve_stream` is the thin asyncio shell,
and `guarded_p2p` is hivemind's P2P with its unary handlers routed through it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from protocols.loglimit import LogLimiter
from protocols import varint

log = logging.getLogger("peer.dht_guard")

OUTCOMES = ("requests", "served", "refused", "timed_out", "malformed", "failed", "disconnected")
# What a caller is told. Fixed words: an exception's text would tell a stranger about our code.
BUSY, MALFORMED, FAILED, TOO_LARGE = "busy", "malformed request", "request failed", "response too large"
MAX_MESSAGE_BYTES = 4 << 20  # p2pd's persistentConnMsgMaxSize: the caller's p2pd reads no larger reply


@dataclass(frozen=True)
class RpcLimits:
    max_streams_per_peer: int = 8  # hivemind sends one RPC at a time per lookup; a few lookups overlap
    max_streams: int = 64
    read_deadline_s: float = 5.0  # the whole request: an honest one is a few KiB and is sent at once
    reply_deadline_s: float = 10.0  # handling plus writing the reply (rpc_ping may ping the caller back)
    # hivemind's DHT message limit: a cached whole-dictionary store of a full run key approaches it
    max_request_bytes: int = MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_streams_per_peer", "max_streams", "max_request_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("read_deadline_s", "reply_deadline_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be > 0 and finite, got {v!r}")


@dataclass(frozen=True)
class Admission:
    """An admitted stream: its request must be complete by `read_by`, its reply sent by `reply_by`
    (times on the clock `now` was read from)."""

    read_by: float
    reply_by: float


class RpcPolicy:
    """Who may open a DHT RPC stream now, and the counters of what became of each.

    `admit(peer, now)` returns an `Admission` or None (refused: the peer already holds
    `max_streams_per_peer` streams, or all `max_streams` are taken). Every Admission must be
    followed by exactly one `release(peer)`. Per-peer state exists only while a peer holds a
    stream, so the table is bounded by `max_streams`.
    """

    def __init__(self, limits: RpcLimits | None = None):
        self.limits = limits or RpcLimits()
        self.active = 0
        self.active_by_peer: dict[str, int] = {}
        self.counts: dict[str, dict[str, int]] = {}

    def admit(self, peer: str, now: float) -> Admission | None:
        lim = self.limits
        if self.active >= lim.max_streams or self.active_by_peer.get(peer, 0) >= lim.max_streams_per_peer:
            return None
        self.active += 1
        self.active_by_peer[peer] = self.active_by_peer.get(peer, 0) + 1
        return Admission(read_by=now + lim.read_deadline_s, reply_by=now + lim.read_deadline_s + lim.reply_deadline_s)

    def release(self, peer: str) -> None:
        held = self.active_by_peer.get(peer, 0)
        if held <= 0:
            raise RuntimeError(f"release without an admission for {peer[:12]}")
        self.active -= 1
        if held == 1:
            del self.active_by_peer[peer]
        else:
            self.active_by_peer[peer] = held - 1

    def count(self, rpc: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        per = self.counts.setdefault(rpc, dict.fromkeys(OUTCOMES, 0))
        per[outcome] += 1

    def summary(self) -> dict[str, Any]:
        """For `peer status`: counters per RPC, and the streams held now."""
        return {"rpcs": {rpc: dict(c) for rpc, c in sorted(self.counts.items())}, "active": self.active,
                "limits": {"per_peer": self.limits.max_streams_per_peer, "total": self.limits.max_streams,
                           "read_deadline_s": self.limits.read_deadline_s}}


class Malformed(Exception):
    """The request is not one this RPC can take; the reason is for our log and counters only.
    A request type's `FromString` may raise it too (a non-protobuf payload, e.g. dial-back's)."""


class Refusal(Exception):
    """The handler declines a well-formed request for a reason of its own: the caller is told
    `refused: <message>`. The message must be text we wrote, never a peer-controlled value."""


def short_rpc_name(handle_name: str) -> str:
    """'DHTProtocol.rpc_find' -> 'rpc_find' (the counters' key)."""
    return handle_name.rsplit(".", 1)[-1]


async def _read_delimited(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """One varint-length-prefixed message of at most `max_bytes`."""
    try:
        n = await varint.read(reader)
    except ValueError:
        raise Malformed("length prefix") from None
    if n > max_bytes:
        raise Malformed("too_large")
    return await reader.readexactly(n)


def _reply(call_id: bytes, *, response: bytes | None = None, error: str | None = None) -> bytes:
    from hivemind.proto import p2pd_pb2

    result = (p2pd_pb2.CallUnaryResponse(response=response) if error is None
              else p2pd_pb2.CallUnaryResponse(error=error.encode()))
    msg = p2pd_pb2.PersistentConnectionRequest(callId=call_id, unaryResponse=result).SerializeToString()
    return varint.encode(len(msg)) + msg


def parse_request(raw: bytes, handle_name: str, request_type: Any) -> tuple[bytes, Any]:
    """(callId, request protobuf) from one wire message, or Malformed. The inner `proto` must name
    the protocol the stream was opened for: hivemind's own dispatch trusts that field."""
    from google.protobuf.message import DecodeError
    from hivemind.proto import p2pd_pb2

    try:
        msg = p2pd_pb2.PersistentConnectionRequest.FromString(raw)
    except DecodeError:
        raise Malformed("envelope") from None
    if msg.WhichOneof("message") != "callUnary":
        raise Malformed("not_a_call")
    if msg.callUnary.proto != handle_name:
        raise Malformed("proto_mismatch")
    try:
        return msg.callId, request_type.FromString(msg.callUnary.data)
    except DecodeError:
        raise Malformed("request") from None


async def serve_stream(policy: RpcPolicy, handle_name: str, handler: Callable[[Any, Any], Awaitable[Any]],
                       request_type: Any, make_context: Callable[[Any], Any], remote: Any,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       peer_log: LogLimiter | None = None) -> str:
    """Serve one stream of `handle_name`; the outcome it was counted under.

    `remote` is the PeerID p2pd authenticated for the stream; `make_context(remote)` builds the
    context hivemind's handler expects. Deadlines are on the event loop's clock."""
    loop = asyncio.get_running_loop()
    rpc, peer = short_rpc_name(handle_name), remote.to_base58()
    policy.count(rpc, "requests")
    admission = policy.admit(peer, loop.time())
    if admission is None:
        policy.count(rpc, "refused")
        if peer_log is not None:
            peer_log.info((peer, rpc, "refused"), "refused DHT %s from %s: %s", rpc, peer[:12], BUSY)
        writer.write(_reply(b"", error=BUSY))  # best effort: the stream closes at once either way
        return "refused"
    # until the reply is out, a cancelled or broken stream counts as disconnected
    outcome, call_id = "disconnected", b""
    try:
        try:
            async with asyncio.timeout_at(admission.read_by):
                raw = await _read_delimited(reader, policy.limits.max_request_bytes)
            call_id, request = parse_request(raw, handle_name, request_type)
        except TimeoutError:
            outcome = "timed_out"
            return outcome
        except asyncio.IncompleteReadError:
            return outcome
        except Malformed as e:
            outcome = "malformed"
            if peer_log is not None:
                peer_log.info((peer, rpc, "malformed"), "malformed DHT %s from %s (%s)", rpc, peer[:12], e)
            writer.write(_reply(call_id, error=MALFORMED))
            return outcome
        answered = "served"
        try:
            async with asyncio.timeout_at(admission.reply_by):
                try:
                    response = (await handler(request, make_context(remote))).SerializeToString()
                    reply = _reply(call_id, response=response)
                    if len(reply) > MAX_MESSAGE_BYTES:
                        answered, reply = "failed", _reply(call_id, error=TOO_LARGE)
                except (TimeoutError, asyncio.CancelledError):
                    raise
                except Refusal as e:
                    answered, reply = "refused", _reply(call_id, error=f"refused: {e}")
                except Exception as e:  # hivemind's handler on odd input: counted, never echoed
                    log.debug("DHT %s from %s failed: %r", rpc, peer[:12], e)
                    answered, reply = "failed", _reply(call_id, error=FAILED)
                writer.write(reply)
                await writer.drain()
            outcome = answered
        except TimeoutError:
            outcome = "timed_out"
        except ConnectionError:
            pass
        return outcome
    finally:
        policy.count(rpc, outcome)
        policy.release(peer)


@functools.cache
def guarded_p2p_class():
    """hivemind's P2P whose unary protobuf handlers (hivemind's DHT RPCs) are served by
    `serve_stream` under the class's `rpc_policy` (hivemind imported on first use)."""
    from hivemind.p2p import P2P, P2PContext

    class GuardedP2P(P2P):
        rpc_policy: RpcPolicy | None = None

        def __init__(self):
            super().__init__()
            self.peer_log = LogLimiter(log)

        async def add_protobuf_handler(self, name, handler, input_protobuf_type, *, stream_input=False,
                                       stream_output=False, balanced=False) -> None:
            if stream_input or stream_output or self.rpc_policy is None:
                return await super().add_protobuf_handler(name, handler, input_protobuf_type, stream_input=stream_input,
                                                          stream_output=stream_output, balanced=balanced)
            policy = self.rpc_policy

            def context(remote):
                return P2PContext(handle_name=name, local_id=self.peer_id, remote_id=remote)

            async def on_stream(info, reader, writer) -> None:
                try:
                    await serve_stream(policy, name, handler, input_protobuf_type, context, info.peer_id,
                                       reader, writer, self.peer_log)
                finally:
                    writer.close()

            await self.add_binary_stream_handler(name, on_stream, balanced=balanced)

        async def remove_protobuf_handler(self, name, *, stream_input=False, stream_output=False) -> None:
            if stream_input or stream_output or self.rpc_policy is None:
                return await super().remove_protobuf_handler(name, stream_input=stream_input, stream_output=stream_output)
            await self.remove_binary_stream_handler(name)

    return GuardedP2P


def guarded_p2p(policy: RpcPolicy):
    """A GuardedP2P class bound to `policy`, for `.create(...)` (one per transport, so two
    transports in one process never share counters)."""
    return type("GuardedP2P", (guarded_p2p_class(),), {"rpc_policy": policy})
