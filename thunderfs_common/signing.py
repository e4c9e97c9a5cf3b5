"""Membership: requests signed with the cluster's shared secret (HMAC-SHA256), and answers too.

Shared by every side that speaks the protocol (tracker, its client, the daemons' peer servers).
A request's signature covers the sending node's id, the method, the path with its query, a
timestamp, a nonce and the body's sha256, so a request cannot be altered, passed off as another
node's, moved to another path, or replayed: the timestamp
must be within ``MAX_SKEW`` seconds and a nonce is accepted once (``NonceCache``: a full cache
refuses new requests rather than forget a nonce that could still be replayed).  Headers that are
not exactly what a signer sends (wrong characters, lengths, formats) are refused as such, before
any comparison.

An answer to a signed request is signed too (``sign_reply``, ``X-Thunderfs-Reply``): over the
request's nonce, the status and the body's sha256, so that nobody between a node and the tracker
can alter an answer, or replay an old one, without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

MAX_SKEW = 60.0
H_NODE, H_TIME, H_NONCE, H_SIG = "X-Thunderfs-Node", "X-Thunderfs-Time", "X-Thunderfs-Nonce", "X-Thunderfs-Signature"
H_REPLY = "X-Thunderfs-Reply"
# What a signer sends, exactly: anything else is refused before it is compared or looked up.
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STAMP = re.compile(r"[0-9]{1,12}\.[0-9]{3}")
_NONCE = re.compile(r"[0-9a-f]{24}")
_MAC = re.compile(r"[0-9a-f]{64}")


class NonceCacheFull(Exception):
    """More signed requests within the replay window than the cache can remember: refuse (503)."""


class SecretError(ValueError):
    pass


def load_secret(path: str | Path) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise SecretError(f"the secret in {path} is shorter than 16 bytes")
    if os.stat(path).st_mode & 0o077:
        log.warning("secret file %s is readable by group or others", path)
    return secret


def _mac(secret: bytes, node: str, method: str, path_qs: str, stamp: str, nonce: str, body: bytes) -> str:
    """Over everything a request says: who sends it too, so that nobody on the way can pass it off
    as another node's."""
    msg = "\n".join((node, method.upper(), path_qs, stamp, nonce, hashlib.sha256(body).hexdigest()))
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, node_id: str, method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
    stamp, nonce = f"{time.time():.3f}", secrets.token_hex(12)
    return {H_NODE: node_id, H_TIME: stamp, H_NONCE: nonce, H_SIG: _mac(secret, node_id, method, path_qs, stamp, nonce, body)}


class SignedRequests(httpx.Auth):
    """Signs every request a member's httpx client sends (each attempt anew: a nonce is accepted
    once), over its method, path with query, and body."""

    requires_request_body = True

    def __init__(self, secret: bytes, node_id: str):
        self._secret = secret
        self._node_id = node_id

    def auth_flow(self, request: httpx.Request):
        request.headers.update(sign(self._secret, self._node_id, request.method,
                                    request.url.raw_path.decode("ascii"), request.content))
        yield request


class NonceCache:
    """Nonces seen within the replay window (twice the allowed skew), at most ``max_nonces``."""

    def __init__(self, max_nonces: int = 200_000):
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max = max_nonces

    def remember(self, nonce: str, now: float) -> bool:
        """True if ``nonce`` is new (and now remembered); False if it was seen (a replay).
        ``NonceCacheFull`` when every remembered nonce is still inside the window."""
        while self._nonces and next(iter(self._nonces.values())) < now - 2 * MAX_SKEW:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            return False
        if len(self._nonces) >= self._max:
            raise NonceCacheFull(f"{self._max} signed requests within {2 * MAX_SKEW:.0f}s")
        self._nonces[nonce] = now
        return True


def _header(headers, name: str, pattern: re.Pattern) -> str:
    value = headers.get(name)
    if value is None:
        raise ValueError("unsigned request")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"malformed {name} header")
    return value


class Verifier:
    """Checks signatures, and nonces against a ``NonceCache`` of its own unless ``check_nonce``
    is False (the tracker's replicas check them in their shared store)."""

    def __init__(self, secret: bytes, max_nonces: int = 200_000):
        self._secret = secret
        self._nonces = NonceCache(max_nonces)

    def verify(self, method: str, path_qs: str, headers, body: bytes, *, check_nonce: bool = True) -> tuple[str, str]:
        """(the signing node's id, the request's nonce), or ValueError saying why the request is
        refused (NonceCacheFull: too many to remember)."""
        node = _header(headers, H_NODE, _NODE)
        stamp = _header(headers, H_TIME, _STAMP)
        nonce = _header(headers, H_NONCE, _NONCE)
        sig = _header(headers, H_SIG, _MAC)
        now = time.time()
        if abs(now - float(stamp)) > MAX_SKEW:
            raise ValueError("timestamp outside the allowed clock skew")
        if not hmac.compare_digest(sig, _mac(self._secret, node, method, path_qs, stamp, nonce, body)):
            raise ValueError("bad signature")
        if check_nonce and not self._nonces.remember(nonce, now):
            raise ValueError("replayed request")
        return node, nonce


def sign_reply(secret: bytes, nonce: str, status: int, body: bytes) -> str:
    """The signature of an answer to the request with ``nonce``."""
    msg = "\n".join(("reply", nonce, str(status), hashlib.sha256(body).hexdigest()))
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


def reply_is_signed(secret: bytes, nonce: str, status: int, body: bytes, headers) -> bool:
    """Whether an answer carries the signature of the request with ``nonce`` (refused otherwise)."""
    sig = headers.get(H_REPLY)
    return (isinstance(sig, str) and _MAC.fullmatch(sig) is not None
            and hmac.compare_digest(sig, sign_reply(secret, nonce, status, body)))


def sign_event(secret: bytes, nonce: str, seq: int, body: bytes) -> str:
    """The signature of the ``seq``-th event (from 0) of a stream answering the request with
    ``nonce``: an event cannot be altered, dropped, reordered or moved to another stream."""
    msg = "\n".join(("event", nonce, str(seq), hashlib.sha256(body).hexdigest()))
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


def event_is_signed(secret: bytes, nonce: str, seq: int, body: bytes, sig: str) -> bool:
    return _MAC.fullmatch(sig) is not None and hmac.compare_digest(sig, sign_event(secret, nonce, seq, body))
