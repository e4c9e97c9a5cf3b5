"""Membership: requests signed with the cluster's shared secret (HMAC-SHA256).

Shared by every side that speaks the protocol (tracker, its client, the daemons' peer servers).
A signature covers the method, the path with its query, a timestamp, a nonce and the body's
sha256, so a request cannot be altered, moved to another path, or replayed: the timestamp must be
within ``MAX_SKEW`` seconds and a nonce is accepted once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

MAX_SKEW = 60.0
H_NODE, H_TIME, H_NONCE, H_SIG = "X-Thunderfs-Node", "X-Thunderfs-Time", "X-Thunderfs-Nonce", "X-Thunderfs-Signature"


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


def _mac(secret: bytes, method: str, path_qs: str, stamp: str, nonce: str, body: bytes) -> str:
    msg = "\n".join((method.upper(), path_qs, stamp, nonce, hashlib.sha256(body).hexdigest()))
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, node_id: str, method: str, path_qs: str, body: bytes = b"") -> dict[str, str]:
    stamp, nonce = f"{time.time():.3f}", secrets.token_hex(12)
    return {H_NODE: node_id, H_TIME: stamp, H_NONCE: nonce, H_SIG: _mac(secret, method, path_qs, stamp, nonce, body)}


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


class Verifier:
    """Checks signatures and remembers nonces for twice the allowed skew (bounded)."""

    def __init__(self, secret: bytes, max_nonces: int = 200_000):
        self._secret = secret
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max = max_nonces

    def verify(self, method: str, path_qs: str, headers, body: bytes) -> str:
        """The signing node's id, or ValueError saying why the request is refused."""
        try:
            node, stamp, nonce, sig = (headers[h] for h in (H_NODE, H_TIME, H_NONCE, H_SIG))
        except KeyError:
            raise ValueError("unsigned request") from None
        try:
            when = float(stamp)
        except ValueError:
            raise ValueError("bad timestamp") from None
        now = time.time()
        if abs(now - when) > MAX_SKEW:
            raise ValueError("timestamp outside the allowed clock skew")
        if not hmac.compare_digest(sig, _mac(self._secret, method, path_qs, stamp, nonce, body)):
            raise ValueError("bad signature")
        while self._nonces and next(iter(self._nonces.values())) < now - 2 * MAX_SKEW:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            raise ValueError("replayed request")
        if len(self._nonces) >= self._max:
            self._nonces.popitem(last=False)
        self._nonces[nonce] = now
        return node
