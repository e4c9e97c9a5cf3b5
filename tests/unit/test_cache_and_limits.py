"""The layers below the fs, driven directly (no mount): store, index, slots, runs, sizes."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
import trio

from fakes import CS
from thunderfs.cache.index import Put
import thunderfs.cache.reading as reading_mod
import thunderfs.cache.space as space_mod
import thunderfs.cache.store as store_mod
from thunderfs.cache.store import ABSENT, INDEXED, PENDING, ChunkStore
from thunderfs.errors import CacheError, ChunkCorrupt
from thunderfs_common.chunk_runs import runs
from thunderfs_common.image import ImageMeta
from thunderfs.fetch.slots import DEMAND, PREFETCH, READAHEAD, PrioritySlots
from thunderfs_common.units import parse_size

CONTENT = bytes(range(16))


def store_of(tmp_path, index, capacity=10 * CS):
    return ChunkStore(tmp_path, index, CS, capacity)


def test_parse_size():
    assert parse_size("64K") == 65536
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("1.5M") == 1572864
    assert parse_size("4096") == 4096
    for bad in ("", "x", "-1", "5Q"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_runs_coalesce_adjacent_chunks_up_to_a_limit():
    assert runs([1, 2, 3, 7, 8, 10], 10) == [(1, 3), (7, 2), (10, 1)]
    assert runs(list(range(5)), 2) == [(0, 2), (2, 2), (4, 1)]
    assert runs([], 4) == []


def test_content_key_differs_when_the_bytes_differ():
    base = dict(id="i", name="n", size=10, status="active", os_hash_algo="sha512", checksum=None,
                created_at=None, updated_at=None)
    a = ImageMeta(os_hash_value="aa", **base)
    b = ImageMeta(os_hash_value="bb", **base)
    assert a.content_key != b.content_key
    assert a.content_key == ImageMeta(os_hash_value="aa", **base).content_key


def test_index_deletes_before_puts_in_one_commit(index):
    index.commit(puts=[Put(CONTENT, 1, CS, 11, 100)])
    # Evicted, then fetched again before the delete was committed: the new put wins.
    index.commit(deletes=[(CONTENT, 1)], puts=[Put(CONTENT, 1, CS, 22, 200)])
    (rec,) = index.chunks_of(CONTENT)
    assert (rec.chunk, rec.xxh3) == (1, 22)
    assert index.used_bytes() == CS
    assert [c for _, c, _ in index.lru_oldest()] == [1]


def test_a_chunk_put_and_touched_in_one_commit_has_one_lru_entry(index):
    """A put over an indexed chunk moves its LRU key, and a second put or a touch of a chunk put
    in the same commit moves the key that put made: one key per chunk, at its last use."""
    index.commit(puts=[Put(CONTENT, 1, CS, 11, 100)])
    index.commit(puts=[Put(CONTENT, 2, CS, 22, 200), Put(CONTENT, 1, CS, 12, 200), Put(CONTENT, 2, CS, 23, 250)],
                 touches=[(CONTENT, 2, 300), (CONTENT, 1, 150), (CONTENT, 3, 300)])
    assert sorted((t, c) for _, c, t in index.lru_oldest()) == [(200, 1), (300, 2)]
    assert [(r.chunk, r.xxh3, r.last_use) for r in index.chunks_of(CONTENT)] == [(1, 12, 200), (2, 23, 300)]
    assert index.used_bytes() == 2 * CS


def test_index_refuses_another_chunk_size(tmp_path, index):
    from thunderfs.errors import CacheLayoutError
    with pytest.raises(CacheLayoutError):
        index.check_layout(2 * CS)


async def test_staged_chunks_become_durable_and_survive_a_restart(tmp_path, index):
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 3 * CS + 100)
    data = os.urandom(2 * CS)
    assert store.stage(img, 1, data)
    assert img.state[1] == img.state[2] == PENDING
    assert await store.read(img, CS, 2 * CS) == data
    await store.commit()
    assert img.state[1] == INDEXED
    store.close()
    again = store_of(tmp_path, index)
    img2 = again.image(CONTENT, 3 * CS + 100)
    assert img2.state[1] == INDEXED and img2.state[0] == ABSENT
    assert await again.read(img2, CS + 10, 100) == data[10:110]
    again.close()


async def test_a_corrupt_chunk_is_dropped_not_served(tmp_path, index):
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    store.stage(img, 0, os.urandom(4 * CS))
    await store.commit()
    store.close()
    with open(tmp_path / "data" / f"{CONTENT.hex()}.data", "r+b") as f:
        f.seek(2 * CS + 7)
        f.write(b"\x00\x01")
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    with pytest.raises(ChunkCorrupt) as exc:
        await store.read(img, 0, 4 * CS)
    assert exc.value.chunk == 2
    assert img.state[2] == ABSENT
    await store.commit()
    assert [r.chunk for r in index.chunks_of(CONTENT)] == [0, 1, 3]
    store.close()


async def test_bytes_that_rot_after_their_first_read_are_never_served(tmp_path, index):
    """Checked on every read from the data file, not once per process: a chunk read fine a moment
    ago and damaged since (bit rot, a stray write) is dropped, whether staged by this process or
    indexed before it."""
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    data = os.urandom(4 * CS)
    store.stage(img, 0, data)
    await store.commit()
    assert await store.read(img, 100, 3 * CS) == data[100:100 + 3 * CS]
    assert await store.read(img, CS + 5, 10) == data[CS + 5:CS + 15]  # a small read checks its whole chunk
    with open(img.path, "r+b") as f:
        f.seek(CS + CS // 2)
        f.write(b"\xff\x00")
    with pytest.raises(ChunkCorrupt) as exc:
        await store.read(img, CS + 5, 10)  # these 10 bytes are intact; their chunk is not
    assert exc.value.chunk == 1 and img.state[1] == ABSENT
    assert await store.read(img, 0, 100) == data[:100]  # the others still serve
    assert store.statistics()["corrupt_dropped"] == 1
    store.close()


def _evict_pages(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_reads_the_page_cache_lacks_go_to_threads_checked_the_same(tmp_path, index):
    """Bytes in the page cache are read in the event loop; bytes that must come from the disk are
    read and hashed in a worker thread, many at once, and rot found there is dropped the same."""
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    data = os.urandom(4 * CS)
    store.stage(img, 0, memoryview(b"\0" + data)[1:])  # unaligned memory: through the page cache
    await store.commit()
    assert store.statistics()["bytes_written_direct"] == 0
    assert await store.read(img, 0, 4 * CS) == data
    assert store.statistics()["reads_inline"] == 1 and store.statistics()["reads_threaded"] == 0
    _evict_pages(img.path)
    got = {}

    async def read(i: int) -> None:
        got[i] = await store.read(img, i * CS + 1, CS - 2)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(read, i)
    assert all(got[i] == data[i * CS + 1:(i + 1) * CS - 1] for i in range(4))
    assert store.statistics()["reads_threaded"] >= 1
    with open(img.path, "r+b") as f:
        f.seek(3 * CS + 9)
        f.write(b"\xff\x00\xfe")
    _evict_pages(img.path)
    store.reading.disk_wait = None  # (the disk's pace unknown again: the next read goes to a thread)
    threaded = store.statistics()["reads_threaded"]
    with pytest.raises(ChunkCorrupt) as exc:
        await store.read(img, 2 * CS, 2 * CS)
    assert store.statistics()["reads_threaded"] == threaded + 1
    assert exc.value.chunk == 3 and img.state[3] == ABSENT and img.state[2] == INDEXED
    # A disk that answers fast is read from the event loop, checked the same.
    store.reading.disk_wait = 1e-6
    with open(img.path, "r+b") as f:
        f.seek(CS + 9)
        f.write(b"\xff\x00\xfe")
    _evict_pages(img.path)
    with pytest.raises(ChunkCorrupt) as exc:
        await store.read(img, 0, 2 * CS)
    assert exc.value.chunk == 1 and store.statistics()["reads_disk_inline"] == 1
    assert await store.read(img, 10, 100) == data[10:110]
    store.close()


async def test_a_chunk_cached_again_while_a_thread_found_it_bad_is_kept(tmp_path, index, monkeypatch):
    """A worker's read of a chunk that was dropped and cached anew meanwhile (another reader met
    the same rot) fails that read (the reader retries) without dropping the good new copy."""
    import thunderfs.cache.reading as reading_mod
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 2 * CS)
    store.stage(img, 0, os.urandom(2 * CS))
    await store.commit()
    fresh = os.urandom(CS)

    def meanwhile(fd, offset, n, a, b, expect, cs, nowait=False):
        if nowait:
            return None  # as if the page cache had none of it
        trio.from_thread.run_sync(lambda: (store.space.release(img, 0), store.stage(img, 0, fresh)))
        return b"", 0

    monkeypatch.setattr(reading_mod, "read_checked", meanwhile)
    with pytest.raises(ChunkCorrupt):
        await store.read(img, 0, CS)
    assert img.state[0] == PENDING and store.statistics()["corrupt_dropped"] == 0
    monkeypatch.undo()
    assert await store.read(img, 0, CS) == fresh
    store.close()


async def test_eviction_spares_pinned_chunks_and_keeps_the_bound(tmp_path, index):
    store = store_of(tmp_path, index, capacity=4 * CS)
    img = store.image(CONTENT, 16 * CS)
    store.stage(img, 0, os.urandom(4 * CS))
    await store.commit()
    token = store.pin(img, 0, 1)  # a read is using chunks 0 and 1
    assert store.stage(img, 4, os.urandom(2 * CS))
    assert img.state[0] == img.state[1] == INDEXED
    assert img.state[2] == img.state[3] == ABSENT
    assert store.statistics()["used"] <= 4 * CS
    # Everything else is pinned or pending: nothing more can be cached, and nothing is lost.
    assert not store.stage(img, 8, os.urandom(CS))
    assert store.statistics()["bytes_not_cached"] == CS
    store.unpin(img, token)
    await store.commit()
    assert store.stage(img, 8, os.urandom(CS))
    store.close()


async def test_a_cache_nobody_reads_gives_room_back_when_other_files_fill_its_disk(tmp_path, index, monkeypatch):
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 8 * CS)
    store.stage(img, 0, os.urandom(6 * CS))
    await store.commit()
    path = tmp_path / "data" / f"{CONTENT.hex()}.data"
    assert path.stat().st_blocks * 512 >= 6 * CS
    # Another file took all but 2 chunks of the cache's reserve (1 MiB, the least it keeps free).
    real = os.statvfs(tmp_path)
    short = os.statvfs_result((real.f_bsize, 4096, 1000, (2**20 - 2 * CS) // 4096,
                               (2**20 - 2 * CS) // 4096, *real[5:]))
    monkeypatch.setattr(space_mod.os, "statvfs", lambda path: short)
    store.space.give_back()
    # Two chunks go: their index entries at the next commit, their bytes after it.
    assert store.statistics()["evictions"] == 2
    assert store.statistics()["room"] == 4 * CS
    await store.commit()
    assert path.stat().st_blocks * 512 <= 4 * CS
    store.close()


async def test_an_index_commit_short_of_space_takes_the_ballasts_room_and_the_evictions_go(tmp_path, index,
                                                                                           monkeypatch):
    """Other files took the disk's last block: the evictions' index commit finds no room for its
    pages (LMDB's ENOSPC) while the ballast holds it.  The ballast gives its room, the commit goes
    through, the evicted bytes are punched; the ballast is laid again once the disk has room."""
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 8 * CS)
    store.stage(img, 0, os.urandom(6 * CS))
    await store.commit()
    path = tmp_path / "data" / f"{CONTENT.hex()}.data"
    ballast = store.space.ballast
    assert ballast.path == tmp_path / "ballast" and ballast.held == ballast.size >= 256 * 2**10
    commit = index.commit

    def commit_if_room(**kw):
        if ballast.path.stat().st_blocks:
            raise CacheError("cache index write failed: mdb_txn_commit: " + os.strerror(errno.ENOSPC))
        commit(**kw)

    monkeypatch.setattr(index, "commit", commit_if_room)
    real = os.statvfs(tmp_path)
    full = os.statvfs_result((real.f_bsize, 4096, 1000, 0, 0, *real[5:]))
    monkeypatch.setattr(space_mod.os, "statvfs", lambda path: full)
    store.space.give_back()
    assert store.statistics()["evictions"] == 6 and store.statistics()["room"] == 0
    await store.commit()
    assert store.statistics()["ballast_released"] == 1 and store.statistics()["commit_failures"] == 0
    assert ballast.held == 0 and ballast.path.stat().st_blocks == 0
    assert path.stat().st_blocks == 0
    # The disk has room again: the ballast is laid again.
    roomy = os.statvfs_result((real.f_bsize, 4096, 10**6, 10**5, 10**5, *real[5:]))
    monkeypatch.setattr(space_mod.os, "statvfs", lambda path: roomy)
    store.space.give_back()
    assert ballast.held == ballast.size and ballast.path.stat().st_blocks * 512 == ballast.size
    store.close()


async def test_reclaim_punches_data_that_no_index_entry_covers(tmp_path, index):
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 8 * CS)
    store.stage(img, 0, os.urandom(CS))
    await store.commit()
    store.stage(img, 4, os.urandom(2 * CS))  # written, never committed: a crash here
    store.close()
    path = tmp_path / "data" / f"{CONTENT.hex()}.data"
    assert path.stat().st_blocks * 512 >= 3 * CS
    store = store_of(tmp_path, index)
    store.reclaim()
    assert path.stat().st_blocks * 512 <= CS + 4096
    store.close()


async def test_slots_serve_demand_before_readahead_and_prefetch():
    slots = PrioritySlots(1)
    order = []
    holder = slots.ticket(DEMAND)
    await holder.__aenter__()

    async def want(name, prio):
        async with slots.ticket(prio):
            order.append(name)
            await trio.sleep(0)

    async with trio.open_nursery() as n:
        n.start_soon(want, "prefetch", PREFETCH)
        await trio.sleep(0.01)
        n.start_soon(want, "readahead", READAHEAD)
        await trio.sleep(0.01)
        n.start_soon(want, "demand", DEMAND)
        await trio.sleep(0.01)
        await holder.__aexit__(None, None, None)
    assert order == ["demand", "readahead", "prefetch"]


async def test_a_promoted_ticket_overtakes_and_a_cancelled_one_gives_its_place_back():
    slots = PrioritySlots(1)
    holder = slots.ticket(DEMAND)
    await holder.__aenter__()
    order = []
    ra = slots.ticket(PREFETCH)

    async def use(t, name):
        async with t:
            order.append(name)

    async with trio.open_nursery() as n:
        n.start_soon(use, slots.ticket(READAHEAD), "readahead")
        await trio.sleep(0.01)
        n.start_soon(use, ra, "joined-by-demand")
        await trio.sleep(0.01)
        with trio.move_on_after(0.01):
            async with slots.ticket(DEMAND):
                pass  # never gets here: cancelled while waiting
        ra.promote(DEMAND)
        await holder.__aexit__(None, None, None)
    assert order == ["joined-by-demand", "readahead"]
    assert slots.statistics()["busy"] == 0


async def test_the_token_bucket_serves_demand_before_prefetch(autojump_clock):
    from thunderfs.ratelimit import TokenBucket
    from thunderfs.fetch.slots import DEMAND, PREFETCH

    bucket = TokenBucket(rate=1_000_000, burst=1_000_000)
    await bucket.wait_for(1_000_000)  # the burst, spent: the bucket is empty
    order = []

    async def take(name, n, priority):
        await bucket.wait_for(n, priority)
        order.append((name, round(trio.current_time(), 2)))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(take, f"prefetch{i}", 2_000_000, PREFETCH)
            await trio.sleep(0)
        await trio.sleep(0.5)
        nursery.start_soon(take, "demand", 64_000, DEMAND)
    names = [name for name, _ in order]
    # The first prefetch was at the head before the demand read came; the demand read goes next.
    assert names == ["prefetch0", "demand", "prefetch1", "prefetch2"], order
    assert order[1][1] - start < 3.1  # after prefetch0's 2 MB debt, not after all 6 MB


async def test_a_hole_is_never_served_a_chunk_not_cached_nor_given_raises(tmp_path, index):
    """Found by the chaos run: a flight that skipped a chunk another fetch had cached, which was
    then evicted, left the reader with neither the chunk on disk nor its bytes; the store served
    the hole (zeros).  Now it refuses, and the reader fetches again."""
    from thunderfs.errors import ChunkNotCached
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    data = os.urandom(2 * CS)
    assert store.stage(img, 0, data)
    assert await store.read(img, 0, 2 * CS) == data
    with pytest.raises(ChunkNotCached):
        await store.read(img, 0, 3 * CS)  # chunk 2 is a hole
    extra = {2: b"x" * CS}
    assert await store.read(img, CS, 2 * CS, extra) == data[CS:] + extra[2]


async def test_a_sealed_image_is_checked_whole_then_kept_whole(tmp_path, index):
    """FUSE passthrough: the kernel reads a sealed image's data file itself, so the seal checks
    every chunk first, and afterwards nothing punches a hole in it: not eviction (pinned), not a
    corrupt chunk dropped (its index entry goes, its bytes stay until fetched again in place)."""
    from thunderfs.fetch.reader import Readers
    from fakes import meta_of
    data = os.urandom(4 * CS)
    meta = meta_of(data)
    store = store_of(tmp_path, index, capacity=4 * CS)
    readers = Readers(store, None)
    img = store.image(meta.content_key, meta.size)
    store.stage(img, 0, data[:3 * CS])
    assert await readers.seal(meta) is None  # not complete
    store.stage(img, 3, data[3 * CS:])
    await store.commit()
    with open(img.path, "r+b") as f:
        f.seek(CS + 3)
        f.write(b"\x00\xff")
    assert await readers.seal(meta) is None and img.state[1] == ABSENT  # checked: chunk 1 dropped
    await store.commit()
    store.stage(img, 1, data[CS:2 * CS])  # fetched again
    await store.commit()
    assert await readers.seal(meta) == str(img.path) and img.sealed == 1
    # Rot after the seal, found by a read through the daemon (a peer's): dropped, not punched.
    with open(img.path, "r+b") as f:
        f.seek(2 * CS + 9)
        f.write(b"\x00\xff")
    with pytest.raises(ChunkCorrupt):
        await store.read(img, 2 * CS, CS)
    await store.commit()
    with open(img.path, "rb") as f:
        f.seek(2 * CS)
        assert f.read(CS).count(0) < CS // 2  # no hole
    other = store.image(CONTENT, 2 * CS)  # the cache is full: nothing of the sealed image makes room
    assert not store.stage(other, 0, os.urandom(2 * CS))
    assert img.cached_count() == 3 and store.statistics()["evictions"] == 0
    readers.unseal(meta)
    assert img.sealed == 0 and not img.pins
    store.close()


async def test_a_file_system_without_rwf_nowait_is_read_in_threads(tmp_path, index, monkeypatch):
    """tmpfs answers RWF_NOWAIT with EOPNOTSUPP (found by the full-disk test, whose cache is on
    tmpfs): every read then goes to a thread instead of failing."""
    import errno as errno_mod
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 2 * CS)
    data = os.urandom(2 * CS)
    store.stage(img, 0, data)
    real = os.preadv

    def no_nowait(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            raise OSError(errno_mod.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", no_nowait)
    assert await store.read(img, 10, CS) == data[10:CS + 10]
    assert store.statistics()["reads_threaded"] == 1
    store.close()


async def test_chunks_a_sequential_reader_will_need_are_read_into_the_page_cache(tmp_path, index):
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    data = os.urandom(4 * CS)
    store.stage(img, 0, data)
    await store.commit()
    _evict_pages(img.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store.will_need_nowait(img, 1, 3)
        with trio.fail_after(10):
            while True:  # until the kernel has them: then a read needs no thread
                if store_mod.read_checked(img.fd, CS, 3 * CS, 0, 0, img.xxh[1:4], CS, nowait=True) is not None:
                    break
                await trio.sleep(0.01)
        assert await store.read(img, CS, 3 * CS) == data[CS:]
        assert store.statistics()["reads_threaded"] == 0
        nursery.cancel_scope.cancel()
    store.close()


async def test_reads_waiting_for_a_slow_disk_overlap_in_threads(tmp_path, index, monkeypatch):
    """Once the disk is slow (its recent reads took more than INLINE_DISK_WAIT), reads that miss
    the page cache wait for it in worker threads, side by side: four of them meet at a barrier
    that would never open if they were read one after the other in the event loop."""
    import threading
    store = store_of(tmp_path, index)
    img = store.image(CONTENT, 4 * CS)
    data = os.urandom(4 * CS)
    store.stage(img, 0, data)
    await store.commit()
    barrier = threading.Barrier(4, timeout=10)
    real = store_mod.read_checked

    def slow_disk(fd, offset, n, a, b, expect, cs, nowait=False):
        if nowait:
            return None  # nothing in the page cache
        barrier.wait()
        return real(fd, offset, n, a, b, expect, cs)

    monkeypatch.setattr(reading_mod, "read_checked", slow_disk)
    store.reading.disk_wait = 0.05  # 50 ms a read lately
    got = {}

    async def read(i: int) -> None:
        got[i] = await store.read(img, i * CS, CS)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(read, i)
    assert b"".join(got[i] for i in range(4)) == data
    assert store.statistics()["reads_threaded"] == 4 and store.statistics()["reads_disk_inline"] == 0
    store.close()


async def test_a_large_read_that_ends_the_image_off_a_page_bound_goes_through_o_direct(tmp_path, index):
    """A peer may ask for more than a thread keeps a buffer for (4 MiB), up to the image's end,
    which need not fall on a page: the buffer is made for whole pages (O_DIRECT reads them)."""
    cs = 64 * 1024
    store = ChunkStore(tmp_path, index, cs, 2**30)
    size = 80 * cs + 1234
    img = store.image(CONTENT, size)
    data = os.urandom(size)
    store.stage(img, 0, data)
    await store.commit()
    _evict_pages(img.path)
    store.reading.disk_wait = 1.0  # slow: a worker reads it
    assert await store.read(img, 0, size) == data
    assert store.statistics()["reads_threaded"] == 1
    store.close()


async def test_whole_pages_in_aligned_memory_go_straight_to_the_disk_and_are_read_from_it(tmp_path, index):
    """A pooled receive buffer (page aligned) is written with O_DIRECT: nothing of it lands in
    the page cache, and its chunks are read back from the disk at once (no page-cache-only try,
    which would start the kernel's readahead), checked the same; unaligned memory, or a short
    last chunk, goes through the page cache."""
    store = store_of(tmp_path, index)
    size = 4 * CS + 100
    img = store.image(CONTENT, size)
    if img.direct_fd == img.fd:
        pytest.skip("no O_DIRECT on this file system")  # (tmpfs)
    data = os.urandom(size)
    buf = mmap.mmap(-1, 4 * CS)
    buf[:] = data[:4 * CS]
    store.stage(img, 0, memoryview(buf)[:2 * CS])
    store.stage(img, 2, memoryview(b"\0" + data)[1 + 2 * CS:1 + 4 * CS])  # unaligned
    store.stage(img, 4, data[4 * CS:])  # 100 bytes: not whole pages
    await store.commit()
    assert store.statistics()["bytes_written_direct"] == 2 * CS
    assert list(img.direct) == [1, 1, 0, 0, 0]
    assert await store.read(img, 0, size) == data
    assert store.statistics()["reads_disk_inline"] + store.statistics()["reads_threaded"] >= 1
    assert list(img.direct) == [0] * 5  # read back once: as any chunk from now on
    with open(img.path, "r+b") as f:  # rot under a direct chunk is found the same
        f.seek(CS + 9)
        f.write(b"\xff\x00\xfe")
    _evict_pages(img.path)
    with pytest.raises(ChunkCorrupt) as exc:
        await store.read(img, 0, 2 * CS)
    assert exc.value.chunk == 1 and img.state[1] == ABSENT
    store.close()
