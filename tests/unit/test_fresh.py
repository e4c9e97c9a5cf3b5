"""The cache's memory tier (``cache/fresh.py``): receive buffers the store holds, serves from and
writes behind (the store's rule 7)."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import trio

from fakes import CS
from thunderfs.cache.fresh import ReceiveBuffers
from thunderfs.cache.store import ABSENT, INDEXED, PENDING, WRITING, ChunkStore

CONTENT = bytes(range(16))


async def test_the_pool_is_bounded_and_refuses_a_buffer_handed_back_twice():
    pool = ReceiveBuffers(4096, 2)
    async with pool.take() as (a, va), pool.take() as (b, vb):
        assert len(va) == len(vb) == 4096 and a is not b
        with trio.move_on_after(0.05) as scope:
            async with pool.take():
                pass
        assert scope.cancelled_caught  # a third waits
    stats = pool.statistics()
    assert (stats["buffers"], stats["in_use"], stats["waits"]) == (2, 0, 1)
    with pytest.raises(RuntimeError, match="handed back twice"):
        pool.unref(a)


class HeldWrites:
    """``os.pwrite`` that waits for ``release`` (in the writer's thread), or fails with ``fail``."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        self.fail: int | None = None
        real = os.pwrite

        def pwrite(fd, data, offset):
            self.gate.wait(10)
            if self.fail is not None:
                raise OSError(self.fail, os.strerror(self.fail))
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)


async def staged_from_a_buffer(store, img, first, data):
    async with store.buffers.take() as (buf, view):
        view[:len(data)] = data
        assert store.stage(img, first, view[:len(data)], buf)
    return buf


@pytest.fixture
async def running(tmp_path, index, nursery):
    store = ChunkStore(tmp_path, index, CS, 64 * CS, buffers=ReceiveBuffers(4 * CS, 2))
    await nursery.start(store.run)
    yield store
    store.close()


async def wait_until(predicate):
    while not predicate():
        await trio.sleep(0.005)


async def test_chunks_are_served_from_their_buffer_while_written_behind_then_from_the_file(running, monkeypatch):
    store, writes = running, HeldWrites(monkeypatch)
    img = store.image(CONTENT, 8 * CS)
    data = os.urandom(4 * CS)
    buf = await staged_from_a_buffer(store, img, 2, data)
    assert [img.state[c] for c in range(2, 6)] == [WRITING] * 4 and img.held[3] is buf
    assert os.pread(img.fd, CS, 2 * CS) == bytes(CS)  # not on disk yet: served from memory only
    assert await store.read(img, 2 * CS + 10, 2 * CS) == data[10:2 * CS + 10]
    await store.commit()
    assert img.state[2] == WRITING  # never indexed before it is written
    writes.gate.set()
    await wait_until(lambda: img.state[2] != WRITING)
    assert img.state[2] == PENDING and buf.written
    # Read from memory counts as read once (the page cache is tried next time); unread, not. A
    # chunk is read once its last byte is: the read above ended 10 bytes into chunk 4.
    assert list(img.direct[2:6]) == [0, 0, 1, 1]
    assert buf.owner is img  # two chunks not read yet: still held
    assert await store.read(img, 4 * CS, 2 * CS - 16) == data[2 * CS:4 * CS - 16]
    assert buf.owner is img  # the last 16 bytes of chunk 5 not read yet (a read that ended inside it)
    disk = store.statistics()["bytes_read_disk"]
    assert await store.read(img, 6 * CS - 16, 16) == data[-16:]
    assert store.statistics()["bytes_read_disk"] == disk  # from memory, not read back and checked
    assert buf.owner is None and not img.held and store.buffers.statistics()["in_use"] == 0  # all read: back
    await store.commit()
    assert img.state[5] == INDEXED
    assert await store.read(img, 2 * CS, 4 * CS) == data  # from the file, checked (rule 5)
    assert store.statistics()["bytes_written_behind"] == 4 * CS


async def test_a_receive_takes_back_the_oldest_written_buffer_and_waits_for_an_unwritten_one(running, monkeypatch):
    store, writes = running, HeldWrites(monkeypatch)
    img = store.image(CONTENT, 16 * CS)
    first = await staged_from_a_buffer(store, img, 0, os.urandom(4 * CS))
    second = await staged_from_a_buffer(store, img, 4, os.urandom(4 * CS))
    with trio.move_on_after(0.1) as scope:
        async with store.buffers.take():
            pass
    assert scope.cancelled_caught  # both held, neither written: a receive waits
    writes.gate.set()
    await wait_until(lambda: first.written and second.written)
    async with store.buffers.take() as (buf, _):
        assert buf is first  # the oldest, written but never read, taken back
    assert 0 not in img.held and img.state[0] == PENDING  # read from the file from now on
    assert store.buffers.statistics()["let_go_unread"] == 1


async def test_a_failed_write_serves_from_memory_until_taken_back_then_the_chunks_are_gone(running, monkeypatch):
    store, writes = running, HeldWrites(monkeypatch)
    store.drain_changes()
    writes.fail = errno.EIO
    img = store.image(CONTENT, 16 * CS)
    data = os.urandom(4 * CS)
    await staged_from_a_buffer(store, img, 0, data)
    writes.gate.set()
    await wait_until(lambda: store.statistics()["write_behind_failures"])
    assert img.cached(0) and await store.read(img, 0, 4 * CS) == data
    assert store.statistics()["used"] == 0  # nothing on disk
    await store.commit()
    assert img.state[0] == WRITING  # never indexed
    await staged_from_a_buffer(store, img, 4, os.urandom(4 * CS))
    async with store.buffers.take():  # the failed one is taken back
        pass
    assert [img.state[c] for c in range(4)] == [ABSENT] * 4 and not img.cached(0)
    assert store.drain_changes()[CONTENT][2] >= {0, 1, 2, 3}  # the announcer hears they are gone


async def test_a_whole_image_check_waits_for_the_writes(running, monkeypatch):
    store, writes = running, HeldWrites(monkeypatch)
    img = store.image(CONTENT, 4 * CS)
    await staged_from_a_buffer(store, img, 0, os.urandom(4 * CS))
    result = []

    async def check():
        result.append(await store.verify(img))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await trio.sleep(0.05)
        assert not result  # still waiting for the write
        writes.gate.set()
    assert result == [True] and store.statistics()["corrupt_dropped"] == 0


async def test_a_peers_answer_is_held_loose_within_the_budget_and_unaligned_memory_is_written_anyway(running):
    """Memory a source allocated for one answer (``Buffer.wrap``) is held like a pooled buffer
    within the pool's bytes (here 2 x 4 chunks); past that, the oldest written loose one is let
    go, and if none is written the store writes the answer at once (plain ``stage``)."""
    from thunderfs.cache.fresh import Buffer
    store = running
    img = store.image(CONTENT, 32 * CS)
    data = os.urandom(12 * CS)
    raw = bytearray(b"\0" + data)  # writable memory off a page: O_DIRECT refuses it (EINVAL)
    a = Buffer.wrap(memoryview(raw)[1:1 + 8 * CS])
    assert store.stage(img, 0, memoryview(raw)[1:1 + 8 * CS], a)
    assert img.held[7] is a and img.state[0] == WRITING
    b = Buffer.wrap(memoryview(bytearray(data[8 * CS:])))
    assert store.stage(img, 8, memoryview(bytearray(data[8 * CS:])), b)  # over the budget, a not written yet:
    assert 8 not in img.held and img.state[8] == PENDING  # written at once
    await wait_until(lambda: a.written)
    assert not a.failed and not img.direct[0]  # refused straight (EINVAL): through the page cache
    assert await store.read(img, 0, 12 * CS) == data  # a from memory, the rest from the file
    assert a.owner is None and store.buffers.statistics()["loose_bytes"] == 0  # read and written: let go
    assert await store.read(img, 0, 8 * CS) == data[:8 * CS]  # now from the file (page cache: unaligned)
    assert store.buffers.statistics()["loose_refused"] == 1


async def test_a_read_within_one_buffer_may_borrow_it_and_any_other_is_copied(running, monkeypatch):
    store, writes = running, HeldWrites(monkeypatch)
    img = store.image(CONTENT, 8 * CS)
    data = os.urandom(4 * CS)
    buf = await staged_from_a_buffer(store, img, 0, data)
    lent = await store.read(img, CS, 2 * CS, borrow=True)
    assert isinstance(lent, memoryview) and lent.obj is buf.mm and lent == data[CS:3 * CS]
    lent.release()
    copied = await store.read(img, CS, 2 * CS)  # not asked to borrow: a copy
    assert isinstance(copied, bytes) and copied == data[CS:3 * CS]
    writes.gate.set()
    other = os.urandom(4 * CS)
    store.stage(img, 4, other)  # no buffer: written at once, read from the file
    across = await store.read(img, 3 * CS, 2 * CS, borrow=True)
    assert isinstance(across, bytes) and across == data[3 * CS:] + other[:CS]


async def test_a_peers_answer_memory_goes_back_once_neither_the_store_nor_its_source_refers_to_it(running):
    """The peer client's memory (``AnswerMemory``) comes back when the store let go of the answer
    (written and read) and the source dropped it, not before; one the store did not hold comes
    back when the source drops it.  The next answer of its size is received into it."""
    from thunderfs.cache.fresh import Buffer
    from thunderfs.fetch.buffers import AnswerMemory
    store = running
    img = store.image(CONTENT, 32 * CS)
    memory = AnswerMemory(64 * CS)
    data = os.urandom(12 * CS)
    freed = []

    def give_back(view):
        freed.append(view.obj)
        memory.give_back(view)

    a_view = memory.take(4 * CS)
    a_view[:] = data[:4 * CS]
    a = Buffer.wrap(a_view, give_back)
    assert store.stage(img, 0, a_view, a) and img.held[0] is a
    a.drop()  # the source is done: the store still holds it
    assert not freed
    await wait_until(lambda: a.written)
    assert not freed  # written, not read yet: still served from memory
    assert await store.read(img, 0, 4 * CS) == data[:4 * CS]
    assert freed == [a_view.obj] and a.owner is None  # read and written: let go, and back
    b_view = memory.take(4 * CS)
    assert b_view.obj is a_view.obj  # the next answer of its size lands in it
    with pytest.raises(RuntimeError, match="dropped twice"):
        a.drop()
    # Over the loose budget (2 x 4 chunks) with nothing written to let go: written at once, not
    # held, and back when the source drops it.
    c_view = memory.take(8 * CS)
    c_view[:] = data[4 * CS:]
    c = Buffer.wrap(c_view, give_back)
    b_view[:] = data[:4 * CS]
    b = Buffer.wrap(b_view, give_back)
    assert store.stage(img, 4, c_view, c) and c.owner is img
    assert store.stage(img, 12, b_view, b) and b.owner is None  # over the budget: written at once
    b.drop()
    assert freed[-1] is b_view.obj
    c.drop()
    assert freed[-1] is b_view.obj  # c is held until written and read
    assert await store.read(img, 4 * CS, 8 * CS) == data[4 * CS:]
    await wait_until(lambda: c.owner is None)
    assert freed[-1] is c_view.obj and len(freed) == 3


def test_answer_memory_is_page_aligned_bounded_and_refuses_what_it_did_not_give():
    import mmap

    from thunderfs.fetch.buffers import AnswerMemory
    memory = AnswerMemory(keep=2 * 2**20)
    a, b = memory.take(100_000), memory.take(2**20)
    assert len(a) == 100_000 and len(b) == 2**20
    for v in (a, b):  # O_DIRECT wants page-aligned memory
        import ctypes
        assert ctypes.addressof(ctypes.c_char.from_buffer(v)) % mmap.PAGESIZE == 0
    memory.give_back(a)
    memory.give_back(b)  # 128 KiB + 1 MiB kept
    c = memory.take(2**20 + 1)  # a 2 MiB class: fresh
    memory.give_back(c)  # over what is kept: dropped
    assert memory.statistics() == {"answers": 3, "reused": 0, "dropped": 1, "free_bytes": 2**17 + 2**20}
    assert memory.take(120_000).obj is a.obj  # the same class: the same memory
    with pytest.raises(RuntimeError, match="handed back twice"):
        memory.give_back(b)
    memory.give_back(memoryview(mmap.mmap(-1, 4096)))  # not ours: ignored
    memory.give_back(memoryview(bytearray(10)))  # likewise
    assert memory.statistics()["free_bytes"] == 2**20
