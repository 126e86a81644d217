"""A site's signed request to withdraw, made with its registered node key.

`fedlora participant withdraw DIR` writes DIR/withdrawal-request.json: the site's name, the
reason, the time and its OpenSSH node public key, signed with the node key (ECDSA P-384,
SHA-384). From then on the site refuses every instruction and its refusal carries the request
(`refusal_text`), so the coordinator receives it with the next round; the operator can also pass
the file to `fedlora coordinator withdraw --request`. The coordinator honours a request only if
the key's fingerprint is the one registered under that name and the signature verifies; anything
else is refused visibly (logged and in the audit chain), never silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.pki import key_fingerprint
from fedlora.registry import canonical_json

REQUEST = "withdrawal-request.json"
REQUEST_KIND = "fedlora withdrawal request"
MARK = "WITHDRAWAL-REQUEST "  # precedes the request (base64 JSON: Flower quotes error texts) in a refusal


def make_request(name: str, reason: str, node_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    body = {"kind": REQUEST_KIND, "site": name, "reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "public_key": public}
    return body | {"signature": node_key.sign(canonical_json(body), ec.ECDSA(hashes.SHA384())).hex()}


def request_problems(request: dict[str, Any], name: str, registered_fingerprint: str) -> list[str]:
    """Why a request cannot be honoured as `name`'s (empty if it can)."""
    if request.get("kind") != REQUEST_KIND:
        return [f"not a withdrawal request (kind {request.get('kind')!r})"]
    if request.get("site") != name:
        return [f"the request names {request.get('site')!r}, not {name!r}"]
    try:
        key = serialization.load_ssh_public_key(str(request.get("public_key", "")).encode())
    except (ValueError, TypeError) as err:
        return [f"its public key does not parse ({err})"]
    if not isinstance(key, ec.EllipticCurvePublicKey) or key_fingerprint(key) != registered_fingerprint:
        return [f"it is not signed with the key registered for {name!r} ({registered_fingerprint})"]
    body = {k: v for k, v in request.items() if k != "signature"}
    try:
        key.verify(bytes.fromhex(str(request.get("signature", ""))), canonical_json(body), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return ["its signature does not verify with the registered key (forged or edited)"]
    return []


def refusal_text(request: dict[str, Any]) -> str:
    encoded = base64.b64encode(json.dumps(request, sort_keys=True).encode()).decode()
    return f"{request['site']} has withdrawn from the consortium ({request['reason']}); {MARK}{encoded}"


def request_in(reason: str) -> dict[str, Any] | None:
    """The withdrawal request a refusal carries, if any (None when the text holds no parsable one)."""
    found = re.search(re.escape(MARK) + r"([A-Za-z0-9+/=]+)", reason)
    if found is None:
        return None
    try:
        request = json.loads(base64.b64decode(found.group(1), validate=True))
    except (ValueError, binascii.Error):
        return None
    return request if isinstance(request, dict) else None


def read_request(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a withdrawal request ({err})") from None
