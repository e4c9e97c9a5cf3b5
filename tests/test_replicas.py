"""Tracker replicas on a shared Redis: real redis-server, two real trackers, real daemons.

Nodes are given both replicas' URLs; each talks to one (chosen by its id) and moves to the other
when it fails.  Whatever replica a node asks, the answer is the same (peer state and boot profiles
live in Redis); a replica killed costs nothing a reader sees; Redis down makes the trackers say
503 and why while the nodes go on with Glance; Redis back empty makes them ask for state again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
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


def test_a_request_replayed_to_another_replica_is_refused(replicas):
    """The replicas remember signed requests' nonces together (in Redis): what one answered, a
    machine in the middle cannot replay to the other."""
    _, trackers = replicas
    headers = sign(SECRET, "probe", "GET", "/v1/stats")

    def get(url):
        req = urllib.request.Request(url + "/v1/stats", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    assert get(trackers[0].url)[0] == 200
    status, body = get(trackers[1].url)
    assert status == 401 and "replayed" in body["error"]


def test_a_manifest_altered_in_redis_is_not_served_but_built_again(replicas, node, images, glance, tmp_path):
    """Whoever can write to Redis (but has neither the key nor the secret) cannot poison a
    manifest: its proof is checked when a replica loads it."""
    redis, trackers = replicas
    image_id = images.add(8 * CHUNK + 5, seed=305)
    a = node("a")
    assert a.image(image_id).read_bytes() == images.data[image_id]
    path = f"/v1/manifests/{image_id}?chunk_size={CHUNK}"
    real = wait_for(lambda: (r := signed_get(trackers[0].url, path))[0] == 200 and r[1], what="the manifest")
    forged = dict(real, blake3=base64.b64encode(bytes(32) + base64.b64decode(real["blake3"])[32:]).decode())
    key = f"tf:m:{image_id}:{CHUNK}"
    cli = ["redis-cli", "--tls", "--cacert", str(redis.tls[0]), "-h", redis.host, "-p", str(redis.port),
           "-a", REDIS_PASSWORD, "--no-auth-warning"]
    subprocess.run([*cli, "SET", key, json.dumps(forged)], check=True, capture_output=True)
    # A replica that has not seen it (a new one: nothing in its memory or on its disk) loads it
    # from Redis, finds the proof broken, and builds it again from Glance rather than serve it.
    fresh = LocalTracker(tmp_path / "tracker-new", "--glance", glance.url, "--store", redis.url, secret=SECRET)
    fresh.start()
    try:
        status, body = signed_get(fresh.url, path)
        assert status in (200, 202) and body.get("blake3") != forged["blake3"]
        rebuilt = wait_for(lambda: (r := signed_get(fresh.url, path))[0] == 200 and r[1], what="a rebuilt manifest")
        assert rebuilt["blake3"] == real["blake3"]
        assert "fails its proof" in fresh.log()
    finally:
        fresh.stop()


def test_a_replica_that_cannot_verify_redis_certificate_says_so(replicas, tmp_path):
    """TLS to Redis with another CA than the one that signed Redis's certificate: a 503 naming
    Redis and the certificate, not a connection made anyway."""
    from harness.tls import make_ca_and_server

    redis, _ = replicas
    other_ca = make_ca_and_server(tmp_path / "other-ca")[0]
    url = redis.url.replace(str(redis.tls[0]), str(other_ca))
    t = LocalTracker(tmp_path / "wrong-ca", "--store", url, secret=SECRET)
    t.start()
    try:
        status, body = signed_get(t.url, "/v1/stats")
        assert status == 503 and "Redis at" in body["error"] and "certificate" in body["error"].lower(), body
    finally:
        t.stop()
    assert "Traceback" not in t.log()
