"""What we know of one Glance image: a value type shared by the catalog, fetcher and fs."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

def _ns(stamp: str | None) -> int:
    if not stamp:
        return 0
    try:
        dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1e9)


def content_key(os_hash_algo: str, os_hash_value: str, size: int) -> bytes:
    """The content key (``ImageMeta.content_key``) of an image Glance hashed (what the tracker
    knows of it from its manifest)."""
    return hashlib.sha256(f"{os_hash_algo}:{os_hash_value}:{size}".encode()).digest()[:16]


@dataclass(frozen=True, slots=True)
class ImageMeta:
    id: str
    name: str
    size: int
    status: str
    os_hash_algo: str | None
    os_hash_value: str | None
    checksum: str | None
    created_at: str | None
    updated_at: str | None

    @classmethod
    def from_glance(cls, record: dict) -> "ImageMeta":
        return cls(
            id=record["id"],
            name=record.get("name") or "",
            size=int(record.get("size") or 0),
            status=record.get("status", ""),
            os_hash_algo=record.get("os_hash_algo"),
            os_hash_value=record.get("os_hash_value"),
            checksum=record.get("checksum"),
            created_at=record.get("created_at"),
            updated_at=record.get("updated_at"),
        )

    def to_record(self) -> dict:
        return asdict(self)

    @property
    def content_id(self) -> str:
        """What names these bytes: Glance's multihash, else its md5, else (weakest) id and time."""
        if self.os_hash_value:
            return f"{self.os_hash_algo}:{self.os_hash_value}:{self.size}"
        if self.checksum:
            return f"md5:{self.checksum}:{self.size}"
        return f"id:{self.id}:{self.created_at}:{self.size}"

    @property
    def content_key(self) -> bytes:
        """16 bytes that key this content's chunks in the cache: a reused image id with other
        bytes gets other keys, so old chunks are never served for it."""
        if self.os_hash_value:
            return content_key(str(self.os_hash_algo), self.os_hash_value, self.size)  # as content_id
        return hashlib.sha256(self.content_id.encode()).digest()[:16]

    @property
    def mtime_ns(self) -> int:
        return _ns(self.updated_at) or _ns(self.created_at)

    @property
    def ctime_ns(self) -> int:
        return _ns(self.created_at)
