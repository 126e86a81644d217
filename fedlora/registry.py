"""Signed adapter versions: a manifest beside each PEFT directory, signed with the coordinator's
Ed25519 key, so that anyone holding the public key can check where an adapter came from.

`manifest.json` holds the SHA-256 of every file of the adapter directory (PEFT's config and
weights), the facts of the version (round, parent version, config hash, participants, epsilon,
metrics) and an Ed25519 signature over the canonical JSON of all of that. `verify_adapter`
recomputes the hashes and checks the signature; a changed file, an added or removed file, an
edited fact and a signature by another key are each reported. The directory stays a plain
PEFT adapter: stock `PeftModel.from_pretrained` ignores the manifest.

A version whose lineage includes a withdrawn participant's contribution gets a second signed
file beside the manifest, `withdrawal.json` (coordinator/withdrawal.py): `verify_adapter`
reports the version withdrawn, and `export_adapter` refuses it unless forced. A withdrawal
record is signed over the manifest's signature, so it cannot be moved to another version.
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
WITHDRAWAL = "withdrawal.json"
SIGNED_FILES = (MANIFEST, WITHDRAWAL)  # beside the adapter, not part of it


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces (manifests, withdrawal records, requests)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of an adapter directory except the manifest, by relative path."""
    directory = Path(directory)
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in SIGNED_FILES
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
    manifest = sign_document(body, key)
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=True) + "\n")
    return manifest


def trusted_key(public_key_pem: bytes) -> Ed25519PublicKey:
    trusted = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(trusted, Ed25519PublicKey):
        raise ValueError("the trusted key is not an Ed25519 public key")
    return trusted


def sign_document(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`body` with an Ed25519 signature over its canonical JSON (withdrawal records, certificates)."""
    return body | {"signature": key.sign(canonical_json(body)).hex()}


def document_verifies(document: dict[str, Any], trusted: Ed25519PublicKey) -> bool:
    body = {key: value for key, value in document.items() if key != "signature"}
    try:
        trusted.verify(bytes.fromhex(str(document.get("signature", ""))), canonical_json(body))
    except (InvalidSignature, ValueError):
        return False
    return True


def withdraw_version(directory: Path, key: Ed25519PrivateKey, facts: dict[str, Any]) -> dict[str, Any]:
    """Mark a signed version withdrawn: a record signed with the version's own manifest signature inside."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    record = sign_document({"version": Path(directory).name, "manifest_signature": manifest["signature"], **facts}, key)
    (Path(directory) / WITHDRAWAL).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def withdrawal_of(directory: Path, trusted: Ed25519PublicKey) -> tuple[dict[str, Any] | None, list[str]]:
    """A version's withdrawal record if it has a valid one, and what is wrong with the record if not."""
    path = Path(directory) / WITHDRAWAL
    if not path.is_file():
        return None, []
    record = json.loads(path.read_text())
    manifest = json.loads((Path(directory) / MANIFEST).read_text()) if (Path(directory) / MANIFEST).is_file() else {}
    if not document_verifies(record, trusted):
        return None, [f"{WITHDRAWAL}: its signature does not verify with the trusted key"]
    if record.get("manifest_signature") != manifest.get("signature"):
        return None, [f"{WITHDRAWAL}: it withdraws another version (its manifest signature differs)"]
    return record, []


def verify_adapter(directory: Path, public_key_pem: bytes) -> list[str]:
    """What is wrong with a signed adapter directory (empty if nothing), against the trusted key.

    A validly withdrawn version is reported as such: 'WITHDRAWN: ...' is its first problem.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return [f"{path} does not exist: the adapter is not signed"]
    manifest = json.loads(path.read_text())
    problems = []
    try:
        trusted = trusted_key(public_key_pem)
    except ValueError as err:
        return [str(err)]
    if not document_verifies(manifest, trusted):
        problems.append("the signature does not verify with the trusted key (signed by another key, or the manifest was edited)")
    withdrawal, withdrawal_problems = withdrawal_of(directory, trusted)
    problems += withdrawal_problems
    if withdrawal:
        problems.insert(0, f"WITHDRAWN: {withdrawal_summary(withdrawal)}")
    actual, listed = file_hashes(directory), manifest.get("files") or {}
    for name in sorted(set(actual) | set(listed)):
        if name not in listed:
            problems.append(f"{name}: not in the manifest (added)")
        elif name not in actual:
            problems.append(f"{name}: listed in the manifest but missing")
        elif actual[name] != listed[name]:
            problems.append(f"{name}: its SHA-256 differs from the manifest's (modified)")
    return problems


def withdrawal_summary(record: dict[str, Any]) -> str:
    return f"its lineage includes contributions of {', '.join(record['participants'])}, withdrawn {record['withdrawn_at']} ({record['reason']})"


def find_public_key(adapter_directory: Path) -> Path:
    """The `coordinator.pub` nearest above an adapter version (a simulated run's, or a coordinator's)."""
    for parent in list(Path(adapter_directory).resolve().parents)[:4]:
        if (parent / "coordinator.pub").is_file():
            return parent / "coordinator.pub"
    raise FileNotFoundError(f"no coordinator.pub above {adapter_directory}; pass --public-key (the coordinator's coordinator.pub)")


def require_verified(directory: Path, public_key_pem: bytes, force: bool, purpose: str) -> None:
    """Refuse a version that does not verify, listing its problems; a withdrawn one unless `force`."""
    problems = verify_adapter(directory, public_key_pem)
    if force and problems and problems[0].startswith("WITHDRAWN"):
        problems = problems[1:]
    if problems:
        raise ValueError(f"{directory} does not verify, refusing to {purpose}: {'; '.join(problems)}")


def version_directory(version: str, run: Path) -> Path:
    """An adapter version given as a directory, or as a name (round-0003, final) under `run`/adapters."""
    source = Path(version)
    if not source.is_dir():
        source = Path(run) / "adapters" / version
    if not source.is_dir():
        raise FileNotFoundError(f"no adapter version {version!r} (neither a directory nor under {Path(run) / 'adapters'})")
    return source


def export_adapter(source: Path, target: Path, public_key_pem: bytes, force: bool = False) -> Path:
    """Copy a version that verifies as a plain PEFT directory (no manifest) that stock PEFT loads.

    A withdrawn version is refused unless `force` (it still verifies otherwise: the copy is the
    signed one).
    """
    require_verified(source, public_key_pem, force, "export it")
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*SIGNED_FILES))
    return target
