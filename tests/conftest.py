"""Fixtures: a real Glance (gunicorn, sqlite, file store) and real thunderfs mounts.

Every daemon is a separate process started through the CLI and stopped by its PID.  A test
fails if a daemon it started logged a traceback.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from harness.fault_proxy import FaultProxy
from harness.local_glance import LocalGlance, free_port
from harness.netns import Lan
from harness.tracker import LocalTracker
from harness.mounts import Mount
from thunderfs.fuse import mounting

CHUNK = 64 * 1024
UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items):
    """The fast layer is ``tests/unit`` (in-process: no mounts, no subprocesses, no namespaces);
    every other test starts real processes and is end-to-end: marked ``slow``, so that
    ``pytest -m "not slow"`` is the inner loop."""
    for item in items:
        if UNIT not in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _run_dir(tmp_path_factory):
    # Control sockets of test daemons live apart from any real mount's.
    os.environ["THUNDERFS_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def glance(tmp_path_factory):
    """One Glance for tests that do not stop it."""
    g = LocalGlance(tmp_path_factory.mktemp("glance"))
    g.start()
    yield g
    g.stop()


@pytest.fixture
def own_glance(tmp_path):
    """A Glance of the test's own, which the test may stop, pause and restart."""
    g = LocalGlance(tmp_path / "glance")
    g.start()
    yield g
    g.stop()


def image_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Images:
    """Uploads test images once per Glance and remembers their bytes."""

    def __init__(self, glance: LocalGlance):
        self.glance = glance
        self.data: dict[str, bytes] = {}

    def add(self, size: int, seed: int = 1, name: str = "test") -> str:
        data = image_bytes(size, seed)
        image_id = self.glance.upload(name, data)["id"]
        self.data[image_id] = data
        return image_id


@pytest.fixture(scope="session")
def images(glance):
    return Images(glance)


@pytest.fixture
def mounts(tmp_path):
    """Factory of mounts; every one made is cleaned up, and its log checked for tracebacks."""
    made: list[Mount] = []

    def make(glance_url: str, *args: str, name: str = "m", cache_dir: Path | None = None,
             prefix: list[str] | None = None) -> Mount:
        m = Mount(tmp_path / f"mnt-{name}", glance_url, cache_dir or tmp_path / f"cache-{name}", *args, prefix=prefix)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    for m in made:
        log = m.log_tail(200_000)
        assert "Traceback" not in log, f"daemon of {m.path} logged a traceback:\n{log[-6000:]}"


@pytest.fixture
def mount(glance, mounts):
    m = mounts(glance.url)
    m.mount()
    return m


SECRET = b"peers-test-secret-0123456789"


def wait_for(pred, timeout=20, what="condition"):
    """Poll ``pred`` until it is true (returning its value) or ``timeout`` seconds pass (failing)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def assert_kernel_waits_on_nothing(m) -> None:
    """Once the readers stopped, the kernel waits on no request of the mount (fusectl's
    ``waiting`` back at 0): none was lost in a handover.  The daemon reports it too."""
    conn = mounting.connection_dir(m.path)
    assert conn is not None, "fusectl is not available: cannot check what the kernel waits on"
    wait_for(lambda: mounting.waiting(conn) == 0, 10, "the kernel to wait on no request of the mount")
    assert m.stats()["fs"]["kernel_waiting"] == 0  # (the stats come over the control socket, not FUSE)


@pytest.fixture
def make_cluster(tmp_path, glance, mounts):
    """``make_cluster(netns=False, node_rate="200mbit", root_rate=None, tracker_args=())`` -> (proxy, tracker, node):
    Glance's counting proxy and a real tracker, and ``node(name, location, *args)`` starting a
    daemon, on loopback or each in its own network namespace on a bridge (links shaped with tbf;
    ``root_rate`` shapes the link of Glance and the tracker).  Everything stops at the end."""
    made_lans, stops = [], []

    def make(netns: bool = False, node_rate: str = "200mbit", root_rate: str | None = None,
             tracker_args: tuple[str, ...] = ()):
        lan = Lan().up() if netns else None
        if lan:
            made_lans.append((lan, []))
            if root_rate:
                lan.limit_root(root_rate)
        host = lan.root_addr if lan else "127.0.0.1"
        proxy = FaultProxy(glance.url, host=host).start()
        stops.append(proxy.stop)
        # The tracker reads Glance through the proxy too: what it seeds is counted at Glance.
        tracker = LocalTracker(tmp_path / "tracker", "--glance", proxy.url, "--heartbeat", "1", "--node-ttl", "5",
                               *tracker_args, secret=SECRET, host=host)
        tracker.start()
        stops.append(tracker.stop)
        secret = tmp_path / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)

        def node(name: str, location: str, *extra: str):
            if lan:
                n = lan.add_node(rate=node_rate)
                addr, prefix = n.addr, n.exec_prefix()
            else:
                addr, prefix = "127.0.0.1", None
            m = mounts(proxy.url, "--tracker", tracker.url, "--peer-listen", f"{addr}:{free_port()}",
                       "--node-id", name, "--location", location, "--secret-file", str(secret),
                       "--peer-timeout", "1", *extra, name=name, prefix=prefix)
            if lan:
                made_lans[-1][1].append(m)
            m.lan_node = n if lan else None
            m.mount()
            m.peer_address = f"{addr}:{m.args[m.args.index('--peer-listen') + 1].rsplit(':', 1)[1]}"
            return m

        node.lan = lan
        return proxy, tracker, node

    yield make
    for stop in reversed(stops):
        stop()
    for lan, nodes in made_lans:
        # Daemons first (the mounts fixture would only get to them after the namespaces are gone).
        for m in nodes:
            m.cleanup()
        lan.down()
