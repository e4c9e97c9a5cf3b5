"""The tracker's HTTP service: ``create_app(config)`` and its route table.

    POST /v1/nodes/{node}/announce   a node says who and where it is (and is alive): heartbeat
    POST /v1/nodes/{node}/alive      a light heartbeat: alive, and as last announced
    POST /v1/nodes/{node}/chunks     the chunks it holds: full state, or batched deltas (alive, as a light heartbeat)
    GET  /v1/images/{content}/peers?first=&last=&limit=   holders of chunks, nearest first
    GET  /v1/images/{content}/watch?nchunks=   who holds what, as it changes: server-sent events
    GET  /v1/manifests/{image}?chunk_size=N   a BLAKE3 digest per chunk, bound to Glance's hash (202 while built,
                                     "lazy" while the seed's pieces stand in; 410: revoked)
    GET  /v1/images/{image}/seed?chunk_size=&first=&count=&data=   a lazy image's chunks: a JSON piece
                                     (their digests, proven) on one line, then their bytes
    POST /v1/images/{content}/claims   "I am about to fetch these from Glance": granted, or who has
    POST /v1/reports                 a member says a peer served a chunk that failed verification
    GET  /v1/profiles/{content}?chunk_size=N   an image's boot access profile (404: none yet)
    POST /v1/profiles/{content}      a node's recording of what a reader touched first
    GET  /v1/stats, /healthz, /readyz

With a secret, every /v1 request must be signed by a member (``signing.py``) and a node may only
speak for itself; health checks stay open.  Every malformed request is a 4xx with a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from thunderfs_common.glance_client import GlanceClient
from thunderfs_common.manifest_proof import ManifestProof
from thunderfs_tracker import metrics, selection
from thunderfs_tracker.config import TrackerConfig
from thunderfs_tracker.manifests import ManifestStore, ManifestUnavailable
from thunderfs_tracker.seed import Seed, SeedUnavailable
from thunderfs_tracker.watch import Watches
from thunderfs_tracker.peer_store import NodeIdTaken, PeerStore, StoreFull, StoreUnavailable
from thunderfs_tracker.profiles import ProfileStore
from thunderfs_tracker.stores import open_stores
from thunderfs_common.tracker_protocol import (
    API,
    Alike,
    AnnounceReply,
    ChunkState,
    Claim,
    Claimed,
    ClaimReply,
    LookupReply,
    Manifest,
    Recording,
    Report,
    Revocation,
    MAX_CHUNKS,
    MAX_PIECE_CHUNKS,
    NodeInfo,
    PeerRecord,
    ProtocolError,
    check_chunk_size,
    check_content,
    check_node_id,
    bits_to_ranges,
    parse_alive,
)
from thunderfs_common.signing import H_NONCE, H_REPLY, NonceCacheFull, Verifier, sign_reply

log = logging.getLogger(__name__)

MAX_BODY = 4 * 2**20
MAX_LOOKUP_CHUNKS = 1 << 16
MAX_ALIKE_CHUNKS = 4096  # a node asks for its lookup window's (1024)


CONFIG = web.AppKey("config", TrackerConfig)
STORE = web.AppKey("store", PeerStore)
VERIFIER = web.AppKey("verifier", Verifier)
STATS = web.AppKey("stats", dict)
MANIFESTS = web.AppKey("manifests", ManifestStore)
SUSPECTS = web.AppKey("suspects", dict)
PROFILES = web.AppKey("profiles", ProfileStore)
NONCES = web.AppKey("nonces", object)  # MemoryNonces or RedisNonces
WATCHES = web.AppKey("watches", Watches)
SIGNER = web.RequestKey("signer", str)  # the member that signed the request


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ProtocolError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    except (StoreFull, StoreUnavailable) as exc:
        raise _error(web.HTTPServiceUnavailable, str(exc)) from None
    except NodeIdTaken as exc:
        log.warning("refused an announce: %s", exc)
        raise _error(web.HTTPConflict, str(exc)) from None


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Members only: a request must be signed (its nonce new to every replica), and a node may
    speak only for itself.  Every answer to a request with a well-formed nonce is signed, so
    that nobody on the way can alter it or replay an old one."""
    verifier = request.app.get(VERIFIER)
    if verifier is None or not request.path.startswith(API):
        return await handler(request)
    nonce = request.headers.get(H_NONCE)
    try:
        response = await _members_only(request, handler, verifier)
    except web.HTTPException as exc:
        response = exc
    if response.prepared:  # a stream (a watch): its events are signed one by one
        return response
    if isinstance(nonce, str) and len(nonce) == 24 and nonce.isascii():
        response.headers[H_REPLY] = sign_reply(request.app[CONFIG].secret, nonce, response.status,
                                               response.body or b"")
    if isinstance(response, web.HTTPException):
        raise response
    return response


async def _body(request: web.Request) -> bytes:
    """The request's body; a client that went away while sending it (a node killed or stopped
    mid-request: the chaos run's tracker logged aiohttp's traceback for it) is answered 400,
    which nobody receives, and logged as what it is."""
    try:
        return await request.read()
    except ConnectionResetError as exc:
        log.debug("a client went away while sending %s %s: %s", request.method, request.path, exc)
        raise _error(web.HTTPBadRequest, "the request's body was cut short") from None


async def _members_only(request: web.Request, handler, verifier: Verifier):
    body = await _body(request)
    try:
        signer, nonce = verifier.verify(request.method, request.path_qs, request.headers, body, check_nonce=False)
        fresh = await request.app[NONCES].remember(nonce)
    except NonceCacheFull as exc:
        raise _error(web.HTTPServiceUnavailable, f"too many signed requests to remember: {exc}") from None
    except StoreUnavailable as exc:
        raise _error(web.HTTPServiceUnavailable, str(exc)) from None
    except ValueError as exc:
        request.app[STATS]["refused"] += 1
        raise _error(web.HTTPUnauthorized, f"not a member: {exc}") from None
    if not fresh:
        request.app[STATS]["refused"] += 1
        raise _error(web.HTTPUnauthorized, "not a member: replayed request")
    node = request.match_info.get("node")
    if node is not None and node != signer:
        raise _error(web.HTTPForbidden, f"node {signer} may not speak for {node}")
    request[SIGNER] = signer
    return await handler(request)


async def _json(request: web.Request):
    try:
        return json.loads(await _body(request))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"body is not JSON: {exc}") from None


async def announce(request: web.Request) -> web.Response:
    node = NodeInfo.parse(request.match_info["node"], await _json(request))
    epoch = await request.app[STORE].put_node(node, time.monotonic())
    return web.json_response(AnnounceReply(epoch, request.app[CONFIG].heartbeat).to_json())


async def alive(request: web.Request) -> web.Response:
    """A light heartbeat: the node's record stays as last announced (409: announce in full)."""
    node_id = check_node_id(request.match_info["node"])
    instance = parse_alive(await _json(request))
    epoch = await request.app[STORE].refresh_node(node_id, instance, time.monotonic())
    if epoch is None:
        raise _error(web.HTTPConflict, f"node {node_id} has not announced itself (or expired): announce first")
    return web.json_response(AnnounceReply(epoch, request.app[CONFIG].heartbeat).to_json())


async def chunks(request: web.Request) -> web.Response:
    """A node's chunk state, in full or as deltas; it keeps the node alive as a light heartbeat
    does, and is answered as one (the heartbeat in the answer says so: the node skips its next)."""
    node_id = check_node_id(request.match_info["node"])
    state = ChunkState.parse(await _json(request))
    full, updates = state.full, state.updates
    try:
        epoch = await request.app[STORE].update_chunks(node_id, full, updates, time.monotonic())
    except KeyError:
        raise _error(web.HTTPConflict, f"node {node_id} has not announced itself (or expired): announce first") from None
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return web.json_response(AnnounceReply(epoch, request.app[CONFIG].heartbeat).to_json())


def _chunks(bits: int) -> list[int]:
    return [c for a, b in bits_to_ranges(bits) for c in range(a, b + 1)]


def _query_int(request: web.Request, name: str, lo: int, hi: int, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ProtocolError(f"query parameter {name} must be an integer") from None
    if not lo <= value <= hi:
        raise ProtocolError(f"query parameter {name} must be from {lo} to {hi}")
    return value


async def peers(request: web.Request) -> web.Response:
    started = time.perf_counter()
    content = check_content(request.match_info["content"])
    store, cfg = request.app[STORE], request.app[CONFIG]
    first = _query_int(request, "first", 0, MAX_CHUNKS - 1)
    last = _query_int(request, "last", first, min(MAX_CHUNKS - 1, first + MAX_LOOKUP_CHUNKS - 1))
    limit = _query_int(request, "limit", 1, 200, default=cfg.max_peers)
    asking = request.get(SIGNER) or request.query.get("node")
    nchunks, me, holders = await store.lookup(content, first, last, asking)
    if nchunks is None:
        raise _error(web.HTTPNotFound, f"no node holds image {content}")
    if last >= nchunks:
        raise ProtocolError(f"image {content} has chunks 0..{nchunks - 1}")
    suspects, now = request.app[SUSPECTS], time.monotonic()
    found = [(n, b) for n, b in holders if n.node_id != asking and suspects.get(n.node_id, 0) < now]
    ranked = selection.rank(me, found)[:limit]
    reply = LookupReply(first, last, [PeerRecord(n.node_id, n.peer_url, n.location, n.load, b) for n, b in ranked])
    stats = request.app[STATS]
    stats["lookups"] += 1
    stats["lookup_seconds"] += time.perf_counter() - started
    return web.json_response(reply.to_json())


async def watch(request: web.Request) -> web.StreamResponse:
    """Who holds which chunks of an image, as it changes: one event now, then what changed."""
    content = check_content(request.match_info["content"])
    store, cfg = request.app[STORE], request.app[CONFIG]
    known = await store.nchunks(content)
    said = _query_int(request, "nchunks", 1, MAX_CHUNKS) if "nchunks" in request.query else None
    if known is not None and said not in (None, known):
        raise ProtocolError(f"image {content} has {known} chunks, not {said}")
    if known is None and said is None:
        raise _error(web.HTTPNotFound, f"no node holds image {content} (say nchunks= to watch it anyway)")
    asking = request.get(SIGNER) or request.query.get("node")
    me = await store.node(asking) if asking else None
    return await request.app[WATCHES].serve(request, content, known or said, me, request.app[SUSPECTS], cfg.secret,
                                            request.headers.get(H_NONCE))


async def claims(request: web.Request) -> web.Response:
    """So that many nodes starting on one image at once do not all fetch the same chunks from
    Glance: the first to claim a chunk fetches it; the others are told to take it from that node."""
    content = check_content(request.match_info["content"])
    claim = Claim.parse(await _json(request), request.get(SIGNER))
    node_id, nchunks, want = claim.node_id, claim.nchunks, claim.chunks
    try:
        granted, others = await request.app[STORE].claim(content, node_id, nchunks, want, time.monotonic(),
                                                   request.app[CONFIG].claim_seconds)
    except KeyError:
        raise _error(web.HTTPConflict, f"node {node_id} has not announced itself (or expired)") from None
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    request.app[STATS]["claims"] += 1
    # A suspect is left out of lookups, so nobody could take its chunks: never name it as their
    # holder (the asker would wait for them in vain); the asker fetches them itself.
    suspects, now = request.app[SUSPECTS], time.monotonic()
    named = []
    for n, b, held in others:
        if suspects.get(n.node_id, 0) < now:
            named.append(Claimed(PeerRecord(n.node_id, n.peer_url, n.location, n.load, 0), _chunks(b), held))
        else:
            granted |= b
    return web.json_response(ClaimReply(_chunks(granted), named).to_json())


async def report(request: web.Request) -> web.Response:
    """A peer served a bad chunk: it is left out of lookups for a while (every report is logged;
    reporting takes membership, and a suspect comes back by itself)."""
    r = Report.parse(await _json(request))
    suspect, content, reason = r.node_id, r.content, r.reason
    cfg = request.app[CONFIG]
    suspects = request.app[SUSPECTS]
    if len(suspects) > 100_000:
        suspects.clear()
    suspects[suspect] = time.monotonic() + cfg.suspect_seconds
    request.app[STATS]["reports"] += 1
    log.warning("node %s reports that %s served a bad chunk of %s (%s): left out of lookups for %.0fs",
                request.get(SIGNER, "?"), suspect, content, reason, cfg.suspect_seconds)
    return web.json_response({"ok": True})


async def manifest(request: web.Request) -> web.Response:
    chunk_size = check_chunk_size(_query_int(request, "chunk_size", 1, 1 << 30))
    try:
        m = await request.app[MANIFESTS].get(request.match_info["image"], chunk_size)
    except ManifestUnavailable as exc:
        raise _error(web.HTTPNotFound, str(exc)) from None
    if isinstance(m, str):
        return web.json_response({"status": m}, status=202)
    if isinstance(m, Revocation):
        return web.json_response({"error": m.why, "revoked": m.to_json()}, status=410)
    return web.json_response({**m.to_json(), "alike": request.app[MANIFESTS].alike.count(m)})


async def alike(request: web.Request) -> web.Response:
    """Issue 31: for a window of an image's chunks, the chunks of other images with the same
    digests, and who holds those (a node takes them from there and checks them against this
    image's manifest)."""
    chunk_size = check_chunk_size(_query_int(request, "chunk_size", 1, 1 << 30))
    first = _query_int(request, "first", 0, MAX_CHUNKS - 1)
    count = _query_int(request, "count", 1, MAX_ALIKE_CHUNKS)
    try:
        m = await request.app[MANIFESTS].get(request.match_info["image"], chunk_size)
    except ManifestUnavailable as exc:
        raise _error(web.HTTPNotFound, str(exc)) from None
    if not isinstance(m, Manifest):
        raise _error(web.HTTPNotFound, f"image {m.image_id if isinstance(m, Revocation) else ''} has no "
                     "checked manifest here")
    store, asking = request.app[STORE], request.get(SIGNER) or request.query.get("node")
    suspects, now = request.app[SUSPECTS], time.monotonic()
    out = []
    for content, pairs in request.app[MANIFESTS].alike.find(m, first, count).items():
        lo, hi = min(j for _, j in pairs), max(j for _, j in pairs)
        nchunks, me, holders = await store.lookup(content.hex(), lo, hi, asking)
        found = [(n, b << lo) for n, b in holders if n.node_id != asking and suspects.get(n.node_id, 0) < now]
        held = 0
        for _, bits in found:
            held |= bits
        pairs = [(k, j) for k, j in pairs if held >> j & 1]
        if pairs and nchunks is not None:
            ranked = selection.rank(me, found)[:request.app[CONFIG].max_peers]
            out.append(Alike(content, request.app[MANIFESTS].alike.size_of(content), pairs,
                             [PeerRecord(n.node_id, n.peer_url, n.location, n.load, b) for n, b in ranked]).to_json())
    return web.json_response({"first": first, "count": count, "alike": out})


async def seed(request: web.Request) -> web.Response:
    """Chunks of an image whose manifest is not built yet, read from Glance once for all."""
    manifests = request.app[MANIFESTS]
    image = request.match_info["image"]
    chunk_size = check_chunk_size(_query_int(request, "chunk_size", 1, 1 << 30))
    first = _query_int(request, "first", 0, MAX_CHUNKS)
    count = _query_int(request, "count", 1, MAX_PIECE_CHUNKS)
    data = bool(_query_int(request, "data", 0, 1, default=1))
    if manifests.seed is None:
        raise _error(web.HTTPNotFound, "this tracker seeds no image (no --glance, or --seed-cache 0)")
    if (r := manifests.revoked(image, chunk_size)) is not None:
        raise _error(web.HTTPGone, f"image {image} is revoked: {r.why}")
    try:
        piece, body = await manifests.seed.read(image, chunk_size, first, count, data=data)
    except SeedUnavailable as exc:
        raise _error(web.HTTPServiceUnavailable if exc.transient else web.HTTPNotFound, str(exc)) from None
    except ValueError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    head = json.dumps(piece.to_json(), separators=(",", ":")).encode() + b"\n"
    return web.Response(body=head + body if body is not None else head, content_type="application/octet-stream")


async def get_profile(request: web.Request) -> web.Response:
    content = check_content(request.match_info["content"])
    chunk_size = check_chunk_size(_query_int(request, "chunk_size", 1, 1 << 30))
    profile = await request.app[PROFILES].get(content, chunk_size)
    if profile is None:
        raise _error(web.HTTPNotFound, f"no profile of image {content} yet")
    return web.json_response(profile.to_json())


async def add_recording(request: web.Request) -> web.Response:
    """A node recorded which chunks a reader touched first after opening the image, and when."""
    content = check_content(request.match_info["content"])
    body = await _json(request)
    rec = Recording.parse(body, request.get(SIGNER))
    chunk_size = check_chunk_size(_query_int(request, "chunk_size", 1, 1 << 30, default=body.get("chunk_size")))
    profile = await request.app[PROFILES].add(content, chunk_size, rec.nchunks, rec.node_id, rec.touches)
    request.app[STATS]["recordings"] += 1
    return web.json_response({"version": profile.version, "chunks": len(profile.touches),
                              "recordings": profile.recordings})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({**await request.app[STORE].statistics(), **request.app[STATS],
                              "requests": request.app[metrics.REQUESTS], **request.app[WATCHES].statistics(),
                              "epoch": await request.app[STORE].epoch(),
                              "manifests": request.app[MANIFESTS].stats,
                              **({"seed": request.app[MANIFESTS].seed.statistics()}
                                 if request.app[MANIFESTS].seed is not None else {})})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"ready": True, **await request.app[STORE].statistics()})


def routes() -> list[web.RouteDef]:
    return [
        web.post(API + "/nodes/{node}/announce", announce),
        web.post(API + "/nodes/{node}/alive", alive),
        web.post(API + "/nodes/{node}/chunks", chunks),
        web.get(API + "/images/{content}/peers", peers),
        web.get(API + "/images/{content}/watch", watch),
        web.get(API + "/manifests/{image}", manifest),
        web.get(API + "/images/{image}/alike", alike),
        web.get(API + "/images/{image}/seed", seed),
        web.post(API + "/reports", report),
        web.post(API + "/images/{content}/claims", claims),
        web.get(API + "/profiles/{content}", get_profile),
        web.post(API + "/profiles/{content}", add_recording),
        web.get(API + "/stats", stats),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]


async def _expiry(app: web.Application):
    cfg, store = app[CONFIG], app[STORE]

    async def sweep():
        while True:
            await asyncio.sleep(min(cfg.node_ttl / 3, 5.0))
            try:
                gone = await store.expire(time.monotonic() - cfg.node_ttl)
            except StoreUnavailable as exc:
                log.warning("expiry skipped: %s", exc)
                continue
            if gone:
                log.info("expired %d nodes that missed their heartbeats: %s", len(gone), ", ".join(gone[:10]))

    task = asyncio.create_task(sweep())
    yield
    task.cancel()
    await app[MANIFESTS].close()
    await store.close()


def create_app(config: TrackerConfig) -> web.Application:
    """The tracker, with the stores ``config.store`` names (in memory, a restarted tracker's new
    epoch makes nodes send their state again)."""
    app = web.Application(middlewares=[auth_middleware, errors_middleware], client_max_size=MAX_BODY)
    app[CONFIG] = config
    app[STATS] = {"lookups": 0, "lookup_seconds": 0.0, "refused": 0, "reports": 0, "claims": 0,
                  "recordings": 0}
    app[SUSPECTS] = {}
    stores = open_stores(config)
    app[STORE] = stores.peers
    app[PROFILES] = stores.profiles
    app[NONCES] = stores.nonces
    # 60 s of silence from Glance (not the whole stream) ends a manifest build.
    glance = GlanceClient(config.glance_url, request_timeout=60, connect_timeout=10,
                          auth=config.glance_auth) if config.glance_url else None
    proof = config.manifest_proof or ManifestProof(secret=config.secret)
    # The seed reads runs a node waits for: 10 s of silence from Glance fails the run (the node
    # then reads Glance itself), not the 60 s a whole-image stream may pause.
    seed = Seed(GlanceClient(config.glance_url, request_timeout=10, connect_timeout=5, auth=config.glance_auth),
                proof, cache_bytes=config.seed_cache) if config.glance_url and config.seed_cache else None
    app[MANIFESTS] = ManifestStore(config.state_dir, glance, shared=stores.shared, proof=proof, seed=seed,
                                   check_quiet=config.check_quiet, check_rate=config.check_rate)
    app[WATCHES] = Watches(stores.peers, interval=config.watch_interval, seconds=config.watch_seconds,
                           peers=config.watch_peers)
    app[MANIFESTS].on_changed = lambda content: app[WATCHES].manifest_changed(content.hex())
    if config.secret:
        app[VERIFIER] = Verifier(config.secret)
    app.add_routes(routes())
    async def all_stats() -> dict:
        return {**await app[STORE].statistics(), **app[STATS], **app[WATCHES].statistics()}

    metrics.install(app, all_stats)
    app.cleanup_ctx.append(_expiry)
    return app
