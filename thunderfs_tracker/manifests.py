"""Manifests: built once per image and chunk size by streaming the image from Glance.

The tracker is the party the cluster trusts to compute them: it reads Glance's bytes, hashes
every chunk (``chunk_digest``: BLAKE3) and the whole image with Glance's own algorithm, and publishes the
manifest only if that whole-image hash equals Glance's ``os_hash_value``.  A node accepts a
peer's chunk only if it matches.  Manifests are kept in the state dir and survive restarts.

With a seed (``seed``), an image nobody has asked for yet is *lazy* first: the first ask answers
"lazy" at once, and nodes trade chunks under the seed's pieces (``seed.py``) while the build, the
whole-image check, waits until nobody has asked the seed for the image for ``check_quiet``
seconds (a boot storm's reads are not slowed by it; at the latest after ``CHECK_LATEST``), then
streams it at ``check_rate`` bytes/s at most.  It also compares every chunk with what the pieces
said.  A mismatch of either kind *revokes* the image: every ask is then answered with a
``Revocation`` under the tracker's proof, and nodes drop every chunk they took under its pieces.
A later build that passes (tried again after the usual backoff) lifts it.

With replicas (``shared``: the Redis of the peer store), a built manifest is also put in Redis
(``tf:m:<image>:<chunk size>``), so that every replica answers the same, and one replica builds
it while the others say "building" (a lock key, ``tf:mb:...``, that expires if its builder dies);
a revocation is shared the same way (``tf:mr:...``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path


from thunderfs_common import chunk_digest
from thunderfs_common.glance_client import GlanceClient
from thunderfs_common.image import content_key
from thunderfs_common.manifest_proof import ManifestProof
from thunderfs_common.tracker_protocol import Manifest, ProtocolError, Revocation
from thunderfs_tracker.alike import AlikeIndex
from thunderfs_tracker.redis_conn import RedisConnection
from thunderfs_tracker.seed import Seed, SeedUnavailable

log = logging.getLogger(__name__)

_IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class ManifestUnavailable(Exception):
    """No manifest can be built (no Glance configured, image unknown, or its bytes do not match)."""


class Mismatch(ManifestUnavailable):
    """Glance's bytes are not the image its hash names: the image is revoked."""


# A failed build is tried again on the first ask after this many seconds, doubling per failure.
RETRY_FIRST = 10.0
RETRY_MAX = 900.0
# A lazy image's whole-image check starts at the latest this long after its first ask, quiet or not.
CHECK_LATEST = 600.0
CHECK_POLL = 1.0  # how often a waiting check looks whether the image is quiet


def shared_between(a: Manifest, b: Manifest) -> dict:
    """What two images share by their manifests (one chunk size): ``b``'s chunks whose digest
    ``a`` has too (issue 31: a node holding ``a`` fetches none of them for ``b``), and each
    one's zero chunks (never fetched)."""
    if a.chunk_size != b.chunk_size:
        raise ValueError("manifests of different chunk sizes")

    def chunks(m: Manifest) -> list[tuple[bytes, int]]:
        return [(m.digest(c), min(m.chunk_size, m.size - c * m.chunk_size)) for c in range(m.nchunks)]

    def zeros(cs: list[tuple[bytes, int]]) -> int:
        return sum(1 for d, n in cs if d == chunk_digest.zero_digest(n))

    ca, cb = chunks(a), chunks(b)
    in_a = {d for d, _ in ca}
    shared = [(d, n) for d, n in cb if d in in_a]
    return {"a": a.image_id, "b": b.image_id, "chunk_size": a.chunk_size, "chunks_a": len(ca), "chunks_b": len(cb),
            "shared_chunks": len(shared), "shared_bytes": sum(n for _, n in shared),
            "shared_fraction": round(len(shared) / len(cb), 4), "zero_chunks_a": zeros(ca), "zero_chunks_b": zeros(cb),
            "b_not_in_a_bytes": sum(n for d, n in cb if d not in in_a)}


class ManifestStore:
    def __init__(self, state_dir: Path, glance: GlanceClient | None, *, keep_in_memory: int = 64,
                 shared: RedisConnection | None = None, proof: ManifestProof | None = None,
                 seed: Seed | None = None, check_quiet: float = 30.0, check_rate: float = 64 * 2**20,
                 clock: Callable[[], float] = time.monotonic):
        """``glance``: the client to read images with (closed with the store), or None (no
        manifests: nodes then read from Glance only).  ``seed``: images are lazy until checked
        (``check_quiet`` seconds after the seed's last read, at ``check_rate`` bytes/s)."""
        self._dir = self.directory = state_dir / "manifests"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._glance = glance
        self._memory: OrderedDict[tuple[str, int], Manifest] = OrderedDict()
        self._keep = keep_in_memory
        self._building: dict[tuple[str, int], asyncio.Task] = {}
        # Builds that failed: why, when to try again, how many times in a row.
        self._failed: dict[tuple[str, int], tuple[str, float, int]] = {}
        self._clock = clock
        self._shared = shared  # the replicas' Redis (manifests built once for all), or None
        self._proof = proof or ManifestProof()  # signs what it builds, checks what it loads
        self.seed = seed
        if seed is not None:
            seed.on_mismatch = self.revoke
        self._check_quiet = check_quiet
        self._check_rate = check_rate
        self._revoked: dict[tuple[str, int], Revocation] = {}
        self._tasks: set[asyncio.Task] = set()
        # Told the content key of an image whose manifest was built or revoked (the app tells
        # the image's watches).
        self.on_changed: Callable[[bytes], None] = lambda content: None
        self.alike = AlikeIndex()  # the chunks of the manifests in memory, by digest (issue 31)
        self.stats = {"built": 0, "failed": 0, "bytes_read": 0, "proof_failures": 0, "revoked": 0}

    def _path(self, image_id: str, chunk_size: int) -> Path:
        return self._dir / f"{image_id}-{chunk_size}.json"

    async def get(self, image_id: str, chunk_size: int) -> Manifest | Revocation | str:
        """The manifest, its revocation, or a word on where it stands: 'lazy' (nodes may use the
        seed's pieces meanwhile) or 'building'.  Asking starts the build (the first ask for an
        image pays for the one stream from Glance, or with a seed, schedules the check)."""
        if not _IMAGE_ID.match(image_id):
            raise ManifestUnavailable("not an image id")
        key = (image_id, chunk_size)
        m = self._memory.get(key)
        if m is not None:
            self._memory.move_to_end(key)
            return m
        path = self._path(image_id, chunk_size)
        if path.exists():
            m = self._trusted(path.read_bytes(), f"{path}")
            if m is not None:
                self._remember(key, m)
                return m
            path.unlink(missing_ok=True)
        revoked = self.revoked(image_id, chunk_size)
        if key in self._failed:
            why, retry_at, _ = self._failed[key]
            left = retry_at - self._clock()
            if left > 0:
                if revoked is not None:
                    return revoked
                raise ManifestUnavailable(f"{why} (tried again in {left:.0f}s)")
        if self._glance is None:
            raise ManifestUnavailable("the tracker has no --glance to build manifests from")
        lazy = self.seed is not None and revoked is None
        pending = revoked or ("lazy" if lazy else "building")
        if key in self._building:
            return pending
        if self._shared is not None:
            raw = await self._shared.call(self._shared.redis.get(f"tf:m:{image_id}:{chunk_size}"))
            m = self._trusted(raw, "Redis") if raw is not None else None
            if m is not None:
                self._save(key, m)
                return m
            raw = await self._shared.call(self._shared.redis.get(f"tf:mr:{image_id}:{chunk_size}"))
            if raw is not None and (r := self._trusted_revocation(raw)) is not None:
                self._revoked[key] = r
                return r
            # None there (or one whose proof fails): one replica builds it, under a lock.
            mine = await self._shared.call(self._shared.redis.set(f"tf:mb:{image_id}:{chunk_size}", "1",
                                                                 nx=True, ex=int(CHECK_LATEST) + 600))
            if not mine:
                return pending  # another replica is building it
        if lazy:
            try:
                await self.seed.meta(image_id)
            except SeedUnavailable as exc:
                if self._shared is not None:
                    await self._shared.call(self._shared.redis.delete(f"tf:mb:{image_id}:{chunk_size}"))
                raise ManifestUnavailable(str(exc)) from None
        # Again, after the awaits: the asks of a crowd all got here at once (one build, not 32
        # streams of the whole image).
        if key not in self._building:
            self._building[key] = asyncio.create_task(self._build(image_id, chunk_size, lazy))
        return pending

    def stored(self, image_id: str) -> dict[int, Manifest]:
        """The manifests of ``image_id`` the state dir holds, by chunk size, each one's proof
        checked (what ``thunderfs-tracker --shared`` compares, with no tracker running)."""
        out: dict[int, Manifest] = {}
        if not _IMAGE_ID.match(image_id):
            return out
        for path in self._dir.glob(f"{image_id}-*.json"):
            size = path.stem.removeprefix(f"{image_id}-")
            if size.isdigit() and (m := self._trusted(path.read_bytes(), str(path))) is not None:
                out[int(size)] = m
        return out

    def revoked(self, image_id: str, chunk_size: int) -> Revocation | None:
        """The image's revocation, if its check failed (kept in the state dir)."""
        key = (image_id, chunk_size)
        if key not in self._revoked:
            path = self._path(image_id, chunk_size).with_suffix(".revoked")
            if path.exists() and (r := self._trusted_revocation(path.read_bytes())) is not None:
                self._revoked[key] = r
        return self._revoked.get(key)

    def revoke(self, image_id: str, chunk_size: int, why: str) -> Revocation:
        """Withdraw the image's lazy manifest: every node that asks is told, with the proof."""
        key = (image_id, chunk_size)
        listed = self.seed.listed(image_id) if self.seed is not None else None
        if self.seed is not None:
            self.seed.forget(image_id, chunk_size)
        r = Revocation(image_id, chunk_size, (listed.os_hash_value or "") if listed else "", why)
        r = dataclasses.replace(r, proof=self._proof.make(r.signed_bytes()))
        self._revoked[key] = r
        raw = json.dumps(r.to_json())
        path = self._path(image_id, chunk_size).with_suffix(".revoked")
        path.with_suffix(".tmp").write_text(raw)
        path.with_suffix(".tmp").replace(path)
        self.stats["revoked"] += 1
        if listed is not None:
            self.on_changed(listed.content_key)
        log.error("image %s revoked: %s; nodes drop every chunk they took under its pieces", image_id, why)
        if self._shared is not None:
            task = asyncio.get_running_loop().create_task(self._share_revocation(key, raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return r

    async def _share_revocation(self, key: tuple[str, int], raw: str) -> None:
        try:
            await self._shared.redis.set(f"tf:mr:{key[0]}:{key[1]}", raw)
        except Exception as exc:  # the other replicas learn it when their own check fails
            log.warning("could not share the revocation of %s in Redis: %s", key[0], exc)

    def _trusted_revocation(self, raw: bytes | str) -> Revocation | None:
        try:
            r = Revocation.parse(json.loads(raw))
        except (ValueError, ProtocolError):
            return None
        if not self._proof.holds(r.signed_bytes(), r.proof):
            self.stats["proof_failures"] += 1
            return None
        return r

    def _trusted(self, raw: bytes, where: str) -> Manifest | None:
        """A stored manifest if it parses and its proof holds (whoever could write the file or
        Redis without the key or the secret could otherwise poison it), else None, logged."""
        try:
            m = Manifest.parse(json.loads(raw))
        except (ValueError, ProtocolError) as exc:
            log.warning("the manifest stored in %s is unreadable (%s): building it again", where, exc)
            return None
        if not self._proof.holds(m.signed_bytes(), m.proof):
            self.stats["proof_failures"] += 1
            log.warning("the manifest of %s stored in %s fails its proof: not used, building it again",
                        m.image_id, where)
            return None
        return m

    def _save(self, key: tuple[str, int], m: Manifest) -> None:
        tmp = self._path(*key).with_suffix(".tmp")
        tmp.write_text(json.dumps(m.to_json()))
        tmp.replace(self._path(*key))
        self._remember(key, m)

    def _remember(self, key, m: Manifest) -> None:
        if key not in self._memory:
            self.alike.add(m)
        self._memory[key] = m
        while len(self._memory) > self._keep:
            self.alike.drop(self._memory.popitem(last=False)[1])

    async def _build(self, image_id: str, chunk_size: int, lazy: bool = False) -> None:
        key = (image_id, chunk_size)
        try:
            if lazy:  # nodes read through the seed meanwhile: the check waits for a quiet moment
                asked = self._clock()
                latest = asked + CHECK_LATEST
                while (min(self.seed.quiet_for(image_id, chunk_size), self._clock() - asked) < self._check_quiet
                       and self._clock() < latest):
                    await asyncio.sleep(min(CHECK_POLL, self._check_quiet))
            m = await self._stream(image_id, chunk_size, self._check_rate if lazy else 0)
            if self.seed is not None:
                for c, said in sorted(self.seed.known(image_id, chunk_size).items()):
                    if c >= m.nchunks or m.digest(c) != said:
                        raise Mismatch(f"chunk {c} of {image_id} read again differs from the piece the seed "
                                       f"served: Glance changed the image under its id")
            m = dataclasses.replace(m, proof=self._proof.make(m.signed_bytes()))
        except Exception as exc:  # recorded and told to every asker, not raised into the loop
            why = f"building the manifest of {image_id} failed: {exc}"
            failures = self._failed.get(key, ("", 0.0, 0))[2] + 1
            wait = min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1))
            log.warning("%s; trying again on an ask after %.0fs", why, wait)
            self._failed[key] = (why, self._clock() + wait, failures)
            self.stats["failed"] += 1
            if isinstance(exc, Mismatch) and self.seed is not None and (lazy or self.seed.known(*key)):
                self.revoke(image_id, chunk_size, str(exc))
        else:
            self._failed.pop(key, None)
            self._save(key, m)
            self.on_changed(content_key(m.os_hash_algo, m.os_hash_value, m.size))
            if self._revoked.pop(key, None) is not None:
                self._path(image_id, chunk_size).with_suffix(".revoked").unlink(missing_ok=True)
                log.warning("image %s: its manifest now checks against Glance; its revocation is lifted", image_id)
            if self.seed is not None:
                self.seed.forget(image_id, chunk_size)
            if self._shared is not None:
                try:
                    await self._shared.redis.set(f"tf:m:{image_id}:{chunk_size}", json.dumps(m.to_json()))
                    await self._shared.redis.delete(f"tf:mr:{image_id}:{chunk_size}")
                except Exception as exc:  # the others build it themselves
                    log.warning("could not share the manifest of %s in Redis: %s", image_id, exc)
            self.stats["built"] += 1
            log.info("manifest of %s (%d chunks of %d) built and checked against Glance's %s",
                     image_id, m.nchunks, chunk_size, m.os_hash_algo)
        finally:
            self._building.pop(key, None)
            if self._shared is not None:
                try:
                    await self._shared.redis.delete(f"tf:mb:{image_id}:{chunk_size}")
                except Exception:
                    pass  # it expires

    async def _stream(self, image_id: str, chunk_size: int, rate: float = 0) -> Manifest:
        meta = await self._glance.image(image_id)
        if meta.status != "active" or not meta.os_hash_value:
            raise ManifestUnavailable(f"image is {meta.status} with no os_hash_value")
        algo, expected, size = meta.os_hash_algo or "sha512", meta.os_hash_value, meta.size
        whole = hashlib.new(algo)
        digests = bytearray()
        pending = bytearray()
        total = 0
        started = self._clock()

        def hash_piece(piece: bytes) -> None:  # in a worker thread: 2 GiB is seconds of CPU
            nonlocal pending
            whole.update(piece)
            pending += piece
            done = len(pending) - len(pending) % chunk_size
            with memoryview(pending) as view:
                for i in range(0, done, chunk_size):
                    digests.extend(chunk_digest.digest(view[i:i + chunk_size]))
            del pending[:done]

        async for piece in self._glance.stream(image_id):
            await asyncio.to_thread(hash_piece, piece)
            total += len(piece)
            if rate > 0 and (ahead := total / rate - (self._clock() - started)) > 0:
                await asyncio.sleep(ahead)  # the background check at a capped rate
        if pending or total == 0:
            digests += chunk_digest.digest(pending)
        self.stats["bytes_read"] += total
        if total != size:
            raise Mismatch(f"Glance sent {total} bytes of a {size}-byte image")
        if whole.hexdigest() != expected:
            raise Mismatch(f"the image's {algo} does not match Glance's os_hash_value: not published")
        return Manifest(image_id, size, chunk_size, algo, expected, bytes(digests))

    async def close(self) -> None:
        for task in [*self._building.values(), *self._tasks]:
            task.cancel()
        if self._glance is not None:
            await self._glance.aclose()
        if self.seed is not None:
            await self.seed.aclose()
