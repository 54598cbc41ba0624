"""Wire format: length-prefixed msgpack headers and raw tensor bytes, with hard limits.

A message is a 4-byte big-endian length followed by a msgpack map (the header). A header that
announces tensors is followed by their raw little-endian bytes, in the order listed. Every
length, count and shape is checked against `Limits` *before* anything is allocated, msgpack
extension types are refused, and nothing is ever unpickled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np

PREFIX = struct.Struct(">I")

# dtype name on the wire -> numpy dtype. A closed whitelist: nothing else is decoded.
# bfloat16 travels as its raw 16 bits (numpy has no bfloat16); protocols.compression converts it.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("<i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
}


class ProtocolError(Exception):
    """A peer sent something we refuse. `reason` is a short stable code used in counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Hard bounds applied before allocating anything a peer asked for."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_total_elements: int = 256 * 1024 * 1024  # 1 GiB of float32
    chunk_bytes: int = 1024 * 1024
    max_string: int = 1024
    max_list: int = 256


DEFAULT_LIMITS = Limits()


class Stream(Protocol):
    """A bidirectional byte stream (the transport gives us these)."""

    remote_peer: str

    async def read_exactly(self, n: int) -> bytes: ...

    async def write(self, data: bytes | memoryview) -> None:
        """Returns once the stream keeps no reference to `data` (the caller may then overwrite it)."""

    async def close(self) -> None: ...


async def _fill(stream: Stream, view: memoryview, chunk: int) -> None:
    """Fill `view` from the stream: straight into it where the stream can (`read_into`), else by chunks."""
    read_into = getattr(stream, "read_into", None)
    pos, size = 0, len(view)
    while pos < size:
        if read_into is not None:  # whatever has arrived, up to the rest of the payload
            n = await read_into(view[pos:])
            if n == 0:
                raise EOFError(f"stream ended after {pos} of {size} payload bytes")
        else:
            n = min(chunk, size - pos)
            view[pos : pos + n] = await stream.read_exactly(n)
        pos += n


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_header", f"msgpack extension type {code} refused")


def encode_header(header: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    body = msgpack.packb(header, use_bin_type=True)
    if len(body) > limits.max_header_bytes:
        raise ProtocolError("header_too_large", f"{len(body)} bytes")
    return PREFIX.pack(len(body)) + body


def decode_header(body: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a header body (without its length prefix) into a plain dict, or raise ProtocolError."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_list,
            max_map_len=limits.max_list,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types on garbage; all mean the same to us
        raise ProtocolError("bad_header", f"undecodable msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_header", f"header is {type(obj).__name__}, not a map")
    return obj


async def read_header(stream: Stream, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    (length,) = PREFIX.unpack(await stream.read_exactly(PREFIX.size))
    if length > limits.max_header_bytes:
        raise ProtocolError("header_too_large", f"{length} bytes announced")
    return decode_header(await stream.read_exactly(length), limits)


async def write_header(stream: Stream, header: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> None:
    await stream.write(encode_header(header, limits))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def parse_tensor_specs(raw: Any, limits: Limits = DEFAULT_LIMITS) -> list[TensorSpec]:
    """Check a header's `tensors` list: types, dtype whitelist, count and total size."""
    if not isinstance(raw, list):
        raise ProtocolError("bad_header", "tensors is not a list")
    if len(raw) > limits.max_tensors:
        raise ProtocolError("too_many_tensors", f"{len(raw)} > {limits.max_tensors}")
    specs, total = [], 0
    for item in raw:
        if not isinstance(item, dict):
            raise ProtocolError("bad_header", "tensor spec is not a map")
        name, dtype, shape = item.get("name"), item.get("dtype"), item.get("shape")
        if not isinstance(name, str) or len(name) > limits.max_string:
            raise ProtocolError("bad_header", "tensor name")
        if dtype not in DTYPES:
            raise ProtocolError("bad_dtype", repr(dtype)[:40])
        if not isinstance(shape, list) or len(shape) > 8:
            raise ProtocolError("bad_shape", "shape is not a list of at most 8 dims")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ProtocolError("bad_shape", "dims must be non-negative ints")
        if any(s > limits.max_total_elements for s in shape):
            raise ProtocolError("too_large", f"a dimension exceeds {limits.max_total_elements}")
        spec = TensorSpec(name, dtype, tuple(shape))
        total += spec.numel
        if total > limits.max_total_elements:
            raise ProtocolError("too_large", f"more than {limits.max_total_elements} elements")
        specs.append(spec)
    return specs


async def write_payload(stream: Stream, buffers: list[np.ndarray], limits: Limits = DEFAULT_LIMITS) -> int:
    """Send contiguous arrays as raw bytes in chunks; returns the bytes written."""
    sent = 0
    step = getattr(stream, "max_write", None) or limits.chunk_bytes  # a stream may take bigger writes
    for arr in buffers:
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            await stream.write(chunk)
            sent += len(chunk)
    return sent


async def read_payload(stream: Stream, specs: list[TensorSpec], limits: Limits = DEFAULT_LIMITS,
                       into: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Read the raw bytes announced by `specs` (already checked against limits) into new arrays,
    or into `into` (arrays of exactly those shapes and dtypes, which the caller reuses)."""
    if into is not None and [(a.shape, a.dtype, a.flags.c_contiguous) for a in into] != [
            (spec.shape, DTYPES[spec.dtype], True) for spec in specs]:
        raise ValueError("receive buffers do not match the announced tensors")
    out = []
    for i, spec in enumerate(specs):
        # np.empty, not bytearray: no zero-fill pass, and numpy asks for huge pages on large arrays
        arr = np.empty(spec.shape, dtype=DTYPES[spec.dtype]) if into is None else into[i]
        await _fill(stream, memoryview(arr).cast("B"), limits.chunk_bytes)
        out.append(arr)
    return out
