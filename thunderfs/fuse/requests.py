"""One handler per request the session serves: the request's body parsed, the ``Operations``
called, the answer's pieces built.  A handler raises ``FuseError`` for an errno answer;
``struct.error`` (a body shorter than its kind) is the session's to answer ``EIO``."""

from __future__ import annotations

import errno as E
from collections.abc import Awaitable, Callable

from thunderfs.fuse import kernel as k
from thunderfs.fuse.kernel import FuseError, Header, Op
from thunderfs.fuse.operations import Operations, SetTimes


async def _lookup(ops: Operations, h: Header, body) -> list:
    return [k.entry_out(await ops.lookup(h.nodeid, k.name_of(body)))]


async def _getattr(ops: Operations, h: Header, body) -> list:
    entry = ops.getattr(h.nodeid)
    return [k.attr_out(entry.attr, entry.attr_timeout)]


async def _setattr(ops: Operations, h: Header, body) -> list:
    (valid, _, _fh, _size, _lo, atime, mtime, _c, atimensec, mtimensec, *_rest) = k.SETATTR_IN.unpack_from(body)
    changes = SetTimes(
        other=bool(valid & (k.FATTR_MODE | k.FATTR_UID | k.FATTR_GID | k.FATTR_SIZE)),
        atime_ns=None if not valid & k.FATTR_ATIME else -1 if valid & k.FATTR_ATIME_NOW
        else atime * 10**9 + atimensec,
        mtime_ns=None if not valid & k.FATTR_MTIME else -1 if valid & k.FATTR_MTIME_NOW
        else mtime * 10**9 + mtimensec)
    entry = ops.setattr(h.nodeid, changes)
    return [k.attr_out(entry.attr, entry.attr_timeout)]


async def _open(ops: Operations, h: Header, body) -> list:
    flags, _ = k.OPEN_IN.unpack_from(body)
    fh, backing_id = await ops.open(h.nodeid, flags, h.unique & ~k.UNIQUE_RESEND)
    # A read-only file has nothing to flush: no FLUSH on every close (a close while no
    # process serves the connection would wait for the next one).
    if backing_id:  # the kernel reads the backing file (no page cache of ours: its rule)
        return [k.open_out(fh, k.FOPEN_PASSTHROUGH | k.FOPEN_NOFLUSH, backing_id)]
    # Images never change under an inode: the kernel keeps its page cache across opens.
    return [k.open_out(fh, k.FOPEN_KEEP_CACHE | k.FOPEN_NOFLUSH)]


async def _read(ops: Operations, h: Header, body) -> list:
    fh, offset, size, *_ = k.READ_IN.unpack_from(body)
    return [await ops.read(h.nodeid, fh, offset, size)]


async def _lseek(ops: Operations, h: Header, body) -> list:
    fh, offset, whence, _ = k.LSEEK_IN.unpack_from(body)
    return [k.LSEEK_OUT.pack(await ops.lseek(h.nodeid, fh, offset, whence))]


async def _release(ops: Operations, h: Header, body) -> list:
    fh, *_ = k.RELEASE_IN.unpack_from(body)
    ops.release(h.nodeid, fh, h.unique & ~k.UNIQUE_RESEND)
    return []


async def _opendir(ops: Operations, h: Header, body) -> list:
    return [k.open_out(await ops.opendir(h.nodeid), 0)]


async def _readdir(ops: Operations, h: Header, body) -> list:
    _fh, offset, size, *_ = k.READ_IN.unpack_from(body)
    out, used = [], 0
    for name, attr, next_offset in ops.readdir(h.nodeid, offset):
        entry = k.dirent(attr.ino, next_offset, name, attr.mode)
        if used + len(entry) > size:
            break
        out.append(entry)
        used += len(entry)
    return out


async def _empty(ops: Operations, h: Header, body) -> list:
    return []


async def _statfs(ops: Operations, h: Header, body) -> list:
    blocks, files = ops.statfs()
    return [k.statfs_out(blocks, files)]


async def _getxattr(ops: Operations, h: Header, body) -> list:
    size, _ = k.GETXATTR_IN.unpack_from(body)
    value = ops.getxattr(h.nodeid, k.name_of(body[k.GETXATTR_IN.size:]))
    return _sized(value, size)


async def _listxattr(ops: Operations, h: Header, body) -> list:
    size, _ = k.GETXATTR_IN.unpack_from(body)
    return _sized(b"".join(n + b"\0" for n in ops.listxattr(h.nodeid)), size)


def _sized(value: bytes, size: int) -> list:
    if size == 0:
        return [k.GETXATTR_OUT.pack(len(value), 0)]
    if len(value) > size:
        raise FuseError(E.ERANGE)
    return [value]


HANDLERS: dict[Op, Callable[[Operations, Header, memoryview], Awaitable[list]]] = {
    Op.LOOKUP: _lookup, Op.GETATTR: _getattr, Op.SETATTR: _setattr, Op.OPEN: _open, Op.READ: _read,
    Op.RELEASE: _release, Op.FLUSH: _empty, Op.OPENDIR: _opendir, Op.READDIR: _readdir,
    Op.RELEASEDIR: _empty, Op.STATFS: _statfs, Op.GETXATTR: _getxattr, Op.LISTXATTR: _listxattr,
    Op.DESTROY: _empty, Op.FSYNC: _empty, Op.FSYNCDIR: _empty, Op.LSEEK: _lseek,
}
