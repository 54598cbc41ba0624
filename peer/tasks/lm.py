"""Byte-level language-model tasks: a small GPT that predicts the next byte of Python source.

Built-in sizes (`lm-tiny`, `lm`, `lm-large`; or `lm_task(size=...)`), with figures measured on a
shared 2-core x86 CPU (median s/step at 1 and 2 torch threads; held-out loss in nats per byte
(bits per byte = loss / ln 2) on 128 (tiny) or 64 (base) held-out windows):

    size   d    layers heads context batch lr    parameters s/step       loss @0 / 50 / 200 steps
    tiny   128  4      4     64      16    2e-3  834,304    0.10 / 0.06  5.33 / 2.88 / 2.43
    base   384  6      6     128     8     5e-4  10,795,008 0.88 / 0.51  5.34 / 2.82 / 2.51
    large  768  14     12    256     16    3e-4  99,624,960 (GPU volunteers: only built; one forward
                                                [2, 256] takes ~1 s on this CPU)

`lm` is the default LM and trains visibly on 2 CPU cores: 200 steps take ~2 minutes, and 500 steps
(~4.5 minutes) bring the held-out loss to 2.10 (3.03 bits per byte). `lm-tiny` is
for tests. `lm-large`'s rate is the usual one for a GPT of its size; it was not tuned here. The
rates of the other two are the best of those tried over 200 steps (tiny: 1e-3, 2e-3, 3e-3, 6e-3; base:
5e-4, 1e-3, 2e-3; 5e-4 and 1e-3 tie within noise, and the lower one is the safer for long runs).
`evaluate()` scores a fixed number of held-out windows, sized so that the trainer's evaluation
every few seconds costs a fraction of a step: tiny 64 windows (~0.06 s at 2 threads), base 16
(~0.3 s), large 32.

Corpus: the Python source files shipped inside the installed `torch` package, under `torch/nn`,
`torch/optim`, `torch/distributions` and `torch/utils/data` (~3.1 MB, ~250 files). Every peer must
train on the same bytes, with no download. pyproject.toml pins torch to one exact version, so these
files are the same on every volunteer's machine. The standard library would not do: it differs
between Python patch versions. Only `.py` files under these four subpackages are read. They are
copied verbatim from the torch source tree into every wheel (CPU, CUDA, ROCm; Linux, macOS,
Windows). The files known to differ between builds are all outside these four subpackages:
`torch/version.py` (version suffix, git hash, CUDA version), `torch/__config__.py` (asks the
compiled library about the build at run time) and the `torch/_C` stubs. The only other files inside
them are `.pyi` stubs (`nn/functional.pyi`, `nn/parameter.pyi`, `optim/_multi_tensor/__init__.pyi`,
`utils/data/datapipes/datapipe.pyi`), some generated at build time; they are not read. That the
files are the same across builds is only reasoned, plus a search of the files read for "generated"
or "do not edit" headers (no file has one). Nothing protects against a wheel whose files differ in
some other way (line endings, a vendor patch), but such a difference cannot go unseen: the task name
carries the corpus digest (below), so peers with different bytes refuse each other.

Files are taken in sorted relative-path order until the cap (`MAX_CORPUS_BYTES`, 4 MB) would be
passed. Each file is preceded by a one-line header `\\x1e# torch/<path>\\n` (0x1e, the ASCII record
separator, never occurs in these sources). `corpus_digest()` is the SHA-256 of a format tag, the
path list, and the exact bytes. Building the corpus (reading ~3 MB, one hash) takes ~20 ms, far
below the ~0.3 s that would justify a disk cache like MNIST-1D's, so it is rebuilt at every
start and kept in memory for the life of the process.

Task identity: a task's name is `f"{builtin_name}@{digest[:12]}"`; with torch 2.13.0 that is
`lm-tiny@456472976a34`. The daemon's task-name checks then refuse a peer whose corpus differs.

Data: the corpus is cut into non-overlapping windows of T+1 bytes. A fixed ~5 % of them
(`HOLDOUT_FRACTION`, drawn with a fixed seed, whatever the run's seed) is the test set, the same for
every peer and every run. The rest are sharded with `shard_indices`. For a "dirichlet" split the
"label" of a window is the subpackage (nn, optim, ...) of the file holding its first byte.
`x = windows[:, :-1]` and `y = windows[:, 1:]` stay uint8 views of one shard tensor. The model and
`loss_fn` widen them to int64 per batch. As int64, x and y would be two copies of the corpus at 8
bytes a token: ~50 MB per peer for the whole corpus, for each of the many peers that one
simulation process builds. As uint8 views they share one copy: ~3 MB.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peer.tasks import Task, shard_indices

CORPUS_FORMAT = b"peer-lm-corpus-v1"  # part of the digest: changing how bytes are chosen or joined must change task names
SUBPACKAGES = ("distributions", "nn", "optim", "utils/data")  # relative to the torch package; sorted
MAX_CORPUS_BYTES = 4_000_000
SEPARATOR = b"\x1e"
HOLDOUT_FRACTION = 0.05
HOLDOUT_SEED = 271_828  # fixed: the test set is the same for every run, so figures compare across runs


@dataclass(frozen=True)
class Size:
    d: int
    n_layer: int
    n_head: int
    context: int
    batch_size: int
    lr: float
    eval_windows: int  # held-out windows scored by evaluate(): the trainer evaluates every few seconds


SIZES = {
    "tiny": Size(d=128, n_layer=4, n_head=4, context=64, batch_size=16, lr=2e-3, eval_windows=64),
    "base": Size(d=384, n_layer=6, n_head=6, context=128, batch_size=8, lr=5e-4, eval_windows=16),
    "large": Size(d=768, n_layer=14, n_head=12, context=256, batch_size=16, lr=3e-4, eval_windows=32),
}
BUILTIN_NAMES = {"tiny": "lm-tiny", "base": "lm", "large": "lm-large"}


# --- corpus --------------------------------------------------------------------------------------

def torch_source_root() -> Path:
    return Path(torch.__file__).resolve().parent


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative paths (POSIX, below the torch package) of the corpus files, sorted, before the cap."""
    root = torch_source_root() if root is None else root
    paths = []
    for sub in SUBPACKAGES:
        base = root / sub
        if not base.is_dir():
            raise ValueError(f"LM corpus directory {base} is missing (the lm tasks need torch's own Python sources)")
        paths.extend(p.relative_to(root).as_posix() for p in base.rglob("*.py") if p.is_file())
    return sorted(paths)


def read_file(root: Path, rel: str) -> bytes:
    return (root / rel).read_bytes()


def subpackage_id(rel: str) -> int:
    for i, sub in enumerate(SUBPACKAGES):
        if rel.startswith(sub + "/"):
            return i
    raise ValueError(f"{rel} is not in any corpus subpackage")


@dataclass(frozen=True)
class Corpus:
    data: bytes
    paths: tuple[str, ...]
    starts: np.ndarray  # offset of each file's header in `data`
    digest: str


def build_corpus(root: Path | None = None) -> Corpus:
    """Read and join the corpus files; no caching (see `corpus()`)."""
    root = torch_source_root() if root is None else root
    parts, paths, starts, size = [], [], [], 0
    for rel in corpus_files(root):
        chunk = SEPARATOR + b"# torch/" + rel.encode() + b"\n" + read_file(root, rel)
        if size + len(chunk) > MAX_CORPUS_BYTES:
            break  # files are taken in sorted order: every machine stops at the same file
        parts.append(chunk)
        paths.append(rel)
        starts.append(size)
        size += len(chunk)
    if not parts:
        raise ValueError(f"LM corpus under {root} is empty")
    data = b"".join(parts)
    h = hashlib.sha256(CORPUS_FORMAT + b"\0")
    h.update("\n".join(paths).encode() + b"\0")
    h.update(data)
    return Corpus(data=data, paths=tuple(paths), starts=np.array(starts, dtype=np.int64), digest=h.hexdigest())


@functools.lru_cache(maxsize=1)
def corpus() -> Corpus:
    """The corpus, built once per process (simulations build many peers in one process)."""
    return build_corpus()


def corpus_digest() -> str:
    return corpus().digest


@functools.lru_cache(maxsize=4)
def _windows(context: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(all windows [N, context+1] uint8, subpackage id per window, held-out window indices in a
    fixed random order).

    The tensors are shared by every task built in this process: callers must not modify them.
    """
    c = corpus()
    width = context + 1
    n = len(c.data) // width
    windows = torch.frombuffer(bytearray(c.data[: n * width]), dtype=torch.uint8).view(n, width)
    file_of = np.searchsorted(c.starts, np.arange(n) * width, side="right") - 1
    labels = np.array([subpackage_id(p) for p in c.paths], dtype=np.int64)[file_of]
    rng = np.random.default_rng(HOLDOUT_SEED)
    # in drawn order, not sorted: evaluate() scores the first few, which must sample the whole
    # corpus rather than the first subpackage's files
    held_out = rng.permutation(n)[: max(1, round(n * HOLDOUT_FRACTION))]
    return windows, labels, held_out


def split_windows(context: int, shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training window indices of this shard, held-out window indices), both into `_windows(context)`."""
    windows, labels, held_out = _windows(context)
    train = np.setdiff1d(np.arange(len(windows)), held_out)
    part = shard_indices(labels[train], shard, num_shards, split, alpha, seed)
    return train[part], held_out


# --- model ---------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, dim=2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only byte model: [B, T] integer tokens (any integer dtype) -> [B, T, 256] logits.

    The output head is the token embedding (tied), so the parameter appears once in
    `parameters()` and the trainer's flat buffer holds it once.
    """

    def __init__(self, d: int, n_layer: int, n_head: int, context: int, vocab: int = 256):
        super().__init__()
        if d % n_head:
            raise ValueError(f"d={d} is not divisible by n_head={n_head}")
        self.context = context
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        # Weights are drawn from the global torch RNG in construction order: the trainer seeds it
        # before make_model, so every peer of a run starts from the same weights.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # residual branches scaled down so the stream's variance stays ~1 with depth
            for m in (block.proj, block.out):
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context of {self.context}")
        x = self.tok(idx.long()) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) over every position of every window."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long())


def make_adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW(0.9, 0.95); weight decay 0.1 on matrices only (not on biases and LayerNorm gains)."""
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def lm_lr_schedule(step: int) -> float:
    """Inverse square-root decay with a floor: 1.0 at step 0, 0.5 at 3000, 0.1 from 99000 on.

    Peers train without a horizon, so a cosine schedule has no end to aim at; the rate still has
    to come down for the models to settle. The trainer adds its own 50-step warm-up on top.
    """
    return max(0.1, 1.0 / math.sqrt(1.0 + step / 1000.0))


@dataclass
class LMTask(Task):
    eval_windows: int = 32

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Next-byte loss (nats and bits per byte) and top-1 accuracy on the first `eval_windows`
        held-out windows (the same windows on every peer, so peers' figures compare)."""
        was_training = model.training
        model.eval()
        try:
            x, y = self.x_test[: self.eval_windows], self.y_test[: self.eval_windows].long()
            logits = model(x)
            loss = float(lm_loss(logits, y))
            accuracy = float((logits.argmax(-1) == y).float().mean())
        finally:
            model.train(was_training)
        return {"test_loss": loss, "bits_per_byte": loss / math.log(2), "accuracy": accuracy}


def lm_task(size: str = "base", shard: int = 0, num_shards: int = 1, split: str = "iid", alpha: float = 0.5,
            seed: int = 0, lr: float | None = None) -> LMTask:
    if size not in SIZES:
        raise ValueError(f"unknown lm size {size!r} ({', '.join(SIZES)})")
    s = SIZES[size]
    windows, _, _ = _windows(s.context)
    train_idx, test_idx = split_windows(s.context, shard, num_shards, split, alpha, seed)
    train = windows[torch.from_numpy(train_idx)]
    test = windows[torch.from_numpy(test_idx)]
    lr = s.lr if lr is None else lr
    return LMTask(
        name=f"{BUILTIN_NAMES[size]}@{corpus_digest()[:12]}",
        make_model=lambda: GPT(s.d, s.n_layer, s.n_head, s.context),
        make_optimizer=lambda params: make_adamw(params, lr),
        x_train=train[:, :-1], y_train=train[:, 1:],
        x_test=test[:, :-1], y_test=test[:, 1:],
        batch_size=s.batch_size,
        lr_schedule=lm_lr_schedule,
        loss_fn=lm_loss,
        eval_windows=s.eval_windows,
        # Outer steps (peer/outer.py). Synchronous DiLoCo on lm-tiny, 4 replicas, 600 inner steps
        # (scripts/bench_comms.py run_diloco): held-out loss 1.48 at H = 10, 1.59 at H = 25, 1.62
        # at H = 50 (central training on the same samples: 1.40); at H = 50, outer momentum 0.5
        # gave 1.62, DiLoCo's 0.9 gave 1.66, none (lr 1.0) 1.68. H = 50 halves the bytes of
        # H = 25 for 2 % more loss at 600 steps. With top-k pseudo-gradients (error feedback in
        # the live model) a larger outer step pays: scripts/diag_loss_gap.py, topk-2bit:0.051,
        # 600 steps, momentum 0.5: outer lr 0.5 1.833, 0.7 1.760, 1.0 1.719, 1.3 1.706, 1.6 1.713
        # (0.7 with momentum 0.7 1.746, 1.0 with 0.7 1.732); the real comms bench, 1,200 steps,
        # side by side: 1.463 at lr 1.0 against 1.505 at 0.7, for 2 % more bytes.
        outer_every_steps=50, outer_lr=1.0, outer_momentum=0.5,
        # A consensus round sends a whole int8 anchor (1 byte a parameter) to each puller, 25x a
        # top-k round's payload: every 20th round (1,000 inner steps) keeps anchors under half
        # of the bytes (docs/benchmarks.md, comms).
        outer_sync_every=20,
        # The 5.1 % largest coordinates, 2-bit values and entropy-coded index gaps: the bytes of
        # SparseLoCo's 1.56 % with int8 values, 3.3x the coordinates. Real comms bench, lm-tiny,
        # 1,200 steps, two side-by-side pairs: held-out loss 1.503 and 1.501 against 1.544 and
        # 1.551 for topk-int8:0.0156, at 4,138-4,165 against 4,110-4,118 bytes per peer per
        # inner step (docs/benchmarks.md, comms).
        compression="topk-2bit:0.051",
        # a forward pass per partner per round: 16 windows keep it well under a training step
        loss_probe_samples=16,
    )
