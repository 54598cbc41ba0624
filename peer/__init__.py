"""The daemon: everything that runs inside one peer process.

    main.py         `peer join`'s process: logging, the event loop, signals, the join line
    preflight.py    what `peer join` checks before torch loads (flags, addresses, config files)
    core.py         PeerCore: every decision of one peer (view, partners, failures, mixing,
                    serving, status) as calls that take inputs and `now`; no I/O
    daemon.py       PeerDaemon: the asyncio shell feeding PeerCore from the transport, timers, files
    outer_rounds.py the daemon's outer rounds: publish, pull and mix pseudo-gradients, step
    behaviour.py    what a peer serves, reports and trains on (honest by default)
    transfers.py    gossip streams: caps, counting, deadlines from payload size and link rate
    trainer.py      local training in a thread; evaluation on a copy, on a budget
    outer.py        outer steps: anchor, Nesterov outer optimizer, one round's arithmetic
    cadence.py      when local steps start a gossip round (post-local SGD); how far training
                    may run ahead of unfinished rounds
    validation.py   checks on a received model before it is mixed
    loss_probe.py   partners' models scored on our own data (the loss screen's input)
    aggregation/    the robust rules (SybilWall weights, clipping, baselines)
    snapshots.py    the model served to pullers, shared while unchanged
    state.py        checkpoints: one per run and task, written whole
    datadir.py      the data dir's checks (writable, private, control socket)
    known_peers.py  recently seen peers of a run, dialled again at start
    reachability.py the reachability verdict (`peer join` at start, `peer doctor`)
    doctor.py       `peer doctor`'s checks, one function each
    control.py      the Unix control socket (`peer status`, `peer leave`)
    metrics.py      the Prometheus endpoint
    metrics_log.py  DATA_DIR/metrics.jsonl, rotated (read by the experiment tools)
    config.py       PeerConfig and where its values come from
    tasks/          built-in tasks (MNIST-1D, digits, the byte-level language model)
    launcher.py     local swarms of real `peer join` processes (scripts, tests)
    sim/            a simulator of many peers on a virtual clock (PeerCore, no sockets)
    experiment/     scenario runner parts: schedules, network conditions, collection, and
                    (EXPERIMENTS ONLY) the attacks, as hostile behaviours
    bench/          what the benchmark and fuzz scripts and their tests share (the instrumented
                    task real peers load, evaluation logs, fuzz targets); the daemon never imports it
"""
