"""What trains one simulated peer's model: the real `Trainer`, or a NumPy twin for the linear task.

Both expose what the simulator uses of `peer.trainer.Trainer`: `flat` (a torch view of the
parameters), `step`, `local_steps`, `samples`, `last_loss`, `train_step()`, `snapshot()`,
`apply_delta()`, `load_flat()`, `history()`, `advance_step()`, `set_step()`, `evaluate()`,
`state_dict()` / `load_state_dict()` (the checkpoint a killed peer comes back with).
`test_predictions(learner)` gives either's predicted class for every test example (what the
targeted attack's success rate counts, per class, beyond accuracy).

`LinearLearner` trains `mnist1d-linear` (peer/tasks) with the same model, the same Adam update
and warm-up as `Trainer` on that task, in NumPy: about 30 us a step instead of about 1 ms,
which is what lets 1,000 peers x 200 rounds run in minutes. `tests/test_sim.py` checks that
its step equals the torch step on the same batch. Data are never copied per peer: the learner
holds NumPy views of its shard's tensors, shared by every peer of that shard.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from peer.tasks import Task

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, which the task's optimizer uses
_max, _sum = np.maximum.reduce, np.add.reduce


class LinearLearner:
    """Softmax regression (`mnist1d-linear`): flat = [weight (10 x 40) row-major, bias (10)]."""

    def __init__(self, task: Task, init: torch.Tensor, seed: int = 0, lr: float = 1e-2, warmup_steps: int = 50):
        self.task = task
        self.x = task.x_train.reshape(len(task.y_train), -1).numpy()  # a view: the shard's tensor
        self.y = task.y_train.numpy()
        self.xt = task.x_test.reshape(len(task.y_test), -1).numpy()
        self.yt = task.y_test.numpy()
        self.features, self.classes = self.x.shape[1], 10
        self.flat = init.clone()
        self._w = self.flat.numpy()  # shares memory with `flat`
        self.origin = self.flat.clone()
        self.mixed_in = torch.zeros_like(self.flat)
        self.m = np.zeros_like(self._w)
        self.v = np.zeros_like(self._w)
        self.adam_steps = 0
        self.lr, self.warmup_steps = lr, warmup_steps
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.local_steps = 0
        self.samples = 0
        self.last_loss: float | None = None
        self.metrics: dict[str, float] = {}

    def _split(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = self.classes * self.features
        return flat[:k].reshape(self.classes, self.features), flat[k:]

    def train_step(self, idx: np.ndarray | None = None) -> None:
        """One Adam step on a random batch of the shard (or on the examples `idx`)."""
        n = len(self.y)
        if n == 0:
            return
        if idx is None:
            idx = self.rng.integers(0, n, min(self.task.batch_size, n))
        x, y = self.x[idx], self.y[idx]
        w, b = self._split(self._w)
        # the ufuncs' reduce, not the ndarray methods' Python wrappers: the same values, and at
        # 4 examples a peer (1,000 peers on MNIST-1D) the step is all per-call overhead
        logits = x @ w.T + b
        logits -= _max(logits, 1, keepdims=True)
        p = np.exp(logits)
        p /= _sum(p, 1, keepdims=True)
        rows = np.arange(len(y))
        picked = p[rows, y]
        self.last_loss = float(-np.log(picked + 1e-30).mean())
        p[rows, y] = picked - 1.0
        p /= len(y)
        grad = np.concatenate(((p.T @ x).ravel(), _sum(p, 0)))
        scale = self.task.lr_schedule(self.step) * min(1.0, (self.local_steps + 1) / max(self.warmup_steps, 1))
        self.adam_steps += 1
        t = self.adam_steps
        self.m *= BETA1
        self.m += (1 - BETA1) * grad
        self.v *= BETA2
        self.v += (1 - BETA2) * grad * grad
        denom = np.sqrt(self.v) / math.sqrt(1 - BETA2 ** t) + EPS
        self._w -= (self.lr * scale / (1 - BETA1 ** t)) * self.m / denom
        self.step += 1
        self.local_steps += 1
        self.samples += len(idx)

    def losses(self, flats: torch.Tensor, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Cross-entropy of each row of `flats` (models) on (x, y), in one batched pass."""
        f = flats.numpy() if isinstance(flats, torch.Tensor) else flats
        k = self.classes * self.features
        w = f[:, :k].reshape(-1, self.classes, self.features)
        logits = np.einsum("nf,mcf->mnc", x, w) + f[:, None, k:]
        logits -= logits.max(2, keepdims=True)
        lse = np.log(np.exp(logits).sum(2))
        return (lse - logits[:, np.arange(len(y)), y]).mean(1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The predicted class of each row of `x` (flattened examples)."""
        w, b = self._split(self._w)
        return (x @ w.T + b).argmax(1)

    def evaluate(self) -> dict[str, float]:
        w, b = self._split(self._w)
        logits = self.xt @ w.T + b
        acc = float((logits.argmax(1) == self.yt).mean())
        logits -= logits.max(1, keepdims=True)
        lse = np.log(np.exp(logits).sum(1))
        loss = float((lse - logits[np.arange(len(self.yt)), self.yt]).mean())
        self.metrics = {"accuracy": acc, "test_loss": loss}
        return self.metrics

    # --- what gossip does to the model (as Trainer) ---------------------------------------
    def snapshot(self) -> torch.Tensor:
        return self.flat.clone()

    def apply_delta(self, delta: torch.Tensor) -> None:
        self.flat.add_(delta)
        self.mixed_in.add_(delta)

    def load_flat(self, values: torch.Tensor) -> None:
        self.mixed_in.add_(values - self.flat)
        self.flat.copy_(values)

    def history(self) -> torch.Tensor:
        return self.flat - self.origin - self.mixed_in

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def advance_step(self, step: int) -> bool:
        if step <= self.step:
            return False
        self.step = int(step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"flat": self.flat.clone(), "history": self.history(), "m": self.m.copy(), "v": self.v.copy(),
                "adam_steps": self.adam_steps, "step": self.step, "samples": self.samples, "metrics": dict(self.metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flat.copy_(state["flat"])
        self.origin = self.flat - state["history"]
        self.mixed_in.zero_()
        self.m[:], self.v[:] = state["m"], state["v"]
        self.adam_steps, self.step, self.samples = state["adam_steps"], state["step"], state["samples"]
        self.metrics = dict(state["metrics"])
        self.local_steps = 0  # a restarted process warms its optimizer's rate up again, as Trainer does


def test_predictions(learner: Any) -> torch.Tensor:
    """The learner's predicted class for each of its task's test examples: a `Trainer`'s model in
    eval mode (left in train mode after, as training expects), or the linear twin's."""
    if isinstance(learner, LinearLearner):
        return torch.from_numpy(learner.predict(learner.xt))
    model = learner.model
    with torch.no_grad():
        model.eval()
        try:
            return model(learner.task.x_test).argmax(1)
        finally:
            model.train()


class LinearLossProbe:
    """`peer.loss_probe.LossProbe` for the linear learner: the same batch (the first `samples`
    of a seed-0 permutation of the shard), every model's loss in one NumPy pass."""

    def __init__(self, learner: LinearLearner, samples: int = 256, seed: int = 0):
        n = len(learner.y)
        idx = (torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples] if n > samples
               else torch.arange(n)).numpy()
        self.learner, self.x, self.y = learner, learner.x[idx], learner.y[idx]
        # the task's loss scale, as LossProbe measures it: an untrained model's loss on the batch
        self.untrained_loss = float(learner.losses(learner.origin[None], self.x, self.y)[0]) if n else 0.0

    def measure(self, own: torch.Tensor, models: list[torch.Tensor]) -> tuple[float, list[float | None]]:
        if len(self.y) == 0:
            return 0.0, [None] * len(models)
        losses = self.learner.losses(torch.stack([own, *models]), self.x, self.y)
        base = float(losses[0])
        if not math.isfinite(base):
            return base, [None] * len(models)
        return base, [float(v) - base if math.isfinite(v) else math.inf for v in losses[1:]]
