"""Signed adapter versions: a manifest beside each PEFT directory, signed with the coordinator's
Ed25519 key, so that anyone holding the public key can check where an adapter came from.

`manifest.json` holds the SHA-256 of every file of the adapter directory (PEFT's config and
weights), the facts of the version (round, parent version, config hash, participants, epsilon,
metrics) and an Ed25519 signature over the canonical JSON of all of that. `verify_adapter`
recomputes the hashes and checks the signature; a changed file, an added or removed file, an
edited fact and a signature by another key are each reported. The directory stays a plain
PEFT adapter: stock `PeftModel.from_pretrained` ignores the manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "manifest.json"


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of an adapter directory except the manifest, by relative path."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key (PEM, created once, owner-readable only), and its `.pub` beside it."""
    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)
    path.with_suffix(".pub").write_bytes(public_pem(key.public_key()))
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_adapter(directory: Path, key: Ed25519PrivateKey, facts: dict[str, Any]) -> dict[str, Any]:
    """Write the signed manifest of an adapter directory; returns it."""
    body = {"files": file_hashes(directory), "facts": facts, "public_key": public_pem(key.public_key()).decode()}
    manifest = body | {"signature": key.sign(_canonical(body)).hex()}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=True) + "\n")
    return manifest


def verify_adapter(directory: Path, public_key_pem: bytes) -> list[str]:
    """What is wrong with a signed adapter directory (empty if nothing), against the trusted key."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return [f"{path} does not exist: the adapter is not signed"]
    manifest = json.loads(path.read_text())
    body = {key: manifest.get(key) for key in ("files", "facts", "public_key")}
    problems = []
    trusted = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(trusted, Ed25519PublicKey):
        return ["the trusted key is not an Ed25519 public key"]
    try:
        trusted.verify(bytes.fromhex(manifest.get("signature", "")), _canonical(body))
    except (InvalidSignature, ValueError):
        problems.append("the signature does not verify with the trusted key (signed by another key, or the manifest was edited)")
    actual, listed = file_hashes(directory), manifest.get("files") or {}
    for name in sorted(set(actual) | set(listed)):
        if name not in listed:
            problems.append(f"{name}: not in the manifest (added)")
        elif name not in actual:
            problems.append(f"{name}: listed in the manifest but missing")
        elif actual[name] != listed[name]:
            problems.append(f"{name}: its SHA-256 differs from the manifest's (modified)")
    return problems


def find_public_key(adapter_directory: Path) -> Path:
    """The `coordinator.pub` nearest above an adapter version (a simulated run's, or a coordinator's)."""
    for parent in list(Path(adapter_directory).resolve().parents)[:4]:
        if (parent / "coordinator.pub").is_file():
            return parent / "coordinator.pub"
    raise FileNotFoundError(f"no coordinator.pub above {adapter_directory}; pass --public-key (the coordinator's coordinator.pub)")


def export_adapter(source: Path, target: Path, public_key_pem: bytes) -> Path:
    """Copy a version that verifies as a plain PEFT directory (no manifest) that stock PEFT loads."""
    problems = verify_adapter(source, public_key_pem)
    if problems:
        raise ValueError(f"{source} does not verify, refusing to export it: {'; '.join(problems)}")
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
    return target
