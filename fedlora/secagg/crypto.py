"""Key agreement, key checks and authenticated encryption for SecAgg+.

Bonawitz et al. (CCS 2017, §4) give each client Diffie-Hellman keys to encrypt Shamir shares
to its neighbours through the untrusted relay and to agree pairwise mask seeds. We use X25519 +
HKDF-SHA256 and ChaCha20-Poly1305, with three changes that let blame land on the party at fault:

- every key a participant advertises is checked on receipt (canonical encoding, not of low
  order) and comes with a proof of possession of its private key, answered to a fresh server
  key: a participant cannot copy someone else's key, so a duplicated key convicts everyone who
  proved possession of it;
- each participant has one *receiving* key per neighbour, and each share ciphertext is
  encrypted to it from a fresh ephemeral key: a participant that receives garbage can reveal
  that one receiving key, which opens that one ciphertext and nothing else, so the coordinator
  can check the complaint (`open_bundle`) without learning anything about the complainer;
- every key derivation and every AEAD binds the digest of the instance's public parameters
  (`params_digest`): members given different parameters derive unrelated masks.

Keys travel as raw 32-byte strings, so state and messages stay plain data.
"""

from __future__ import annotations

import hashlib
import json
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
DOMAIN = b"fedlora/secagg/v2"
_FIELD = 2**255 - 19  # X25519 u-coordinates are canonical below this


def generate_keypair() -> tuple[bytes, bytes]:
    """Return a fresh X25519 (private, public) key pair as raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def public_from_private(private: bytes) -> bytes:
    """Raw public key of a raw private key (lets the server check revealed or rebuilt keys)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(public: bytes) -> None:
    """ValueError unless `public` is a canonical X25519 encoding (32 bytes, u < 2^255 - 19).

    X25519 ignores the top bit and reduces u mod p, so one point has several encodings; only the
    canonical one is accepted, so that "distinct keys" means distinct points. Low-order points
    are caught where they are used: `_exchange` refuses an all-zero shared secret.
    """
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise ValueError(f"public key must be {KEY_BYTES} bytes")
    if int.from_bytes(public, "little") >= _FIELD:
        raise ValueError("public key is not a canonical X25519 encoding")


def _exchange(private: bytes, peer_public: bytes) -> bytes:
    """X25519; ValueError for a malformed, non-canonical or low-order peer key (all-zero secret)."""
    check_public_key(peer_public)
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError:
        raise ValueError("public key is of low order (the shared secret would be zero)") from None


def _kdf(secret: bytes, info: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=DOMAIN + b"|" + info)
    return hkdf.derive(secret)


def params_digest(
    round_id: str,
    members: list[int],
    threshold: int,
    vector_length: int,
    clip_norm: float,
    scale: float,
    modulus_bits: int,
    context: str,
    member_names: list[str] | tuple[str, ...] = (),
) -> bytes:
    """SHA-256 of an instance's public parameters, in one canonical encoding.

    Floats are written exactly (`float.hex`), members in order; `context` carries the
    application's own public parameters (server round, example-count reference);
    `member_names` the roster name of each member, so every signature names who is who.
    """
    fields = {
        "round_id": round_id,
        "members": list(members),
        "threshold": threshold,
        "vector_length": vector_length,
        "clip_norm": float(clip_norm).hex(),
        "scale": float(scale).hex(),
        "modulus_bits": modulus_bits,
        "context": context,
        "member_names": list(member_names),
    }
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(DOMAIN + b"|params|" + encoded).digest()


def possession_proof(privates: list[bytes], server_public: bytes, params: bytes, sender: int) -> bytes:
    """Proof that `sender` holds the private keys of what it advertises (in this order).

    HKDF over DH(private, server key) for each key: only the holder of every private key (or
    the server, holding the other side) can compute it, so a copied key cannot be proved.
    """
    shared = b"".join(_exchange(p, server_public) for p in privates)
    return _kdf(shared, b"possession|" + params + struct.pack(">Q", sender))


def check_possession(
    server_private: bytes, publics: list[bytes], proof: bytes, params: bytes, sender: int
) -> None:
    """ValueError unless `proof` is `possession_proof` of the private keys behind `publics`."""
    shared = b"".join(_exchange(server_private, p) for p in publics)
    if _kdf(shared, b"possession|" + params + struct.pack(">Q", sender)) != proof:
        raise ValueError("proof of possession of the advertised keys does not verify")


def pairwise_seed(s_private: bytes, peer_s_public: bytes, params: bytes) -> bytes:
    """Pairwise mask seed s_ij (symmetric in i, j), bound to the instance's parameters."""
    return _kdf(_exchange(s_private, peer_s_public), b"pairwise-mask|" + params)


def _share_aad(params: bytes, sender: int, receiver: int, s_public: bytes, ephemeral: bytes) -> bytes:
    return DOMAIN + b"|share|" + params + struct.pack(">QQ", sender, receiver) + s_public + ephemeral


def seal_bundle(
    receiver_key: bytes, bundle: bytes, params: bytes, sender: int, receiver: int, s_public: bytes
) -> bytes:
    """Encrypt `bundle` to `receiver`'s receiving key from a fresh ephemeral key.

    Returns ephemeral public || nonce || ciphertext || tag. The associated data names the
    instance, the ordered pair and the sender's masking key, so the relay cannot move it.
    """
    e_private, e_public = generate_keypair()
    key = _kdf(_exchange(e_private, receiver_key), b"share-encryption|" + params)
    nonce = os.urandom(NONCE_BYTES)
    aad = _share_aad(params, sender, receiver, s_public, e_public)
    return e_public + nonce + ChaCha20Poly1305(key).encrypt(nonce, bundle, aad)


def open_sealed(
    receiver_private: bytes, blob: bytes, params: bytes, sender: int, receiver: int, s_public: bytes
) -> bytes:
    """Inverse of `seal_bundle`; raises ValueError (or InvalidTag) on any defect or tampering."""
    if len(blob) < KEY_BYTES + NONCE_BYTES + TAG_BYTES:
        raise ValueError(f"ciphertext too short ({len(blob)} bytes)")
    e_public, nonce, body = blob[:KEY_BYTES], blob[KEY_BYTES : KEY_BYTES + NONCE_BYTES], blob[KEY_BYTES + NONCE_BYTES :]
    key = _kdf(_exchange(receiver_private, e_public), b"share-encryption|" + params)
    aad = _share_aad(params, sender, receiver, s_public, e_public)
    return ChaCha20Poly1305(key).decrypt(nonce, body, aad)


def commit_seed(params: bytes, participant: int, seed: bytes) -> bytes:
    """Hash commitment to a self-mask seed, so the server can check its reconstruction."""
    return hashlib.sha256(DOMAIN + b"|commit|" + params + struct.pack(">Q", participant) + seed).digest()


def commit_share(params: bytes, owner: int, holder: int, kind: bytes, share: bytes) -> bytes:
    """Commitment by `owner` to the share of kind b"b" or b"s" it dealt to `holder`.

    A revealed share that does not match it convicts the holder; one that matches but lies off
    the owner's polynomial convicts the owner, who dealt it.
    """
    tag = DOMAIN + b"|share-commit|" + kind + params + struct.pack(">QQ", owner, holder)
    return hashlib.sha256(tag + share).digest()


def rotation_seed(params: bytes) -> bytes:
    """Public seed of a 16-bit instance's random rotation: anyone holding its parameters derives it,
    and every instance (round, bucket) gets its own."""
    return hashlib.sha256(DOMAIN + b"|rotation|" + params).digest()
