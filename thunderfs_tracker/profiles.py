"""Boot access profiles: nodes' recordings of what an image's readers touch first, merged.

Each node sends at most one recording per image content and chunk size (a newer one replaces
its older one); the last ``keep`` nodes' recordings are kept.  The merged profile has every
chunk that at least half of the recordings touched (one odd reader, say a ``dd`` of the whole
image, cannot make every node prefetch everything once two boots disagree with it), ordered
by the median of its first-touch times.  Every change bumps the version.  Kept as one JSON file
per profile in the state dir, so profiles survive a restart.
"""

from __future__ import annotations

import json
import time
import logging
import os
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from thunderfs_common.tracker_protocol import Profile, ProtocolError, check_content, parse_touches
from thunderfs_tracker.redis_conn import RedisConnection

log = logging.getLogger(__name__)


def merge(recordings: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Chunks touched by at least half of the recordings, by median first-touch time."""
    times: dict[int, list[int]] = {}
    for rec in recordings:
        for c, ms in rec:
            times.setdefault(c, []).append(ms)
    need = (len(recordings) + 1) // 2
    kept = [(c, int(statistics.median(ts))) for c, ts in times.items() if len(ts) >= need]
    kept.sort(key=lambda t: (t[1], t[0]))
    return kept


class ProfileStore(Protocol):
    """Where a tracker keeps boot profiles: files of its own (one tracker) or Redis (replicas)."""

    async def get(self, content: str, chunk_size: int) -> Profile | None:
        """The merged profile, or None if nobody has recorded one."""

    async def add(self, content: str, chunk_size: int, nchunks: int, node_id: str,
                  touches: list[tuple[int, int]]) -> Profile:
        """A node's recording (replacing its earlier one); the new merged profile."""


class FileProfileStore:
    def __init__(self, state_dir: Path, *, keep: int = 16, in_memory: int = 256):
        self._dir = state_dir / "profiles"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        self._in_memory = in_memory
        # (content, chunk_size) -> {"nchunks", "version", "recordings": {node: [[c, ms], ...]}}
        self._state: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._merged: dict[tuple[str, int], Profile] = {}

    def _path(self, content: str, chunk_size: int) -> Path:
        return self._dir / f"{check_content(content)}-{chunk_size}.json"

    def _load(self, key: tuple[str, int]) -> dict | None:
        state = self._state.get(key)
        if state is None:
            path = self._path(*key)
            if not path.exists():
                return None
            try:
                state = json.loads(path.read_text())
                nchunks = int(state["nchunks"])
                state["recordings"] = {node: parse_touches(rec, nchunks)
                                       for node, rec in state["recordings"].items()}
            except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
                log.warning("profile file %s is unreadable (%s): ignoring it", path, exc)
                return None
            self._remember(key, state)
        self._state.move_to_end(key)
        return state

    def _remember(self, key: tuple[str, int], state: dict) -> None:
        self._state[key] = state
        while len(self._state) > self._in_memory:
            old, _ = self._state.popitem(last=False)
            self._merged.pop(old, None)

    async def get(self, content: str, chunk_size: int) -> Profile | None:
        key = (content, chunk_size)
        state = self._load(key)
        if state is None:
            return None
        profile = self._merged.get(key)
        if profile is None or profile.version != state["version"]:
            profile = Profile(content, chunk_size, state["nchunks"], state["version"], len(state["recordings"]),
                              merge(list(state["recordings"].values())))
            self._merged[key] = profile
        return profile

    async def add(self, content: str, chunk_size: int, nchunks: int, node_id: str,
                  touches: list[tuple[int, int]]) -> Profile:
        """Take ``node_id``'s recording (replacing its last one); the merged profile."""
        key = (content, chunk_size)
        state = self._load(key)
        if state is None:
            state = {"nchunks": nchunks, "version": 0, "recordings": {}}
            self._remember(key, state)
        elif state["nchunks"] != nchunks:
            raise ProtocolError(f"image {content} has {state['nchunks']} chunks of {chunk_size}, not {nchunks}")
        recs = state["recordings"]
        recs.pop(node_id, None)
        recs[node_id] = touches
        while len(recs) > self._keep:
            recs.pop(next(iter(recs)))
        state["version"] += 1
        self._save(key, state)
        profile = await self.get(content, chunk_size)
        assert profile is not None
        log.info("profile of %s: recording of %d chunks from %s; version %d has %d chunks from %d recordings",
                 content, len(touches), node_id, profile.version, len(profile.touches), profile.recordings)
        return profile

    def _save(self, key: tuple[str, int], state: dict) -> None:
        path = self._path(*key)
        tmp = path.with_suffix(".tmp")
        data = {"nchunks": state["nchunks"], "version": state["version"],
                "recordings": {n: [[c, ms] for c, ms in rec] for n, rec in state["recordings"].items()}}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)


class RedisProfileStore:
    """Profiles in Redis, so that every tracker replica answers the same: per (content, chunk
    size) a hash node -> its recording (JSON, with when it came, for keeping the newest ``keep``),
    the version (INCR) and the chunk count.  Merged profiles are cached per replica by version."""

    def __init__(self, conn: RedisConnection, *, keep: int = 16):
        self._r = conn.redis  # the replica's one connection pool
        self._do = conn.call  # and its translation of Redis errors
        self._keep = keep
        self._merged: OrderedDict[tuple[str, int], Profile] = OrderedDict()

    async def get(self, content: str, chunk_size: int) -> Profile | None:
        key = f"{check_content(content)}:{chunk_size}"
        p = self._r.pipeline(transaction=False)
        p.get(f"tf:pv:{key}")
        p.get(f"tf:pk:{key}")
        version, nchunks = await self._do(p)
        if version is None or nchunks is None:
            return None
        version, nchunks = int(version), int(nchunks)
        cached = self._merged.get((content, chunk_size))
        if cached is not None and cached.version == version:
            return cached
        p = self._r.pipeline(transaction=False)
        p.hgetall(f"tf:p:{key}")
        (raw,) = await self._do(p)
        recordings = []
        for value in raw.values():
            try:
                recordings.append(parse_touches(json.loads(value)["chunks"], nchunks))
            except (ValueError, KeyError, TypeError, ProtocolError) as exc:
                log.warning("a recording of %s in Redis is unreadable (%s): ignoring it", content, exc)
        if not recordings:
            return None
        profile = Profile(content, chunk_size, nchunks, version, len(recordings), merge(recordings))
        self._merged[(content, chunk_size)] = profile
        while len(self._merged) > 256:
            self._merged.popitem(last=False)
        return profile

    async def add(self, content: str, chunk_size: int, nchunks: int, node_id: str,
                  touches: list[tuple[int, int]]) -> Profile:
        key = f"{check_content(content)}:{chunk_size}"
        p = self._r.pipeline(transaction=False)
        p.set(f"tf:pk:{key}", nchunks, nx=True)
        p.get(f"tf:pk:{key}")
        known = int((await self._do(p))[1])
        if known != nchunks:
            raise ProtocolError(f"image {content} has {known} chunks of {chunk_size}, not {nchunks}")
        p = self._r.pipeline(transaction=False)
        p.hset(f"tf:p:{key}", node_id, json.dumps({"at": time.time(), "chunks": [[c, ms] for c, ms in touches]}))
        p.incr(f"tf:pv:{key}")
        p.hgetall(f"tf:p:{key}")
        _, _, recs = await self._do(p)
        if len(recs) > self._keep:
            by_age = sorted(recs, key=lambda n: json.loads(recs[n])["at"])
            p = self._r.pipeline(transaction=False)
            p.hdel(f"tf:p:{key}", *by_age[:len(recs) - self._keep])
            await self._do(p)
        profile = await self.get(content, chunk_size)
        assert profile is not None
        log.info("profile of %s: recording of %d chunks from %s; version %d has %d chunks from %d recordings",
                 content, len(touches), node_id, profile.version, len(profile.touches), profile.recordings)
        return profile
