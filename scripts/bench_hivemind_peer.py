#!/usr/bin/env python3
"""One `hivemind.Optimizer` peer for the convergence benchmark (the nearest existing system).

Same model, data shard, local batch and optimizer as a `peer join` peer of the built-in
`mnist1d-cnn` task (Adam lr 1e-2, batch 100, shard i/n of the IID split, seed 0), wrapped in
hivemind's collaborative Optimizer with the knobs given as JSON. Peer 0 writes its DHT address
to `<dir>/maddrs`; the others bootstrap from it. Each peer writes `<dir>/ready.<i>` once its
Optimizer exists, waits for the gate file, then trains and logs every evaluation
(`{"t", "samples", "accuracy", "epoch"}`, `peer.bench.eval_log`) to `<dir>/eval.<i>.jsonl` until
the stop file appears.

    bench_hivemind_peer.py DIR INDEX COUNT '{"target_batch_size": 400, ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from peer.bench import eval_log


def wait_file(path: Path, deadline: float) -> None:
    while not path.exists():  # files from other processes: nothing to wait on but the file itself
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.01)


def main() -> int:
    root, index, count, knobs = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    import warnings

    warnings.filterwarnings("ignore")
    import hivemind
    import torch

    from peer.tasks import MNIST1DCNN, mnist1d_cnn

    torch.set_num_threads(1)
    deadline = time.monotonic() + 120
    if index == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        (root / "maddrs.tmp").write_text("\n".join(str(a) for a in dht.get_visible_maddrs()))
        os.replace(root / "maddrs.tmp", root / "maddrs")
    else:
        wait_file(root / "maddrs", deadline)
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                           initial_peers=(root / "maddrs").read_text().split())

    task = mnist1d_cnn(shard=index, num_shards=count)
    torch.manual_seed(0)  # every peer starts from the same weights, as `peer join` peers do
    model = MNIST1DCNN()
    opt = hivemind.Optimizer(
        dht=dht, run_id="bench-convergence", params=model.parameters(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
        batch_size_per_step=task.batch_size, verbose=False, **knobs,
    )
    (root / f"ready.{index}").write_text("")
    wait_file(root / "gate", time.monotonic() + 300)

    gen = torch.Generator().manual_seed(index)
    trained, last_eval = 0, 0.0
    log = open(root / f"eval.{index}.jsonl", "a")
    try:
        while not (root / "stop").exists():
            idx = torch.randint(0, len(task.y_train), (task.batch_size,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            trained += len(idx)
            now = time.monotonic()
            if now - last_eval >= 0.1:
                acc = task.evaluate(model)["accuracy"]
                log.write(eval_log.entry(trained, acc, epoch=opt.local_epoch))
                log.flush()
                last_eval = now
    finally:
        log.close()
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
