"""Wire protocols: message schemas, codecs and protocol logic, without the daemon.

    codec.py        framing of headers and tensors, and the hard limits checked before allocating
    compression.py  compressed pseudo-gradients (fp16, bf16, int8, top-k) and their checks
    gossip.py       `/peer/gossip/1`: pull a model or a pseudo-gradient; partner picking
    discovery.py    signed peer records in the DHT and the bounded swarm view
    reputation.py   scores and bans from what peers did
    dht_guard.py    hivemind's DHT RPCs served under per-peer caps and deadlines, and counted
    ratelimit.py    bandwidth caps, fair sharing, deadlines from measured goodput
    loglimit.py     at most one log line per peer and reason a minute
    dialback.py     `/peer/dialback/1`: a peer dials the asker back (reachability)
    relay.py        circuit relay v2 hop for `--relay-service`: bounded reservations and relayed connections
    lightdht.py     reading a run's records from the DHT without a daemon (`peer swarm`)
    transport/      base.py (the interface), hivemind.py (p2pd), memory.py (tests, simulation),
                    light.py (py-libp2p client for `peer swarm`, `peer doctor`)
"""
