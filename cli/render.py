"""Human view of a status object (rich tables); the JSON form is the status object itself."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table


def _duration(seconds: float) -> str:
    """3725 -> '1h 2m', 75 -> '1m 15s', 4 -> '4s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def relay_line(relay: dict[str, Any] | None) -> str | None:
    """status["relay"] in one line: the relays this peer is reachable through and the relay it
    serves for others; None when there is neither (a directly reachable peer, no --relay-service)."""
    from protocols.transport.nat import relay_of

    relay = relay or {}
    parts = []
    through = sorted({relay_of(a) for a in relay.get("relayed_addrs") or []} - {None})
    if through:
        parts.append("reachable through " + ", ".join(f"{r[:12]}…" for r in through))
    served = relay.get("service")
    if served is not None:
        refused = sum(served.get(k, 0) for k in ("reservations_refused", "circuits_refused", "circuits_no_reservation"))
        parts.append(f"serving {served['reservations']} reservations, {served['circuits']} circuits open, "
                     f"{served.get('circuits_opened', 0)} served, {refused} refused")
    return "; ".join(parts) or None


def render_status(s: dict[str, Any]) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("peer", s["peer_id"])
    for a in s["addrs"]:
        head.add_row("address", a)
    relay = relay_line(s.get("relay"))
    if relay:
        head.add_row("relay", relay)
    head.add_row("run / task", f"{s['run_id']} / {s['task']} (shard {s['shard']}, aggregator {s['aggregator']})")
    head.add_row("phase", f"{s['phase']}, up {s['uptime_s']:.0f}s")
    head.add_row("training", f"step {s['step']}  loss {_fmt(s['loss'])}  accuracy {_fmt(s['accuracy'], pct=True)}  {s['samples_per_s']:.0f} samples/s")
    prog = s.get("progress")
    if prog:
        eta = "unknown" if prog["eta_s"] is None else _duration(prog["eta_s"])
        head.add_row("progress", f"{100 * prog['done']:.1f} % of {prog['target_steps']} steps, {eta} left at this rate")
    if s.get("bits_per_byte") is not None:
        head.add_row("held-out", f"loss {_fmt(s.get('test_loss'))} nats/byte, {_fmt(s['bits_per_byte'])} bits/byte")
    head.add_row("gossip", f"{s['rounds_ok']} rounds ok, {s['rounds_failed']} failed, {s.get('rounds_no_partner', 0)} found no partner; "
                           f"sent {_bytes(s['bytes_sent'])}, received {_bytes(s['bytes_received'])}")
    outer = s.get("outer")
    if outer:
        ratio = f", {outer['compression_ratio']:g}x smaller than float32" if outer.get("compression_ratio") else ""
        head.add_row("outer steps", f"step {outer['outer_step']} (every {outer['every_steps']} inner steps, lr {outer['lr']:g}, "
                                    f"momentum {outer['momentum']:g}); sends {outer['compression']}{ratio}")
    elif s.get("gossip_cadence"):
        head.add_row("gossip cadence", s["gossip_cadence"])
    traffic = s.get("traffic")
    if traffic:
        caps = "/".join(_fmt(traffic.get(k)) for k in ("max_upload_mbps", "max_download_mbps"))
        head.add_row("traffic", f"up {_fmt(traffic['upload_mbps'])} / down {_fmt(traffic['download_mbps'])} Mbit/s (caps {caps}); "
                                f"training {_fmt(traffic.get('utilisation'), pct=True)} of the time")
    last = s.get("last_round") or {}
    if last.get("seconds"):
        sec = last["seconds"]
        head.add_row("last round", f"{last.get('kind', 'models')}: compute {sec['compute']:.2f}s, transfer {sec['transfer']:.2f}s, "
                                   f"aggregate {sec['aggregate']:.2f}s; staleness {last.get('staleness') or '-'}")
    swarm = s.get("swarm")
    if swarm:
        acc = swarm.get("accuracy")
        spread = (f"; accuracy best {_fmt(acc['best'], pct=True)}, median {_fmt(acc['median'], pct=True)}, "
                  f"worst {_fmt(acc['worst'], pct=True)}") if acc else ""
        head.add_row("swarm", f"{swarm['peers']} peers with this one, {swarm['samples_per_s']:.0f} samples/s in total{spread}")
    rej = ", ".join(f"{k} {v}" for k, v in {**s["rejected"], **s["pull_failed"]}.items()) or "none"
    head.add_row("rejected / failed", rej)
    refused = {**s.get("serve_errors", {}), **s.get("record_rejects", {}), **s.get("dht_rejects", {})}
    head.add_row("refused (serving, records)", ", ".join(f"{k} {v}" for k, v in refused.items()) or "none")
    rpcs = (s.get("dht_rpcs") or {}).get("rpcs") or {}
    if rpcs:  # DHT RPCs other peers sent us: only what was not served in full is worth a glance
        head.add_row("DHT requests", "; ".join(
            f"{rpc} {c.get('requests', 0)}" + "".join(f", {k} {v}" for k, v in c.items() if v and k not in ("requests", "served"))
            for rpc, c in rpcs.items()))
    banned = s.get("banned", {})
    head.add_row("banned peers", ", ".join(f"{p[:12]}… {t:.0f}s" for p, t in banned.items()) or "none")
    ck = s["checkpoint"]
    head.add_row("checkpoint", f"step {ck['step']} ({_fmt(ck['age_s'])}s ago), errors {ck['errors']}" if ck["step"] is not None else "none yet")

    peers = Table(title=f"live peers in run {s['run_id']}: {len(s['live_peers'])}", title_justify="left")
    for col in ("peer", "step", "samples/s", "last seen", "score"):
        peers.add_column(col)
    reputation = s.get("reputation", {})
    backing_off = set(s.get("backing_off", ()))
    for p in s["live_peers"]:
        mark = " (backing off)" if p["peer_id"] in backing_off else ""
        peers.add_row(p["peer_id"] + mark, str(p["step"]), f"{p['samples_per_s']:.0f}", f"{p['last_seen_s']:.0f}s ago",
                      _fmt(reputation.get(p["peer_id"], {}).get("score", 1.0)))
    return Group(head, peers)
