"""Local training loop, in its own thread so the event loop stays responsive (torch releases the GIL).

All parameters are views into one flat float32 tensor, so a snapshot for a partner is one copy
and mixing in the aggregated model is one add. `version` counts every change to that tensor (a
step, a mix, a load), so a snapshot taken at a version is still the model while it is unchanged
(`peer/snapshots.py` serves partners from such snapshots). Everything that writes the flat tensor
goes through the methods below, under `lock`, and bumps `version`. Gossip never waits for training to finish:
it snapshots, aggregates outside the lock, and applies `new - snapshot` as a delta, keeping the
local steps taken meanwhile.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import torch

from peer.cadence import RoundBacklog, StepCadence
from peer.tasks import Task

log = logging.getLogger("peer.trainer")


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Re-point every parameter at a slice of one flat buffer; returns the buffer."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset : offset + n].copy_(p.data.reshape(-1))
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


def lower_thread_priority(nice: int) -> int | None:
    """Run the calling thread at niceness `nice` (never raising its priority); returns the niceness
    it now has, or None where per-thread priorities are not supported.

    Volunteer computing runs its compute at low priority (as BOINC does) so the machine's owner,
    the daemon's own networking, and a peer that is starting up are served first; on Linux a
    thread is a task with its own nice value. Training throughput on an otherwise idle core is
    unchanged: niceness only matters when something else wants the CPU.
    """
    if not sys.platform.startswith("linux"):
        return None  # elsewhere PRIO_PROCESS with a thread id would name a process, or nothing
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as e:  # a sandbox forbidding it: train at the normal priority
        log.info("training thread priority unchanged: %s", e)
        return None


class FairLock:
    """A mutex granted in the order it was asked for.

    The training thread takes the trainer's lock for every step and asks again as soon as it
    lets go. `threading.Lock` makes no promise of order, so the thread that releases it can win
    the race to take it again, step after step, while another thread (a round's snapshot, a
    heartbeat's history sketch) waits. Here a waiter is served after at most the step in
    progress (`scripts/bench_lock.py` measures both)."""

    def __init__(self) -> None:
        self._turns = threading.Condition(threading.Lock())
        self._issued = 0  # tickets handed out
        self._serving = 0  # the ticket that may hold the lock

    def acquire(self) -> None:
        with self._turns:
            ticket = self._issued
            self._issued += 1
            while ticket != self._serving:
                self._turns.wait()

    def release(self) -> None:
        with self._turns:
            self._serving += 1
            self._turns.notify_all()

    def queued(self) -> int:
        """Threads holding or waiting for the lock."""
        with self._turns:
            return self._issued - self._serving

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# weight of the newest 1 s window in the reported samples/s: an evaluation, a checkpoint or a
# gossip round's aggregation takes CPU from training for a moment, and `peer status` refreshing
# every second would otherwise jump with each of them
RATE_SMOOTHING = 0.3


def smoothed_rate(previous: float, window: float) -> float:
    """Samples/s after one more 1 s window: an exponential moving average (the first window as is)."""
    return window if previous <= 0 else (1 - RATE_SMOOTHING) * previous + RATE_SMOOTHING * window


class Trainer:
    def __init__(self, task: Task, seed: int = 0, eval_every_s: float = 2.0, max_steps: int | None = None,
                 step_delay_s: float = 0.0, warmup_steps: int = 50, nice: int = 0):
        torch.manual_seed(seed)  # every peer of a run starts from the same weights
        self.task = task
        self.model = task.make_model()
        self.flat = flatten_parameters(self.model)
        # history = sum of this peer's own local updates = flat - base, where base is the start
        # plus everything mixed in (every change that was not a local step goes into both flat and
        # base): one vector, and a training step costs nothing extra (SybilWall compares these).
        self.base = self.flat.clone()
        self.optimizer = task.make_optimizer(list(self.model.parameters()))
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # Fresh optimizer moments (new peer, restart) take large first steps: ramp the rate up.
        self.warmup_steps = warmup_steps
        self.lock = FairLock()
        self.step = 0
        self.version = 0  # bumped (under the lock) by every change to `flat`
        self.samples = 0
        self.last_loss: float | None = None
        self.metrics: dict[str, float] = {}
        self.samples_per_s = 0.0
        self.steps_per_s = 0.0  # smoothed like samples_per_s; status's ETA reads it (never task.batch_size,
        # which a task may compute, or block in, on the training thread's behalf)
        self.eval_every_s = eval_every_s
        self.max_steps = max_steps
        self.step_delay_s = step_delay_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self.error: BaseException | None = None
        self.local_steps = 0  # steps since this trainer started (the warmup counts these)
        self.requested_nice = nice  # the training thread's niceness (0: the process's own)
        self.nice: int | None = None  # what it got, once the thread runs
        # called from the training thread after a step when `step_cadence` says a gossip round is
        # due (peer/cadence.py; the daemon starts one); must be thread-safe and quick
        self.step_cadence: StepCadence | None = None
        self.on_steps: Callable[[], None] | None = None
        # with a backlog bound (peer/cadence.py) the loop waits before a step while too many of
        # the rounds it asked for are unfinished; `round_finished` is the daemon's answer
        self.round_backlog: RoundBacklog | None = None
        self._backlog_changed = threading.Condition()
        self.round_wait_seconds = 0.0  # time the loop spent waiting for rounds
        self.waiting_for_round = False
        self._eval_model: torch.nn.Module | None = None  # a copy evaluated outside the lock (1x the model)
        self._eval_flat: torch.Tensor | None = None
        self.eval_seconds = 0.0  # the last evaluation's duration
        # wall time spent in training steps, waits for the lock included (utilisation = its rate)
        self.train_seconds = 0.0
        self._eval_lock = threading.Lock()

    # --- state shared with the event loop -------------------------------------------------
    def seed_batches(self, seed: int) -> None:
        """Restart the order in which training batches are drawn from `seed`."""
        self._gen.manual_seed(seed)

    def snapshot(self) -> torch.Tensor:
        with self.lock:
            return self.flat.clone()

    def copy_into(self, out: torch.Tensor) -> tuple[int, int]:
        """Copy the model into `out` (no new memory); returns the (version, step) it had."""
        with self.lock:
            out.copy_(self.flat)
            return self.version, self.step

    def apply_delta(self, delta: torch.Tensor) -> None:
        with self.lock:
            self.flat.add_(delta)
            self.base.add_(delta)
            self.version += 1

    def load_flat(self, values: torch.Tensor) -> None:
        with self.lock:
            self.base.sub_(self.flat).add_(values)  # base += values - flat, with no temporary
            self.flat.copy_(values)
            self.version += 1

    def history(self) -> torch.Tensor:
        """Sum of the local updates this peer's own training made (not what gossip mixed in)."""
        with self.lock:
            return self._history()

    def _history(self) -> torch.Tensor:
        return self.flat - self.base

    def sketch_history(self, sketcher) -> torch.Tensor:
        """`sketcher(self.history())` (a `peer.aggregation.sybil.Sketcher`), slice by slice: no
        model-sized temporary."""
        with self.lock:
            return sketcher.of_difference(self.flat, self.base)

    def state_dict(self) -> dict[str, Any]:
        """Copies taken under the lock, at one step boundary: the caller may write them from
        another thread while training goes on. `Optimizer.state_dict()` returns the live moment
        tensors, which the next step updates in place, so they are cloned too (for Adam, two
        model-sized copies, freed once the checkpoint is written)."""
        with self.lock:
            optimizer = self.optimizer.state_dict()
            optimizer["state"] = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                                  for i, entry in optimizer["state"].items()}
            return {
                "flat": self.flat.clone(),
                "history": self._history(),
                "optimizer": optimizer,
                "step": self.step,
                "samples": self.samples,
                "metrics": dict(self.metrics),
            }

    def state_mismatch(self, state: dict[str, Any]) -> str | None:
        """Why `state` cannot be loaded into this trainer's model (another model's shape or
        optimizer), or None. Checked before anything is loaded, so a refused state changes nothing."""
        flat = state.get("flat")
        if not isinstance(flat, torch.Tensor) or flat.shape != self.flat.shape or flat.dtype != self.flat.dtype:
            got = f"{flat.dtype} {tuple(flat.shape)}" if isinstance(flat, torch.Tensor) else type(flat).__name__
            return f"its model is {got}, this task's is {self.flat.dtype} {tuple(self.flat.shape)}"
        for key in ("step", "samples", "optimizer"):
            if key not in state:
                return f"it has no {key!r}"
        opt = state["optimizer"]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            saved = [i for g in opt["param_groups"] for i in g["params"]]
            sizes = [len(g["params"]) for g in opt["param_groups"]]
            if sizes != [len(g["params"]) for g in self.optimizer.param_groups]:
                return f"its optimizer has parameter groups of {sizes} parameters, this task's {[len(g['params']) for g in self.optimizer.param_groups]}"
            shapes = dict(zip(saved, (p.shape for p in params)))
            for i, entry in opt["state"].items():
                for name, v in entry.items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shapes[i]:
                        return f"its optimizer's {name} of parameter {i} is {tuple(v.shape)}, the parameter {tuple(shapes[i])}"
        except (KeyError, TypeError, AttributeError) as e:
            return f"its optimizer state is malformed ({type(e).__name__})"
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state; ValueError (nothing changed) if it is for another model."""
        why = self.state_mismatch(state)
        if why is not None:
            raise ValueError(why)
        with self.lock:
            self.flat.copy_(state["flat"])
            history = state.get("history")
            self.base = self.flat - history if history is not None and history.shape == self.flat.shape else self.flat.clone()
            self.optimizer.load_state_dict(state["optimizer"])
            for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = lr  # the schedule sets it each step from the base rate
            self.step = int(state["step"])
            self.version += 1
            self.samples = int(state["samples"])
            self.metrics = dict(state.get("metrics", {}))

    def set_step(self, step: int) -> None:
        """Adopt the swarm's step on joining, so the learning-rate schedule matches the others'."""
        with self.lock:
            self.step = int(step)
            self.version += 1  # a served snapshot carries the step too

    def advance_step(self, step: int) -> bool:
        """Move the step forward to `step` (the swarm's), never back; whether it moved. The
        learning-rate schedule follows from the next local step on."""
        with self.lock:
            if step <= self.step:
                return False
            self.step = int(step)
            self.version += 1  # a served snapshot carries the step too
            return True

    def _set_lr(self, local_steps: int) -> None:
        scale = self.task.lr_schedule(self.step) * min(1.0, (local_steps + 1) / max(self.warmup_steps, 1))
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * scale

    def evaluate(self) -> dict[str, float]:
        """The task's evaluation of a copy of the model: the lock is held only for the copy, so
        gossip (which snapshots under the lock from the event loop) never waits for an evaluation."""
        with self._eval_lock:  # one evaluation at a time owns the copy
            return self._evaluate_copy()

    def _evaluate_copy(self) -> dict[str, float]:
        with self.lock:
            if self._eval_model is None:
                with torch.random.fork_rng():  # building it must not move the training RNG
                    self._eval_model = self.task.make_model()
                self._eval_flat = flatten_parameters(self._eval_model)
            self._eval_flat.copy_(self.flat)
            for dst, src in zip(self._eval_model.buffers(), self.model.buffers()):
                dst.copy_(src)
        started = time.monotonic()
        result = self.task.evaluate(self._eval_model)
        self.eval_seconds = time.monotonic() - started
        self.metrics = result
        return result

    # --- the loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        self._thread.start()

    def round_finished(self) -> None:
        """A round the trainer asked for has ended (with a change applied or not); thread-safe."""
        with self._backlog_changed:
            if self.round_backlog is not None:
                self.round_backlog.finished += 1
            self._backlog_changed.notify_all()

    def _wait_for_rounds(self) -> None:
        with self._backlog_changed:
            backlog = self.round_backlog
            if backlog is None or backlog.may_step():
                return
            started = time.monotonic()
            self.waiting_for_round = True
            while not backlog.may_step() and not self._stop.is_set():
                self._backlog_changed.wait(0.2)  # stop() sets an Event, not this condition
            self.waiting_for_round = False
            self.round_wait_seconds += time.monotonic() - started

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _run(self) -> None:
        try:
            if self.requested_nice:
                self.nice = lower_thread_priority(self.requested_nice)
            self._loop()
        except BaseException as e:  # surfaced by the daemon, which logs it and stops cleanly
            self.error = e
            log.exception("trainer crashed")

    def train_step(self) -> None:
        """One local step on a random batch of this peer's shard (also used by lock-step simulations)."""
        task = self.task
        started = time.monotonic()
        n = len(task.y_train)
        idx = torch.randint(0, n, (min(task.batch_size, n),), generator=self._gen)
        with self.lock:
            self._set_lr(self.local_steps)
            loss = task.loss_fn(self.model(task.x_train[idx]), task.y_train[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.version += 1
            self.samples += len(idx)
        self.local_steps += 1
        self.last_loss = float(loss.detach())
        self.train_seconds += time.monotonic() - started

    def _loop(self) -> None:
        last_eval = 0.0
        window_start, window_samples, window_steps = time.monotonic(), 0, 0
        while not self._stop.is_set():
            if self.done:
                if not self.metrics:  # done before a single step (a joiner adopted a later step)
                    self.evaluate()
                self._stop.wait(0.2)
                continue
            self._wait_for_rounds()
            if self._stop.is_set():
                break
            self.train_step()
            notify, cadence = self.on_steps, self.step_cadence  # read once: the event loop may clear them
            if notify is not None and cadence is not None and cadence.due(self.step, self.local_steps):
                with self._backlog_changed:
                    if self.round_backlog is not None:
                        self.round_backlog.due += 1
                notify()
            window_samples += min(self.task.batch_size, len(self.task.y_train))
            window_steps += 1
            now = time.monotonic()
            if now - window_start >= 1.0:
                self.samples_per_s = smoothed_rate(self.samples_per_s, window_samples / (now - window_start))
                self.steps_per_s = smoothed_rate(self.steps_per_s, window_steps / (now - window_start))
                window_start, window_samples, window_steps = now, 0, 0
            # evaluations take at most ~2 % of the training thread's time, however large the model
            if now - last_eval >= max(self.eval_every_s, 50 * self.eval_seconds) or self.done:
                self.evaluate()
                last_eval = now
            if self.step_delay_s:
                self._stop.wait(self.step_delay_s)
