"""Boot profiles on a node, with a fake tracker and an in-memory source: the first open records
and sends what readers touch; an open prefetches along the profile, counting hits and waste; a
profile of another content is ignored; warm fetches the rest too."""

from __future__ import annotations

import trio

from fakes import CS, MemorySource, fetcher_of, meta_of, pattern, running
from thunderfs.fetch.reader import Readers
from thunderfs.profiles.registry import Profiles
from thunderfs_common.tracker_protocol import Profile

DATA = pattern(40 * CS)
META = meta_of(DATA)


class ProfileTracker:
    def __init__(self, touches=None, content=None):
        self.touches = touches
        self.content = content
        self.recordings: list[list[tuple[int, int]]] = []

    async def profile(self, content, chunk_size):
        if self.touches is None:
            return None
        return Profile(self.content or content, chunk_size, 40, 3, 1, self.touches)

    async def add_recording(self, content, chunk_size, nchunks, touches):
        self.recordings.append(list(touches))
        return len(self.recordings)


def build(store, tracker, **kw):
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src)
    profiles = Profiles(fetcher, tracker, chunk_size=CS, **kw)
    return src, fetcher, profiles, Readers(store, fetcher, on_open=[profiles.opened])


async def test_the_first_open_records_what_readers_touch_and_sends_it(store, autojump_clock):
    tracker = ProfileTracker()
    src, fetcher, profiles, readers = build(store, tracker, record_idle=5, prefetch_flights=0)
    async with running(fetcher, profiles):
        r = readers.open(META)
        for c in (7, 3, 7, 30):
            await r.read(c * CS, 100)
            await trio.sleep(1)
        await trio.sleep(10)  # reads stopped: the recording ends and goes to the tracker
    assert [c for c, _ in tracker.recordings[0]] == [7, 3, 30]
    assert [ms for _, ms in tracker.recordings[0]] == [0, 1000, 3000]


async def test_an_open_prefetches_the_profile_in_order_and_counts_hits_and_waste(store):
    tracker = ProfileTracker(touches=[(9, 0), (2, 10), (5, 20)])
    src, fetcher, profiles, readers = build(store, tracker, record_window=0, prefetch_flights=1, batch_chunks=1)
    async with running(fetcher, profiles):
        r = readers.open(META)
        img = r.img
        while profiles.statistics()[img.content.hex()]["job"] is not None or not img.cached(5):
            await trio.sleep(0.01)
        await r.read(2 * CS, 10)
    assert [ask for ask in src.asks] == [[9], [2], [5]]
    s = profiles.statistics()[img.content.hex()]
    assert (s["prefetched"], s["hits"], s["waste"], s["profile_version"]) == (3, 1, 2, 3)


async def test_a_profile_of_another_content_is_ignored(store, caplog):
    tracker = ProfileTracker(touches=[(1, 0)], content="ff" * 16)
    src, fetcher, profiles, readers = build(store, tracker, record_window=0)
    async with running(fetcher, profiles):
        readers.open(META)
        while "for another content" not in caplog.text:
            await trio.sleep(0.01)
    assert src.asks == []


async def test_warm_fetches_the_profile_first_then_everything_else(store):
    tracker = ProfileTracker(touches=[(30, 0), (4, 5)])
    src, fetcher, profiles, readers = build(store, tracker, record_window=0, prefetch_flights=1)
    async with running(fetcher, profiles):
        img = store.image(META.content_key, META.size)
        act = profiles.start_job(META, img, "warm")
        while act.job is not None or act.job_total == 0:
            await trio.sleep(0.01)
    assert sorted(src.asks[:2]) == [[4], [30]]  # the profile's chunks first (two flights at once)
    assert img.cached_count() == img.nchunks and act.stats["prefetched"] == 0  # warm is not prefetch
