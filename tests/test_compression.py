"""Compressed pseudo-gradients: round trips per method, headers refused before allocation, payload
contents refused, error feedback conserves what was trained, spec parsing; topk-2bit's index
stream and two-level values."""

from __future__ import annotations

import contextlib
import math
import zlib

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from protocols.codec import (
    DEFAULT_LIMITS, DTYPES, Limits, ProtocolError, parse_tensor_specs, read_header, read_payload, write_header,
    write_payload,
)
import protocols.compression as compression
from protocols.compression import (
    INDEX_CHUNK, MAX_BLOCK, MAX_SCALE, MAX_TOPK_FRACTION, METHODS, TOPK_METHODS, CompressionSpec, ErrorFeedback,
    _encode_gaps, _encode_indices, compress, decompress, expected_parts, gap_indices, largest_magnitudes,
    max_gap_stream, ratio, top_indices, topk_indices,
)
from peer.bench.fuzz_targets import BytesStream

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FP16_MAX = 65504.0
BF16_MAX = float(torch.finfo(torch.bfloat16).max)


# --- strategies --------------------------------------------------------------------------------


@st.composite
def vectors(draw, max_size: int = 3000) -> np.ndarray:
    """Finite float32 vectors: any float32 bit pattern (subnormals, ±3.4e38) at small sizes, or
    larger random vectors of one magnitude or of magnitudes spread over the whole float32 range,
    with a random share of exact zeros."""
    mode = draw(st.sampled_from(["any", "scaled", "spread"]))
    if mode == "any":
        return draw(hnp.arrays(np.float32, st.integers(1, 64),
                               elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
    n = draw(st.integers(1, max_size))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "scaled":
        exponent = draw(st.integers(-45, 37))
    else:
        exponent = rng.integers(-45, 38, size=n)
    x = (rng.standard_normal(n) * np.power(10.0, exponent)).astype(np.float32)
    x[rng.random(n) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = 0.0
    return x


blocks = st.one_of(st.sampled_from([1, 3, 64, 1024]), st.integers(1, 2048))
fractions = st.one_of(st.sampled_from([0.001, 0.01, 0.0156, 0.1, MAX_TOPK_FRACTION]),
                      st.floats(1e-6, MAX_TOPK_FRACTION))
chunks = st.one_of(st.just(0), st.sampled_from([1, 7, 64, 1000]), st.integers(1, 4000))
specs = st.builds(CompressionSpec, method=st.sampled_from(METHODS), topk_fraction=fractions, block=blocks, chunk=chunks)


# --- round trips -------------------------------------------------------------------------------


def round_trip(x: np.ndarray, spec: CompressionSpec):
    """Compress, check the payload is well formed and accepted by a receiver, decompress."""
    vec = torch.from_numpy(x)
    payload = compress(vec, spec)
    n = x.size
    assert msgpack.unpackb(msgpack.packb(payload.header), raw=False) == payload.header  # plain types only
    specs = expected_parts(payload.header, n, DEFAULT_LIMITS)
    assert specs == payload.specs
    assert parse_tensor_specs([s.to_wire() for s in specs]) == specs  # the dense codec accepts them too
    for part, s in zip(payload.parts, specs, strict=True):
        assert part.flags.c_contiguous and part.dtype == DTYPES[s.dtype] and part.shape == s.shape
        assert part.dtype.byteorder in "<|="
        assert not np.shares_memory(part, x)
    assert payload.nbytes == sum(s.nbytes for s in specs)
    assert ratio(n, payload) == 4 * n / payload.nbytes
    y = decompress(payload.header, payload.parts, n)
    reused = torch.full((n,), float("nan"))
    assert decompress(payload.header, payload.parts, n, out=reused) is reused
    assert torch.equal(reused, y)  # `out` holding old contents changes nothing (top-k zero-fills)
    assert y.dtype == torch.float32 and y.shape == (n,) and bool(torch.isfinite(y).all())
    return payload, y.numpy().astype(np.float64)


def assert_16bit(x: np.ndarray, y: np.ndarray, largest: float, mantissa_bits: int, smallest_step: float) -> None:
    """Round to nearest 16-bit value: within half a unit in the last place; beyond the largest
    finite value, saturated to it."""
    x = x.astype(np.float64)
    inside = np.abs(x) <= largest
    tol = np.maximum(np.abs(x) * 2.0 ** -(mantissa_bits + 1), smallest_step / 2)
    assert np.all(np.abs(y - x)[inside] <= tol[inside])
    assert np.array_equal(y[~inside], np.copysign(largest, x[~inside]))


def assert_int8(x: np.ndarray, y: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int) -> None:
    """Per block: scale = max|x|/127 (capped at MAX_SCALE); each coordinate within scale/2, up to
    float32 rounding and, below ~1.5e-36 where the scale is subnormal, a negligible absolute error."""
    x64 = x.astype(np.float64)
    assert q.min(initial=0) >= -127 and q.max(initial=0) <= 127
    for b, start in enumerate(range(0, x.size, block)):
        xs, ys = x64[start:start + block], y[start:start + block]
        amax = np.float32(np.abs(x[start:start + block]).max())
        assert scales[b] == min(amax / np.float32(127), np.float32(MAX_SCALE))
        s = float(scales[b])
        assert np.all(np.abs(ys - xs) <= 0.5 * s + 1e-5 * s + 1e-6 * float(amax) + 1e-35)


def payload_indices(header: dict, parts: list[np.ndarray], numel: int) -> np.ndarray:
    if header["method"] == "topk-2bit":
        return gap_indices(parts[0], header["k"], numel)
    return topk_indices(parts, numel)


def assert_two_levels(x: np.ndarray, y: np.ndarray, levels: np.ndarray, block: int) -> None:
    """Per block of kept values: two levels lo <= hi within the block's range of magnitudes; each
    value decodes to ± the nearer level with its own sign (zeros may take either), and the squared
    error is no larger than with one level, the block's mean magnitude (two-means only improves on
    it), up to float32 rounding of the levels."""
    x64, mags = x.astype(np.float64), np.abs(x.astype(np.float64))
    for b, start in enumerate(range(0, x.size, block)):
        m, xs, ys = mags[start:start + block], x64[start:start + block], y[start:start + block]
        lo, hi = float(levels[2 * b]), float(levels[2 * b + 1])
        slack = 1e-6 * m.max()
        assert m.min() - slack <= lo <= hi <= m.max() + slack
        assert np.all(np.isin(np.abs(ys), [lo, hi]))
        assert np.all(np.sign(ys)[xs != 0] * np.sign(xs[xs != 0]) >= 0)
        nearer = np.where(np.abs(m - lo) <= np.abs(m - hi), lo, hi)
        assert np.all(np.abs(np.abs(ys) - m) <= np.abs(nearer - m) + slack)
        one = np.sum((m - m.mean()) ** 2)
        assert np.sum((ys - xs) ** 2) <= one * (1 + 1e-5) + block * slack ** 2


def check_top_k(x: np.ndarray, y: np.ndarray, payload, spec: CompressionSpec) -> np.ndarray:
    """Exactly k indices, strictly increasing; zeros elsewhere. Without chunks they hold the k
    largest magnitudes; with chunks, each whole chunk keeps at least its share
    floor(k · chunk / numel), as its own largest magnitudes."""
    indices = payload_indices(payload.header, payload.parts, x.size)
    k = spec.k(x.size)
    assert payload.header["k"] == k == indices.size
    assert np.all(np.diff(indices) > 0) and indices[-1] < x.size
    kept = np.zeros(x.size, dtype=bool)
    kept[indices] = True
    mags = np.abs(x.astype(np.float64))
    c = spec.chunk
    full = x.size // c if c else 0
    if full == 0 or k * c // x.size == 0:
        if not kept.all():
            assert mags[kept].min() >= mags[~kept].max()  # ties may go either way
    else:
        for start in range(0, full * c, c):
            part, m = kept[start:start + c], mags[start:start + c]
            assert part.sum() >= k * c // x.size
            if not part.all():
                assert m[part].min() >= m[~part].max()
    assert np.all(y[~kept] == 0)
    return indices


@FAST
@given(vectors(), specs)
def test_round_trip(x, spec):
    payload, y = round_trip(x, spec)
    method = spec.method
    if method == "fp32":
        assert np.array_equal(y, x.astype(np.float64))
    elif method == "fp16":
        assert_16bit(x, y, FP16_MAX, 10, 2.0 ** -24)
    elif method == "bf16":
        assert_16bit(x, y, BF16_MAX, 7, 2.0 ** -133)
    elif method == "int8":
        assert_int8(x, y, *payload.parts, spec.block)
    else:
        indices = check_top_k(x, y, payload, spec)
        if method == "topk":
            assert_16bit(x[indices], y[indices], FP16_MAX, 10, 2.0 ** -24)
        elif method == "topk-2bit":
            assert_two_levels(x[indices], y[indices], payload.parts[2], spec.block)
        else:
            assert_int8(x[indices], y[indices], payload.parts[2], payload.parts[3], spec.block)


@FAST
@given(vectors(), fractions, blocks, chunks)
def test_two_bit_round_trip(x, fraction, block, chunk):
    """topk-2bit on its own (test_round_trip draws it among all methods): the k coordinates top-k
    keeps, each as ± the nearer of its block's two levels."""
    spec = CompressionSpec("topk-2bit", fraction, block, chunk)
    payload, y = round_trip(x, spec)
    indices = check_top_k(x, y, payload, spec)
    assert_two_levels(x[indices], y[indices], payload.parts[2], block)


def test_payload_sizes():
    n = 200_000  # 4 index chunks
    x = torch.randn(n)
    sizes = {m: compress(x, CompressionSpec(m, 0.01, 1000)).nbytes for m in METHODS}
    # 2,000 codes of 2 bits, two levels per block, and the gaps within 1.5 bits of their entropy
    # (8.08 bits at f = 1 %; varints split gaps of 128 and more in two bytes, which costs a bit)
    index_bytes = sizes.pop("topk-2bit") - (500 + 2 * 2 * 4)
    assert 2000 * 8.08 / 8 < index_bytes < 2000 * 9.6 / 8
    assert sizes == {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "int8": n + 4 * 200,
                     "topk": 4 * 4 + 2000 * (2 + 2), "topk-int8": 4 * 4 + 2000 * (2 + 1) + 2 * 4}


@FAST
@given(st.integers(1, 5 * INDEX_CHUNK), st.data())
def test_index_encoding_round_trip(numel, data):
    """Any strictly increasing indices below numel, across chunk boundaries, come back exactly."""
    k = data.draw(st.integers(1, min(numel, 300)))
    indices = np.sort(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).choice(numel, k, replace=False))
    parts = list(_encode_indices(indices, numel))
    assert parts[0].size == -(-numel // INDEX_CHUNK) and parts[1].dtype == np.dtype("<u2")
    assert np.array_equal(topk_indices(parts, numel), indices)


def test_payload_does_not_alias_the_vector():
    x = torch.randn(100)
    for method in METHODS:
        payload = compress(x, CompressionSpec(method))
        before = decompress(payload.header, payload.parts, 100).clone()
        x2 = x.clone()
        x.add_(1.0)  # the caller keeps training on its vector
        assert torch.equal(decompress(payload.header, payload.parts, 100), before)
        x = x2


def test_compress_takes_strided_and_grad_tensors():
    base = torch.randn(200, requires_grad=True)
    view = base[::2]
    for method in METHODS:
        payload = compress(view, CompressionSpec(method))
        assert payload.header["numel"] == 100


@pytest.mark.parametrize("bad", [
    torch.zeros(10, dtype=torch.float64), torch.zeros(2, 5), torch.zeros(0),
    torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 1.0]), np.zeros(3, dtype=np.float32),
])
def test_compress_refuses_bad_vectors(bad):
    with pytest.raises(ValueError):
        compress(bad, CompressionSpec("int8"))


async def test_payload_travels_over_the_dense_wire_format():
    n = 5000
    x = torch.randn(n)
    for method in METHODS:
        payload = compress(x, CompressionSpec(method, 0.01, 256))
        out = BytesStream()
        await write_header(out, {"type": "delta", "compression": payload.header,
                                 "tensors": [s.to_wire() for s in payload.specs]})
        await write_payload(out, payload.parts, Limits(chunk_bytes=999))
        inp = BytesStream(bytes(out.sent))
        header = await read_header(inp)
        specs = expected_parts(header["compression"], n, DEFAULT_LIMITS)
        assert parse_tensor_specs(header["tensors"]) == specs
        parts = await read_payload(inp, specs)
        received = decompress(header["compression"], parts, n)
        assert torch.equal(received, decompress(payload.header, payload.parts, n))
        assert inp.pos == len(inp.data)


# --- headers refused before allocation ---------------------------------------------------------


ALLOCATORS = [(np, "empty"), (np, "zeros"), (np, "ones"), (np, "full"), (np, "frombuffer"),
              (torch, "empty"), (torch, "zeros"), (torch, "ones"), (torch, "full"), (torch, "tensor")]


@contextlib.contextmanager
def no_allocation():
    """numpy and torch refuse to allocate arrays inside this context."""
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ALLOCATORS:
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"{_name} called while checking a header")
            mp.setattr(module, name, refuse)
        yield


def valid_header(draw, method: str, numel: int) -> dict:
    header = {"method": method, "numel": numel}
    if method in ("int8", "topk-int8", "topk-2bit"):
        header["block"] = draw(st.integers(1, MAX_BLOCK))
    if method in TOPK_METHODS:
        header["k"] = draw(st.integers(1, math.ceil(MAX_TOPK_FRACTION * numel)))
    if method == "topk-2bit":
        header["index_bytes"] = draw(st.integers(1, max_gap_stream(header["k"], numel)))
    return header


junk = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def bad_headers(draw):
    """(header, numel, reason): a valid header with one thing wrong."""
    numel = draw(st.integers(1, 10**7))
    method = draw(st.sampled_from(METHODS))
    header = valid_header(draw, method, numel)
    fields = ["method", "numel", "drop", "not_a_map"]
    if "block" in header:
        fields.append("block")
    if "k" in header:
        fields.append("k")
    if "index_bytes" in header:
        fields.append("index_bytes")
    field = draw(st.sampled_from(fields))
    reason = "bad_compression"
    if field == "not_a_map":
        return draw(st.one_of(junk.filter(lambda j: not isinstance(j, dict)), st.just([header]))), numel, reason
    if field == "drop":
        del header[draw(st.sampled_from(sorted(header)))]
    elif field == "method":
        header["method"] = draw(st.one_of(junk, st.text(max_size=12)).filter(lambda m: m not in METHODS))
    elif field == "numel":
        other = draw(st.one_of(st.integers(-2**64, 2**64).filter(lambda v: v != numel), junk,
                               st.just(float(numel)), st.just(str(numel)), st.just(True)))
        if isinstance(other, int) and not isinstance(other, bool):
            reason = "wrong_size"
        header["numel"] = other
    elif field == "block":
        header["block"] = draw(st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_BLOCK + 1), junk,
                                         st.just(float(header["block"])), st.just(str(header["block"])),
                                         st.just(True)))
    elif field == "index_bytes":
        if draw(st.booleans()):
            header["index_bytes"] = draw(st.integers(max_gap_stream(header["k"], numel) + 1, 2**64))
            return header, numel, "too_large"
        header["index_bytes"] = draw(st.one_of(st.integers(max_value=0), junk, st.just(True),
                                               st.just(float(header["index_bytes"]))))
    else:
        cap = math.ceil(MAX_TOPK_FRACTION * numel)
        choices = [st.integers(max_value=0), st.integers(min_value=numel + 1), junk,
                   st.just(float(header["k"])), st.just(str(header["k"]))]
        if numel == 1:
            choices.append(st.just(True))  # True == 1 == numel: must still be refused
        if cap < numel and draw(st.booleans()):
            header["k"] = draw(st.integers(cap + 1, numel))
            return header, numel, "too_large"
        header["k"] = draw(st.one_of(*choices))
    return header, numel, reason


@FAST
@given(bad_headers())
def test_bad_headers_refused_before_allocating(case):
    header, numel, reason = case
    with no_allocation(), pytest.raises(ProtocolError) as e:
        expected_parts(header, numel, DEFAULT_LIMITS)
    assert e.value.reason == reason


@FAST
@given(st.integers(1, 10**7), st.sampled_from(METHODS), st.data())
def test_valid_headers_accepted_without_allocating(numel, method, data):
    header = valid_header(data.draw, method, numel)
    with no_allocation():
        specs = expected_parts(header, numel, DEFAULT_LIMITS)
    assert sum(s.nbytes for s in specs) <= 4 * DEFAULT_LIMITS.max_total_elements


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["method", "numel", "block", "k", "index_bytes", "x"]),
                       st.one_of(junk, st.integers(-3, 3000), st.sampled_from(METHODS)), max_size=5))
def test_random_headers_only_raise_protocol_errors(header):
    with no_allocation():
        try:
            expected_parts(header, 1000, DEFAULT_LIMITS)
        except ProtocolError:
            pass


def test_payload_over_the_byte_limit_refused():
    limits = Limits(max_total_elements=1000)  # 4000 bytes
    assert expected_parts({"method": "fp32", "numel": 1000}, 1000, limits)
    assert expected_parts({"method": "int8", "numel": 2000, "block": 1000}, 2000, limits)
    with pytest.raises(ProtocolError) as e:
        expected_parts({"method": "fp32", "numel": 1001}, 1001, limits)
    assert e.value.reason == "too_large"
    with pytest.raises(ProtocolError) as e:  # int8 with block 1: 5 bytes a coordinate
        expected_parts({"method": "int8", "numel": 1000, "block": 1}, 1000, limits)
    assert e.value.reason == "too_large"


def test_top_k_chunk_counts_checked_before_the_indices_are_made():
    """Counts that add up to more than k would make np.repeat allocate what they claim."""
    counts, offsets = np.array([2**31, 2**31], dtype="<u4"), np.zeros(4, dtype="<u2")
    with no_allocation(), pytest.raises(ProtocolError) as e:
        topk_indices([counts, offsets], 2 * INDEX_CHUNK)
    assert e.value.reason == "bad_payload"


def test_receiver_numel_must_be_a_positive_int():
    for numel in (0, -1, True, 1.0):
        with pytest.raises(ValueError):
            expected_parts({"method": "fp32", "numel": numel}, numel, DEFAULT_LIMITS)


# --- payload contents refused ------------------------------------------------------------------


def corrupted(method: str, how: str, n: int = 3000):
    """A valid payload for `method` with one part overwritten as `how` says."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    payload = compress(x, CompressionSpec(method, 0.01, 256))
    parts = [p.copy() for p in payload.parts]
    names = [s.name for s in payload.specs]
    if how.startswith(("index", "count")):
        counts, idx = parts[0], parts[1]
        if how == "index_swapped":
            idx[[3, 4]] = idx[[4, 3]]
        elif how == "index_duplicate":
            idx[5] = idx[4]
        elif how == "index_numel":
            idx[-1] = n
        elif how == "index_max":
            idx[-1] = 2**16 - 1
        elif how == "index_first_after_last":
            idx[0] = idx[-1] + 1
        elif how == "count_short":
            counts[-1] -= 1
        elif how == "count_long":
            counts[-1] += 1

    elif how.startswith("scale"):
        value = {"scale_nan": np.nan, "scale_inf": np.inf, "scale_negative": -1.0,
                 "scale_overflows": np.nextafter(np.float32(MAX_SCALE), np.float32(np.inf))}[how]
        parts[names.index("scales")][-1] = value
    elif how == "int8_min":
        parts[names.index("values")][7] = -128
    else:
        values = parts[names.index("values")]
        bits = {"nan": {"float16": np.float16(np.nan), "bfloat16": 0x7FC0, "float32": np.nan},
                "inf": {"float16": np.float16(np.inf), "bfloat16": 0x7F80, "float32": np.inf},
                "neg_inf": {"float16": np.float16(-np.inf), "bfloat16": 0xFF80, "float32": -np.inf}}[how]
        values[2] = bits[payload.specs[names.index("values")].dtype]
    return payload.header, parts, n


CORRUPTIONS = (
    [(m, h) for m in ("topk", "topk-int8") for h in  # topk-2bit's index stream: test_gap_stream_refused
     ["index_swapped", "index_duplicate", "index_numel", "index_max", "index_first_after_last",
      "count_short", "count_long"]]
    + [(m, h) for m in ("int8", "topk-int8") for h in
       ["scale_nan", "scale_inf", "scale_negative", "scale_overflows", "int8_min"]]
    + [(m, h) for m in ("fp32", "fp16", "bf16", "topk") for h in ["nan", "inf", "neg_inf"]]
)


def test_chunk_counts_that_move_an_index_to_another_chunk_refused():
    """The same total, but an index claimed by a later chunk: out of order or past numel. (Counts
    that move indices and still decode in order and in range are just other valid indices.)"""
    numel = 2 * INDEX_CHUNK + 10
    indices = np.array([5, 70_000, INDEX_CHUNK * 2 + 3])
    counts, offsets = _encode_indices(indices, numel)
    for moved in ([1, 0, 2], [0, 1, 2]):
        with pytest.raises(ProtocolError):
            topk_indices([np.array(moved, dtype="<u4"), offsets], numel)
    assert np.array_equal(topk_indices([counts, offsets], numel), indices)


@pytest.mark.parametrize("method, how", CORRUPTIONS)
def test_decompress_refuses_bad_contents(method, how):
    header, parts, n = corrupted(method, how)
    with pytest.raises(ProtocolError) as e:
        decompress(header, parts, n, out=torch.empty(n))
    assert e.value.reason == "bad_payload"


def test_largest_scale_reconstructs_finite():
    x = torch.tensor([float(np.finfo(np.float32).max), -3.0e38, 1.0])
    payload = compress(x, CompressionSpec("int8"))
    assert payload.parts[1][0] == np.float32(MAX_SCALE)
    y = decompress(payload.header, payload.parts, 3)
    assert bool(torch.isfinite(y).all())


@FAST
@given(st.sampled_from(METHODS), st.integers(1, 300), st.data())
def test_random_part_bytes_refused_or_finite(method, numel, data):
    """Whatever bytes arrive for a valid header: a ProtocolError or a finite vector."""
    header = valid_header(data.draw, method, numel)
    header["block"] = data.draw(st.integers(1, 64)) if "block" in header else None
    header = {key: value for key, value in header.items() if value is not None}
    valid_indices = method in TOPK_METHODS and data.draw(st.booleans())  # so the values get checked too
    if valid_indices:
        indices = np.sort(np.random.default_rng(numel).choice(numel, header["k"], replace=False))
        index_parts = [_encode_gaps(indices)] if method == "topk-2bit" else list(_encode_indices(indices, numel))
        if method == "topk-2bit":
            header["index_bytes"] = index_parts[0].size
    specs = expected_parts(header, numel, DEFAULT_LIMITS)
    parts = [np.frombuffer(data.draw(st.binary(min_size=s.nbytes, max_size=s.nbytes)), dtype=DTYPES[s.dtype])
             .reshape(s.shape).copy() for s in specs]
    if valid_indices:
        parts[: len(index_parts)] = index_parts
    try:
        y = decompress(header, parts, numel)
    except ProtocolError as e:
        assert e.reason == "bad_payload"
    else:
        assert bool(torch.isfinite(y).all())


def test_decompress_refuses_mismatched_parts_and_out():
    payload = compress(torch.randn(100), CompressionSpec("int8", block=16))
    with pytest.raises(ValueError):
        decompress(payload.header, payload.parts[:1], 100)
    with pytest.raises(ValueError):
        decompress(payload.header, [payload.parts[0].astype(np.int16), payload.parts[1]], 100)
    for out in (torch.empty(99), torch.empty(100, dtype=torch.float64), torch.empty(200)[::2]):
        with pytest.raises(ValueError):
            decompress(payload.header, payload.parts, 100, out=out)
    with pytest.raises(ProtocolError) as e:
        decompress(payload.header, payload.parts, 101)
    assert e.value.reason == "wrong_size"


# --- error feedback ----------------------------------------------------------------------------


@FAST
@given(specs, st.integers(1, 500), st.integers(0, 2**32 - 1), st.integers(-20, 20))
def test_error_feedback_conserves_every_delta(spec, n, seed, exponent):
    check_error_feedback_conserves(spec, n, seed, exponent)


@FAST
@given(fractions, blocks, chunks, st.integers(1, 500), st.integers(0, 2**32 - 1), st.integers(-20, 20))
def test_two_bit_error_feedback_conserves_every_delta(fraction, block, chunk, n, seed, exponent):
    check_error_feedback_conserves(CompressionSpec("topk-2bit", fraction, block, chunk), n, seed, exponent)


def check_error_feedback_conserves(spec: CompressionSpec, n: int, seed: int, exponent: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ef = ErrorFeedback(n)
    total_delta = np.zeros(n)
    total_sent = np.zeros(n)
    scale_sum = np.zeros(n)  # magnitudes that passed through, for the rounding tolerance
    for _ in range(12):
        delta = torch.randn(n, generator=gen) * 10.0 ** exponent
        old = ef.residual.double().clone()
        payload, sent = ef.compress(delta, spec)
        new = ef.residual.double()
        d, s = delta.double(), sent.double()
        assert torch.equal(sent, decompress(payload.header, payload.parts, n))  # what receivers see
        # sent + new residual == delta + old residual, up to float32 rounding
        err = (s + new - (d + old)).abs()
        assert bool((err <= 1e-6 * (d.abs() + old.abs() + s.abs())).all())
        total_delta += d.numpy()
        total_sent += s.numpy()
        scale_sum += (d.abs() + old.abs() + s.abs()).numpy()
    assert np.all(np.abs(total_sent + ef.residual.double().numpy() - total_delta) <= 1e-6 * scale_sum)
    if spec.method == "fp32":
        assert not ef.residual.any()


def test_top_k_error_feedback_tracks_a_constant_delta():
    n, spec = 2000, CompressionSpec("topk", 0.01)
    k = spec.k(n)
    delta = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ef = ErrorFeedback(n)
    sent_sum = torch.zeros(n, dtype=torch.float64)
    # A coordinate waits until its accumulated delta reaches the top-k threshold, which averages
    # |delta|_1 / k: the residual plateaus there instead of growing with the rounds.
    plateau = float(delta.abs().sum()) / k + float(delta.abs().max())
    gaps = {}
    for t in range(1, 201):
        _, sent = ef.compress(delta, spec)
        sent_sum += sent.double()
        assert float(ef.residual.abs().max()) <= plateau
        gaps[t] = float((sent_sum - t * delta.double()).norm() / (t * delta.double()).norm())
    assert gaps[200] < 0.3 and gaps[200] < 0.65 * gaps[100]  # the running sums converge


def test_error_feedback_state_round_trip(tmp_path):
    n, spec = 300, CompressionSpec("topk-int8", 0.05, 32)
    gen = torch.Generator().manual_seed(3)
    ef = ErrorFeedback(n)
    for _ in range(5):
        ef.compress(torch.randn(n, generator=gen), spec)
    state = ef.state_dict()
    torch.save(state, tmp_path / "ef.pt")
    restored = ErrorFeedback(n)
    restored.load_state_dict(torch.load(tmp_path / "ef.pt", weights_only=True))
    assert torch.equal(restored.residual, ef.residual)
    delta = torch.randn(n, generator=gen)
    (p1, s1), (p2, s2) = ef.compress(delta, spec), restored.compress(delta, spec)
    assert p1.header == p2.header and all(np.array_equal(a, b) for a, b in zip(p1.parts, p2.parts))
    assert torch.equal(s1, s2)
    assert not torch.equal(state["residual"], ef.residual)  # the state is a copy, not a live view


@pytest.mark.parametrize("state", [
    {"residual": torch.zeros(299)}, {"residual": torch.zeros(300, dtype=torch.float64)}, {},
    {"residual": torch.full((300,), float("nan"))}, {"residual": np.zeros(300, dtype=np.float32)}, None,
])
def test_error_feedback_refuses_bad_state(state):
    ef = ErrorFeedback(300)
    with pytest.raises(ValueError):
        ef.load_state_dict(state)


def test_error_feedback_refuses_bad_delta_and_keeps_its_residual():
    ef = ErrorFeedback(10)
    ef.compress(torch.arange(10, dtype=torch.float32), CompressionSpec("topk", 0.1))
    before = ef.residual.clone()
    for bad in (torch.zeros(9), torch.zeros(10, dtype=torch.float64), torch.full((10,), float("nan")),
                torch.full((10,), float(np.finfo(np.float32).max))):  # + residual overflows
        with pytest.raises(ValueError):
            ef.compress(bad, CompressionSpec("topk", 0.1))
        assert torch.equal(ef.residual, before)
    with pytest.raises(ValueError):
        ef.compress(torch.full((10,), float("inf")), CompressionSpec("fp32"))


# --- spec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, spec", [
    ("int8", CompressionSpec("int8")), ("fp32", CompressionSpec()), ("bf16", CompressionSpec("bf16")),
    ("fp16", CompressionSpec("fp16")), ("topk", CompressionSpec("topk")),
    ("topk:0.01", CompressionSpec("topk", 0.01)), ("topk-int8:0.0156", CompressionSpec("topk-int8", 0.0156)),
    (" topk:0.25 ", CompressionSpec("topk", 0.25)), ("topk:1e-3", CompressionSpec("topk", 0.001)),
    ("topk-int8:0.0156:4096", CompressionSpec("topk-int8", 0.0156, chunk=4096)),
    ("topk:0.01:0", CompressionSpec("topk", 0.01)),
    ("topk-2bit:0.047:4096", CompressionSpec("topk-2bit", 0.047, chunk=4096)),
])
def test_spec_parse(text, spec):
    assert CompressionSpec.parse(text) == spec
    assert CompressionSpec.parse(spec.describe()) == spec


@pytest.mark.parametrize("text, setting", [
    ("", "method"), ("int4", "method"), ("INT8", "method"), ("topk:", "not a number"),
    ("topk:abc", "not a number"), ("topk:0", "topk_fraction"), ("topk:-0.1", "topk_fraction"),
    ("topk:1.5", "topk_fraction"), ("topk:0.5", "topk_fraction"), ("topk:nan", "topk_fraction"),
    ("topk:inf", "topk_fraction"), ("int8:0.1", "FRACTION"), ("topk:0.01:x", "not an integer"),
    ("topk:0.01:1.5", "not an integer"), ("topk:0.01:-1", "chunk"), ("topk:abc:3", "not a number"),
])
def test_spec_parse_refuses(text, setting):
    with pytest.raises(ValueError, match=setting):
        CompressionSpec.parse(text)


@pytest.mark.parametrize("kwargs, setting", [
    ({"method": "zip"}, "method"), ({"topk_fraction": 0.0}, "topk_fraction"),
    ({"topk_fraction": 1.01}, "topk_fraction"), ({"topk_fraction": float("nan")}, "topk_fraction"),
    ({"topk_fraction": True}, "topk_fraction"), ({"topk_fraction": "0.1"}, "topk_fraction"),
    ({"method": "topk-int8", "topk_fraction": 0.3}, "topk_fraction"),
    ({"block": 0}, "block"), ({"block": -4}, "block"), ({"block": True}, "block"), ({"block": 2.0}, "block"),
    ({"block": MAX_BLOCK + 1}, "block"), ({"chunk": -1}, "chunk"), ({"chunk": True}, "chunk"), ({"chunk": 4.0}, "chunk"),
])
def test_spec_refuses_bad_settings(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        CompressionSpec(**kwargs)


def test_spec_k():
    spec = CompressionSpec("topk", 0.01)
    assert [spec.k(n) for n in (1, 99, 100, 101, 10**6)] == [1, 1, 1, 2, 10**4]
    assert CompressionSpec("topk", MAX_TOPK_FRACTION).k(7) == math.ceil(MAX_TOPK_FRACTION * 7)


def reference_largest(x: torch.Tensor, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The `count` largest |x| outside `exclude`, equal magnitudes by lowest index (a stable sort)."""
    mags = x.abs().double()
    if exclude is not None:
        mags[exclude] = -1.0
    return torch.sort(torch.sort(-mags, stable=True).indices[:count]).values


@pytest.mark.parametrize("slice_len", [1, 3, 1 << 20])
@pytest.mark.parametrize("kind", ["normal", "few values", "zeros", "one float's neighbours"])
def test_top_k_takes_the_largest_magnitudes_and_the_lowest_indices_among_equal_ones(monkeypatch, slice_len, kind):
    """The selection reads the vector in slices (three passes); whatever the slice length, it
    is the stable sort's: the k largest magnitudes, of equal ones at the threshold the first.
    Ties are the usual case, not a corner: a pseudo-gradient is a difference of float32
    parameters, so many coordinates share each value near the threshold."""
    monkeypatch.setattr(compression, "TOPK_SLICE", slice_len)
    gen = torch.Generator().manual_seed(slice_len)
    for n in (1, 2, 17, 1000):
        x = {"normal": torch.randn(n, generator=gen),
             "few values": torch.randint(-3, 4, (n,), generator=gen).float(),
             "zeros": torch.zeros(n),
             "one float's neighbours": (torch.randn(n, generator=gen) * 1e-4 + 0.01) - 0.01}[kind]
        for k in sorted({1, max(1, n // 64), max(1, n // 3), n}):
            assert torch.equal(largest_magnitudes(x, k), reference_largest(x, k)), (n, k)
            if k < n:
                exclude = torch.sort(torch.randperm(n, generator=gen)[: (n - k) // 2]).values
                assert torch.equal(largest_magnitudes(x, k, exclude), reference_largest(x, k, exclude)), (n, k)


@pytest.mark.parametrize("chunk", [0, 1, 7, 100, 999])
def test_chunked_top_k_keeps_each_chunks_largest_then_the_largest_of_the_rest(monkeypatch, chunk):
    """Chunked top-k, sliced into few-row `torch.topk` calls, against the definition computed in
    one piece: each whole chunk's `per` largest (no ties here: each row's choice is torch's),
    then the largest magnitudes not yet kept, the first of equal ones."""
    monkeypatch.setattr(compression, "TOPK_SLICE", 2000)
    gen = torch.Generator().manual_seed(chunk)
    n = 10_007
    x = (torch.randperm(n, generator=gen) + 1).float() * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    x[9000:] = 5.0  # ties among the rest (the last partial chunk's share goes there)
    for k in (1, 157, 2501):
        full = n // chunk if chunk else 0
        per = k * chunk // n if full else 0
        if per:
            mags = x.abs()[: full * chunk].view(full, chunk)
            kept = (torch.topk(mags, per, dim=1).indices + torch.arange(full).unsqueeze(1) * chunk).reshape(-1)
            kept = torch.sort(kept).values
            expected = torch.sort(torch.cat([kept, reference_largest(x, k - kept.numel(), kept)])).values
        else:
            expected = reference_largest(x, k)
        assert torch.equal(top_indices(x, k, chunk), expected), (chunk, k)


@pytest.mark.parametrize("method", ["int8", "topk", "topk-int8", "topk-2bit"])
def test_slice_lengths_change_no_payload(monkeypatch, method):
    """Compression and decompression work slice by slice (QUANT_SLICE, TOPK_SLICE) so that
    their temporaries stay small at any model size; the payload and its decoding are the same
    bytes whatever the slices, partial last slices and blocks included."""
    gen = torch.Generator().manual_seed(3)
    n = 50_003
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen).pow(4)
    x[:100] = 0.5  # ties at and above the threshold
    for block, chunk in ((1, 0), (3, 64), (64, 1000), (1024, 0), (4096, 7)):
        spec = CompressionSpec(method, 0.05, block, chunk)
        whole = compress(x, spec)
        with monkeypatch.context() as m:
            m.setattr(compression, "QUANT_SLICE", 5 * block)
            m.setattr(compression, "TOPK_SLICE", 999)
            sliced = compress(x, spec)
            decoded = decompress(sliced.header, sliced.parts, n)
        assert whole.header == sliced.header, (block, chunk)
        assert all(np.array_equal(a, b) for a, b in zip(whole.parts, sliced.parts)), (block, chunk)
        assert torch.equal(decompress(whole.header, whole.parts, n).view(torch.int32), decoded.view(torch.int32))


def test_chunked_top_k_sends_every_part_of_a_vector_that_one_part_dominates():
    """A pseudo-gradient whose first 4 % moved 10x more (lm-tiny's token embedding after 50 inner
    steps): the whole-vector top-k 1.56 % spends all of k there; with chunks of 1000 every chunk
    sends its 15 largest, and the payload is the same size and decodes the same way."""
    n = 100_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    x[: n // 25] *= 10
    whole, chunked = CompressionSpec("topk-int8", 0.0156), CompressionSpec("topk-int8", 0.0156, chunk=1000)
    kept = {}
    for spec in (whole, chunked):
        payload = compress(x, spec)
        y = decompress(payload.header, payload.parts, n)
        kept[spec.chunk] = torch.from_numpy(topk_indices(payload.parts, n))
        assert payload.header["k"] == spec.k(n) == int((y != 0).sum())
        assert payload.nbytes == compress(x, whole).nbytes
    assert int(kept[0].max()) < n // 25  # all of k in the large part
    per_chunk = torch.bincount(kept[1000] // 1000, minlength=n // 1000)
    assert int(per_chunk.min()) == 15 and int(per_chunk.sum()) == whole.k(n)


def test_chunked_error_feedback_conserves_and_sends_every_part_from_the_first_round():
    """Error feedback with chunked top-k: the sum of what was sent plus the residual equals the
    sum of the deltas, and the part that whole-vector top-k would leave waiting (here 90 % of the
    coordinates, 20x smaller) gets its chunks' share from the first round on."""
    n = 20_000
    delta = torch.randn(n, generator=torch.Generator().manual_seed(1))
    delta[: n // 10] *= 20
    small = {}
    for chunk in (0, 500):
        spec = CompressionSpec("topk", 0.05, chunk=chunk)
        ef = ErrorFeedback(n)
        sent_sum = torch.zeros(n, dtype=torch.float64)
        for i in range(3):
            _, sent = ef.compress(delta, spec)
            sent_sum += sent.double()
            if i == 0:
                small[chunk] = int((sent[n // 10:] != 0).sum())
        torch.testing.assert_close(sent_sum + ef.residual.double(), 3 * delta.double(), rtol=1e-4, atol=1e-4)
    assert small[0] == 0 and small[500] >= 25 * (n - n // 10) // 500


# --- topk-2bit: index stream and two-level values ----------------------------------------------


@FAST
@given(st.one_of(st.integers(1, 5 * INDEX_CHUNK), st.integers(1, 10**11)), st.data())
def test_gap_stream_round_trip(numel, data):
    """Any strictly increasing indices below numel (gaps of every varint length, up to 5 bytes)
    come back exactly, and the stream stays within the bound a receiver checks."""
    k = data.draw(st.integers(1, min(numel, 300)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    indices = np.unique(rng.integers(0, numel, size=k, dtype=np.int64))
    if data.draw(st.booleans()):
        indices = np.unique(np.concatenate([indices, [0, numel - 1]]))  # the extremes
    stream = _encode_gaps(indices)
    assert stream.dtype == np.uint8 and 1 <= stream.size <= max_gap_stream(indices.size, numel)
    assert np.array_equal(gap_indices(stream, indices.size, numel), indices)


def varints(values) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


def deflated(raw: bytes) -> np.ndarray:
    return np.frombuffer(zlib.compress(raw), dtype=np.uint8).copy()


@pytest.mark.parametrize("stream, k, numel", [
    (np.frombuffer(b"not zlib at all", dtype=np.uint8), 3, 100),
    (deflated(varints([1, 2, 3]))[:-3], 3, 100),                                         # truncated
    (np.concatenate([deflated(varints([1, 2, 3])), [0]]).astype(np.uint8), 3, 100),      # trailing byte
    (deflated(varints([1, 2, 3, 4])), 3, 100),                                           # k + 1 gaps
    (deflated(varints([1, 2])), 3, 100),                                                 # k - 1 gaps
    (deflated(varints([1, 2]) + b"\x80"), 3, 100),                                       # unfinished varint
    (deflated(varints([10, 50, 40])), 3, 100),                                           # last index 102
    (deflated(varints([0, 100])), 2, 100),                                               # a gap >= numel
    (deflated(b"\x81\x80\x00"), 1, 100),                                                # 3-byte varint, numel needs 1
    (deflated(b""), 1, 100),
    (deflated(bytes(10**7)), 10, 100),                                                   # inflates to 10 MB
])
def test_gap_stream_refused(stream, k, numel):
    with pytest.raises(ProtocolError) as e:
        gap_indices(stream, k, numel)
    assert e.value.reason == "bad_payload"


def test_gap_stream_bomb_is_not_inflated(monkeypatch):
    """A stream that inflates far past what k gaps can take is stopped at that bound plus one."""
    asked = []
    real = zlib.decompressobj

    class Recording:
        def __init__(self):
            self.inner = real()

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            out = self.inner.decompress(data, max_length)
            asked.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Recording)
    with pytest.raises(ProtocolError):
        gap_indices(deflated(bytes(10**7)), 10, 100)
    assert asked == [11, 11]


def two_bit_corrupted(how: str, n: int = 3000):
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    payload = compress(x, CompressionSpec("topk-2bit", 0.01, 8))  # k = 30: 8 codes bytes, 4 blocks
    header, parts = dict(payload.header), [p.copy() for p in payload.parts]
    if how.startswith("level"):
        parts[2][-1] = {"level_nan": np.nan, "level_inf": np.inf, "level_negative": -1.0}[how]
    elif how == "padding":
        parts[1][-1] |= 0xC0  # k = 30: the last byte's last code is padding
    elif how == "gaps_swapped_stream":
        parts[0] = parts[0][::-1].copy()
    return header, parts, n


@pytest.mark.parametrize("how", ["level_nan", "level_inf", "level_negative", "padding", "gaps_swapped_stream"])
def test_two_bit_contents_refused(how):
    header, parts, n = two_bit_corrupted(how)
    with pytest.raises(ProtocolError) as e:
        decompress(header, parts, n, out=torch.empty(n))
    assert e.value.reason == "bad_payload"


def test_two_bit_fits_three_times_the_coordinates_of_top_k_int8():
    """The point of topk-2bit: at the bytes of topk-int8 1.56 % it sends about three times the
    coordinates, and keeps more of the vector."""
    n = 200_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    base = compress(x, CompressionSpec("topk-int8", 0.0156))
    dense = compress(x, CompressionSpec("topk-2bit", 0.045))
    assert dense.nbytes <= base.nbytes
    assert dense.header["k"] >= 2.8 * base.header["k"]
    error = {}
    for name, p in (("int8", base), ("2bit", dense)):
        y = decompress(p.header, p.parts, n)
        error[name] = float((x - y).norm() ** 2 / x.norm() ** 2)
    assert error["2bit"] < error["int8"] - 0.1
