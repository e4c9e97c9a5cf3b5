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
import logging
import os
import statistics
from collections import OrderedDict
from pathlib import Path

from thunderfs_tracker.protocol import Profile, ProtocolError, check_content, parse_touches

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


class ProfileStore:
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

    def get(self, content: str, chunk_size: int) -> Profile | None:
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

    def add(self, content: str, chunk_size: int, nchunks: int, node_id: str,
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
        profile = self.get(content, chunk_size)
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
