"""Compressed pseudo-gradients: codecs for a flat float32 vector, and error feedback. No I/O.

A pseudo-gradient is the change of a peer's flat float32 parameter vector over its local steps.
`compress` turns it into a `Compressed` payload: a small msgpack-able `header` and raw `parts`
(C-contiguous little-endian arrays sent in order after the header, as in `protocols.codec`).

Methods (wire names):
    fp32       the vector as is
    fp16/bf16  each coordinate rounded to 16 bits, saturated at the type's largest finite value
    int8       blocks of `block` consecutive coordinates; per block a float32 scale max|x|/127 and
               int8 values round(x/scale) in [-127, 127]
    topk       k coordinates, float16 values (which k: `CompressionSpec.chunk`); the indices, strictly
               increasing, travel as a uint32 count per chunk of INDEX_CHUNK = 65536 coordinates
               and each index's uint16 offset within its chunk: 2 bytes an index, not 4
    topk-int8  the same indices; the kept values int8 with per-block scales over the kept values
    topk-2bit  the same k coordinates in about a third of the bytes (SparseLoCo's regime): each kept
               value as 2 bits (sign, and which of its block's two magnitude levels is nearer),
               four to a byte, with per block of `block` kept values two float32 levels (lo, hi);
               the indices as gaps (index - previous index - 1) in LEB128 varints, deflated by
               zlib (Huffman only): near the gaps' entropy, 5.9 bits a gap at f = 4.7 % instead of 16

Invariants:
  * The part specs are a function of the header alone (`part_specs`): a receiver calls
    `expected_parts` on an untrusted header before allocating anything, and a peer cannot announce
    sizes that disagree with its header.
  * A payload that `compress` makes always passes `expected_parts` (for the same numel, under
    limits that allow it) and `decompress`: every value it carries is finite, every scale lies in
    [0, MAX_SCALE], so reconstruction never overflows, and top-k fractions above
    MAX_TOPK_FRACTION are refused when the spec is made rather than by every receiver.
  * `decompress` is deterministic, so the dense vector a sender computes from its own payload is
    bit-identical to what every receiver reconstructs; error feedback relies on this.
  * `ErrorFeedback`: after each call, sent + new residual == delta + old residual up to float32
    rounding, so nothing a peer trained is lost, only delayed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocols.codec import DTYPES, Limits, ProtocolError, TensorSpec

METHODS = ("fp32", "fp16", "bf16", "int8", "topk", "topk-int8", "topk-2bit")
TOPK_METHODS = ("topk", "topk-int8", "topk-2bit")
BLOCK_METHODS = ("int8", "topk-int8", "topk-2bit")

# A peer may not make us allocate more than this fraction of the model for top-k parts.
MAX_TOPK_FRACTION = 0.25
# Largest int8 block a header may announce (a block is one scale; larger blocks only lose accuracy).
MAX_BLOCK = 1 << 20
# Top-k indices travel as offsets within chunks of this many coordinates (uint16), after the
# count of kept coordinates in each chunk (uint32).
INDEX_CHUNK = 1 << 16
# topk-2bit deflates the gaps' varints with Huffman coding only (no LZ77 matching): the gaps of
# top-k indices are close to independent geometric draws, so string matches find nothing and
# Huffman alone comes within ~1 % of their entropy (5.88 bits a gap at f = 4.7 %, entropy 5.82;
# zlib level 9 6.02, lzma 5.96, bz2 6.36), and it is the fastest. Any zlib inflater reads it.

_INT8_MAX = 127


def _largest_safe_scale() -> float:
    """The largest float32 scale s with 127 * s finite in float32: int8 reconstruction never overflows."""
    with np.errstate(over="ignore"):
        s = np.float32(np.finfo(np.float32).max) / np.float32(_INT8_MAX)
        while not np.isfinite(s * np.float32(_INT8_MAX)):
            s = np.nextafter(s, np.float32(0))
    return float(s)


MAX_SCALE = _largest_safe_scale()

# Largest finite value of the 16-bit value types; larger magnitudes are saturated to it on send.
_FP16_MAX = torch.finfo(torch.float16).max
_BF16_MAX = torch.finfo(torch.bfloat16).max


@dataclass(frozen=True)
class CompressionSpec:
    """How a peer compresses what it sends. `topk_fraction` is used by the top-k methods only,
    `block` by the int8 methods only; both are validated whatever the method."""

    method: str = "fp32"
    topk_fraction: float = 0.0156
    block: int = 1024
    # How the top-k methods choose their k coordinates (the sender's choice: receivers see only
    # indices). 0: the k largest magnitudes of the whole vector. C > 0: the largest of every
    # chunk of C consecutive coordinates, each chunk its share of k, so every part of the model
    # is sent each round. The whole-vector choice spends a pseudo-gradient's budget on the
    # tensors whose coordinates move most: on lm-tiny after 50 inner steps, 98 % of a 1.56 %
    # top-k lies in the token embedding (4 % of the parameters), and the transformer blocks'
    # progress waits in the error feedback.
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compression method {self.method!r} is not one of {', '.join(METHODS)}")
        f = self.topk_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"compression topk_fraction must be a number in (0, 1], got {f!r}")
        if self.method in TOPK_METHODS and f > MAX_TOPK_FRACTION:
            raise ValueError(f"compression topk_fraction {f!r} exceeds {MAX_TOPK_FRACTION}, "
                             "the largest fraction receivers accept")
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BLOCK:
            raise ValueError(f"compression block must be an int in [1, {MAX_BLOCK}], got {b!r}")
        c = self.chunk
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"compression chunk must be an int >= 0 (0: the whole vector), got {c!r}")

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """`METHOD` or, for the top-k methods, `METHOD:FRACTION[:CHUNK]` (e.g. "int8",
        "topk:0.01", "topk-int8:0.0156:4096"; CHUNK as `chunk`)."""
        method, sep, rest = text.strip().partition(":")
        if not sep:
            return cls(method=method)
        if method not in TOPK_METHODS:
            raise ValueError(f"compression {text!r}: only {' and '.join(TOPK_METHODS)} take a ':FRACTION'")
        rest, sep, chunk_text = rest.partition(":")
        try:
            fraction = float(rest)
        except ValueError:
            raise ValueError(f"compression {text!r}: fraction {rest!r} is not a number") from None
        chunk = 0
        if sep:
            try:
                chunk = int(chunk_text)
            except ValueError:
                raise ValueError(f"compression {text!r}: chunk {chunk_text!r} is not an integer") from None
        return cls(method=method, topk_fraction=fraction, chunk=chunk)

    def describe(self) -> str:
        """The spelling `parse` reads back (`peer status`, logs)."""
        if self.method not in TOPK_METHODS:
            return self.method
        return f"{self.method}:{self.topk_fraction:g}" + (f":{self.chunk}" if self.chunk else "")

    def k(self, numel: int) -> int:
        """How many coordinates the top-k methods keep of `numel`."""
        return min(numel, max(1, math.ceil(self.topk_fraction * numel)))


@dataclass(frozen=True)
class Compressed:
    """A payload: `header` (plain msgpack-able types) and `parts`, sent in order after it.
    The parts are owned by the payload (they never alias the compressed vector)."""

    header: dict[str, Any]
    parts: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def specs(self) -> list[TensorSpec]:
        return part_specs(self.header)


def ratio(numel: int, compressed: Compressed) -> float:
    """How many times smaller the payload is than the float32 vector."""
    return 4 * numel / compressed.nbytes


def part_specs(header: dict[str, Any]) -> list[TensorSpec]:
    """The parts that follow a header whose fields were already validated: the only place sizes
    are derived, shared by sender and receiver."""
    method, numel = header["method"], header["numel"]
    if method == "fp32":
        return [TensorSpec("values", "float32", (numel,))]
    if method == "fp16":
        return [TensorSpec("values", "float16", (numel,))]
    if method == "bf16":
        return [TensorSpec("values", "bfloat16", (numel,))]
    if method == "int8":
        return [TensorSpec("values", "int8", (numel,)),
                TensorSpec("scales", "float32", (-(-numel // header["block"]),))]
    k = header["k"]
    if method == "topk-2bit":
        return [TensorSpec("gaps", "uint8", (header["index_bytes"],)),
                TensorSpec("codes", "uint8", (-(-k // 4),)),
                TensorSpec("levels", "float32", (2 * -(-k // header["block"]),))]
    index = [TensorSpec("chunk_counts", "uint32", (-(-numel // INDEX_CHUNK),)), TensorSpec("offsets", "uint16", (k,))]
    if method == "topk":
        return [*index, TensorSpec("values", "float16", (k,))]
    if method == "topk-int8":
        return [*index, TensorSpec("values", "int8", (k,)),
                TensorSpec("scales", "float32", (-(-k // header["block"]),))]
    raise AssertionError(method)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(header: Any, numel: int) -> None:
    """Field checks on an untrusted header; allocates nothing."""
    if not isinstance(header, dict):
        raise ProtocolError("bad_compression", "header is not a map")
    method = header.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise ProtocolError("bad_compression", f"method {str(method)[:32]!r}")
    n = header.get("numel")
    if not _is_int(n):
        raise ProtocolError("bad_compression", "numel is not an int")
    if n != numel:
        raise ProtocolError("wrong_size", f"numel {n} != {numel}")
    if method in BLOCK_METHODS:
        block = header.get("block")
        if not _is_int(block) or not 1 <= block <= MAX_BLOCK:
            raise ProtocolError("bad_compression", f"block must be an int in [1, {MAX_BLOCK}]")
    if method in TOPK_METHODS:
        k = header.get("k")
        if not _is_int(k) or not 1 <= k <= numel:
            raise ProtocolError("bad_compression", "k must be an int in [1, numel]")
        if k > math.ceil(MAX_TOPK_FRACTION * numel):
            raise ProtocolError("too_large", f"k {k} above {MAX_TOPK_FRACTION} of {numel}")
    if method == "topk-2bit":
        size = header.get("index_bytes")
        if not _is_int(size) or size < 1:
            raise ProtocolError("bad_compression", "index_bytes must be a positive int")
        if size > max_gap_stream(header["k"], numel):
            raise ProtocolError("too_large", f"index_bytes {size} above what {header['k']} gaps below {numel} can take")


def _check_numel(numel: Any) -> None:
    if not _is_int(numel) or numel < 1:
        raise ValueError(f"numel must be a positive int, got {numel!r}")


def expected_parts(header: dict[str, Any], numel: int, limits: Limits) -> list[TensorSpec]:
    """Validate a received compression header for a model of `numel` coordinates, before anything
    is allocated; returns the specs of the parts that must follow. Raises ProtocolError."""
    _check_numel(numel)
    _check_header(header, numel)
    specs = part_specs(header)
    if len(specs) > limits.max_tensors:
        raise ProtocolError("too_many_tensors", f"{len(specs)} > {limits.max_tensors}")
    # Limits bounds elements of float32; a compressed payload may carry more (smaller) elements
    # than that, so its bound is the same number of bytes.
    nbytes = sum(s.nbytes for s in specs)
    if nbytes > 4 * limits.max_total_elements:
        raise ProtocolError("too_large", f"{nbytes} bytes")
    return specs


# --- compression -------------------------------------------------------------------------------


def _max_abs(x: torch.Tensor) -> float:
    """max |x| without a temporary copy of x; NaN if x holds a NaN."""
    return float(torch.linalg.vector_norm(x, float("inf"))) if x.numel() else 0.0


def _check_vector(vec: torch.Tensor) -> torch.Tensor:
    if not isinstance(vec, torch.Tensor) or vec.dtype != torch.float32 or vec.dim() != 1:
        raise ValueError("compress takes a 1-D float32 tensor")
    if vec.numel() < 1:
        raise ValueError("compress takes a non-empty vector")
    vec = vec.detach().contiguous()
    if not math.isfinite(_max_abs(vec)):
        raise ValueError("vector to compress holds inf or NaN")
    return vec


# The block methods quantize and dequantize at most about this many coordinates per op (whole
# blocks), so their float32 temporaries are a few MB at any model size, not a model-sized copy.
# Results do not depend on the slicing: the ops are elementwise, or reduce each block (row) on
# its own, and a view of two or more rows reduces every row the way the whole matrix would
# (torch splits one row across threads only when it is the only output).
QUANT_SLICE = 1 << 18


def _row_ranges(full: int, rows: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about `rows` rows covering `full` rows, none of one row unless `full` is 1."""
    ranges = [(lo, min(lo + rows, full)) for lo in range(0, full, rows)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] == 1:
        ranges[-2:] = [(ranges[-2][0], full)]
    return ranges


def _blocks(x: torch.Tensor, block: int) -> list[tuple[torch.Tensor, slice]]:
    """`x` as (rows, block) views of its whole blocks, about QUANT_SLICE coordinates per view,
    plus its last partial block, each with the slice of the scale vector it owns. Views, so
    nothing is padded or copied."""
    n = x.numel()
    full = n // block
    out = [(x[lo * block: hi * block].view(hi - lo, block), slice(lo, hi))
           for lo, hi in _row_ranges(full, max(2, QUANT_SLICE // block))]
    if n % block:
        out.append((x[full * block:].view(1, -1), slice(full, full + 1)))
    return out


def _quantize(x: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values in [-127, 127] and per-block float32 scales in [0, MAX_SCALE]."""
    n = x.numel()
    q = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(-(-n // block), dtype=torch.float32)
    for (rows, where), (q_rows, _) in zip(_blocks(x, block), _blocks(q, block)):
        s = scales[where]
        torch.linalg.vector_norm(rows, float("inf"), dim=1, out=s)
        s.div_(_INT8_MAX).clamp_(max=MAX_SCALE)
        # A block whose scale underflows to 0 (max |x| below ~1.5e-43) is sent as zeros.
        divisor = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
        # x / scale is within 127 up to rounding; clamp keeps it in the symmetric int8 range.
        q_rows.copy_(torch.div(rows, divisor).round_().clamp_(-_INT8_MAX, _INT8_MAX))
    return q.numpy(), scales.numpy()


def _dequantize(q: np.ndarray, scales: np.ndarray, block: int, out: torch.Tensor) -> None:
    qt, st = torch.from_numpy(q), torch.from_numpy(scales)
    for (q_rows, where), (out_rows, _) in zip(_blocks(qt, block), _blocks(out, block)):
        torch.mul(q_rows, st[where].unsqueeze(1), out=out_rows)


def _to16(x: torch.Tensor, dtype: torch.dtype, largest: float) -> torch.Tensor:
    h = x.to(dtype)
    return h.clamp_(-largest, largest)  # finite input can round to inf; saturate instead


def _encode_indices(indices: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing indices as (count per chunk, offset within its chunk)."""
    counts = np.bincount(indices // INDEX_CHUNK, minlength=-(-numel // INDEX_CHUNK)).astype("<u4")
    return counts, (indices % INDEX_CHUNK).astype("<u2")


def topk_indices(parts: list[np.ndarray], numel: int) -> np.ndarray:
    """The int64 indices that a top-k payload's first two parts (chunk counts, offsets) encode.
    ProtocolError("bad_payload") unless they are strictly increasing and below `numel`, so each
    is in range and none repeats. The counts are checked against the offsets' length before the
    indices are allocated: a peer cannot make us allocate more than its header announced."""
    counts, offsets = parts[0], parts[1]
    if int(counts.sum(dtype=np.int64)) != offsets.size:
        raise _bad("top-k chunk counts do not add up to k")
    starts = np.arange(counts.size, dtype=np.int64) * INDEX_CHUNK
    indices = np.repeat(starts, counts.astype(np.int64)) + offsets
    # An offset is below INDEX_CHUNK (uint16), so each index lies in the chunk its count gave it;
    # strictly increasing and the last below numel puts all of them in range, each once.
    if not (np.all(indices[1:] > indices[:-1]) and int(indices[-1]) < numel):
        raise _bad("top-k indices not strictly increasing below numel")
    return indices


def _varint_len(value: int) -> int:
    """Bytes of the LEB128 varint of a non-negative int (7 bits a byte)."""
    return max(1, -(-value.bit_length() // 7))


def max_gap_stream(k: int, numel: int) -> int:
    """The most bytes a topk-2bit index stream of k gaps below numel may take: every gap in the
    longest varint, and zlib's worst-case expansion of that (zlib.h's compressBound)."""
    raw = k * _varint_len(numel - 1)
    return raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 13


def _encode_gaps(indices: np.ndarray) -> np.ndarray:
    """Strictly increasing int64 indices as the deflated LEB128 varints of their gaps."""
    gaps = np.diff(indices, prepend=-1) - 1
    lengths = np.ones(gaps.size, dtype=np.int64)
    for bits in range(7, 64, 7):
        lengths += gaps >= (1 << bits)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    raw = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(lengths.max())):
        more = lengths > j
        at, g = starts[more] + j, gaps[more]
        raw[at] = ((g >> (7 * j)) & 0x7F) | np.where(lengths[more] > j + 1, 0x80, 0)
    deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return np.frombuffer(deflater.compress(raw.tobytes()) + deflater.flush(), dtype=np.uint8)


def gap_indices(stream: np.ndarray, k: int, numel: int) -> np.ndarray:
    """The int64 indices a topk-2bit index stream encodes. ProtocolError("bad_payload") unless it
    is one complete zlib stream of exactly k varints, each at most as long as numel - 1 needs,
    with every index below numel. Inflating stops one byte past the most that k such varints can
    take, so a stream that inflates to more is refused without holding more than that in memory."""
    longest = _varint_len(numel - 1)
    most = k * longest
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stream.tobytes(), most + 1)
    except zlib.error as e:
        raise _bad(f"top-k index stream: {e}") from None
    if len(raw) > most:
        raise _bad("top-k index stream inflates to more than k varints")
    if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise _bad("top-k index stream is truncated or has bytes after its end")
    b = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)  # a varint's last byte has its high bit clear
    if ends.size != k or ends[-1] != b.size - 1:
        raise _bad("top-k index stream does not hold exactly k varints")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > longest:
        raise _bad("top-k index gap varint too long")
    position = np.arange(b.size, dtype=np.int64) - np.repeat(starts, lengths)
    gaps = np.add.reduceat((b & 0x7F).astype(np.int64) << (7 * position), starts)
    # Each gap is below 2**(7 * longest) <= 2**35 before this check and below numel after it,
    # so the running sum cannot overflow int64; gaps >= 0 make the indices strictly increasing.
    if int(gaps.max()) >= numel:
        raise _bad("top-k index gap past numel")
    indices = np.cumsum(gaps + 1) - 1
    if int(indices[-1]) >= numel:
        raise _bad("top-k indices past numel")
    return indices


def _two_levels(x: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """2-bit codes (four to a byte, first value in the low bits; bit 1 the sign, bit 0 set for
    the high level) and per block of `block` values the float32 levels (lo, hi) of |x|: two
    rounds of 1-D two-means (split at the mean, then at the midpoint of the two means), each
    value coded with the nearer level. Levels are means of float32 magnitudes, so finite."""
    n = x.numel()
    mags = x.abs().double()  # float64: a block's sum of float32 magnitudes cannot overflow
    levels = torch.empty(2 * -(-n // block), dtype=torch.float64)
    high = torch.empty(n, dtype=torch.bool)
    pairs = levels.view(-1, 2)
    for (rows, where), (high_rows, _) in zip(_blocks(mags, block), _blocks(high, block)):
        split = rows.mean(dim=1, keepdim=True)
        for _ in range(2):
            up = rows > split
            count_up = up.sum(dim=1, keepdim=True)
            count_down = rows.shape[1] - count_up
            sum_up = torch.where(up, rows, 0.0).sum(dim=1, keepdim=True)
            hi = torch.where(count_up > 0, sum_up / count_up.clamp(min=1), split)
            lo = torch.where(count_down > 0, (rows.sum(dim=1, keepdim=True) - sum_up) / count_down.clamp(min=1), hi)
            hi = torch.where(count_up > 0, hi, lo)
            split = (lo + hi) / 2
        high_rows.copy_(rows > split)
        pairs[where, 0], pairs[where, 1] = lo.squeeze(1), hi.squeeze(1)
    codes = high.to(torch.uint8) | (x < 0).to(torch.uint8) << 1
    return _pack2(codes.numpy()), levels.to(torch.float32).numpy()


def _pack2(codes: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-codes.size // 4) * 4, dtype=np.uint8)
    padded[: codes.size] = codes
    quads = padded.reshape(-1, 4)
    return quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6


def _unpack2(packed: np.ndarray, k: int) -> np.ndarray:
    codes = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1).reshape(-1)
    if codes[k:].any():
        raise _bad("top-k 2-bit codes: padding bits set")
    return codes[:k]


# Top-k selection reads the vector this many coordinates at a time, so its work buffers are a
# few MB at any model size (`torch.topk` over the whole vector holds a (value, index) pair per
# coordinate: four copies of the model, and a fifth for the magnitudes).
TOPK_SLICE = 1 << 20


def _magnitude_bits(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns, into `out`: for finite float32 values their order as integers
    is the order of the magnitudes, so the threshold can be found 16 bits at a time."""
    return torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=out)


def _count_from_top(hist: torch.Tensor, count: int) -> tuple[int, int]:
    """(bin, how many of `count` fall in it) for the bin where the `count`-th largest value lies,
    counting from the top bin down."""
    above = torch.flip(hist, [0]).cumsum_(0)
    j = int(torch.searchsorted(above, count))
    return hist.numel() - 1 - j, count - (int(above[j - 1]) if j else 0)


def largest_magnitudes(vec: torch.Tensor, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted int64 indices of the `count` largest |vec| (a contiguous finite float32 vector),
    leaving out the sorted indices `exclude`; of equal magnitudes at the threshold, the lowest
    indices. Three passes over the vector in slices of TOPK_SLICE: the threshold's high 16 bits,
    its low 16 bits, the selection."""
    n = vec.numel()
    buf = torch.empty(min(n, TOPK_SLICE), dtype=torch.int32)
    slices = [(lo, min(lo + TOPK_SLICE, n)) for lo in range(0, n, TOPK_SLICE)]

    def bits(lo: int, hi: int) -> torch.Tensor:
        b = _magnitude_bits(vec[lo:hi], buf[: hi - lo])
        if exclude is not None:
            a, z = torch.searchsorted(exclude, torch.tensor([lo, hi])).tolist()
            b[exclude[a:z] - lo] = -1  # below every magnitude: never counted, never chosen
        return b

    high = torch.zeros(1 << 15, dtype=torch.int64)  # finite magnitudes' bits are below 2^31
    for lo, hi in slices:
        b = bits(lo, hi)
        high += torch.bincount((b[b >= 0] if exclude is not None else b) >> 16, minlength=1 << 15)
    top, need = _count_from_top(high, count)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for lo, hi in slices:
        b = bits(lo, hi)
        low += torch.bincount(b[(b >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom, ties = _count_from_top(low, need)
    threshold = (top << 16) | bottom
    out = torch.empty(count, dtype=torch.int64)
    filled = 0
    for lo, hi in slices:
        b = bits(lo, hi)
        chosen = b > threshold
        if ties:
            equal = torch.nonzero(b == threshold).squeeze(1)[:ties]
            chosen[equal] = True
            ties -= equal.numel()
        idx = torch.nonzero(chosen).squeeze(1)
        out[filled: filled + idx.numel()] = idx + lo
        filled += idx.numel()
    assert filled == count, (filled, count)
    return out


def top_indices(vec: torch.Tensor, k: int, chunk: int = 0) -> torch.Tensor:
    """Sorted int64 indices of the k coordinates a top-k payload keeps (`CompressionSpec.chunk`):
    the k largest magnitudes, of equal magnitudes at the threshold the lowest indices
    (`largest_magnitudes`). With chunks, each whole chunk keeps floor(k · chunk / numel) of its
    largest magnitudes, and the rest of k (the remainders and the last partial chunk's share)
    goes to the largest magnitudes not yet kept, so the count is exactly k and no index repeats."""
    n = vec.numel()
    full = n // chunk if chunk else 0
    per = k * chunk // n if full else 0
    if per == 0:
        return largest_magnitudes(vec, k)
    rows = max(1, TOPK_SLICE // chunk)  # chunks per `torch.topk` call: each row is chosen on its own
    mags = torch.empty(min(full, rows) * chunk, dtype=vec.dtype)
    parts = []
    for lo in range(0, full, rows):
        hi = min(lo + rows, full)
        m = torch.abs(vec[lo * chunk: hi * chunk], out=mags[: (hi - lo) * chunk]).view(hi - lo, chunk)
        _, idx = torch.topk(m, per, dim=1, sorted=False)
        parts.append(idx.add_(torch.arange(lo, hi).mul_(chunk).unsqueeze(1)).reshape(-1))
    kept, _ = torch.sort(torch.cat(parts))
    rest = k - kept.numel()
    if rest:
        kept, _ = torch.sort(torch.cat([kept, largest_magnitudes(vec, rest, exclude=kept)]))
    return kept


def compress(vec: torch.Tensor, spec: CompressionSpec) -> Compressed:
    """Compress a non-empty, finite, 1-D float32 vector (ValueError otherwise)."""
    vec = _check_vector(vec)
    n, method = vec.numel(), spec.method
    header: dict[str, Any] = {"method": method, "numel": n}
    if method == "fp32":
        parts = [vec.numpy().copy()]
    elif method == "fp16":
        parts = [_to16(vec, torch.float16, _FP16_MAX).numpy()]
    elif method == "bf16":
        parts = [_to16(vec, torch.bfloat16, _BF16_MAX).view(torch.int16).numpy().view("<u2")]
    elif method == "int8":
        header["block"] = spec.block
        parts = list(_quantize(vec, spec.block))
    else:
        k = spec.k(n)
        header["k"] = k
        idx = top_indices(vec, k, spec.chunk)
        values = vec[idx]
        if method == "topk-2bit":
            header["block"] = spec.block
            gaps = _encode_gaps(idx.numpy())
            header["index_bytes"] = int(gaps.size)
            parts = [gaps, *_two_levels(values, spec.block)]
        elif method == "topk":
            parts = [*_encode_indices(idx.numpy(), n), _to16(values, torch.float16, _FP16_MAX).numpy()]
        else:
            header["block"] = spec.block
            parts = [*_encode_indices(idx.numpy(), n), *_quantize(values, spec.block)]
    payload = Compressed(header, [np.ascontiguousarray(p) for p in parts])
    assert [(p.dtype, p.shape) for p in payload.parts] == [
        (DTYPES[s.dtype], s.shape) for s in payload.specs]
    return payload


# --- decompression -----------------------------------------------------------------------------


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_payload", detail)


def _check_scales(scales: np.ndarray) -> None:
    # One comparison catches NaN, inf, negative and overflowing scales.
    if not np.all((scales >= 0) & (scales <= MAX_SCALE)):
        raise _bad(f"a scale is not in [0, {MAX_SCALE:.3g}]")


def _check_int8(q: np.ndarray) -> None:
    if q.size and int(q.min()) < -_INT8_MAX:
        raise _bad("int8 value -128")


def _check_finite(out: torch.Tensor, what: str) -> None:
    if not math.isfinite(_max_abs(out)):
        raise _bad(f"{what} value is inf or NaN")


def decompress(header: dict[str, Any], parts: list[np.ndarray], numel: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense float32 vector a payload stands for, written into `out` (a contiguous float32
    tensor of `numel` coordinates that the caller reuses) when given. The header must have passed
    `expected_parts`; this checks it again (cheaply) and checks the parts' contents, raising
    ProtocolError("bad_payload") on any violation. On error `out` holds garbage."""
    _check_numel(numel)
    _check_header(header, numel)
    specs = part_specs(header)
    if [(p.dtype, p.shape) for p in parts] != [(DTYPES[s.dtype], s.shape) for s in specs]:
        raise ValueError("parts do not match the header's specs")
    if out is None:
        out = torch.empty(numel, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (numel,) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({numel},)")
    method = header["method"]
    if method == "fp32":
        out.copy_(torch.from_numpy(parts[0]))
        _check_finite(out, "fp32")
    elif method == "fp16":
        out.copy_(torch.from_numpy(parts[0]))
        _check_finite(out, "fp16")
    elif method == "bf16":
        out.copy_(torch.from_numpy(parts[0].view("<i2")).view(torch.bfloat16))
        _check_finite(out, "bf16")
    elif method == "int8":
        values, scales = parts
        _check_scales(scales)
        _check_int8(values)
        _dequantize(values, scales, header["block"], out)
    elif method == "topk-2bit":
        k = header["k"]
        indices = gap_indices(parts[0], k, numel)
        codes = _unpack2(parts[1], k)
        levels = parts[2]
        if not np.all((levels >= 0) & (levels <= np.finfo(np.float32).max)):
            raise _bad("a 2-bit level is not a finite number >= 0")
        block = header["block"]
        magnitude = levels.reshape(-1, 2)[np.arange(k) // block, codes & 1]
        values = torch.from_numpy(np.where(codes & 2, -magnitude, magnitude))
        out.zero_()
        out.index_copy_(0, torch.from_numpy(indices), values)
    else:
        indices = topk_indices(parts, numel)
        if method == "topk":
            values = torch.from_numpy(parts[2]).to(torch.float32)
            _check_finite(values, "top-k")
        else:
            q, scales = parts[2], parts[3]
            _check_scales(scales)
            _check_int8(q)
            values = torch.empty(q.shape[0], dtype=torch.float32)
            _dequantize(q, scales, header["block"], values)
        out.zero_()
        out.index_copy_(0, torch.from_numpy(indices), values)
    return out


# --- error feedback ----------------------------------------------------------------------------


class ErrorFeedback:
    """Carries what compression dropped into the next round, so it is delayed, not lost.

    Each call compresses target = delta + residual and keeps residual = target - sent, where sent
    is exactly what receivers reconstruct. Hence, up to float32 rounding,
        sent + new residual == delta + old residual,
    and the sum of everything sent plus the residual equals the sum of all deltas. The residual
    belongs with the model in a checkpoint (`state_dict`). With "fp32" it stays zero.
    """

    def __init__(self, numel: int):
        _check_numel(numel)
        self.numel = numel
        self.residual = torch.zeros(numel, dtype=torch.float32)

    def compress(self, delta: torch.Tensor, spec: CompressionSpec) -> tuple[Compressed, torch.Tensor]:
        """Returns (payload, sent): the payload to send and the dense vector receivers will see.
        Raises ValueError, leaving the residual unchanged, if delta is not a finite float32
        vector of `numel` coordinates or if adding it to the residual could overflow."""
        if not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32 or delta.shape != (self.numel,):
            raise ValueError(f"delta must be a float32 tensor of shape ({self.numel},)")
        # Checked before the residual changes: a failed call must not poison it.
        bound = _max_abs(delta) + _max_abs(self.residual)
        if not bound < float(torch.finfo(torch.float32).max):
            raise ValueError("delta holds inf or NaN, or delta + residual could overflow")
        target = self.residual.add_(delta.detach())  # the residual's storage now holds the target
        payload = compress(target, spec)
        sent = decompress(payload.header, payload.parts, self.numel)
        target.sub_(sent)
        return payload, sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        residual = state.get("residual") if isinstance(state, dict) else None
        if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 \
                or residual.shape != (self.numel,):
            raise ValueError(f"error-feedback residual must be a float32 tensor of shape ({self.numel},)")
        if not math.isfinite(_max_abs(residual)):
            raise ValueError("error-feedback residual holds inf or NaN")
        self.residual.copy_(residual)
