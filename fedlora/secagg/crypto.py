"""Key agreement and authenticated encryption for share bundles.

Bonawitz et al. (CCS 2017, §4) give each client two Diffie-Hellman key pairs:
c (to encrypt Shamir shares to a neighbour through the untrusted relay) and s
(to agree pairwise mask seeds). We use X25519 + HKDF-SHA256 and
ChaCha20-Poly1305. The associated data binds round, sender and receiver, so the
relaying server cannot replay a ciphertext to another pair or another round.
Keys travel as raw 32-byte strings, so state and messages stay plain data.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DOMAIN = b"fedlora/secagg/v1"


def generate_keypair() -> tuple[bytes, bytes]:
    """Return a fresh X25519 (private, public) key pair as raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_from_private(private: bytes) -> bytes:
    """Raw public key of a raw private key (lets the server check reconstructed keys)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """X25519 shared secret -> 32 uniform bytes via HKDF-SHA256 bound to `info`.

    Raises ValueError for malformed or low-order peer keys (all-zero secret).
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=DOMAIN + b"|" + info)
    return hkdf.derive(shared)


def associated_data(round_id: str, sender: int, receiver: int) -> bytes:
    """AEAD associated data naming the round and the ordered (sender, receiver) pair."""
    return DOMAIN + b"|share|" + round_id.encode() + b"|" + struct.pack(">QQ", sender, receiver)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `encrypt`; raises cryptography.exceptions.InvalidTag on any tampering."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"ciphertext too short ({len(blob)} bytes)")
    return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)


def share_key(c_private: bytes, peer_c_public: bytes, round_id: str) -> bytes:
    """Symmetric key for share bundles between two participants in this round."""
    return agree(c_private, peer_c_public, b"share-encryption|" + round_id.encode())


def pairwise_seed(s_private: bytes, peer_s_public: bytes, round_id: str) -> bytes:
    """Pairwise mask seed s_ij (symmetric in i, j); fresh per round via HKDF info."""
    return agree(s_private, peer_s_public, b"pairwise-mask|" + round_id.encode())


def keys_digest(c_public: bytes, s_public: bytes) -> bytes:
    """Fingerprint of a participant's advertised key pair, embedded in its share bundles."""
    return hashlib.sha256(DOMAIN + b"|keys|" + c_public + s_public).digest()


def commit_seed(round_id: str, participant: int, seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed, so the server can check its reconstruction."""
    tag = DOMAIN + b"|commit|" + round_id.encode() + struct.pack(">Q", participant)
    return hashlib.sha256(tag + seed).digest()
