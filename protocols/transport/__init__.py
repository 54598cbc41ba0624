"""Transports: how the daemon reaches other peers.

    base.py         the interface the daemon sees: named stream protocols and a signed record store
    hivemind.py     production: hivemind's P2P (p2pd) and a DHTNode on it, in-process
    nat.py          relays, auto-relay, hole punching, relay service: the p2pd flags they become
    memory.py       many peers in one event loop (tests, simulations): bounded pipes, a dict store
    light.py        a py-libp2p client with no p2pd, for `peer swarm` (reads the DHT only)
"""
