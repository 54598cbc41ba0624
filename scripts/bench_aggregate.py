#!/usr/bin/env python3
"""Time an aggregation rule against a plain memory copy of the same bytes.

For each size (n partners x d float32 coordinates) this builds honest-like inputs
(own = randn(d), each partner = own + 0.01 * randn(d)), makes a fresh rule from
`peer.aggregation.AGGREGATORS`, warms it up with one call on a realistic `RoundContext`
(distinct partner ids, a reported 512-dim history sketch per partner, own id), so that the timed
calls see the steady state (partners already known and observed, sketcher built for this d).
The rule writes its result into one output buffer reused across calls (`out=`), as the daemon
calls it; `--fresh-out` times it returning a fresh tensor every call instead (the page faults of
a new d-sized result each round, which the daemon's reused buffer avoids).

Then, `--repeats` times, interleaved: one timed rule call, one timed copy of the n partner
tensors into a preallocated, already-touched n x d buffer (n*d*4 bytes read and written).
Reported: the median of each, their ratio, and the peak extra resident memory of one more
(untimed) rule call: peak RSS during the call (VmHWM, reset just before through
/proc/self/clear_refs) minus the RSS just before it, after malloc_trim; it counts everything the
call allocates and touches, not the inputs, and not the reused output buffer (with `--fresh-out`
it includes the returned d-vector).

Torch runs with 1 intra-op thread unless `--threads` says otherwise, as the daemon does
(`peer join --threads`, default 1); the count is printed.

    .venv/bin/python scripts/bench_aggregate.py                    # default rule, 8/16/32 x 1M/10M
    .venv/bin/python scripts/bench_aggregate.py --rule scc --n 8 --d 1000 --repeats 3
    .venv/bin/python scripts/bench_aggregate.py --sizes 16x10M --json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import statistics
import sys
import time


import torch

from peer.aggregation import AGGREGATORS, DEFAULT_AGGREGATOR, RoundContext, make_aggregator
from peer.aggregation.sybil import SKETCH_DIM

DEFAULT_N = (8, 16, 32)
DEFAULT_D = (1_000_000, 10_000_000)


def parse_count(text: str) -> int:
    """'1000', '1M', '10m', '2.5k', '1e6' -> int."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    value = float(t) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole count: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'8x1M,16x10M' -> [(8, 1000000), (16, 10000000)]."""
    sizes = []
    for item in text.split(","):
        try:
            n, d = item.lower().split("x")
            sizes.append((parse_count(n), parse_count(d)))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"size {item!r} is not NxD (e.g. 16x10M)") from None
    return sizes


# --- memory: resident set size from /proc (torch's allocations are invisible to tracemalloc) ---

_PAGE = None
_LIBC = None


def _rss_bytes() -> int:
    global _PAGE
    if _PAGE is None:
        import resource
        _PAGE = resource.getpagesize()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS, so RSS before a call is what is live."""
    global _LIBC
    gc.collect()
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn) -> int | None:
    """Peak RSS during fn() minus RSS just before; None where /proc can't tell."""
    try:
        _trim()
        if not _reset_hwm():
            return None
        before = _rss_bytes()
        result = fn()
        peak = _hwm_bytes()
        del result
        return max(0, peak - before)
    except (OSError, AttributeError, ValueError):
        return None


# --- the benchmark ---

def make_inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], RoundContext]:
    g = torch.Generator().manual_seed(seed)
    own = torch.randn(d, generator=g)
    others = []
    for _ in range(n):
        x = torch.randn(d, generator=g)
        x.mul_(0.01).add_(own)
        others.append(x)
    partner_ids = [f"partner{j:03d}" for j in range(n)]
    sketches = {p: torch.randn(SKETCH_DIM, generator=g) for p in partner_ids}
    ctx = RoundContext(self_id="self", partner_ids=partner_ids, sketches=sketches)
    return own, others, ctx


def bench_size(rule_name: str, n: int, d: int, repeats: int, warmup: int, reuse_out: bool = True) -> dict:
    own, others, ctx = make_inputs(n, d)
    rule = make_aggregator(rule_name)
    out_buf = torch.zeros_like(own) if reuse_out else None  # the daemon's reused round buffer, touched
    for _ in range(warmup):
        rule(own, others, ctx, out=out_buf)  # steady state: partners known, sketcher built, histories observed

    buf = torch.zeros(n, d)  # preallocated and touched, so the copy pays no page faults

    def copy():
        for j, x in enumerate(others):
            buf[j].copy_(x)

    rule_times, copy_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = rule(own, others, ctx, out=out_buf)
        rule_times.append(time.perf_counter() - t0)
        del out
        t0 = time.perf_counter()
        copy()
        copy_times.append(time.perf_counter() - t0)

    buf = None  # freed: the peak below is the rule's alone
    peak = peak_extra_bytes(lambda: rule(own, others, ctx, out=out_buf))
    rule_s, copy_s = statistics.median(rule_times), statistics.median(copy_times)
    own = others = ctx = rule = out_buf = None  # freed before the next size
    _trim()
    return {
        "n": n, "d": d, "reuse_out": reuse_out, "rule_s": rule_s, "copy_s": copy_s,
        "ratio": rule_s / copy_s if copy_s > 0 else None,
        "peak_extra_mb": None if peak is None else peak / 2**20,
        "rule_s_all": rule_times, "copy_s_all": copy_times,
    }


def _fmt_d(d: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if d >= div and d % div == 0:
            return f"{d // div}{unit}"
    return str(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rule", default=DEFAULT_AGGREGATOR, choices=list(AGGREGATORS), metavar="NAME",
                    help=f"aggregator from the registry (default {DEFAULT_AGGREGATOR}): {', '.join(AGGREGATORS)}")
    ap.add_argument("--n", type=parse_count, nargs="+", default=None, help="partner counts (default 8 16 32)")
    ap.add_argument("--d", type=parse_count, nargs="+", default=None,
                    help="model sizes in float32 coordinates, 1M-style suffixes allowed (default 1M 10M)")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help="explicit NxD list instead of --n x --d, e.g. 8x1M,16x10M")
    ap.add_argument("--repeats", type=int, default=5, help="timed rule/copy pairs per size (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rule calls before timing (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; default 1, as `peer join --threads` (0: torch's default)")
    ap.add_argument("--fresh-out", action="store_true",
                    help="the rule returns a fresh tensor every call instead of writing into a reused buffer")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.sizes and (args.n or args.d):
        ap.error("--sizes replaces --n/--d; give one or the other")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or [(n, d) for d in (args.d or DEFAULT_D) for n in (args.n or DEFAULT_N)]

    threads = torch.get_num_threads()
    if not args.json:
        print(f"rule {args.rule} ({'fresh result tensor' if args.fresh_out else 'result into a reused buffer'}); torch {torch.__version__}, {threads} intra-op thread(s); "
              f"{args.repeats} repeats, {args.warmup} warm-up call(s) per size")
        print("rule_s: median wall time of one rule(own, others, ctx) call, steady state (after warm-up)")
        print("copy_s: median wall time of copying the n partner tensors (n*d*4 bytes) into a preallocated "
              "buffer, timed interleaved with the rule calls")
        print("peak_extra: peak RSS during one more rule call minus RSS before it (inputs excluded, output included)")
        print()
        header = f"{'n':>4} {'d':>6} {'bytes':>9} {'rule_s':>9} {'copy_s':>9} {'ratio':>7} {'copy GB/s':>9} {'peak_extra':>11}"
        print(header)
        print("-" * len(header))

    results = []
    for n, d in sizes:
        r = bench_size(args.rule, n, d, args.repeats, args.warmup, reuse_out=not args.fresh_out)
        results.append(r)
        if not args.json:
            nbytes = n * d * 4
            gbps = 2 * nbytes / r["copy_s"] / 1e9 if r["copy_s"] > 0 else float("inf")
            peak = "?" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f} MB"
            print(f"{n:>4} {_fmt_d(d):>6} {nbytes / 2**20:>6.0f} MB {r['rule_s']:>9.4f} {r['copy_s']:>9.4f} "
                  f"{r['ratio'] or 0:>6.1f}x {gbps:>9.1f} {peak:>11}", flush=True)

    if args.json:
        print(json.dumps({"rule": args.rule, "reuse_out": not args.fresh_out, "threads": threads, "repeats": args.repeats,
                          "warmup": args.warmup, "results": results}))
    else:
        print("\ncopy GB/s counts bytes read + written (2 * n*d*4 / copy_s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
