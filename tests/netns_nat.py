"""Masquerading NAT in a network namespace, for tests/test_nat_traversal.py.

Run inside the router namespace: `ip netns exec NS python -m tests.netns_nat 192.168.1.0/24`. It
adds an nf_tables table `peernat` with a source-NAT chain on postrouting that masquerades packets
from that subnet, which is `iptables -t nat -A POSTROUTING -s 192.168.1.0/24 -j MASQUERADE`: the
kernel rewrites the source of every connection the subnet opens to the router's outgoing address
(keeping the port where it is free) and maps the replies back through conntrack; nothing from
outside reaches the subnet unless the subnet opened the connection.

pyroute2 speaks nf_tables netlink directly, so neither the iptables nor the nft binary is needed,
only a kernel with nf_tables and its NAT and masquerade expressions (CONFIG_NFT_NAT,
CONFIG_NFT_MASQ). The netlink socket belongs to the namespace it is opened in, hence a process
run in the namespace rather than a call from the test's own.
"""

from __future__ import annotations

import sys

TABLE = "peernat"
NF_ACCEPT = 1
NF_IP_PRI_NAT_SRC = 100  # where iptables' nat POSTROUTING sits


def masquerade(subnet: str) -> None:
    """Masquerade connections from `subnet` (a.b.c.d/n) leaving this namespace."""
    from pyroute2.nftables.expressions import ipv4addr, masq
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=2)  # NFPROTO_IPV4: `table ip`
    try:
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name="postrouting", hook="postrouting", type="nat",
                  priority=NF_IP_PRI_NAT_SRC, policy=NF_ACCEPT)
        nft.rule("add", table=TABLE, chain="postrouting", expressions=(ipv4addr(src=subnet), masq()))
    finally:
        nft.close()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m tests.netns_nat SUBNET  (run inside the router's namespace)", file=sys.stderr)
        return 2
    try:
        masquerade(sys.argv[1])
    except ImportError:
        print("pyroute2 is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 3
    except Exception as e:  # netlink refusals: one line, the test turns it into a skip or a failure
        print(f"nf_tables masquerade failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
