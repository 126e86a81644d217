"""Who may reach a read-only web view (a site's monitor, the operator's dashboard): this machine only,
unless the view is served over TLS and every request carries a bearer token.

A view shows what a site trained, refused and spent, so it is for the people who run it. On the loopback
interface it needs nothing more; on any other address (a LAN, or 0.0.0.0) it needs both TLS, so that
the token and the page cannot be read or changed on the way, and the token, so that reaching the port
is not enough. Every command that serves a view takes the same options: `--listen HOST:PORT`,
`--tls-cert`, `--tls-key`, `--token-file`, and fedlora/web.py calls `check_exposure` before it binds.
The token travels as `Authorization: Bearer <token>` (Prometheus, curl) or as the password of HTTP
Basic (what a browser asks for; the user name is ignored).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

MIN_TOKEN_CHARS = 16
NEW_TOKEN = "openssl rand -hex 32"


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 address in brackets: '[::1]:9464') as (host, port); ValueError showing the form."""
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {listen!r}: give HOST:PORT, e.g. 127.0.0.1:9464 (an IPv6 address in brackets: [::1]:9464)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: a loopback address, or 'localhost'. Any other name may resolve
    to an address others reach, so it counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tls_cert: str | Path | None, tls_key: str | Path | None, token_file: str | Path | None) -> None:
    """ValueError unless a view may listen on `host` with these options: named files exist, the certificate
    comes with its key, and off the loopback interface TLS and a token are both given."""
    given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--token-file": token_file}
    absent = [f"{option} {path}" for option, path in given.items() if path and not Path(path).is_file()]
    if absent:
        raise ValueError(f"no such file: {', '.join(absent)}")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together: the certificate and its private key")
    missing = [option for option, path in given.items() if not path]
    if missing and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host}, which other machines can reach, without {', '.join(missing)}: off this machine a view "
            "is served only over TLS (--tls-cert, --tls-key) and only to requests carrying the token in --token-file "
            f"(Authorization: Bearer <token>; make one with `{NEW_TOKEN}`). Or listen on 127.0.0.1, the default"
        )


def load_token(path: str | Path) -> str:
    """The bearer token in a file (surrounding whitespace ignored); ValueError when it is too weak to be one."""
    token = Path(path).read_text().strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(
            f"{path}: a token is at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces; make one with `{NEW_TOKEN}`"
        )
    return token


def token_matches(header_value: str | None, token: str) -> bool:
    """Whether an Authorization header carries `token`, as a bearer token or as a Basic password,
    compared in constant time."""
    scheme, _, given = (header_value or "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.encode(), token.encode())


def check_issued_by(certificate: str | Path, ca_certificate: str | Path) -> None:
    """ValueError unless `certificate` was signed by the CA (a view of the consortium is served with its CA)."""
    issued = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    try:
        issued.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(ca_certificate).read_bytes()))
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ValueError(f"{certificate} was not issued by the consortium CA {ca_certificate}: {err or type(err).__name__}") from None
