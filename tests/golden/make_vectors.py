#!/usr/bin/env python3
"""Golden vectors for the aggregation rules, computed by independent reference implementations.

References: ByzFL (EPFL, `byzfl.aggregators`) and Flower (`flwr.server.strategy.aggregate`).
Neither is a dependency of this project; install them in a separate venv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install numpy scipy pytest /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/refvenv/bin/pip install byzfl==0.0.11 --no-deps    # `import byzfl` needs torchvision: we load files
    /tmp/refvenv/bin/pip install flwr==1.41.0
    /tmp/refvenv/bin/python -m tests.golden.make_vectors   # from the repository root; writes tests/golden/aggregators.npz

(torch only because ByzFL's modules import it; the references run on their numpy paths.)

Inputs are float32. The references run on float64 copies of them, so what is stored is (close
to) the exact answer for those float32 inputs, rounded to float32.

Parameter mapping from our functions (peer/aggregation/baselines.py, clipping.py) to the
references, checked here on every case where both references apply:

- mean:          ByzFL Average();   Flower aggregate() with every weight 1.
- median:        ByzFL Median();    Flower aggregate_median().
- trimmed mean:  ours trimmed_mean(x, f) = ByzFL TrMean(f) = Flower aggregate_trimmed_avg with
                 proportiontocut (f + 0.25) / n (Flower cuts int(p * n) = f per side).
- Krum:          ours krum(x, f) scores with the n - f - 2 nearest others (clamped to >= 1), as
                 Flower aggregate_krum(num_malicious=f, to_keep=0). ByzFL Krum(f_b) scores with
                 n - f_b - 1, so ours krum(x, f) = ByzFL Krum(f_b = f + 1) (ByzFL needs 2 f_b < n).
- Multi-Krum:    ours multi_krum(x, f, m) = Flower aggregate_krum(num_malicious=f, to_keep=m).
                 ByzFL MultiKrum(f_b) averages the n - f_b best by n - f_b - 1 neighbours, so
                 ByzFL MultiKrum(f_b) = ours multi_krum(x, f = f_b - 1, m = n - f_b). Our default
                 m (n - f) therefore does NOT equal ByzFL's MultiKrum(f) nor MultiKrum(f + 1).
- geometric median: ours geometric_median(x, nu, iters) = ByzFL GeometricMedian(nu, T=iters)
                 (smoothed Weiszfeld from zero; ByzFL's alpha = 1/n cancels).
- centred clipping: ours CenteredClipping(tau, iters=L, start="zero") called once per round =
                 ByzFL CenteredClipping(L=L, tau=tau) called once per round (its centre self.m
                 persists across calls, starting at zero).

Krum / Multi-Krum cases where the selection is ambiguous (two distinct inputs whose scores differ
by < 1e-6 relative across the selection boundary) are left out for that rule: float32 vs float64
rounding may legitimately pick either.

Layout of the .npz (all lookups by offsets; `manifest` is a JSON string):
  pool_n, pool_d, pool_x (flat float32, case after case, row-major n x d), pool_kind
  <rule>__<ref>__case (pool index), __f, __m (-1: none), __reff (the f given to the reference),
  __nu, __iters (geomed), __out (flat float32, d per case)
  cc_R (rounds per case), cc_d, cc_n (flat, one per round), cc_x (flat), cc_tau, cc_iters,
  cc__byzfl__out (flat float32, R x d per case: the centre after each round)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "golden" / "aggregators.npz"
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed")
KINDS = ("gauss", "offset", "ints", "heavy", "clusters", "same")
TIE_RTOL = 1e-6


# ---------------------------------------------------------------- references


def load_byzfl():
    """ByzFL's aggregator classes, loaded from its files (its package __init__ needs torchvision)."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    before = {k for k in sys.modules if k == "byzfl" or k.startswith("byzfl.")}
    for name, sub in (("byzfl", root), ("byzfl.utils", root / "utils")):
        if name not in sys.modules:  # empty package stubs, so `from byzfl.utils.misc import ...` works
            mod = types.ModuleType(name)
            mod.__path__ = [str(sub)]
            sys.modules[name] = mod
    try:
        file = root / "aggregators" / "aggregators.py"
        mspec = importlib.util.spec_from_file_location("_byzfl_reference_aggregators", file)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:  # leave no stubs behind (the loaded module keeps what it imported)
        for name in [k for k in sys.modules if (k == "byzfl" or k.startswith("byzfl.")) and k not in before]:
            del sys.modules[name]
    return mod


def load_flwr():
    try:
        return importlib.import_module("flwr.server.strategy.aggregate")
    except ImportError:
        return None


def reference_versions() -> dict[str, str]:
    out = {}
    for dist in ("byzfl", "flwr", "numpy", "scipy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class References:
    def __init__(self):
        self.byzfl = load_byzfl()
        self.flwr = load_flwr()

    # every method takes float64 (n, d) arrays and returns a float64 (d,) array
    def mean(self, ref, x):
        if ref == "byzfl":
            return self.byzfl.Average()(x)
        return self.flwr.aggregate([([row], 1) for row in x])[0]

    def median(self, ref, x):
        if ref == "byzfl":
            return self.byzfl.Median()(x)
        return self.flwr.aggregate_median([([row], 1) for row in x])[0]

    def trimmed_mean(self, ref, x, f):
        if ref == "byzfl":
            return self.byzfl.TrMean(f=f)(x)
        return self.flwr.aggregate_trimmed_avg([([row], 1) for row in x], (f + 0.25) / len(x))[0]

    def krum(self, ref, x, f):
        if ref == "byzfl":
            return self.byzfl.Krum(f=f + 1)(x)
        return self.flwr.aggregate_krum([([row], 1) for row in x], f, 0)[0]

    def multi_krum(self, ref, x, f, m):
        if ref == "byzfl":
            assert m == len(x) - f - 1, "ByzFL's Multi-Krum fixes m = n - f_b"
            return self.byzfl.MultiKrum(f=f + 1)(x)
        return self.flwr.aggregate_krum([([row], 1) for row in x], f, m)[0]

    def geomed(self, ref, x, nu, iters):
        return self.byzfl.GeometricMedian(nu=float(nu), T=int(iters))(x)

    def centred_clipping(self, rounds, tau, iters):
        cc = self.byzfl.CenteredClipping(L=int(iters), tau=float(tau))
        outs = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for x in rounds:
                outs.append(np.array(cc(x), dtype=np.float64, copy=True))
        return outs


# ---------------------------------------------------------------- inputs


def _draw_d(rng, dmax):
    if rng.random() < 0.2:
        return int(rng.integers(1, 6))
    return int(min(dmax, max(1, round(math.exp(rng.uniform(0, math.log(dmax)))))))


def make_pool(seed: int, count: int) -> list[tuple[np.ndarray, str]]:
    """Random (n, d) float32 inputs: varied n (odd and even), d, scales, duplicates and outliers."""
    cases = []
    for i in range(count):
        rng = np.random.default_rng([seed, 1, i])
        n = int(rng.integers(1, 3)) if rng.random() < 0.04 else int(rng.integers(3, 31))
        d = _draw_d(rng, 200)
        scale = 10.0 ** rng.uniform(-3, 3)
        kind = KINDS[i % len(KINDS)]
        if kind == "gauss":
            x = rng.normal(0, scale, (n, d))
        elif kind == "offset":  # a large common part: cancellation in differences and sums
            x = rng.normal(0, scale, d) + rng.normal(0, scale * 1e-2, (n, d))
        elif kind == "ints":  # many exact per-coordinate ties and tied distances
            x = rng.integers(-3, 4, (n, d)) * scale
        elif kind == "heavy":
            x = rng.standard_cauchy((n, d)) * scale
        elif kind == "clusters":
            centres = rng.normal(0, scale, (2, d))
            x = centres[rng.integers(0, 2, n)] + rng.normal(0, scale * 0.05, (n, d))
        else:  # every input identical
            x = np.repeat(rng.normal(0, scale, (1, d)), n, 0)
        if n >= 3 and rng.random() < 0.35:  # outliers
            k = int(rng.integers(1, n // 2 + 1))
            rows = rng.choice(n, k, replace=False)
            x[rows] = x[rows] * 10.0 ** rng.uniform(1, 4) + rng.normal(0, scale * 100, (k, d))
        if n >= 2 and rng.random() < 0.3:  # exact duplicates of other inputs
            k = int(rng.integers(1, n // 2 + 1))
            dst = rng.choice(n, k, replace=False)
            x[dst] = x[rng.integers(0, n, k)]
        cases.append((x.astype(np.float32), kind))
    return cases


def make_cc_cases(seed: int, count: int) -> list[dict]:
    """Multi-round centred-clipping cases: drifting honest inputs, outlier rounds, various tau, L."""
    cases = []
    for i in range(count):
        rng = np.random.default_rng([seed, 2, i])
        R = int(rng.integers(3, 6))
        d = _draw_d(rng, 100)
        scale = 10.0 ** rng.uniform(-2, 2)
        mu = rng.normal(0, scale, d)
        rounds = []
        for _ in range(R):
            n = int(rng.integers(1, 21))
            mu = mu + rng.normal(0, scale * rng.choice([0.01, 0.3, 1.0]), d)
            x = mu + rng.normal(0, scale * rng.choice([0.01, 0.1, 1.0]), (n, d))
            if n >= 2 and rng.random() < 0.4:
                k = int(rng.integers(1, (n + 1) // 2 + 1))
                x[:k] = rng.normal(0, scale * 10.0 ** rng.uniform(1, 3), (k, d))
            if n >= 2 and rng.random() < 0.2:
                x[-1] = x[0]
            rounds.append(x.astype(np.float32))
        choice = rng.integers(0, 7)
        if choice == 0:
            tau, iters = 100.0, 1  # ByzFL's defaults
        elif choice == 1:
            tau, iters = math.inf, int(rng.choice([1, 3]))
        else:
            tau = float(scale * math.sqrt(d) * rng.choice([0.03, 0.3, 1.0, 3.0, 30.0]))
            iters = int(rng.choice([1, 2, 3, 5]))
        cases.append(dict(rounds=rounds, d=d, tau=tau, iters=iters))
    return cases


# ---------------------------------------------------------------- Krum ambiguity


def krum_scores64(x: np.ndarray, f: int) -> np.ndarray:
    x = x.astype(np.float64)
    n = len(x)
    if n == 1:
        return np.zeros(1)
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    k = min(max(1, n - f - 2), n - 1)
    return np.sort(dist, 1)[:, :k].sum(1)


def krum_ambiguous(x: np.ndarray, f: int, m: int, argmin: bool = False) -> bool:
    """True if distinct inputs have (nearly) tied scores across the boundary of the m chosen.

    `argmin`: the reference picks with argmin (first index on exact ties), not with a sort
    (Flower's Multi-Krum uses np.argsort, which is not stable for long arrays)."""
    n = len(x)
    if m >= n:
        return False
    s = krum_scores64(x, f)
    order = np.argsort(s, kind="stable")
    lo, hi = s[order[m - 1]], s[order[m]]
    tol = TIE_RTOL * max(abs(hi), 1e-300)
    if hi - lo > tol:
        return False
    group = np.flatnonzero(np.abs(s - lo) <= 2 * tol + (hi - lo))
    if all(np.array_equal(x[group[0]], x[j]) for j in group[1:]):
        return False
    if argmin and m == 1 and min(max(1, n - f - 2), n - 1) == 1 and len(group) == 2:
        # One nearest neighbour: a mutually nearest pair has exactly equal scores (the same
        # symmetric distance) in every implementation, and Krum's argmin takes the first.
        i, j = group
        dist = ((x[i].astype(np.float64) - x[j]) ** 2).sum()
        return not (s[i] == s[j] == dist)
    return True


# ---------------------------------------------------------------- computing entries


def _draw_params(rule, ref, x, rng):
    """Parameters in OUR convention (f, m, nu, iters), or None when the reference can't take the case."""
    n = len(x)
    if rule == "trimmed_mean":
        return dict(f=int(rng.integers(0, (n - 1) // 2 + 1)))
    if rule in ("krum", "multi_krum"):
        if ref == "byzfl":  # ByzFL f_b in 1 .. (n-1)//2, ours f = f_b - 1
            if n < 3:
                return None
            fb = int(rng.integers(1, (n - 1) // 2 + 1))
            p = dict(f=fb - 1)
            if rule == "multi_krum":
                p["m"] = n - fb
        else:
            f = int(rng.integers(0, max(1, n - 1)))
            p = dict(f=f)
            if rule == "multi_krum":
                p["m"] = int(rng.integers(1, n + 1))
        if krum_ambiguous(x, p["f"], p.get("m", 1), argmin=rule == "krum"):
            return None
        return p
    if rule == "geomed":
        scale = float(np.abs(x).max()) or 1.0
        nu = float(rng.choice([0.1, 0.1 * scale, 1e-3 * scale, 1.0]))
        return dict(nu=nu, iters=int(rng.choice([0, 1, 3, 3, 5, 10])))
    return {}


def _reference_call(refs, rule, ref, x64, p):
    if rule in ("mean", "median"):
        return getattr(refs, rule)(ref, x64)
    if rule == "trimmed_mean":
        return refs.trimmed_mean(ref, x64, p["f"])
    if rule == "krum":
        return refs.krum(ref, x64, p["f"])
    if rule == "multi_krum":
        return refs.multi_krum(ref, x64, p["f"], p["m"])
    return refs.geomed(ref, x64, p["nu"], p["iters"])


def available(refs: References) -> list[tuple[str, str]]:
    out = []
    for rule in RULES:
        if refs.byzfl is not None:
            out.append((rule, "byzfl"))
        if refs.flwr is not None and rule != "geomed":
            out.append((rule, "flwr"))
    return out


def compute_entries(refs: References, pool, seed: int) -> dict[tuple[str, str], list[dict]]:
    """For each (rule, reference): the list of {case, params, out} it could produce."""
    entries = {key: [] for key in available(refs)}
    for (rule, ref), rows in entries.items():
        for i, (x, _kind) in enumerate(pool):
            rng = np.random.default_rng([seed, 3, RULES.index(rule), ref == "flwr", i])
            p = _draw_params(rule, ref, x, rng)
            if p is None:
                continue
            x64 = x.astype(np.float64)
            out = np.asarray(_reference_call(refs, rule, ref, x64, p), dtype=np.float64).reshape(-1)
            # both references, where they both take these parameters, must agree
            other = "flwr" if ref == "byzfl" else "byzfl"
            if (rule, other) in entries and (rule != "multi_krum" or p["m"] == len(x) - p["f"] - 1) \
                    and (rule not in ("krum", "multi_krum") or 2 * (p["f"] + 1) < len(x)):
                alt = np.asarray(_reference_call(refs, rule, other, x64, p), dtype=np.float64).reshape(-1)
                tol = 1e-9 * max(1.0, float(np.abs(x64).max()))
                if not np.allclose(out, alt, rtol=1e-9, atol=tol):
                    raise AssertionError(f"{rule}: ByzFL and Flower disagree on pool case {i} with {p}")
            rows.append(dict(case=i, params=p, out=out))
    return entries


def compute_cc(refs: References, cc_cases) -> list[list[np.ndarray]]:
    return [refs.centred_clipping([r.astype(np.float64) for r in c["rounds"]], c["tau"], c["iters"])
            for c in cc_cases]


# ---------------------------------------------------------------- (un)packing


def pack(pool, entries, cc_cases, cc_outs, manifest) -> dict[str, np.ndarray]:
    arrays = {
        "pool_n": np.array([len(x) for x, _ in pool], np.int16),
        "pool_d": np.array([x.shape[1] for x, _ in pool], np.int16),
        "pool_kind": np.array([KINDS.index(k) for _, k in pool], np.int8),
        "pool_x": np.concatenate([x.reshape(-1) for x, _ in pool]).astype(np.float32),
    }
    for (rule, ref), rows in entries.items():
        key = f"{rule}__{ref}"
        arrays[key + "__case"] = np.array([r["case"] for r in rows], np.int16)
        arrays[key + "__f"] = np.array([r["params"].get("f", -1) for r in rows], np.int16)
        arrays[key + "__m"] = np.array([r["params"].get("m", -1) for r in rows], np.int16)
        reff = [r["params"].get("f", -1) + (ref == "byzfl" and rule in ("krum", "multi_krum")) for r in rows]
        arrays[key + "__reff"] = np.array(reff, np.int16)
        if rule == "geomed":
            arrays[key + "__nu"] = np.array([r["params"]["nu"] for r in rows], np.float64)
            arrays[key + "__iters"] = np.array([r["params"]["iters"] for r in rows], np.int16)
        arrays[key + "__out"] = np.concatenate([r["out"] for r in rows]).astype(np.float32)
    if cc_cases:
        arrays["cc_R"] = np.array([len(c["rounds"]) for c in cc_cases], np.int8)
        arrays["cc_d"] = np.array([c["d"] for c in cc_cases], np.int16)
        arrays["cc_n"] = np.array([len(r) for c in cc_cases for r in c["rounds"]], np.int16)
        arrays["cc_x"] = np.concatenate([r.reshape(-1) for c in cc_cases for r in c["rounds"]]).astype(np.float32)
        arrays["cc_tau"] = np.array([c["tau"] for c in cc_cases], np.float64)
        arrays["cc_iters"] = np.array([c["iters"] for c in cc_cases], np.int16)
        arrays["cc__byzfl__out"] = np.concatenate([v for outs in cc_outs for v in outs]).astype(np.float32)
    arrays["manifest"] = np.array(json.dumps(manifest, sort_keys=True))
    return arrays


def unpack(data) -> dict:
    """Inverse of `pack`: {"pool": [x...], "entries": {(rule, ref): [...]}, "cc": [...], "manifest": {...}}."""
    data = {k: data[k] for k in getattr(data, "files", data)}  # an NpzFile decompresses on every lookup
    manifest = json.loads(str(data["manifest"]))
    ns, ds = data["pool_n"].astype(int), data["pool_d"].astype(int)
    offs = np.concatenate([[0], np.cumsum(ns * ds)])
    pool = [data["pool_x"][offs[i]:offs[i + 1]].reshape(ns[i], ds[i]) for i in range(len(ns))]
    entries = {}
    for rule, ref in (tuple(k.split("__")) for k in manifest["entries"]):
        key = f"{rule}__{ref}"
        cases = data[key + "__case"].astype(int)
        out_offs = np.concatenate([[0], np.cumsum(ds[cases])])
        rows = []
        for j, c in enumerate(cases):
            p = {}
            if data[key + "__f"][j] >= 0:
                p["f"] = int(data[key + "__f"][j])
            if data[key + "__m"][j] >= 0:
                p["m"] = int(data[key + "__m"][j])
            if rule == "geomed":
                p["nu"] = float(data[key + "__nu"][j])
                p["iters"] = int(data[key + "__iters"][j])
            rows.append(dict(case=int(c), params=p, ref_f=int(data[key + "__reff"][j]),
                             out=data[key + "__out"][out_offs[j]:out_offs[j + 1]]))
        entries[(rule, ref)] = rows
    cc = []
    if "cc_R" in data:
        Rs, dd, nn = data["cc_R"].astype(int), data["cc_d"].astype(int), data["cc_n"].astype(int)
        xo, oo, r0 = 0, 0, 0
        for i, (R, d) in enumerate(zip(Rs, dd)):
            rounds, outs = [], []
            for n in nn[r0:r0 + R]:
                rounds.append(data["cc_x"][xo:xo + n * d].reshape(n, d))
                xo += n * d
                outs.append(data["cc__byzfl__out"][oo:oo + d])
                oo += d
            r0 += R
            cc.append(dict(rounds=rounds, d=int(d), tau=float(data["cc_tau"][i]),
                           iters=int(data["cc_iters"][i]), outs=outs))
    return dict(pool=pool, entries=entries, cc=cc, manifest=manifest)


def generate(seed: int, pool_size: int, cc_count: int, refs: References | None = None):
    refs = refs or References()
    if refs.byzfl is None and refs.flwr is None:
        raise SystemExit("neither byzfl nor flwr is importable here; see this script's docstring")
    pool = make_pool(seed, pool_size)
    entries = compute_entries(refs, pool, seed)
    cc_cases = make_cc_cases(seed, cc_count) if refs.byzfl is not None else []
    cc_outs = compute_cc(refs, cc_cases) if cc_cases else []
    manifest = dict(
        seed=seed, pool_size=pool_size, versions=reference_versions(), kinds=list(KINDS),
        entries={f"{rule}__{ref}": dict(rule=rule, reference=ref, cases=len(rows))
                 for (rule, ref), rows in entries.items()},
        cc={"reference": "byzfl", "cases": len(cc_cases), "rounds": sum(len(c["rounds"]) for c in cc_cases)},
        krum_tie_rtol=TIE_RTOL,
        conventions="see tests/golden/make_vectors.py docstring",
    )
    return pool, entries, cc_cases, cc_outs, manifest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=20260101)
    ap.add_argument("--pool", type=int, default=300, help="random input sets shared by the one-shot rules")
    ap.add_argument("--cc-cases", type=int, default=240, help="multi-round centred-clipping cases")
    args = ap.parse_args(argv)
    pool, entries, cc_cases, cc_outs, manifest = generate(args.seed, args.pool, args.cc_cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **pack(pool, entries, cc_cases, cc_outs, manifest))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), references {manifest['versions']}")
    for key, e in manifest["entries"].items():
        print(f"  {key:24s} {e['cases']:4d} cases")
    print(f"  {'centred_clipping__byzfl':24s} {manifest['cc']['cases']:4d} cases, {manifest['cc']['rounds']} rounds")


if __name__ == "__main__":
    main()
