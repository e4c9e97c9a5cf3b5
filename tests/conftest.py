"""Fixtures: a real Glance (gunicorn, sqlite, file store) and real thunderfs mounts.

Every daemon is a separate process started through the CLI and stopped by its PID.  A test
fails if a daemon it started logged a traceback.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from harness.local_glance import LocalGlance
from harness.mounts import Mount

CHUNK = 64 * 1024


@pytest.fixture(scope="session", autouse=True)
def _run_dir(tmp_path_factory):
    # Control sockets of test daemons live apart from any real mount's.
    os.environ["THUNDERFS_RUN_DIR"] = str(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def glance(tmp_path_factory):
    """One Glance for tests that do not stop it."""
    g = LocalGlance(tmp_path_factory.mktemp("glance"))
    g.start()
    yield g
    g.stop()


@pytest.fixture
def own_glance(tmp_path):
    """A Glance of the test's own, which the test may stop, pause and restart."""
    g = LocalGlance(tmp_path / "glance")
    g.start()
    yield g
    g.stop()


def image_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Images:
    """Uploads test images once per Glance and remembers their bytes."""

    def __init__(self, glance: LocalGlance):
        self.glance = glance
        self.data: dict[str, bytes] = {}

    def add(self, size: int, seed: int = 1, name: str = "test") -> str:
        data = image_bytes(size, seed)
        image_id = self.glance.upload(name, data)["id"]
        self.data[image_id] = data
        return image_id


@pytest.fixture(scope="session")
def images(glance):
    return Images(glance)


@pytest.fixture
def mounts(tmp_path):
    """Factory of mounts; every one made is cleaned up, and its log checked for tracebacks."""
    made: list[Mount] = []

    def make(glance_url: str, *args: str, name: str = "m", cache_dir: Path | None = None,
             prefix: list[str] | None = None) -> Mount:
        m = Mount(tmp_path / f"mnt-{name}", glance_url, cache_dir or tmp_path / f"cache-{name}", *args, prefix=prefix)
        made.append(m)
        return m

    yield make
    for m in made:
        m.cleanup()
    for m in made:
        log = m.log_tail(200_000)
        assert "Traceback" not in log, f"daemon of {m.path} logged a traceback:\n{log[-6000:]}"


@pytest.fixture
def mount(glance, mounts):
    m = mounts(glance.url)
    m.mount()
    return m
