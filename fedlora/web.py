"""Serving the read-only views (operator dashboard, site monitor) over HTTP(S) with cheroot.

On loopback a view needs nothing more: only this machine reaches it. Bound to any other
address it must be served over TLS with a certificate issued by the consortium's CA and every
request must carry the operator's (or site's) token, `Authorization: Bearer <token>` or HTTP
Basic with the token as password (what a browser sends); a view exposed without both refuses
to start. cheroot (CherryPy's WSGI server) serves any WSGI app with TLS and a thread pool,
so we write no HTTP handling of our own (docs/decisions.md, "Operator dashboard").
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
MIN_TOKEN_CHARS = 24


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (or '[::1]:port') -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(path: Path) -> str:
    """The shared secret in a file (whitespace stripped); a short one is refused, as a guessable credential."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{path}: the token must have at least {MIN_TOKEN_CHARS} characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def check_certificate(cert: Path, key: Path, ca: Path | None) -> None:
    """The TLS certificate and key exist and, when a CA is named, the certificate was issued by it."""
    for path in (cert, key):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no TLS file at {path}")
    if ca is None:
        return
    if not Path(ca).is_file():
        raise FileNotFoundError(f"no CA certificate at {ca}")
    certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    try:
        certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(Path(ca).read_bytes()))
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ValueError(f"{cert} was not issued by the consortium CA {ca}: {err}") from err


def check_exposure(host: str, tls: tuple[Path, Path] | None, token_file: Path | None) -> None:
    """Refuse to expose a view beyond loopback without TLS and a credential."""
    if is_loopback(host):
        return
    missing = [what for what, given in (("TLS (--tls-cert and --tls-key)", tls), ("a credential (--token-file)", token_file)) if not given]
    if missing:
        raise ValueError(f"refusing to serve on {host}, beyond this machine, without {' and '.join(missing)}; bind 127.0.0.1 to use it locally")


def token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header carries the token (Bearer, or Basic with it as the password)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode(), token.encode())


def require_token(app: WSGIApp, token: str, realm: str) -> WSGIApp:
    """WSGI middleware: a request without the token gets 401 and never reaches the app."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token_matches(environ.get("HTTP_AUTHORIZATION", ""), token):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", f'Basic realm="{realm}"')])
        return [b"a credential is required\n"]

    return guarded


def read_only(app: WSGIApp, post_paths: tuple[str, ...]) -> WSGIApp:
    """WSGI middleware: GET and HEAD, and POST only to `post_paths` (a view's own read requests); 405 otherwise."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        if method in ("GET", "HEAD") or (method == "POST" and path in post_paths):
            return app(environ, start_response)
        start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
        return [b"this view is read-only\n"]

    return guarded


def serve(app: WSGIApp, listen: str, tls: tuple[Path, Path] | None, token_file: Path | None, ca: Path | None, realm: str) -> str:
    """Serve `app` until SIGTERM or Ctrl-C, after the exposure checks; prints and returns the URL."""
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    host, port = parse_listen(listen)
    check_exposure(host, tls, token_file)
    if token_file:
        app = require_token(app, load_token(token_file), realm)
    if tls:
        check_certificate(*tls, ca)
    server = wsgi.Server((host, port), app, numthreads=8, server_name=realm)
    if tls:
        server.ssl_adapter = BuiltinSSLAdapter(str(tls[0]), str(tls[1]))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does (a container stop)
    server.prepare()  # binds: a port in use fails here, before we say where it listens
    bound = server.bind_addr[1]
    url = f"{'https' if tls else 'http'}://{host if ':' not in host else f'[{host}]'}:{bound}/"
    print(f"{realm} at {url} (read-only{', token required' if token_file else ''}); Ctrl-C stops it", flush=True)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return url
