"""A manifest's proof: that the tracker made it.

With a signing key (Ed25519, PEM; ``openssl genpkey -algorithm ed25519``), the tracker signs every
manifest it builds; a node given the public key (``--tracker-public-key``) takes no manifest the
key did not sign, so that not even a member on the path between it and the tracker (who knows the
shared secret, and so can sign answers) can forge one.  Without a key, the tracker proves its
manifests with a MAC under the cluster's secret: whoever can write its disk or Redis (but does
not know the secret) cannot poison a manifest it loads from there.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


__all__ = ["Ed25519PublicKey", "KeyFileError", "ManifestProof", "load_private_key", "load_public_key", "signed_by"]


class KeyFileError(ValueError):
    """A key file that cannot be read or is not an Ed25519 key of the right kind."""


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM private key without a password: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


class ManifestProof:
    """Makes and checks proofs: an Ed25519 signature with ``private``, else a MAC with ``secret``;
    with neither, manifests carry no proof (and none is asked for)."""

    def __init__(self, private: Ed25519PrivateKey | None = None, secret: bytes | None = None):
        self._private = private
        self._public = private.public_key() if private else None
        self._secret = secret

    def make(self, data: bytes) -> bytes:
        if self._private is not None:
            return self._private.sign(data)
        if self._secret is not None:
            return hmac.new(self._secret, b"manifest\n" + data, hashlib.sha256).digest()
        return b""

    def holds(self, data: bytes, proof: bytes) -> bool:
        if self._public is not None:
            return signed_by(self._public, data, proof)
        if self._secret is not None:
            return hmac.compare_digest(proof, hmac.new(self._secret, b"manifest\n" + data, hashlib.sha256).digest())
        return True


def signed_by(public: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        public.verify(signature, data)
        return True
    except InvalidSignature:
        return False
