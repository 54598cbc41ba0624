#!/usr/bin/env python3
"""Long fuzz run over every decoder and handler a stranger can reach (figures go in SECURITY.md).

    scripts/fuzz.py [--cases 100000] [--seed 0] [--json]

Targets (peer/bench/fuzz_targets.py, the same ones the hypothesis tests drive briefly):
  header   the msgpack header decoder
  reply    what a pulling peer does with a reply (header, tensor specs, payload)
  request  what the model server does with a request, up to answering
  record   a DHT peer record through the check every node applies, and the swarm view
  serve    the daemon's real model-server handler (reputation, limits, counters included)
  control  the daemon's control-API handler
  dht      our DHT node's real record validator (RSA signature + RunRecordValidator)
Inputs are, in turn, random bytes, mutations of a valid message (bit flips, inserts, deletes,
truncation, tampered length prefixes, msgpack edge markers) and records with one field replaced by
a wrong type or size. A case fails if it raises anything but the target's own refusal, or breaks
an allocation bound. The run prints cases, outcomes by reason, failures, and cases per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import traceback
from collections import Counter

import msgpack

from peer.bench import fuzz_targets as ft
from protocols.codec import ProtocolError
from protocols.reputation import Reputation


def _reply_reason(sent: bytes) -> str:
    """What the server answered (its refusal reason), from the bytes it wrote back."""
    if len(sent) < 4:
        return "closed"
    header = msgpack.unpackb(sent[4 : 4 + int.from_bytes(sent[:4], "big")])
    return f"answered_{header.get('reason', header.get('type'))}"


def _input(rng: random.Random, seed_msg: bytes) -> bytes:
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randrange(0, 2048))
    return ft.mutate(seed_msg, rng)


async def run(cases: int, seed: int) -> dict:
    rng = random.Random(seed)
    harness = ft.DaemonHarness()
    seeds = {
        "header": ft.valid_request()[4:], "reply": ft.valid_reply(), "request": ft.valid_request(),
        "record": msgpack.packb(ft.valid_record(), use_bin_type=True), "serve": ft.valid_request(),
    }
    names = ["header", "reply", "request", "record", "serve", "control", "dht"]
    validator = ft.ValidatorHarness()
    outcomes: dict[str, Counter] = {n: Counter() for n in names}
    failures: list[dict] = []
    started = time.perf_counter()
    try:
        for i in range(cases):
            name = names[i % len(names)]
            if name == "dht":
                v = validator.valid
                parts = [v.key, v.subkey, v.value]
                which = rng.randrange(4)
                if which < 3:
                    parts[which] = _input(rng, parts[which])
                else:
                    parts[1], parts[2] = rng.randbytes(rng.randrange(300)), rng.randbytes(rng.randrange(3000))
                payload = tuple(parts)
            elif name == "control":
                payload = rng.choice([{"cmd": rng.choice(["status", "bogus", None, 1, "x" * 300])}, {}, {"cmd": "status", "x": [1] * 50}])
            elif name == "record" and rng.random() < 0.4:
                payload = ft.record_variants(rng)
            else:
                payload = _input(rng, seeds[name])
            try:
                if name == "header":
                    ft.header_decoder(payload)
                elif name in ("reply", "request"):
                    await ft.TARGETS[name](payload)
                elif name == "record":
                    outcomes[name][ft.record_decoder(payload)] += 1
                    continue
                elif name == "dht":
                    before = dict(validator.run.rejected)
                    ok = validator.validate(*payload, v.expiration_time)
                    changed = [k for k in validator.run.rejected if validator.run.rejected[k] != before.get(k, 0)]
                    outcomes[name]["accepted" if ok else (changed[0] if changed else "bad_signature")] += 1
                    continue
                elif name == "serve":
                    if i % 6000 == 4:  # forget old fuzzer identities, so bans do not hide the parser
                        harness.daemon.core.reputation = Reputation()
                    # mostly fresh identities (parsing), sometimes a repeat offender (bans)
                    peer = f"fuzzer{i}" if rng.random() < 0.9 else f"repeat{rng.randrange(10)}"
                    ended_before = sum(harness.daemon.stats.serve_errors.values()) + harness.daemon.counters["serves"]
                    sent = await harness.serve(payload, peer=peer)
                    if harness.daemon.core.serving or harness.daemon.core.serving_by_peer:
                        raise AssertionError("serving slot leaked")
                    if sum(harness.daemon.stats.serve_errors.values()) + harness.daemon.counters["serves"] != ended_before + 1:
                        raise AssertionError("a request did not end as exactly one serve or one counted refusal")
                    outcomes[name][_reply_reason(sent)] += 1
                    continue
                else:
                    await harness.control(payload)
                outcomes[name]["accepted"] += 1
            except ProtocolError as e:
                outcomes[name][e.reason] += 1
            except asyncio.IncompleteReadError:
                outcomes[name]["ended_early"] += 1
            except Exception as e:  # noqa: BLE001 -- a bug: anything else, including a broken allocation bound
                outcomes[name]["FAILURE"] += 1
                if len(failures) < 20:
                    failures.append({"target": name, "input": payload.hex()[:400] if isinstance(payload, bytes) else repr(payload)[:400],  # noqa: E501
                                     "error": "".join(traceback.format_exception_only(e)).strip()})
    finally:
        harness.close()
    elapsed = time.perf_counter() - started
    d = harness.daemon
    if len(d.stats.serve_errors) > 32 or any(len(k) > 40 for n in outcomes.values() for k in n):
        failures.append({"target": "counters", "input": "", "error": "counter names not bounded (peer input echoed?)"})
        outcomes["serve"]["FAILURE"] += 1
    return {
        "cases": cases, "seed": seed, "seconds": round(elapsed, 1), "cases_per_s": round(cases / elapsed),
        "failures": sum(c["FAILURE"] for c in outcomes.values()), "failure_examples": failures,
        "outcomes": {n: dict(c.most_common()) for n, c in outcomes.items()},
        "server_counters": {"serves": d.counters["serves"], "serve_errors": dict(d.stats.serve_errors),
                            "bans": d.core.reputation.bans_total},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    import logging

    logging.getLogger("peer").setLevel(logging.ERROR)  # the server logs one line per refusal
    result = asyncio.run(run(args.cases, args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['cases']} cases in {result['seconds']} s ({result['cases_per_s']}/s), seed {result['seed']}: "
              f"{result['failures']} failures")
        for name, counts in result["outcomes"].items():
            print(f"  {name:8s} " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"  server counters: {result['server_counters']}")
        for f in result["failure_examples"]:
            print(f"  FAILURE {f['target']}: {f['error']} on {f['input'][:120]}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
