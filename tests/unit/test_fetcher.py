"""Reader and Fetcher against in-memory sources: single flight, coalescing, the order of sources,
handing chunks on, failures, priorities and readahead."""

from __future__ import annotations

import logging

import pytest
import trio

from fakes import CS, MemorySource, fetcher_of, meta_of, pattern, running
from thunderfs.cache.store import ChunkStore
from thunderfs.errors import FetchFailed, SourceFailed
from thunderfs.fetch.breaker import Breaker
from thunderfs.fetch.reader import Reader, Readers
from thunderfs.fetch.slots import DEMAND, PREFETCH, READAHEAD, PrioritySlots

DATA = pattern(64 * CS + 100)  # a short last chunk
META = meta_of(DATA)


def reader_of(store, fetcher, readahead=0) -> Reader:
    return Readers(store, fetcher, readahead=readahead).open(META)


async def test_a_missing_chunk_is_fetched_cached_and_then_served_from_the_cache(store):
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src)
    async with running(fetcher):
        r = reader_of(store, fetcher)
        assert await r.read(CS + 10, 100) == DATA[CS + 10:CS + 110]
        assert await r.read(CS, CS) == DATA[CS:2 * CS]
    assert src.asks == [[1]]
    assert r.img.cached(1) and not r.img.cached(0)
    s = fetcher.statistics()
    assert (s["chunks_from_origin"], s["bytes_from_origin"], s["flights"]) == (1, CS, 1)


async def test_the_short_last_chunk_and_reads_past_the_end(store):
    fetcher = fetcher_of(store, MemorySource("origin", DATA))
    async with running(fetcher):
        r = reader_of(store, fetcher)
        assert await r.read(len(DATA) - 150, 1000) == DATA[-150:]
        assert await r.read(len(DATA), 10) == b""
        assert await r.read(0, 0) == b""


async def test_readers_of_one_chunk_share_one_flight(store):
    gate = trio.Event()
    src = MemorySource("origin", DATA, gate=gate)
    fetcher = fetcher_of(store, src)
    got = []
    async with running(fetcher):
        r = reader_of(store, fetcher)

        async def read():
            got.append(await r.read(5 * CS, CS))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert fetcher.statistics()["in_flight"] == 1
            gate.set()
    assert got == [DATA[5 * CS:6 * CS]] * 10
    assert src.asks == [[5]]


async def test_adjacent_missing_chunks_go_in_one_request_split_at_max_request(store):
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src, max_request=4 * CS)
    async with running(fetcher):
        r = reader_of(store, fetcher)
        await r.read(2 * CS, CS)  # cached: not asked again
        assert await r.read(0, 10 * CS) == DATA[:10 * CS]
    assert src.asks[0] == [2]
    assert sorted(src.asks[1:]) == [[0, 1], [3, 4, 5, 6], [7, 8, 9]]  # flights run side by side


async def test_sources_are_asked_in_order_and_the_next_gets_only_what_is_left(store):
    peers = MemorySource("peers", DATA, has={1, 2, 5})
    glance = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, peers, glance)
    async with running(fetcher):
        assert await reader_of(store, fetcher).read(0, 8 * CS) == DATA[:8 * CS]
    assert peers.asks == [list(range(8))]
    assert sorted(c for ask in glance.asks for c in ask) == [0, 3, 4, 6, 7]
    s = fetcher.statistics()
    assert (s["chunks_from_peers"], s["chunks_from_origin"]) == (3, 5)


async def test_chunks_passed_on_are_fetched_at_once_while_the_first_source_still_works(store):
    # A peer source passes on what the tracker granted it and waits for the rest: the next
    # source must not wait for it (two nodes waiting for each other's claims would deadlock).
    gate = trio.Event()
    peers = MemorySource("peers", DATA, gate=gate, pass_on={0, 1})
    glance = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, peers, glance)
    async with running(fetcher):
        r = reader_of(store, fetcher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.read, 0, 4 * CS)
            while not r.img.cached(1):
                await trio.sleep(0.001)
            assert glance.asks == [[0, 1]] and not r.img.cached(2)
            gate.set()
    assert all(r.img.cached(c) for c in range(4))


async def test_chunks_no_source_delivers_fail_the_read(store):
    fetcher = fetcher_of(store, MemorySource("peers", DATA, has={0}), MemorySource("origin", DATA, has={1}))
    async with running(fetcher):
        r = reader_of(store, fetcher)
        with pytest.raises(FetchFailed, match="no source has chunks 2..3"):
            await r.read(0, 4 * CS)
        assert r.img.cached(0) and r.img.cached(1)  # what came is kept


async def test_a_failing_source_fails_its_readers_and_the_next_read_tries_again(store, caplog):
    glance = MemorySource("origin", DATA, error=SourceFailed("Glance answered 503"))
    fetcher = fetcher_of(store, glance)
    async with running(fetcher):
        r = reader_of(store, fetcher)
        with pytest.raises(FetchFailed, match="503"):
            await r.read(0, CS)
        glance.error = None
        assert await r.read(0, CS) == DATA[:CS]
    assert fetcher.statistics()["failures"] == 1
    assert not [r for r in caplog.records if r.exc_info]  # a source's failure is no bug: no traceback


async def test_a_bug_in_a_source_fails_the_read_and_is_logged_not_the_daemon(store, caplog):
    fetcher = fetcher_of(store, MemorySource("origin", DATA, error=KeyError("oops")))
    async with running(fetcher):
        with pytest.raises(FetchFailed, match="oops"):
            await reader_of(store, fetcher).read(0, CS)
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_a_reader_that_gives_up_does_not_cancel_the_flight_others_wait_for(store):
    gate = trio.Event()
    src = MemorySource("origin", DATA, gate=gate)
    fetcher = fetcher_of(store, src)
    async with running(fetcher):
        r = reader_of(store, fetcher)
        with trio.move_on_after(0.01):
            await r.read(0, CS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.read, 0, CS)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert src.asks == [[0]] and r.img.cached(0)


async def test_a_read_waits_no_longer_than_the_fetch_timeout(store, autojump_clock):
    fetcher = fetcher_of(store, MemorySource("origin", DATA, gate=trio.Event()), fetch_timeout=5)
    async with running(fetcher):
        started = trio.current_time()
        with pytest.raises(FetchFailed, match="within 6s"):
            await reader_of(store, fetcher).read(0, CS)
        assert trio.current_time() - started == pytest.approx(6)


async def test_with_no_room_in_the_cache_a_read_is_served_from_memory(tmp_path, index):
    small = ChunkStore(tmp_path, index, CS, 2 * CS)
    fetcher = fetcher_of(small, MemorySource("origin", DATA))
    async with running(fetcher):
        assert await reader_of(small, fetcher).read(0, 4 * CS) == DATA[:4 * CS]
    assert small.statistics()["bytes_not_cached"] > 0
    small.close()


async def test_sequential_reads_fetch_ahead_and_scattered_reads_do_not(store, monkeypatch):
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src, max_request=8 * CS)
    monkeypatch.setattr(Reader, "SEQUENTIAL_TRIGGER", 4 * CS)  # for this small image
    monkeypatch.setattr(Reader, "INITIAL_WINDOW", 16 * CS)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=32 * CS)
        for c in (40, 3, 20, 9):
            await r.read(c * CS, CS)
        assert fetcher.statistics()["readahead_chunks"] == 0
        for c in range(4):
            await r.read(c * CS, CS)
        await trio.testing.wait_all_tasks_blocked()
        assert fetcher.statistics()["readahead_chunks"] > 0
        assert r.img.cached(12)  # ahead of the reader, in requests of up to 8 chunks
    assert READAHEAD in [p for _, p in src.served] and max(len(a) for a in src.asks) <= 8


async def test_a_demand_read_overtakes_queued_prefetch_and_promotes_what_it_joins(store):
    slots = PrioritySlots(1)
    gate = trio.Event()
    src = MemorySource("origin", DATA, slots=slots, gate=gate)
    fetcher = fetcher_of(store, src)
    async with running(fetcher):
        img = store.image(META.content_key, META.size)
        fetcher.start(META, img, [0], PREFETCH)  # takes the one slot, held at the gate
        await trio.testing.wait_all_tasks_blocked()
        fetcher.start(META, img, [10], PREFETCH)
        await trio.testing.wait_all_tasks_blocked()
        fetcher.start(META, img, [20], PREFETCH)
        await trio.testing.wait_all_tasks_blocked()
        r = reader_of(store, fetcher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.read, 20 * CS, CS)  # joins the queued flight of chunk 20
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        await trio.testing.wait_all_tasks_blocked()
        # Started ahead of any reader, so counted as such though a reader's demand promoted one
        # (a slow origin lets a sequential reader catch up with its whole window: CI's load did).
        assert fetcher.statistics()["readahead_chunks"] == 3
    assert src.served == [([0], PREFETCH), ([20], DEMAND), ([10], PREFETCH)]


async def test_prefetch_waits_for_its_flights_and_does_not_raise(store):
    src = MemorySource("origin", DATA, error=SourceFailed("down"))
    fetcher = fetcher_of(store, src)
    async with running(fetcher):
        img = store.image(META.content_key, META.size)
        await fetcher.fetch(META, img, [1, 2, 3], PREFETCH)
        assert not img.cached(1)
        src.error = None
        await fetcher.fetch(META, img, [1, 2, 3], PREFETCH)
        assert img.missing(0, 3) == [0]


async def test_prefetch_yields_until_no_reader_waits(store):
    gate = trio.Event()
    fetcher = fetcher_of(store, MemorySource("origin", DATA, gate=gate))
    idle = False
    async with running(fetcher):
        r = reader_of(store, fetcher)

        async def prefetcher():
            nonlocal idle
            await fetcher.wait_demand_idle()
            idle = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.read, 0, CS)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(prefetcher)
            await trio.testing.wait_all_tasks_blocked()
            assert not idle
            gate.set()
    assert idle


async def test_every_delivered_run_is_observed_by_source(store):
    seen = []
    fetcher = fetcher_of(store, MemorySource("peers", DATA, has={0}), MemorySource("origin", DATA),
                         observe=lambda source, seconds: seen.append(source))
    async with running(fetcher):
        r = reader_of(store, fetcher)
        await r.read(0, 2 * CS)
    assert sorted(seen) == ["origin", "peers"]
    assert (r.img.counters["bytes_from_peers"], r.img.counters["bytes_from_origin"]) == (CS, CS)


def test_a_fetcher_needs_a_source(store):
    with pytest.raises(ValueError):
        fetcher_of(store)


async def test_a_miss_that_ends_a_read_brings_the_next_chunks_in_the_same_request_within_budget(store):
    """Scattered small reads (a boot's, with no profile): each miss at a read's end asks for the
    missing chunks after it in the same request, as far as 0.4 of the bytes read so far allows,
    up to the origin's bandwidth-delay product; the origin never sends 1.5 x what was read."""
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src, bdp=lambda: 2 * CS)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=2**20)
        assert await r.read(0, CS) == DATA[:CS]  # credit 0.4 chunk: nothing more
        assert await r.read(10 * CS, 2 * CS) == DATA[10 * CS:12 * CS]  # credit 1.2: one more
        assert await r.read(12 * CS, 100) == DATA[12 * CS:12 * CS + 100]  # served by it, no request
        assert await r.read(30 * CS, 8 * CS) == DATA[30 * CS:38 * CS]  # credit 3.4, capped at the BDP: 2
        assert await r.read(20 * CS, CS) == DATA[20 * CS:21 * CS]  # credit spent: nothing more
        assert await r.read(19 * CS, 2 * CS) == DATA[19 * CS:21 * CS]  # a miss not at the read's end
    assert src.asks == [[0], [10, 11, 12], list(range(30, 40)), [20], [19]]
    read = CS + 2 * CS + 100 + 8 * CS + CS + 2 * CS
    assert fetcher.statistics()["bytes_from_origin"] <= 1.5 * read


async def test_a_miss_is_extended_only_over_chunks_the_profile_expects(store):
    """With a profile prefetched, the boot reads what it lists: a miss's extension stops at the
    first chunk it does not list (each node of a storm guessing its own costs Glance)."""
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src, bdp=lambda: 8 * CS)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=2**20)
        r.expect(lambda chunk: chunk not in (13, 22))
        assert await r.read(0, CS) == DATA[:CS]  # credit 0.4 chunk: nothing more
        assert await r.read(10 * CS, 2 * CS) == DATA[10 * CS:12 * CS]  # credit 1.2: one more, 12
        assert await r.read(20 * CS, 2 * CS) == DATA[20 * CS:22 * CS]  # credit 1.0, but 22 is not expected
    assert src.asks == [[0], [10, 11, 12], [20, 21]]


async def test_chunks_another_image_holds_are_not_fetched_and_earn_a_miss_no_extension(store):
    """Issue 31: a new version of a cached image reads mostly chunks the old one holds; they are
    shared, not fetched, and the budget of a miss's extension grows with the image's own bytes
    read only (v2 booting after v1 fetched 2 MiB it never read before)."""
    from thunderfs_common import chunk_digest

    old = bytearray(DATA)
    old[20 * CS:24 * CS] = bytes(4 * CS)  # v2 (DATA) changed v1's chunks 20-23
    v1 = meta_of(bytes(old), image_id="v1")
    a = store.image(v1.content_key, v1.size)
    store.know_digests(a, b"".join(chunk_digest.digests(bytes(old), CS)))
    store.stage(a, 0, bytes(old))
    await store.commit()
    src = MemorySource("origin", DATA)
    fetcher = fetcher_of(store, src, bdp=lambda: 8 * CS)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=2**20)
        store.know_digests(r.img, b"".join(chunk_digest.digests(DATA, CS)))
        assert await r.read(0, 16 * CS) == DATA[:16 * CS]  # shared: no credit
        assert await r.read(20 * CS, CS) == DATA[20 * CS:21 * CS]  # a new chunk: no new neighbour with it
        assert await r.read(21 * CS, 2 * CS) == DATA[21 * CS:23 * CS]  # credit 1.2: still no extension
    assert src.asks == [[20], [21, 22]]  # a new version of a cached image fetches what it reads
    assert store.statistics()["used"] == len(DATA) + 3 * CS  # v1, and v2's chunks of its own


async def test_a_flapping_breaker_warns_once_a_quiet_period_and_counts_the_rest(caplog, autojump_clock):
    async def probe():
        return None

    b = Breaker("the tracker")
    with caplog.at_level("WARNING", logger="thunderfs.fetch.breaker"):
        for _ in range(5):  # the probe passes, the calls fail: open, close, open ...
            b.open("its answer failed authentication", probe)
            b.close()
            await trio.sleep(1)
        assert [r.getMessage().count("failed authentication") for r in caplog.records] == [1, 0]  # open, close
        await trio.sleep(Breaker.QUIET)
        b.open("its answer failed authentication", probe)
        assert "4 more time(s) since the last warning" in caplog.records[-1].getMessage()
    assert b.statistics()["opened"] == 6


class HalfThenGate:
    """Delivers a flight's first ``half`` chunks after ``first_gate``, the rest after ``gate``
    (or fails then)."""

    name = "origin"

    def __init__(self, half: int, first_gate: trio.Event, gate: trio.Event, error=None):
        self.half, self.first_gate, self.gate, self.error = half, first_gate, gate, error

    async def fetch(self, want, sink):
        first = want.chunks[0]
        await self.first_gate.wait()
        sink.put(first, DATA[first * CS:(first + min(self.half, len(want.chunks))) * CS])
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        rest = want.chunks[self.half:]
        if rest:
            sink.put(rest[0], DATA[rest[0] * CS:(rest[-1] + 1) * CS])
        return []


@pytest.mark.parametrize("fails", [False, True], ids=["then-ends", "then-fails"])
async def test_a_reader_goes_on_once_its_chunks_arrived_not_when_the_whole_flight_ends(store, fails):
    """A long request's pieces are cached as they arrive; a reader waiting for the first ones is
    served then, while a reader of them all waits (and fails only if the rest never come)."""
    first_gate, gate = trio.Event(), trio.Event()
    fetcher = fetcher_of(store, HalfThenGate(4, first_gate, gate, SourceFailed("gone") if fails else None))
    done = {}
    async with running(fetcher):
        r = reader_of(store, fetcher)

        async def read(name, chunk, n=1):
            try:
                done[name] = await r.read(chunk * CS, n * CS) == DATA[chunk * CS:(chunk + n) * CS]
            except FetchFailed:
                done[name] = "failed"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "all", 0, 16)  # one flight of chunks 0..15 (max_request)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read, "early", 1)
            nursery.start_soon(read, "early2", 2, 2)
            await trio.testing.wait_all_tasks_blocked()
            assert done == {}
            first_gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert done == {"early": True, "early2": True} and fetcher.in_flight(r.img, 10)
            gate.set()
    assert done["all"] == ("failed" if fails else True)


async def test_a_chunk_dropped_after_it_arrived_is_fetched_again_not_failed(store):
    """A chunk that arrived in a long flight and was dropped (found rotten, evicted) while the
    flight goes on: its reader waits for the flight's end and fetches it anew, instead of finding
    it "arrived" three times over and failing with EIO."""
    first_gate, gate = trio.Event(), trio.Event()
    src = HalfThenGate(4, first_gate, gate)
    fetcher = fetcher_of(store, src)
    done = {}
    async with running(fetcher):
        r = reader_of(store, fetcher)

        async def read(name, chunk, n=1):
            done[name] = await r.read(chunk * CS, n * CS) == DATA[chunk * CS:(chunk + n) * CS]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "all", 0, 16)
            await trio.testing.wait_all_tasks_blocked()
            first_gate.set()
            await trio.testing.wait_all_tasks_blocked()
            store.space.release(r.img, 1)  # dropped right after it arrived; the flight goes on
            nursery.start_soon(read, "again", 1)
            await trio.testing.wait_all_tasks_blocked()
            assert "again" not in done  # waiting for the flight, not failing
            src.first_gate = trio.Event()
            src.first_gate.set()
            gate.set()
    assert done == {"all": True, "again": True}


async def test_a_misses_extension_neither_holds_up_nor_bounds_its_reader(store, monkeypatch, autojump_clock):
    """The chunks after a miss join its request, but the reader returns once its own chunks are
    here, and gives up after the deadline of its own bytes, not of the extension's (the chaos run
    once saw a 1 MiB read fail only after 29 s: its limit had counted the extension)."""
    first_gate, never = trio.Event(), trio.Event()
    first_gate.set()
    src = HalfThenGate(8, first_gate, never)
    fetcher = fetcher_of(store, src, bdp=lambda: 32 * CS, fetch_timeout=5)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=2**20)
        assert await r.read(0, 8 * CS) == DATA[:8 * CS]  # chunks 8..10 joined it and never come
        assert trio.current_time() == 0 and fetcher.in_flight(r.img, 8)
    # One second per chunk: the deadline of a read of 1 chunk is 6 s, of 1 + 3 it would be 9 s.
    monkeypatch.setattr("thunderfs.fetch.fetcher.deadline_for", lambda timeout, nbytes: timeout + nbytes / CS)
    fetcher = fetcher_of(store, MemorySource("origin", DATA, gate=trio.Event()), bdp=lambda: 32 * CS,
                         fetch_timeout=5)
    async with running(fetcher):
        r = reader_of(store, fetcher, readahead=2**20)
        r._credit = 3 * CS
        started = trio.current_time()
        with pytest.raises(FetchFailed, match="within 7s"):
            await r.read(20 * CS, CS)
        assert trio.current_time() - started == pytest.approx(7)


async def test_a_reader_that_sought_holes_fetches_no_known_zero_chunk(store):
    """Once a seek found the image's zero chunks (its manifest's), reads of them are answered
    with zeros and nothing is fetched, ahead or on demand; without them, every chunk is data."""
    import os

    from thunderfs.fetch.zero_chunks import ZeroChunks
    data = bytearray(DATA)
    data[2 * CS:6 * CS] = bytes(4 * CS)  # chunks 2..5 are zeros
    meta = meta_of(bytes(data))
    flags = bytes(1 if 2 <= c <= 5 else 0 for c in range(65))
    asked = []

    async def zeros(m):
        asked.append(m.id)
        return ZeroChunks(flags, CS, len(data))

    src = MemorySource("origin", bytes(data))
    fetcher = fetcher_of(store, src)
    async with running(fetcher):
        r = Readers(store, fetcher, readahead=0, zeros=zeros).open(meta)
        assert await r.seek(0, os.SEEK_HOLE) == 2 * CS and await r.seek(2 * CS, os.SEEK_DATA) == 6 * CS
        assert await r.read(CS, 5 * CS) == bytes(data[CS:6 * CS])  # chunk 1 fetched, 2..5 not
        assert await r.read(3 * CS, 10) == bytes(10)
        plain = Readers(store, fetcher, readahead=0).open(meta_of(bytes(data), "dddddddd-0000-0000-0000-000000000009"))
        assert await plain.seek(CS, os.SEEK_HOLE) == len(data)  # nothing known: all data
    assert src.asks == [[1]] and asked == [meta.id, meta.id]
    assert not any(r.img.cached(c) for c in range(2, 6))
