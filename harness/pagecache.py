"""Dropping a file's pages from the kernel's page cache, so that the next read goes to its source."""

from __future__ import annotations

import os
from pathlib import Path


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
