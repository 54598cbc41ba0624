#!/usr/bin/env python3
"""Run a scenario of real `peer join` daemons on 127.0.0.1 with churn, attackers and slow peers.

    scripts/experiment.py scripts/scenarios/churn.toml [--out DIR] [--duration S] [--allow-unshaped] [--shaper auto|netem|switch]
    scripts/experiment.py --collect DIR      # summarise data dirs (this runner's, or gathered elsewhere)

Each peer is a real daemon (real p2pd, real protocol, real training) started through
`peer/launcher.py`. The runner follows the scenario's churn schedule (SIGKILL or graceful
`peer leave`, coming back with the same data dir or a fresh one), starts attackers
(`--experiment-attack`) when the scenario says, throttles slow peers (`step_delay_s`), shows live
counts, then asks everyone to leave and writes DIR/summary.json, DIR/summary.md and PNG plots
(peer/experiment/collect.py). What it did goes to DIR/events.jsonl; every peer's own JSON lines
are in DIR/peers/<name>/metrics.jsonl. Run it under `flock /tmp/peer-heavy.lock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path


from peer.experiment import network  # noqa: E402
from peer.experiment.collect import collect  # noqa: E402
from peer.experiment.scenario import Scenario, ScenarioError, churn_schedule, load_scenario  # noqa: E402
from peer.launcher import LocalPeer, PeerProcessError  # noqa: E402


class Slot:
    """One peer of the scenario across its lives (each life one process, maybe a fresh data dir)."""

    def __init__(self, index: int, role: str, base_dir: Path, args: list[str]):
        self.index, self.role, self.base_dir, self.args = index, role, base_dir, args
        self.lives = 0
        self.peer: LocalPeer | None = None
        self.state = "down"  # down, starting, up, leaving, killed
        self.expected_exit = False

    @property
    def name(self) -> str:
        return self.peer.data_dir.name if self.peer else self.base_dir.name


class Runner:
    def __init__(self, sc: Scenario, out: Path, quiet: bool = False, net: network.Plan | None = None):
        self.sc, self.out, self.quiet = sc, out, quiet
        self.netns: network.Namespaces | None = None
        self.where: dict[int, tuple[list[str], str]] = {}  # slot -> (command prefix, listen address)
        if net is not None and net.via is not None:
            self.netns = network.Namespaces(via=net.via, seed=sc.seed)
            try:
                self.netns.up()
                for i in range(sc.total_peers):
                    c = net.conditions.get(i, network.Condition())
                    self.where[i] = self.netns.add(i, c.delay_ms, c.rate_mbit, c.loss_pct)
                self.netns.start()
            except BaseException:  # a failed command, or Ctrl-C while setting up: leave nothing behind
                self.netns.down()
                raise
        self.events_file = open(out / "events.jsonl", "a")
        self.t0 = time.time()
        self.counts = {"joins": 0, "leaves": 0, "kills": 0, "crashes": 0}
        self.slots = [self._slot(i) for i in range(sc.total_peers)]
        self.statuses: dict[int, dict] = {}

    def _slot(self, i: int) -> Slot:
        sc = self.sc
        role = sc.role(i)
        cfg = {k.replace("_", "-"): v for k, v in sc.peer_settings.items()}
        throttle = sc.settings_for(i)
        if throttle.step_delay_s:
            cfg["step-delay-s"] = throttle.step_delay_s
        conf = self.out / "config" / f"p{i}.toml"
        conf.parent.mkdir(exist_ok=True)
        conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))
        args = ["--run-id", f"exp-{sc.name}-{os.getpid()}", "--task", sc.task, "--config", str(conf), "--split", sc.split,
                "--alpha", str(sc.alpha)]
        if sc.aggregator:
            args += ["--aggregator", sc.aggregator]
        if role == "attacker":
            from peer.experiment.attacks import TARGETED

            args += ["--experiment-attack", sc.attack.name]
            # Sybils of the targeted attacks all train alike on the whole set (as scripts/robustness.py)
            args += ["--shard", "0/1", "--split", "iid"] if sc.attack.name in TARGETED else ["--shard", f"{i % sc.peers}/{sc.peers}"]
        else:
            args += ["--shard", f"{i}/{sc.peers}"]
        return Slot(i, role, self.out / "peers" / f"p{i}", args)

    # --- bookkeeping -----------------------------------------------------------------------
    def log(self, action: str, slot: Slot | None = None, **kw) -> None:
        line = {"time": time.time(), "t": round(time.time() - self.t0, 2), "action": action, **kw}
        if slot is not None:
            line.update(peer=slot.name, slot=slot.index, role=slot.role)
        self.events_file.write(json.dumps(line) + "\n")
        self.events_file.flush()

    def bootstrap_addrs(self, exclude: Slot) -> list[str]:
        ups = [s for s in self.slots if s is not exclude and s.state == "up" and s.peer and s.peer.addrs]
        ups.sort(key=lambda s: (s.role != "honest", s.index))
        return [s.peer.addrs[0] for s in ups[:3]]

    # --- actions ---------------------------------------------------------------------------
    def start(self, slot: Slot) -> None:
        if slot.lives and not self.sc.churn.keep_identity:
            data = slot.base_dir.with_name(f"{slot.base_dir.name}.{slot.lives}")  # a fresh identity and no checkpoint
        else:
            data = slot.base_dir
        prefix, addr = self.where.get(slot.index, ([], "127.0.0.1"))
        slot.peer = LocalPeer(data, slot.args, listen=f"/ip4/{addr}/tcp/0", prefix=prefix)
        boot = self.bootstrap_addrs(slot)
        slot.peer.start([a for b in boot for a in ("--initial-peer", b)])
        slot.lives += 1
        slot.state, slot.expected_exit = "starting", False
        if slot.lives > 1:
            self.counts["joins"] += 1
        self.log("start", slot, life=slot.lives, pid=slot.peer.proc.pid)

    def kill(self, slot: Slot) -> None:
        slot.expected_exit = True
        slot.peer.proc.kill()
        slot.state = "killed"
        self.counts["kills"] += 1
        self.log("kill", slot)

    def leave(self, slot: Slot) -> None:
        slot.expected_exit = True
        slot.peer.request_leave()
        slot.state = "leaving"
        self.counts["leaves"] += 1
        self.log("leave", slot)

    def poll(self) -> None:
        """Reap exits (an exit nobody asked for, or a failed graceful leave, is a crash) and
        read every running daemon's status. A network that stopped working ends the run: peers
        cut off from each other would measure nothing the scenario asked for."""
        if self.netns is not None and (broken := self.netns.failure()):
            raise PeerProcessError(f"network: {broken}")
        for s in self.slots:
            if s.peer is None or s.state == "down":
                continue
            if not s.peer.alive:
                code = s.peer.proc.returncode
                if not s.expected_exit or (s.state == "leaving" and code != 0):
                    self.counts["crashes"] += 1
                    self.log("crash", s, exit_code=code, log_tail=s.peer.log_tail(8))
                s.state = "down"
                self.statuses.pop(s.index, None)
                continue
            st = s.peer.status()
            if st is not None:
                self.statuses[s.index] = st
                if s.state == "starting" and st.get("phase") == "training":
                    s.peer.peer_id, s.peer.addrs = st["peer_id"], st["addrs"]
                    s.state = "up"

    def apply(self, ev) -> bool:
        """Do one scheduled event now if the peer's state allows; False means try again later."""
        slot = self.slots[ev.peer]
        if ev.action == "join":
            if slot.state == "down":
                self.start(slot)
                return True
            return slot.state not in ("leaving", "killed")  # still exiting: wait; already up: drop
        if slot.state not in ("up", "starting"):
            self.log("skipped", slot, wanted=ev.action)
            return True
        (self.kill if ev.action == "kill" else self.leave)(slot)
        return True

    # --- the run ---------------------------------------------------------------------------
    def wait_up(self, slots: list[Slot], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(s.state != "up" for s in slots):
            self.poll()
            dead = [s for s in slots if s.state == "down"]
            if dead:
                raise PeerProcessError(f"{dead[0].name} exited while starting:\n{dead[0].peer.log_tail()}")
            if time.monotonic() > deadline:
                late = [s.name for s in slots if s.state != "up"]
                raise PeerProcessError(f"{late} not training after {timeout:.0f}s:\n{self.slots[0].peer.log_tail()}")
            time.sleep(0.3)

    def run(self, network_notice: str | None) -> None:
        sc = self.sc
        honest = [s for s in self.slots if s.role == "honest"]
        attackers = [s for s in self.slots if s.role == "attacker"]
        self.start(honest[0])
        self.wait_up(honest[:1], 120)
        for s in honest[1:] + (attackers if sc.attack.start_s <= 0 else []):
            self.start(s)
        self.wait_up(honest[1:], 180)
        self.t0 = time.time()  # scenario time starts when the honest swarm is up
        schedule = churn_schedule(sc)
        self.log("run_start", scenario=sc.to_dict(), schedule=[asdict(e) for e in schedule], cpus=os.cpu_count(),
                 load=[round(x, 2) for x in os.getloadavg()], network=network_notice or "none requested")
        pending = list(schedule)
        attack_started = sc.attack.start_s <= 0
        if attack_started and attackers:
            self.log("attack_start", attack=sc.attack.name, count=len(attackers))
        with self.display() as update:
            while (now := time.time() - self.t0) < sc.duration_s:
                if not attack_started and now >= sc.attack.start_s:
                    for s in attackers:
                        self.start(s)
                    attack_started = True
                    self.log("attack_start", attack=sc.attack.name, count=len(attackers))
                pending = [ev for ev in pending if ev.at > now or not self.apply(ev)]
                self.poll()
                update(now)
                time.sleep(0.5)

    def shutdown(self) -> None:
        """Every peer still running leaves gracefully (SIGKILL after 60 s); nobody is left behind."""
        self.log("stop", load=[round(x, 2) for x in os.getloadavg()])  # leaves after this are not churn
        for s in self.slots:
            if s.peer is not None and s.peer.alive and s.state != "leaving":
                s.expected_exit = True
                s.state = "leaving"
                s.peer.request_leave()
        for s in self.slots:
            if s.peer is None:
                continue
            try:
                code = s.peer.wait_exit(60)
                if code != 0 and s.state == "leaving":
                    self.log("crash", s, exit_code=code, log_tail=s.peer.log_tail(8))
            except PeerProcessError as e:
                self.log("crash", s, exit_code=None, log_tail=str(e)[-400:])
            s.state = "down"
        if self.netns is not None:
            stats = self.netns.down()
            if stats is not None:
                self.log("network_stats", switch=stats)  # packets forwarded, lost, dropped at a full queue
        self.log("run_end")
        self.events_file.close()

    def display(self):
        """A rich progress bar with live counts; a line every 30 s when not on a terminal."""
        import contextlib

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        runner = self

        @contextlib.contextmanager
        def ctx():
            progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                                TimeElapsedColumn(), disable=runner.quiet, transient=False)
            task = progress.add_task(runner.sc.name, total=runner.sc.duration_s, counts="")
            last_line = [0.0]

            def update(now: float) -> None:
                up = sum(s.state == "up" for s in runner.slots)
                accs = [st["accuracy"] for i, st in runner.statuses.items()
                        if runner.slots[i].role == "honest" and runner.slots[i].state == "up" and st.get("accuracy") is not None]
                mean = f"{100 * sum(accs) / len(accs):.1f}%" if accs else "-"
                c = runner.counts
                counts = (f"up {up}/{len(runner.slots)}  joins {c['joins']}  leaves {c['leaves']}  kills {c['kills']}  "
                          f"crashes {c['crashes']}  honest acc {mean}")
                progress.update(task, completed=min(now, runner.sc.duration_s), counts=counts)
                if runner.quiet and now - last_line[0] >= 30:
                    last_line[0] = now
                    print(f"[{now:5.0f}s] {counts}", file=sys.stderr, flush=True)

            with progress:
                yield update

        return ctx()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("scenario", nargs="?", type=Path, help="scenario TOML (scripts/scenarios/*.toml)")
    ap.add_argument("--out", type=Path, help="run directory (default runs/experiments/<name>-<time>)")
    ap.add_argument("--duration", type=float, help="override the scenario's duration_s")
    ap.add_argument("--seed", type=int, help="override the scenario's seed (the churn schedule)")
    ap.add_argument("--collect", type=Path, metavar="DIR", help="only summarise DIR (data dirs from a run or gathered elsewhere)")
    ap.add_argument("--print-schedule", action="store_true",
                    help='print the churn schedule as "SECONDS ACTION SLOT" lines (for deploy/k8s/churn.sh) and exit')
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no live display; a progress line every 30 s on stderr")
    ap.add_argument("--allow-unshaped", action="store_true",
                    help="run even when some network condition cannot be applied here (named in one line); default: refuse, exit 2")
    ap.add_argument("--shaper", choices=network.SHAPERS, default="auto",
                    help="how to apply delay/loss: auto (tc netem where the kernel has it, else the userspace delay switch), "
                         "netem (tc only), switch (the delay switch for every condition, caps included)")
    args = ap.parse_args()

    if args.collect:
        try:
            summary = collect(args.collect, plots=not args.no_plots)
        except (FileNotFoundError, ValueError) as e:
            print(f"experiment: {e}", file=sys.stderr)
            return 2
        print((args.collect / "summary.md").read_text())
        return 1 if summary["honest_crashed"] else 0
    if args.scenario is None:
        ap.error("give a scenario file, or --collect DIR")
    try:
        sc = load_scenario(args.scenario)
    except ScenarioError as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    if args.duration:
        sc.duration_s = args.duration
    if args.seed is not None:
        sc.seed = args.seed
    if args.print_schedule:
        print(f"# {sc.name}: seed {sc.seed}, {sc.duration_s:.0f} s; slot K is pod peer-K")
        for ev in churn_schedule(sc):
            print(f"{ev.at:.2f} {ev.action} {ev.peer}")
        return 0
    out = args.out or Path("runs/experiments") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        print(f"experiment: {out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2

    # Every condition the scenario asks for is applied, or named in one line with the reason:
    # a run is refused (exit 2) rather than quietly measuring an unshaped network.
    asked = {}
    for i in range(sc.total_peers):
        g = sc.settings_for(i)
        asked[i] = network.Condition(g.delay_ms, g.rate_mbit, g.loss_pct)
    net = network.plan(asked, args.shaper)
    notices = []
    if net.missing:
        what = f"network conditions {network.Plan.describe(net.missing)} cannot be applied: {net.why}"
        if not args.allow_unshaped:
            print(f"experiment: {what}; refusing to start (--allow-unshaped runs without them)", file=sys.stderr)
            return 2
        print(f"{what}; running without them (--allow-unshaped)", file=sys.stderr)
        notices.append(f"not applied (--allow-unshaped): {network.Plan.describe(net.missing)}: {net.why}")
    (out / "peers").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.scenario, out / "scenario.toml")
    print(f"experiment {sc.name}: {sc.peers} honest + {sc.attack.count} attackers, {sc.duration_s:.0f} s, data in {out}",
          file=sys.stderr)
    try:
        runner = Runner(sc, out, quiet=args.quiet, net=net)
    except (RuntimeError, OSError) as e:
        print(f"experiment: setting up network namespaces failed: {e}", file=sys.stderr)
        return 1
    if runner.netns is not None:
        where = ("veth pairs on a bridge, 10.231.0.0/16, shaped with tc" if net.via == "bridge" else
                 "TUN devices, 10.232.0.0/16, through the userspace delay switch (peer/experiment/delayswitch.py)")
        notices.insert(0, f"applied: {network.Plan.describe(net.conditions)}; every peer in its own namespace, {where}")
        print(f"network conditions {notices[0]}", file=sys.stderr)
    notice = "; ".join(notices) or None
    def terminated(*_):  # `kill`, a CI timeout: stop the peers as Ctrl-C does, leave nothing behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        runner.run(notice)
    except KeyboardInterrupt:
        print("interrupted: stopping every peer", file=sys.stderr)
    except PeerProcessError as e:
        print(f"experiment: {e}", file=sys.stderr)
        runner.shutdown()
        return 1
    finally:
        if not runner.events_file.closed:
            print("asking every peer to leave ...", file=sys.stderr)
            runner.shutdown()
    summary = collect(out, plots=not args.no_plots)
    print((out / "summary.md").read_text())
    print(f"written: {out}/summary.json, summary.md, accuracy.png, bytes.png", file=sys.stderr)
    return 1 if summary["honest_crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
