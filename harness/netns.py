"""Simulated compute nodes: network namespaces on one bridge, with tc bandwidth per link.

    root namespace  <veth>  bridge namespace (br0)  <veth>  node namespace 1..N

The root namespace gets ``PREFIX.1`` (Glance's proxy and the tracker listen there); node i gets
``PREFIX.(10+i)``.  ``tbf`` shapes both directions of a node's link (netem is not in this
kernel).  Only addresses of these namespaces and loopback are ever used.  ``down()`` removes
everything it made, also after a failure half-way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


class NetnsUnavailable(RuntimeError):
    pass


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    res = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"tc -n {ns} {' '.join(args)}: {res.stderr.strip()}")


@dataclass
class Node:
    ns: str
    addr: str
    dev: str       # its end of the veth, in its namespace
    bridge_dev: str  # the other end, on the bridge

    def exec_prefix(self) -> list[str]:
        # Not `ip netns exec`: it also unshares the mount namespace, so a FUSE mount made inside
        # would be invisible to the host (and to qemu).  nsenter enters the network namespace only.
        return ["nsenter", f"--net=/run/netns/{self.ns}"]


class Lan:
    def __init__(self, prefix: str = "10.203.0", tag: str | None = None):
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise NetnsUnavailable("network namespaces need root, ip and tc (apt: iproute2)")
        self.prefix = prefix
        self.tag = tag or f"tf{os.getpid() % 100000}"
        self.bridge_ns = f"{self.tag}-br"
        self.root_dev = f"{self.tag}r"
        self.root_addr = f"{prefix}.1"
        self.nodes: list[Node] = []
        self._made_ns: list[str] = []

    def up(self) -> "Lan":
        try:
            self._netns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            _ip("link", "add", self.root_dev, "type", "veth", "peer", "name", f"{self.tag}rb")
            _ip("link", "set", f"{self.tag}rb", "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", f"{self.tag}rb", "master", "br0", "up")
            _ip("addr", "add", f"{self.root_addr}/24", "dev", self.root_dev)
            _ip("link", "set", self.root_dev, "up")
        except Exception:
            self.down()
            raise
        return self

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made_ns.append(name)

    def add_node(self, rate: str | None = None) -> Node:
        i = len(self.nodes) + 1
        ns, dev, brdev = f"{self.tag}-n{i}", f"{self.tag}n{i}", f"{self.tag}b{i}"
        addr = f"{self.prefix}.{10 + i}"
        self._netns(ns)
        _ip("link", "add", dev, "type", "veth", "peer", "name", brdev)
        _ip("link", "set", dev, "netns", ns)
        _ip("link", "set", brdev, "netns", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", brdev, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        node = Node(ns, addr, dev, brdev)
        self.nodes.append(node)
        if rate:
            self.limit(node, rate)
        return node

    def limit(self, node: Node, rate: str) -> None:
        """Shape the node's link both ways (tbf on each end of its veth)."""
        for ns, dev in ((node.ns, node.dev), (self.bridge_ns, node.bridge_dev)):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "256kb", "latency", "100ms")

    def limit_root(self, rate: str) -> None:
        """Shape the root namespace's link (where Glance's proxy listens) both ways."""
        subprocess.run(["tc", "qdisc", "del", "dev", self.root_dev, "root"], capture_output=True)
        res = subprocess.run(["tc", "qdisc", "add", "dev", self.root_dev, "root", "tbf", "rate", rate, "burst",
                              "256kb", "latency", "100ms"], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr)
        subprocess.run(["tc", "-n", self.bridge_ns, "qdisc", "del", "dev", f"{self.tag}rb", "root"],
                       capture_output=True)
        _tc(self.bridge_ns, "qdisc", "add", "dev", f"{self.tag}rb", "root", "tbf", "rate", rate, "burst", "256kb",
            "latency", "100ms")

    def lose(self, node: Node, percent: int) -> None:
        """Drop ``percent`` % of the packets into and out of ``node`` until ``unlose`` (nftables;
        netem is not in this kernel).  Both drops are on arrival (the node's input, the bridge's
        forwarding of what it sent): a drop on output would fail the sender's call with EPERM,
        which lost packets never do."""
        if not shutil.which("nft"):
            raise NetnsUnavailable("packet loss needs nft (apt: nftables)")
        rule = f"numgen random mod 100 < {int(percent)} drop"
        self._nft(node.ns, f"table inet tf_loss {{ chain in {{ type filter hook input priority 0; {rule}\n }}\n }}\n")
        self._nft(self.bridge_ns, f"table bridge tf_loss_{node.bridge_dev} {{ chain loss {{ type filter hook forward "
                                  f"priority 0; iifname \"{node.bridge_dev}\" {rule}\n }}\n }}\n")

    def unlose(self, node: Node) -> None:
        for ns, table in ((node.ns, ("inet", "tf_loss")), (self.bridge_ns, ("bridge", f"tf_loss_{node.bridge_dev}"))):
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", *table], capture_output=True)

    @staticmethod
    def _nft(ns: str, script: str) -> None:
        res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True,
                             text=True)
        if res.returncode:
            raise RuntimeError(f"nft in {ns}: {res.stderr.strip()}")

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.root_dev], capture_output=True)
        for ns in reversed(self._made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made_ns.clear()
        self.nodes.clear()

    def __enter__(self) -> "Lan":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
