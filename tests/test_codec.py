"""Wire codec: round trips, hard limits checked before allocation, garbage refused cleanly."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocols import gossip
from peer.bench.fuzz_targets import BytesStream  # a stream over fixed bytes, shared with the fuzz targets
from protocols.codec import (
    DEFAULT_LIMITS, Limits, ProtocolError, TensorSpec, decode_header, encode_header, parse_tensor_specs,
    read_header, read_payload, write_header, write_payload,
)


SPEC = [TensorSpec("flat", "float32", (1000,))]


async def test_model_reply_round_trip():
    values = np.arange(1000, dtype=np.float32)
    out = BytesStream()
    await write_header(out, gossip.model_header(7, SPEC))
    sent = await write_payload(out, [values], Limits(chunk_bytes=256))
    assert sent == 4000
    inp = BytesStream(bytes(out.sent))
    step = gossip.check_model_header(await read_header(inp), SPEC, DEFAULT_LIMITS)
    (arr,) = await read_payload(inp, SPEC, Limits(chunk_bytes=256))
    assert step == 7 and np.array_equal(arr, values)
    assert inp.largest_read <= 256  # read in chunks, never the whole payload at once


async def test_oversized_header_refused_before_reading_it():
    stream = BytesStream(struct.pack(">I", 10**9) + b"x" * 10)
    with pytest.raises(ProtocolError) as e:
        await read_header(stream)
    assert e.value.reason == "header_too_large"
    assert stream.largest_read == 4  # only the length prefix was read


async def test_billion_element_claim_refused_before_allocation():
    header = {"type": "model", "step": 1, "tensors": [{"name": "flat", "dtype": "float32", "shape": [10**9]}]}
    with pytest.raises(ProtocolError) as e:
        gossip.check_model_header(header, SPEC, DEFAULT_LIMITS)
    assert e.value.reason == "too_large"


def test_shape_must_match_our_model():
    header = {"type": "model", "step": 1, "tensors": [{"name": "flat", "dtype": "float32", "shape": [999]}]}
    with pytest.raises(ProtocolError) as e:
        gossip.check_model_header(header, SPEC, DEFAULT_LIMITS)
    assert e.value.reason == "wrong_shape"


@pytest.mark.parametrize("bad, reason", [
    ({"type": "model", "step": 1, "tensors": [{"name": "a", "dtype": "object", "shape": [1]}]}, "bad_dtype"),
    ({"type": "model", "step": 1, "tensors": [{"name": "a", "dtype": "float32", "shape": [-1]}]}, "bad_shape"),
    ({"type": "model", "step": 1, "tensors": [{"name": "a", "dtype": "float32", "shape": [True]}]}, "bad_shape"),
    ({"type": "model", "step": -1, "tensors": []}, "bad_header"),
    ({"type": "model", "step": 1, "tensors": "x"}, "bad_header"),
    ({"type": "model", "step": 1, "tensors": [{"name": "a", "dtype": "float32", "shape": [1]}] * 65}, "too_many_tensors"),
    ({"type": "error", "reason": "busy"}, "remote_error"),
    ({"type": "surprise"}, "bad_header"),
])
def test_bad_model_headers(bad, reason):
    with pytest.raises(ProtocolError) as e:
        gossip.check_model_header(bad, SPEC, DEFAULT_LIMITS)
    assert e.value.reason == reason


def test_msgpack_extension_types_refused():
    body = msgpack.packb({"x": msgpack.ExtType(1, b"evil")})
    with pytest.raises(ProtocolError) as e:
        decode_header(body)
    assert e.value.reason == "bad_header"


def test_non_map_header_refused():
    with pytest.raises(ProtocolError):
        decode_header(msgpack.packb([1, 2, 3]))


def test_encode_refuses_oversized_header():
    with pytest.raises(ProtocolError):
        encode_header({"x": "y" * 70_000})


def test_request_checks():
    gossip.check_request(gossip.model_request("r", "t"), "r", "t")
    for header, reason in [({"type": "get_model", "run_id": "other", "task": "t"}, "wrong_run"),
                           ({"type": "get_model", "run_id": "r", "task": "other"}, "wrong_task"),
                           ({"type": 5}, "bad_request")]:
        with pytest.raises(ProtocolError) as e:
            gossip.check_request(header, "r", "t")
        assert e.value.reason == reason


async def _decode_reply(data: bytes):
    stream = BytesStream(data)
    header = await read_header(stream)
    gossip.check_model_header(header, SPEC, DEFAULT_LIMITS)
    await read_payload(stream, SPEC)
    return stream


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_protocol_errors(data):
    try:
        asyncio.run(_decode_reply(data))
    except (ProtocolError, asyncio.IncompleteReadError):
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["type", "step", "tensors", "reason", "x"]), json_like, max_size=4))
def test_random_headers_only_raise_protocol_errors(header):
    try:
        gossip.check_model_header(header, SPEC, DEFAULT_LIMITS)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.fixed_dictionaries({"name": st.text(max_size=5), "dtype": st.sampled_from(["float32", "float16", "int8"]),
                                       "shape": st.lists(st.integers(0, 10**6), max_size=4)}), max_size=8))
def test_tensor_specs_never_exceed_limits(raw):
    limits = Limits(max_total_elements=10**6)
    try:
        specs = parse_tensor_specs(raw, limits)
    except ProtocolError:
        return
    assert sum(s.numel for s in specs) <= limits.max_total_elements


def test_compressed_model_replies_are_checked_and_never_top_k():
    import torch

    from protocols.compression import CompressionSpec, compress

    numel = SPEC[0].numel
    dense = compress(torch.ones(numel), CompressionSpec("int8"))
    step, comp, specs = gossip.check_model_reply(gossip.model_header(3, dense.specs, dense.header), SPEC, DEFAULT_LIMITS)
    assert step == 3 and comp["method"] == "int8" and [s.shape for s in specs] == [s.shape for s in dense.specs]
    sparse = compress(torch.ones(numel), CompressionSpec("topk", topk_fraction=0.1))
    with pytest.raises(ProtocolError, match="bad_compression"):
        gossip.check_model_reply(gossip.model_header(3, sparse.specs, sparse.header), SPEC, DEFAULT_LIMITS)
    lying = gossip.model_header(3, [TensorSpec("values", "int8", (numel * 4,)), dense.specs[1]], dense.header)
    with pytest.raises(ProtocolError, match="wrong_shape"):
        gossip.check_model_reply(lying, SPEC, DEFAULT_LIMITS)
