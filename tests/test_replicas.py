"""Tracker replicas on a shared Redis: real redis-server, two real trackers, real daemons.

Nodes are given both replicas' URLs; each talks to one (chosen by its id) and moves to the other
when it fails.  Whatever replica a node asks, the answer is the same (peer state and boot profiles
live in Redis); a replica killed costs nothing a reader sees; Redis down makes the trackers say
503 and why while the nodes go on with Glance; Redis back empty makes them ask for state again.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from conftest import SECRET, wait_for
from harness.local_glance import free_port
from harness.local_redis import LocalRedis
from harness.tracker import LocalTracker
from thunderfs_common.signing import sign

CHUNK = 64 * 1024


REDIS_PASSWORD = "a-redis-password-of-this-cluster"


@pytest.fixture
def replicas(tmp_path, glance):
    """Two trackers on one Redis as operators run it: a password, and TLS only (rediss://, the CA
    file in the URL)."""
    redis = LocalRedis(tmp_path / "redis", password=REDIS_PASSWORD, tls=True).start()
    trackers = []
    for i in range(2):
        t = LocalTracker(tmp_path / f"tracker{i}", "--glance", glance.url, "--heartbeat", "1", "--node-ttl", "4",
                         "--store", redis.url, secret=SECRET)
        t.start()
        trackers.append(t)
    yield redis, trackers
    for t in trackers:
        t.stop()
        assert "Traceback" not in t.log()
    redis.stop()


@pytest.fixture
def node(tmp_path, mounts, glance, replicas):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    urls = ",".join(t.url for t in replicas[1])

    def make(name: str):
        m = mounts(glance.url, "--tracker", urls, "--peer-listen", f"127.0.0.1:{free_port()}", "--node-id", name,
                   "--location", f"z1/r1/{name}", "--secret-file", str(secret), "--peer-timeout", "1", "--record-idle", "1", name=name)
        m.mount()
        return m
    return make


def signed_get(url: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, headers=sign(SECRET, "probe", "GET", path))
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def the_replica_of(m, trackers) -> LocalTracker:
    url = m.stats()["announcer"]["tracker"]
    return next(t for t in trackers if t.url == url)


def test_replicas_answer_the_same_and_a_killed_one_costs_readers_nothing(replicas, node, images):
    redis, trackers = replicas
    image_id = images.add(48 * CHUNK + 7, seed=300)
    data = images.data[image_id]
    a = node("a")
    assert a.image(image_id).read_bytes() == data
    content = os.getxattr(a.image(image_id), "user.thunderfs.content_key").decode()
    path = f"/v1/images/{content}/peers?first=0&last=48"
    # a's chunks reach Redis through its replica; both replicas name a as the holder.
    wait_for(lambda: all(signed_get(t.url, path)[0] == 200 and signed_get(t.url, path)[1]["peers"]
                         for t in trackers), what="both replicas to know a's chunks")
    assert {p["node_id"] for t in trackers for p in signed_get(t.url, path)[1]["peers"]} == {"a"}
    # The boot profile a recorded (sent through its replica) is the same through both.
    profile = f"/v1/profiles/{content}?chunk_size={CHUNK}"
    wait_for(lambda: all(signed_get(t.url, profile)[0] == 200 for t in trackers), what="a's profile")
    assert signed_get(trackers[0].url, profile) == signed_get(trackers[1].url, profile)
    # Kill the replica that a uses: a moves to the other and keeps announcing.
    used = the_replica_of(a, trackers)
    os.killpg(used.proc.pid, signal.SIGKILL)
    used.proc.wait()
    used.proc = None
    wait_for(lambda: a.stats()["announcer"]["tracker_failovers"] >= 1, what="a to fail over")
    b = node("b")
    c = node("c")
    for m in (b, c):  # whichever replica each was given, they find a through the live one
        assert m.image(image_id).read_bytes() == data
        s = m.stats()
        assert s["fetch"]["bytes_from_origin"] == 0 and s["fetch"]["bytes_from_peers"] == len(data)
    assert a.stats()["announcer"]["tracker_ok"]


def test_redis_down_is_a_503_saying_why_and_back_empty_nodes_send_their_state_again(replicas, node, images):
    redis, trackers = replicas
    image_id = images.add(16 * CHUNK, seed=301)
    data = images.data[image_id]
    a = node("a")
    assert a.image(image_id).read_bytes() == data
    content = os.getxattr(a.image(image_id), "user.thunderfs.content_key").decode()
    path = f"/v1/images/{content}/peers?first=0&last=15"
    wait_for(lambda: signed_get(trackers[0].url, path)[0] == 200, what="a's chunks in Redis")
    epoch = signed_get(trackers[0].url, "/v1/stats")[1]["epoch"]
    redis.stop()
    status, body = signed_get(trackers[1].url, path)
    assert status == 503 and "Redis" in body["error"]
    # Nodes go on: another node reads from Glance (and the peers it knows: none yet).
    b = node("b")
    assert b.image(image_id).read_bytes() == data
    # Redis comes back empty (no persistence): a new epoch, nodes send their full state again,
    # and a lookup finds a within a few heartbeats.
    redis.start()
    wait_for(lambda: signed_get(trackers[1].url, path)[0] == 200
             and {p["node_id"] for p in signed_get(trackers[1].url, path)[1]["peers"]} >= {"a"},
             timeout=15, what="a's state to be sent again")
    assert signed_get(trackers[0].url, "/v1/stats")[1]["epoch"] != epoch
    assert "Traceback" not in a.log_tail(10**6)


def test_a_replica_with_the_wrong_redis_password_says_so_and_never_shows_a_password(replicas, tmp_path):
    redis, _ = replicas
    wrong = redis.url.replace(REDIS_PASSWORD, "not-the-password")
    t = LocalTracker(tmp_path / "wrong", "--store", wrong, secret=SECRET)
    t.start()
    try:
        status, body = signed_get(t.url, "/v1/stats")
        assert status == 503 and f"Redis at {redis.host}:{redis.port}/0" in body["error"], body
        assert "not-the-password" not in body["error"] and REDIS_PASSWORD not in body["error"]
    finally:
        t.stop()
    assert "not-the-password" not in t.log() and REDIS_PASSWORD not in t.log()
