"""Boot access profiles on real daemons, a real tracker and a real Glance: recording on the
first open, merging at the tracker, prefetching on another node, warming, demand reads
overtaking a running prefetch, and profiles that are missing, broken or unreachable.

Reads go through O_DIRECT so that the kernel's readahead does not touch chunks the test did not
ask for (the profile would then rightly contain them).
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import time
import urllib.error
import urllib.request

import pytest

import conftest
from conftest import SECRET
from harness.mounts import thunderfs
from thunderfs_common.signing import sign

CHUNK = 64 * 1024


def read_direct(path, chunks, pause=0.0):
    """4 KiB of each of ``chunks``, in that order, bypassing the page cache."""
    buf = mmap.mmap(-1, 4096)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    out = []
    try:
        for c in chunks:
            assert os.preadv(fd, [buf], c * CHUNK) == 4096
            out.append(bytes(buf))
            time.sleep(pause)
    finally:
        os.close(fd)
    return out


wait_for = functools.partial(conftest.wait_for, timeout=30)  # a recording ends after reads stop


def activity(m, image_id):
    for a in m.stats()["profiles"].values():
        if a["image_id"] == image_id:
            return a
    return None


def show(m, image_id):
    res = thunderfs("profile", "show", image_id, "--mountpoint", str(m.path), "--json")
    return json.loads(res.stdout) if res.returncode == 0 else None


def post_recording(tracker, content, nchunks, touches, node="tester", secret=SECRET):
    path = f"/v1/profiles/{content}?chunk_size={CHUNK}"
    body = json.dumps({"nchunks": nchunks, "chunks": touches}).encode()
    req = urllib.request.Request(tracker.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **sign(secret, node, "POST", path, body)})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def content_of(m, image_id):
    return os.getxattr(m.image(image_id), "user.thunderfs.content_key").decode()


# --- the tracker's side, alone ---------------------------------------------------------------








def test_malformed_recordings_get_a_400_that_says_why(make_cluster):
    _, tracker, _ = make_cluster()
    content = "ef" * 16
    cases = [
        ({"nchunks": 10, "chunks": [[10, 0]]}, "outside the image"),
        ({"nchunks": 10, "chunks": [[1, -5]]}, "time"),
        ({"nchunks": 10, "chunks": [[1, 0], [1, 3]]}, "twice"),
        ({"nchunks": 10, "chunks": [["1", 0]]}, "two integers"),
        ({"nchunks": 0, "chunks": [[0, 0]]}, "nchunks"),
        ({"nchunks": 10, "chunks": []}, "empty"),
        ({"nchunks": 10, "chunks": [[c, 0] for c in range(200_001)]}, "at most"),
    ]
    for body, why in cases:
        with pytest.raises(urllib.error.HTTPError) as exc:
            post_recording(tracker, content, body["nchunks"], body["chunks"])
        assert exc.value.code == 400
        assert why in json.loads(exc.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as exc:  # not a member
        post_recording(tracker, content, 10, [[1, 0]], secret=b"not-the-secret-at-all-0000")
    assert exc.value.code == 401


# --- on real mounts --------------------------------------------------------------------------


def test_a_first_open_is_recorded_and_another_node_prefetches_it(make_cluster, images):
    proxy, tracker, node = make_cluster()
    image_id = images.add(64 * CHUNK, seed=300)
    data = images.data[image_id]
    a = node("a", "z/r/a", "--record-idle", "1", "--readahead", "0")
    order = [40, 3, 17, 18, 60]
    got = read_direct(a.image(image_id), order, pause=0.05)
    assert got == [data[c * CHUNK:c * CHUNK + 4096] for c in order]
    profile = wait_for(lambda: show(a, image_id), what="a profile at the tracker")
    assert [c for c, _ in profile["chunks"]] == order
    assert profile["version"] == 1 and profile["recordings"] == 1
    assert activity(a, image_id)["recordings_sent"] == 1

    # Another node opens it with nothing cached: the profile's chunks come in before any read.
    b = node("b", "z/r/b", "--record-window", "0", "--readahead", "0")
    with open(b.image(image_id), "rb"):
        wait_for(lambda: (s := activity(b, image_id)) and s["job"] is None and s["prefetched"] == 5,
                 what="the prefetch")
    assert b.stats()["cache"]["used"] == 5 * CHUNK  # those chunks, nothing else
    got = read_direct(b.image(image_id), order)
    assert got == [data[c * CHUNK:c * CHUNK + 4096] for c in order]
    s = activity(b, image_id)
    assert (s["hits"], s["waste"], s["demand_waits"]) == (5, 0, 0)
    read_direct(b.image(image_id), [50])  # not in the profile: a read that waits
    assert activity(b, image_id)["demand_waits"] == 1


def test_recordings_from_two_nodes_merge(make_cluster, images):
    proxy, tracker, node = make_cluster()
    image_id = images.add(32 * CHUNK, seed=301)
    a = node("a", "z/r/a", "--record-idle", "1", "--readahead", "0", "--prefetch-flights", "0")
    b = node("b", "z/r/b", "--record-idle", "1", "--readahead", "0", "--prefetch-flights", "0")
    read_direct(a.image(image_id), [1, 2, 3], pause=0.05)
    wait_for(lambda: show(a, image_id), what="a's recording")
    read_direct(b.image(image_id), [1, 9, 3], pause=0.05)
    p = wait_for(lambda: (p := show(a, image_id)) and p["version"] == 2 and p, what="b's recording")
    assert p["recordings"] == 2
    assert sorted(c for c, _ in p["chunks"]) == [1, 2, 3, 9]
    # By median first-touch time: both nodes read 1 before 3, so 1 comes before 3 whatever each
    # first read cost (where 9, which one node read, falls depends on that: under load a first
    # fetch can take longer than the pauses here).
    order = [c for c, _ in p["chunks"]]
    assert order.index(1) < order.index(3)


@pytest.mark.timeout(300)
def test_demand_reads_overtake_a_running_prefetch(make_cluster, images):
    # Glance (and the tracker) behind a real 16 Mbit/s link: the prefetch of 16 MiB takes ~8 s.
    proxy, tracker, node = make_cluster(netns=True, root_rate="16mbit")
    image_id = images.add(256 * CHUNK, seed=302)
    data = images.data[image_id]
    # One prefetch flight: its first batch (128 chunks) is far from chunk 250.
    b = node("b", "z/r/b", "--record-window", "0", "--readahead", "0", "--prefetch-idle", "60",
             "--prefetch-flights", "1")
    content = content_of(b, image_id)
    post_recording(tracker, content, 256, [[c, c * 10] for c in range(256)])
    with open(b.image(image_id), "rb"):
        wait_for(lambda: (s := activity(b, image_id)) and s["prefetched"] > 0, what="the prefetch to start")
        assert read_direct(b.image(image_id), [250]) == [data[250 * CHUNK:250 * CHUNK + 4096]]
        # The read is served while the prefetch is still far from chunk 250: it did not wait for
        # the prefetch to get there (its own way, tracker then Glance, crosses the same busy link).
        s = activity(b, image_id)
        assert s["job"] == "prefetch" and s["job_done"] < 200, s
        wait_for(lambda: activity(b, image_id)["job"] is None, timeout=120, what="the prefetch to finish")
    s = activity(b, image_id)
    assert s["prefetched"] == 255  # chunk 250 was the reader's, not the prefetch's
    assert b.stats()["cache"]["used"] == 256 * CHUNK


def test_prefetch_stops_when_nobody_reads_and_without_a_tracker_reads_still_work(make_cluster, images):
    # No seed: the prefetch goes to Glance, whose --origin-rate keeps it slow enough to be stopped.
    proxy, tracker, node = make_cluster(tracker_args=("--seed-cache", "0"))
    # 512 chunks: four batches of 128 (with 256 it once fetched both before it looked at the idle time).
    image_id = images.add(512 * CHUNK, seed=303)
    data = images.data[image_id]
    b = node("b", "z/r/b", "--record-window", "0", "--readahead", "0", "--prefetch-idle", "1",
             "--origin-rate", "1M", "--prefetch-flights", "1")
    post_recording(tracker, content_of(b, image_id), 512, [[c, c] for c in range(512)])
    with open(b.image(image_id), "rb"):
        wait_for(lambda: (s := activity(b, image_id)) and s["prefetched"] > 0, what="the prefetch to start")
        wait_for(lambda: activity(b, image_id)["job"] is None, timeout=20, what="the idle prefetch to stop")
    assert activity(b, image_id)["prefetched"] < 512  # it stopped between batches, before the end
    assert "stopped: nobody has read it" in b.log_tail()

    tracker.stop()
    other = images.add(16 * CHUNK, seed=304)
    assert b.image(other).read_bytes() == images.data[other]
    assert activity(b, other)["prefetched"] == 0
    assert "no profile of" in b.log_tail()
    assert data  # (the first image's bytes were checked by the prefetch's own verification)


def test_warm_fetches_the_profile_first_then_the_whole_image(make_cluster, images):
    proxy, tracker, node = make_cluster()
    image_id = images.add(200 * CHUNK + 77, seed=305)
    data = images.data[image_id]
    b = node("b", "z/r/b", "--record-window", "0", "--prefetch-flights", "0")
    post_recording(tracker, content_of(b, image_id), 201, [[150, 0], [151, 5], [7, 10]])
    before = len(proxy.ranges)
    res = thunderfs("warm", str(b.path), image_id, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "201 chunks cached of 201" in res.stdout
    first = proxy.ranges[before]
    assert first.startswith(f"bytes={150 * CHUNK}-") or first.startswith(f"bytes={7 * CHUNK}-"), proxy.ranges[before:]
    assert b.stats()["cache"]["used"] == len(data)
    glance_bytes = proxy.range_bytes
    assert b.image(image_id).read_bytes() == data
    assert proxy.range_bytes == glance_bytes  # all of it was cached
    assert activity(b, image_id)["prefetched"] == 0  # warm is not prefetch: no hit/waste counting


def test_record_and_prefetch_on_demand_from_the_command_line(make_cluster, images):
    proxy, tracker, node = make_cluster()
    image_id = images.add(32 * CHUNK, seed=306)
    a = node("a", "z/r/a", "--record-window", "0", "--record-idle", "1", "--prefetch-flights", "0",
             "--readahead", "0")
    read_direct(a.image(image_id), [30])  # not recorded: automatic recording is off
    res = thunderfs("profile", "record", str(a.path), image_id, "--seconds", "20")
    assert res.returncode == 0 and "recording" in res.stdout, res.stderr
    read_direct(a.image(image_id), [4, 5, 20], pause=0.05)
    p = wait_for(lambda: show(a, image_id), what="the recording")
    assert [c for c, _ in p["chunks"]] == [4, 5, 20]
    res = thunderfs("profile", "show", image_id, "--mountpoint", str(a.path))
    assert "3 chunks" in res.stdout and "version 1" in res.stdout, res.stdout

    b = node("b", "z/r/b", "--record-window", "0", "--prefetch-flights", "0")
    with open(b.image(image_id), "rb"):
        time.sleep(1)
    assert b.stats()["cache"]["used"] == 0  # no automatic prefetch
    res = thunderfs("prefetch", str(b.path), image_id)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: (s := activity(b, image_id)) and s["job"] is None and s["prefetched"] == 3, what="prefetch")
    assert b.stats()["cache"]["used"] == 3 * CHUNK
    res = thunderfs("profile", "show", "no-such-image", "--mountpoint", str(b.path))
    assert res.returncode == 1 and "no active image" in res.stderr


def test_warm_takes_over_a_running_prefetch(make_cluster, images):
    proxy, tracker, node = make_cluster()
    image_id = images.add(64 * CHUNK, seed=307)
    b = node("b", "z/r/b", "--record-window", "0", "--origin-rate", "512K", "--prefetch-flights", "1")
    post_recording(tracker, content_of(b, image_id), 64, [[c, c] for c in range(0, 64, 2)])  # 32 requests
    with open(b.image(image_id), "rb"):
        wait_for(lambda: (s := activity(b, image_id)) and s["job"] == "prefetch" and s["prefetched"] > 0,
                 what="the prefetch to start")
        res = thunderfs("warm", str(b.path), image_id, "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "64 chunks cached of 64" in res.stdout
    assert b.image(image_id).read_bytes() == images.data[image_id]
