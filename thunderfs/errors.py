"""Exceptions, one family per layer.

Each layer raises its own; ``fs.Operations`` is the one boundary that turns them into
``FUSEError(errno)`` and logs them once.
"""


class ThunderfsError(Exception):
    """Base of every error thunderfs raises on purpose."""


class ConfigError(ThunderfsError):
    """Bad options or an environment the daemon cannot start in (told to the operator as is)."""


# --- Glance: its errors are the Glance client's own (thunderfs_common.glance_client: GlanceError and
# below), shared with the tracker; the fs boundary turns them into EIO like these.


class SourceFailed(ThunderfsError):
    """A source of chunks failed for good (Glance unavailable past the deadline, the image gone):
    the reads that needed it fail with EIO."""


# --- cache ----------------------------------------------------------------------------------


class CacheError(ThunderfsError):
    """The local chunk cache cannot do what was asked."""


class CacheLayoutError(CacheError, ConfigError):
    """The cache directory is in use, or was made with other settings."""


class ChunkCorrupt(CacheError):
    """A cached chunk failed its checksum; it has been dropped and must be fetched again."""

    def __init__(self, chunk: int):
        super().__init__(f"cached chunk {chunk} failed its checksum")
        self.chunk = chunk


class ChunkNotCached(CacheError):
    """A chunk a read needed is neither cached nor in hand (evicted after another fetch cached it
    and before this read pinned it): the caller fetches it again."""

    def __init__(self, chunk: int):
        super().__init__(f"chunk {chunk} is not cached")
        self.chunk = chunk


# --- fetch ----------------------------------------------------------------------------------


class FetchFailed(ThunderfsError):
    """A chunk needed by a read could not be had from any source in time."""

    def __init__(self, image_id: str, chunk: int, cause: BaseException | str):
        super().__init__(f"image {image_id} chunk {chunk}: {cause}")
        self.image_id = image_id
        self.chunk = chunk
        self.cause = cause
