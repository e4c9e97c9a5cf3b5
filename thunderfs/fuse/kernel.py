"""The FUSE wire protocol, as far as a read-only filesystem needs it (linux/fuse.h, 7.40).

Only layouts and constants: parsing requests and building replies, no I/O.  Where the names and
layouts come from: the kernel's ``include/uapi/linux/fuse.h``; the fields past the 7.38 header
that Debian bookworm ships (``backing_id``, ``FUSE_NOTIFY_RESEND``, the resend bit) are 7.40's.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

KERNEL_MAJOR = 7
KERNEL_MINOR = 40  # the newest protocol this module speaks

ROOT_ID = 1
MIN_READ_BUFFER = 8192
MAX_WRITE = 128 * 1024  # what INIT asks for (a read-only mount gets no writes anyway)


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# Requests that change the filesystem: a read-only mount answers EROFS.
WRITES = frozenset({Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK, Op.WRITE,
                    Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.RENAME2, Op.COPY_FILE_RANGE,
                    Op.TMPFILE})
# Requests that get no reply.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT})


class Notify(enum.IntEnum):
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    RESEND = 7  # 7.40: the kernel queues again every request read but not answered


# fuse_init_in.flags / init_out.flags (flags2 are bits 32-63, sent in flags2 with INIT_EXT).
ASYNC_READ = 1 << 0
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37  # 7.40: reads of a file opened so go to a backing file, not to us
HAS_RESEND = 1 << 39  # the kernel can resend (FUSE_NOTIFY_RESEND)

# The high bit of ``unique`` marks a request the kernel sends again after FUSE_NOTIFY_RESEND.
UNIQUE_RESEND = 1 << 63

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# ioctls on /dev/fuse (7.40): register an open file as a backing file (struct fuse_backing_map:
# fd, flags, padding; returns its id), and drop an id (a u32).
BACKING_MAP = struct.Struct("<iIQ")
DEV_IOC_BACKING_OPEN = (1 << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE = (1 << 30) | (4 << 16) | (229 << 8) | 2

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

IN_HEADER = struct.Struct("<IIQQIIIHH")      # fuse_in_header
OUT_HEADER = struct.Struct("<IiQ")           # fuse_out_header
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII")         # fuse_entry_out, before its fuse_attr
ATTR_OUT = struct.Struct("<QII")             # fuse_attr_out, before its fuse_attr
OPEN_OUT = struct.Struct("<QIi")             # fuse_open_out: fh, open_flags, backing_id
READ_IN = struct.Struct("<QQIIQII")          # fuse_read_in
RELEASE_IN = struct.Struct("<QIIQ")          # fuse_release_in
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
OPEN_IN = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
INIT_IN = struct.Struct("<IIIII")            # major, minor, max_readahead, flags, flags2 (then unused)
INIT_IN_OLD = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes (the last I: max_stack_depth)
KSTATFS = struct.Struct("<QQQQQIIII24x")     # fuse_kstatfs, 80 bytes
DIRENT = struct.Struct("<QQII")              # fuse_dirent, before its name
INVAL_ENTRY_OUT = struct.Struct("<QII")
INVAL_INODE_OUT = struct.Struct("<Qqq")  # fuse_notify_inval_inode_out: ino, off, len
LSEEK_IN = struct.Struct("<QQII")            # fuse_lseek_in: fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")              # fuse_lseek_out: offset

S_IFMT = 0o170000


class ProtocolError(Exception):
    """The kernel sent something this module cannot parse (never seen from a real kernel)."""


class FuseError(Exception):
    """The answer to one request is this errno (raised by the operations, sent by the session)."""

    def __init__(self, errno: int):
        super().__init__(errno)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @classmethod
    def parse(cls, buf) -> "Header":
        if len(buf) < IN_HEADER.size:
            raise ProtocolError(f"short request ({len(buf)} bytes)")
        length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
        if length != len(buf):
            raise ProtocolError(f"request says {length} bytes, read {len(buf)}")
        return cls(length, opcode, unique, nodeid, uid, gid, pid)


@dataclass(frozen=True, slots=True)
class Attr:
    """What ``stat`` shows of an inode."""
    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blksize: int = 4096
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    def pack(self) -> bytes:
        a, m, c = (divmod(t, 10**9) for t in (self.atime_ns, self.mtime_ns, self.ctime_ns))
        return ATTR.pack(self.ino, self.size, -(-self.size // 512), a[0], m[0], c[0], a[1], m[1], c[1],
                         self.mode, self.nlink, self.uid, self.gid, 0, self.blksize, 0)


@dataclass(frozen=True, slots=True)
class Entry:
    """A name's inode and how long the kernel may trust the name and the attributes."""
    attr: Attr
    entry_timeout: float
    attr_timeout: float


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def entry_out(entry: Entry) -> bytes:
    ev, evn = _split(entry.entry_timeout)
    av, avn = _split(entry.attr_timeout)
    return ENTRY_OUT.pack(entry.attr.ino, 0, ev, av, evn, avn) + entry.attr.pack()


def attr_out(attr: Attr, timeout: float) -> bytes:
    av, avn = _split(timeout)
    return ATTR_OUT.pack(av, avn, 0) + attr.pack()


def open_out(fh: int, flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, flags, backing_id)


def dirent(ino: int, offset: int, name: bytes, mode: int) -> bytes:
    """One directory entry, padded to 8 bytes; ``offset`` is where the next one starts."""
    entry = DIRENT.pack(ino, offset, len(name), (mode & S_IFMT) >> 12) + name
    return entry + b"\0" * (-len(entry) % 8)


def statfs_out(blocks: int, files: int, bsize: int = 4096, namelen: int = 255) -> bytes:
    return KSTATFS.pack(blocks, 0, 0, files, 0, bsize, namelen, bsize, 0)


def reply(unique: int, error: int = 0, *payload) -> list:
    """The pieces of one reply (``error`` is a positive errno, or 0), for ``os.writev``."""
    length = OUT_HEADER.size + sum(len(p) for p in payload)
    return [OUT_HEADER.pack(length, -error, unique), *payload]


def notify(code: Notify, payload: bytes = b"") -> list:
    return [OUT_HEADER.pack(OUT_HEADER.size + len(payload), int(code), 0), payload]


def inval_entry(parent: int, name: bytes) -> list:
    return notify(Notify.INVAL_ENTRY, INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0")


def inval_inode(ino: int, offset: int = 0, length: int = 0) -> list:
    """Drop the inode's cached pages (``length`` 0: to the end) and attributes."""
    return notify(Notify.INVAL_INODE, INVAL_INODE_OUT.pack(ino, offset, length))


def name_of(body) -> bytes:
    """A request's NUL-terminated name."""
    raw = bytes(body)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


@dataclass(frozen=True)
class InitParams:
    """What INIT settled between the kernel and the first serving process; every later serving
    process of the same connection abides by it (the kernel never asks again)."""
    minor: int
    flags: int
    max_write: int
    max_pages: int
    passthrough: bool = False  # agreed: opens may name a backing file

    def to_record(self) -> dict:
        return {"minor": self.minor, "flags": self.flags, "max_write": self.max_write, "max_pages": self.max_pages,
                "passthrough": self.passthrough}

    @classmethod
    def from_record(cls, r: dict) -> "InitParams":
        return cls(int(r["minor"]), int(r["flags"]), int(r["max_write"]), int(r["max_pages"]),
                   bool(r.get("passthrough", False)))


WANTED = ASYNC_READ | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES


def negotiate(body, *, max_pages: int, max_background: int, max_write: int = MAX_WRITE,
              passthrough: bool = False) -> tuple[InitParams, bytes]:
    """The answer to the kernel's INIT: the flags both sides know, the sizes this daemon wants.
    ``passthrough``: ask for FUSE passthrough (a backing file one level deep: the cache's own
    file system must not be a stacked one)."""
    if len(body) >= INIT_IN.size:
        major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(body)
    elif len(body) >= INIT_IN_OLD.size:
        major, minor, max_readahead, flags = INIT_IN_OLD.unpack_from(body)
        flags2 = 0
    else:
        raise ProtocolError("short INIT")
    if major != KERNEL_MAJOR:
        raise ProtocolError(f"the kernel speaks FUSE {major}.{minor}, this daemon 7.x")
    offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
    agreed = offered & (WANTED | (PASSTHROUGH if passthrough else 0))
    if agreed >> 32:
        agreed |= INIT_EXT  # the kernel reads flags2 only with it
    minor = min(minor, KERNEL_MINOR)
    params = InitParams(minor=minor, flags=offered, max_write=max_write,
                        max_pages=max_pages if agreed & MAX_PAGES else 32, passthrough=bool(agreed & PASSTHROUGH))
    out = INIT_OUT.pack(KERNEL_MAJOR, minor, max_readahead, agreed & 0xFFFFFFFF, max_background,
                        max_background * 3 // 4, max_write, 1, params.max_pages, 0, agreed >> 32,
                        1 if params.passthrough else 0)
    return params, out
