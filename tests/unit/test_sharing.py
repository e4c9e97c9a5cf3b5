"""Chunks shared across images by their digest, and zero chunks (issue 31), in the store alone."""

from __future__ import annotations

import os

import pytest

from fakes import CS
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ABSENT, INDEXED, SHARED, ZERO, ChunkStore
from thunderfs.errors import ChunkCorrupt, ChunkNotCached
from thunderfs_common import chunk_digest

V1, V2, V3 = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


def digests(data: bytes) -> bytes:
    return b"".join(chunk_digest.digests(data, CS))


def versions():
    """Two versions of an 8-chunk image: v2 changes chunk 2, and chunks 5 and 6 are zeros."""
    v1 = os.urandom(5 * CS) + bytes(2 * CS) + os.urandom(CS)
    v2 = v1[:2 * CS] + os.urandom(CS) + v1[3 * CS:]
    return v1, v2


async def cached(store: ChunkStore, content: bytes, data: bytes, chunks=None):
    img = store.image(content, len(data))
    store.know_digests(img, digests(data))
    for c in chunks if chunks is not None else img.missing(0, img.nchunks - 1):
        store.stage(img, c, data[c * CS:(c + 1) * CS])
    await store.commit()
    return img


async def test_a_second_version_takes_what_the_first_holds_and_fetches_only_what_changed(store):
    v1, v2 = versions()
    a = await cached(store, V1, v1)
    assert a.count(ZERO) == 2 and store.statistics()["used"] == 6 * CS  # zero chunks take no room
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    rest = store.share(b, b.missing(0, b.nchunks - 1))
    assert rest == [2]  # only the changed chunk is left to fetch
    assert [b.state[c] for c in (0, 1, 3, 4, 7)] == [SHARED] * 5 and b.state[5] == b.state[6] == ZERO
    assert await store.read(b, 0, len(v2), {2: v2[2 * CS:3 * CS]}) == v2
    assert store.statistics()["used"] == 6 * CS  # nothing stored twice
    assert b.cached_count() == 5 and b.held_bits() == 0b10011011  # zero chunks are not offered


async def test_shares_survive_a_restart_and_go_with_their_home(tmp_path):
    v1, v2 = versions()
    index = ChunkIndex(tmp_path / "index")
    index.check_layout(CS)
    store = ChunkStore(tmp_path, index, CS, 1 << 30)
    await cached(store, V1, v1)
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    store.share(b, b.missing(0, b.nchunks - 1))
    await store.commit()
    store.close()
    # A new process: the shares come back from the index before any manifest is known again.
    store = ChunkStore(tmp_path, index, CS, 1 << 30)
    store.reclaim()
    b = store.image(V2, len(v2))
    assert [c for c in range(b.nchunks) if b.state[c] == SHARED] == [0, 1, 3, 4, 7]
    assert b.state[5] == b.state[6] == ZERO  # its digests were kept: its zeros need no manifest
    assert await store.read(b, 3 * CS, CS) == v2[3 * CS:4 * CS]
    assert b.foreign == 5 and b.shares_with_others()
    # The home goes: so do the chunks that share it, in memory and in the index.
    a = store.find(V1)
    store.space.release(a, 3)
    assert b.state[3] == ABSENT and b.foreign == 4
    store.drop_image(V2)
    assert b.foreign == 0 and not b.shares_with_others()
    await store.commit()
    store.close()
    store = ChunkStore(tmp_path, index, CS, 1 << 30)
    store.reclaim()
    b = store.image(V2, len(v2))
    assert not any(b.state[c] == SHARED for c in range(b.nchunks))  # dropped, durably
    store.close()
    index.close()


async def test_eviction_takes_no_home_a_read_of_another_image_pins(tmp_path, index):
    v1, v2 = versions()
    store = ChunkStore(tmp_path, index, CS, 6 * CS)
    a = await cached(store, V1, v1)
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    store.share(b, [0, 1])
    token = store.pin(b, 0, 1)  # a read of v2 is using chunks 0 and 1, whose bytes are v1's
    store.space.evict(6 * CS)
    assert a.state[0] == a.state[1] == INDEXED and b.state[0] == b.state[1] == SHARED
    assert a.state[3] == ABSENT
    store.unpin(b, token)
    store.space.evict(6 * CS)
    assert a.state[0] == ABSENT and b.state[0] == ABSENT
    store.close()


async def test_a_home_whose_bytes_do_not_hash_to_its_digest_is_never_shared(store):
    """A manifest that lies about a chunk it holds poisons no other image."""
    v1, v2 = versions()
    a = store.image(V1, len(v1))
    lie = bytearray(digests(v1))
    wrong = os.urandom(CS)
    store.stage(a, 0, wrong)  # the bytes v1's manifest gives chunk 0's digest for are others
    await store.commit()
    store.know_digests(a, bytes(lie))
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    assert store.share(b, [0]) == [0]
    assert b.state[0] == ABSENT and store.statistics()["homes_refused"] == 1


async def test_rot_under_a_home_is_found_through_a_share_and_both_go(store):
    v1, v2 = versions()
    a = await cached(store, V1, v1)
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    store.share(b, [1])
    os.pwrite(a.fd, b"rot", 1 * CS + 7)
    with pytest.raises(ChunkCorrupt):
        await store.read(b, CS, CS)
    assert a.state[1] == ABSENT and b.state[1] == ABSENT
    with pytest.raises(ChunkNotCached):
        await store.read(b, CS, CS)


async def test_a_zero_chunk_reads_as_zeros_is_never_stored_and_a_complete_image_still_verifies(store):
    v1, _ = versions()
    a = await cached(store, V1, v1)
    assert await store.read(a, 4 * CS, 3 * CS) == v1[4 * CS:7 * CS]
    assert a.missing(0, a.nchunks - 1) == []
    assert os.fstat(a.fd).st_blocks * 512 <= 6 * CS + 4096  # holes where the zeros are
    assert await store.verify(a)  # what a seal checks: the holes read as the zeros they are


async def test_a_chunk_staged_over_a_share_becomes_its_own(store):
    v1, v2 = versions()
    await cached(store, V1, v1)
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    store.share(b, [3])
    store.stage(b, 3, v2[3 * CS:4 * CS])  # a flight that started before the share
    assert b.state[3] not in (SHARED, ABSENT) and 3 not in b.home
    await store.commit()
    assert b.state[3] == INDEXED


def test_the_tracker_reports_what_two_manifests_share():
    from thunderfs_common.tracker_protocol import Manifest
    from thunderfs_tracker.manifests import shared_between

    v1, v2 = versions()
    v2 = v2 + bytes(100)  # a short last chunk of zeros, which v1 does not have
    a = Manifest("a", len(v1), CS, "sha512", "x", digests(v1))
    b = Manifest("b", len(v2), CS, "sha512", "y", digests(v2))
    r = shared_between(a, b)
    assert (r["chunks_b"], r["shared_chunks"], r["zero_chunks_a"], r["zero_chunks_b"]) == (9, 7, 2, 3)
    assert r["b_not_in_a_bytes"] == CS + 100 and r["shared_bytes"] == 7 * CS


async def v2_over_v1(store: ChunkStore):
    """v1 cached; v2 sharing v1's chunks, its zero chunks known, its changed chunk its own."""
    v1, v2 = versions()
    await cached(store, V1, v1)
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    store.share(b, b.missing(0, b.nchunks - 1))
    store.stage(b, 2, v2[2 * CS:3 * CS])
    return v2, b


async def test_a_seal_copies_shared_chunks_into_the_images_own_file(store):
    """The kernel reads a sealed image's file alone (passthrough): its shared chunks are copied
    in first, and the file then reads as the image, holes of zero chunks included."""
    v2, b = await v2_over_v1(store)
    assert not await store.verify(b)  # its own file lacks the shared chunks
    assert await store.materialize(b)
    assert SHARED not in b.state and await store.verify(b)
    assert os.pread(b.fd, len(v2), 0) == v2


def test_an_alike_answer_outside_what_was_asked_is_refused():
    from thunderfs_common.tracker_protocol import Alike, ProtocolError

    good = {"content": "ab" * 16, "size": 10 * CS, "first": 2, "last": 3, "pairs": [[0, 2], [1, 3]], "peers": []}
    assert Alike.parse(good, 0, 2).pairs == [(0, 2), (1, 3)]
    for bad in ({**good, "pairs": [[5, 2]]}, {**good, "pairs": [[0, 9]]}, {**good, "content": "zz"},
                {**good, "size": "x"}, {**good, "peers": [{"node_id": "../x"}]}, "nonsense"):
        with pytest.raises(ProtocolError):
            Alike.parse(bad, 0, 2)


async def test_when_a_home_goes_another_image_holding_the_digest_serves_next(store):
    v1, v2 = versions()
    await cached(store, V1, v1)
    c = await cached(store, V3, v1)  # another image with v1's bytes: the second home of each digest
    b = store.image(V2, len(v2))
    store.know_digests(b, digests(v2))
    assert store.share(b, [0]) == [] and b.home[0][0] is store.find(V1)
    store.space.release(store.find(V1), 0)  # v1's copy goes: so does b's share of it
    assert b.state[0] == ABSENT
    assert store.share(b, [0]) == [] and b.home[0] == (c, 0)
    assert await store.read(b, 0, CS) == v2[:CS]


async def test_zero_chunks_are_found_wherever_they_are_and_cached_chunks_become_homes(store):
    """``know`` finds the zero chunks by searching the digests: the first chunk, runs of them, a
    short last one; a cached one stays as it is and becomes a home for another image."""
    data = bytes(CS) + os.urandom(CS) + bytes(3 * CS) + os.urandom(CS) + bytes(CS // 2)
    img = store.image(V1, len(data))
    store.stage(img, 1, data[CS:2 * CS])
    store.stage(img, 2, data[2 * CS:3 * CS])  # a zero chunk fetched before the manifest was known
    await store.commit()
    store.know_digests(img, digests(data))
    assert [s == ZERO for s in img.state] == [True, False, False, True, True, False, True]
    assert img.state[2] == INDEXED
    other = store.image(V2, 2 * CS)
    store.know_digests(other, digests(data[CS:3 * CS]))
    assert other.missing(0, 1) == [0] and other.state[1] == ZERO
    assert store.share(other, [0]) == [] and other.state[0] == SHARED
    assert await store.read(other, 0, 2 * CS) == data[CS:3 * CS]


async def test_what_a_peer_is_sent_own_chunks_as_checked_file_spans_the_rest_as_ranges_to_read(store):
    """``sendable``: v2's own chunk goes as a span of its file, checked where it lies (the kernel
    sends it); its shared and zero chunks as ranges read as they are sent.  Rot in the span is
    found before anything is sent: the chunk is dropped."""
    from thunderfs.cache.store import FileSpan
    v2, b = await v2_over_v1(store)
    parts = await store.sendable(b, 100, len(v2) - 100)
    assert [(type(p).__name__, p.offset, p.count) if isinstance(p, FileSpan) else p for p in parts] == [
        (100, 2 * CS - 100), ("FileSpan", 2 * CS, CS), (3 * CS, 5 * CS)]
    sent = b"".join([os.pread(p.fileno(), p.count, p.offset) if isinstance(p, FileSpan)
                     else await store.read(b, *p) for p in parts])
    assert sent == v2[100:]
    assert store.statistics()["bytes_sendable"] == CS
    with pytest.raises(ChunkNotCached):
        await store.sendable(store.image(b"\x09" * 16, len(v2)), 0, len(v2))
    os.pwrite(b.fd, b"rot", 2 * CS + 7)
    with pytest.raises(ChunkCorrupt):
        await store.sendable(b, 0, len(v2))
    assert b.state[2] == ABSENT and store.statistics()["corrupt_dropped"] == 1

