"""Serving the read-only views (the operator's dashboard, a site's monitor) with cheroot.

cheroot (CherryPy's WSGI server) serves any WSGI app with a thread pool and TLS, so we write no
HTTP handling of our own (docs/decisions.md, "Operator dashboard"). Two middlewares make every
view the same: a request without the token (when one is set) gets 401 and reaches nothing; a
request that is not GET or HEAD gets 405, but for a view's own read-only POST route (Dash's render
callback). Who may bind where is fedlora/exposure.py's.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter

from fedlora.exposure import check_exposure, check_issued_by, load_token, parse_listen, token_matches

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
READ = ("GET", "HEAD")


def _refuse(start_response: Callable[..., Any], status: str, text: str, headers: list[tuple[str, str]]) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers])
    return [body]


def read_only(app: WSGIApp, post_paths: tuple[str, ...] = ()) -> WSGIApp:
    """GET and HEAD, and POST only to `post_paths`; 405 otherwise."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in READ or (method == "POST" and environ.get("PATH_INFO", "/") in post_paths):
            return app(environ, start_response)
        return _refuse(start_response, "405 Method Not Allowed", "read-only: GET or HEAD\n", [("Allow", ", ".join(READ))])

    return guarded


def require_token(app: WSGIApp, token: str, realm: str) -> WSGIApp:
    """401 for a request without the token, whatever it asks (who may not read learns nothing)."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if token_matches(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        return _refuse(
            start_response, "401 Unauthorized", "a token is required (Authorization: Bearer <token>, or as the Basic password)\n",
            [("WWW-Authenticate", f'Basic realm="{realm}"')],
        )  # fmt: skip

    return guarded


def bind(
    app: WSGIApp, listen: str, tls_cert: str | Path | None = None, tls_key: str | Path | None = None, token_file: str | Path | None = None,
    *, realm: str, ca: str | Path | None = None, post_paths: tuple[str, ...] = (),
) -> wsgi.Server:  # fmt: skip
    """A bound server for a read-only view, not yet serving; ValueError (exposure, token, certificate) or
    RuntimeError (the address) before anything listens. With `ca`, the certificate must be issued by it."""
    host, port = parse_listen(listen)
    check_exposure(host, tls_cert, tls_key, token_file)
    if tls_cert and ca:
        check_issued_by(tls_cert, ca)
    app = read_only(app, post_paths)
    if token_file:
        app = require_token(app, load_token(token_file), realm)
    server = wsgi.Server((host, port), app, numthreads=8, server_name=realm)
    if tls_cert:
        server.ssl_adapter = BuiltinSSLAdapter(str(tls_cert), str(tls_key))
    try:
        server.prepare()
    except OSError as err:
        raise RuntimeError(f"cannot listen on {listen}: {err}") from None
    return server


def url(server: wsgi.Server) -> str:
    host, port = server.bind_addr[:2]
    return f"{'https' if server.ssl_adapter else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"


def serve_forever(server: wsgi.Server) -> None:
    """Serve until Ctrl-C or SIGTERM (a container stop), then close."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
