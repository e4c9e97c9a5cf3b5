"""The fast layer's fixtures: a real chunk store on a temporary directory.  The in-memory sources
and helpers the tests share are in ``fakes``.  No mounts, no subprocesses, no network."""

from __future__ import annotations

import pytest

from fakes import CS
from thunderfs.cache.index import ChunkIndex
from thunderfs.cache.store import ChunkStore


@pytest.fixture
def index(tmp_path):
    ix = ChunkIndex(tmp_path / "index")
    ix.check_layout(CS)
    yield ix
    ix.close()


@pytest.fixture
def store(tmp_path, index):
    s = ChunkStore(tmp_path, index, CS, 1 << 30)
    yield s
    s.close()
