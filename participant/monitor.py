"""`fedlora participant monitor DIR`: the site's metrics for Prometheus (/metrics) and a status page for
people (/), both read-only and both read afresh from the site's files at each request.

The page is plain HTML made on the server from the same report as `participant status`
(participant/status.py), every text escaped, refreshing itself; the metrics are participant/metrics.py's.
It is a WSGI app served as every read-only view is (fedlora/web.py: cheroot, over TLS when given a
certificate, GET and HEAD only). It listens on 127.0.0.1 unless told otherwise, and elsewhere only
with TLS and a token (fedlora/exposure.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any

from cheroot.wsgi import Server
from prometheus_client import CollectorRegistry, make_wsgi_app

from fedlora.web import StartResponse, WSGIApp, bind, serve_forever, url
from participant.approvals import CONFIG, Approval
from participant.metrics import SiteCollector
from participant.status import rounds_text, site_report

REFRESH_S = 30
PAGE_HEADERS = [  # a page of the site's own text: never cached, never framed, nothing loaded from elsewhere
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
]
STYLE = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .5em;text-align:left;vertical-align:top}td{word-break:break-word}.alert{color:#a00;font-weight:bold}"



def monitor_app(site: Path) -> WSGIApp:
    """The monitor's WSGI app: the page at / and the metrics at /metrics."""
    registry = CollectorRegistry()
    registry.register(SiteCollector(site))
    routes: dict[str, WSGIApp] = {"/": lambda environ, start_response: _page(site, start_response), "/metrics": make_wsgi_app(registry)}

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = routes.get(environ.get("PATH_INFO") or "/")
        if route is None:
            return _respond(start_response, "404 Not Found", "not found: the status page is /, the metrics /metrics\n")
        return _as_get(route, environ, start_response)

    return app


def _as_get(route: WSGIApp, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
    """Answer GET or HEAD as `route` answers GET (prometheus_client's app knows no HEAD): HEAD gets the
    same status and headers, its length included, and no body."""
    answered: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(route({**environ, "REQUEST_METHOD": "GET"}, lambda status, headers, *_: answered.append((status, headers))))
    status, headers = answered[0]
    if not any(name.lower() == "content-length" for name, _ in headers):
        headers = [*headers, ("Content-Length", str(len(body)))]
    start_response(status, headers)
    return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]


def _respond(start_response: StartResponse, status: str, text: str, headers: list[tuple[str, str]] | None = None,
             content_type: str = "text/plain; charset=utf-8") -> list[bytes]:  # fmt: skip
    body = text.encode()
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def _page(site: Path, start_response: StartResponse) -> list[bytes]:
    try:
        report = site_report(site)
    except (OSError, ValueError) as err:  # a file edited by hand: say which, as `participant status` would
        return _respond(start_response, "500 Internal Server Error", f"the site's files do not read: {err}\n", PAGE_HEADERS)
    return _respond(start_response, "200 OK", render_page(report), PAGE_HEADERS, "text/html; charset=utf-8")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of escaped text ('' when there are no rows)."""
    if not rows:
        return ""
    cells = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + f"</tr>{cells}</table>"


def _line(text: str, alert: bool = False) -> str:
    return f"<p{' class=alert' if alert else ''}>{escape(text)}</p>"


def render_page(report: dict[str, Any]) -> str:
    """The status page of a `site_report`: every text escaped, refreshed every REFRESH_S seconds."""
    title = escape(f"fedlora participant {report['site']}: {report['directory']}")
    withdrawn = report["withdrawn"]
    sections = [
        _line(f"WITHDRAWN {withdrawn['time']}: {withdrawn['reason']}", alert=True) if withdrawn else "",
        _ledger(report), _runs(report["runs"]), _refusals(report["refusals"]), _blame(report["coordinator_blamed"]), _approvals(report),
    ]
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>{''.join(sections)}"
        f'<p>Read-only; refreshed every {REFRESH_S} s. Metrics for Prometheus: <a href="metrics">/metrics</a>.</p></body></html>'
    )


def _ledger(report: dict[str, Any]) -> str:
    limits = [f"{report[key]:g}" if report[key] else "none" for key in ("max_epsilon", "max_epsilon_coordinator")]
    return "<h2>Privacy ledger</h2>" + _line(f"{report['contributions']} contributions charged (ledger.json), epsilon at delta {report['delta']:g}") + _table(
        ["against", "epsilon", "policy limit"],
        [["adapter consumers", f"{report['epsilon']:.4g}", limits[0]], ["the coordinator", f"{report['epsilon_coordinator']:.4g}", limits[1]]],
    )


def _runs(runs: list[dict[str, Any]]) -> str:
    headers = ["configuration sha256", "Flower runs", "rounds trained", "rounds sent", "updates", "bytes sent", "last sent",
               "adapters made from those rounds (sha256)"]  # fmt: skip
    rows = [[
        run["config_sha256"], ", ".join(map(str, run["flower_runs"])), rounds_text(run["rounds_trained"]), rounds_text(run["rounds_contributed"]),
        run["contributions"], f"{run['bytes_sent']:,}", run["last_contribution"] or "",
        "; ".join(f"round {v['round']}: {v['adapter_sha256'] or 'not received yet'}" for v in run["versions"]),
    ] for run in runs]  # fmt: skip
    return "<h2>Runs</h2>" + _line(f"runs this site took part in (events.jsonl): {len(runs)}") + _table(headers, rows)


def _refusals(refusals: dict[str, Any]) -> str:
    latest = [[e["time"], e.get("round", ""), ", ".join(e.get("rules", [])), e["reason"]] for e in reversed(refusals["last"])]
    return "<h2>Refusals</h2>" + _line(f"{refusals['total']} instructions refused") + _table(
        ["rule", "refusals naming it"], [[rule, count] for rule, count in refusals["by_rule"].items()]
    ) + _table(["time", "round", "rules", "reason (latest first)"], latest)


def _blame(blamed: dict[str, Any]) -> str:
    advice = " (the evidence is in events.jsonl: raise it with the consortium)" if blamed["total"] else ""
    return "<h2>Coordinator blamed</h2>" + _line(
        f"{blamed['total']} secure-aggregation instances aborted with evidence against the coordinator{advice}", alert=bool(blamed["total"])
    ) + _table(["time", "reason (latest first)"], [[e["time"], e["reason"]] for e in reversed(blamed["last"])])


def _approvals(report: dict[str, Any]) -> str:
    pinned = [[str(Approval(CONFIG, sha)), "pinned in participant.toml", ""] for sha in report["pinned"]]
    made = [[str(Approval(r["kind"], r["value"])), r["approved"], r.get("revoked") or ""] for r in report["approvals"]]
    return "<h2>Approvals</h2>" + _line(f"policy.require_approval = {str(report['require_approval']).lower()}") + _table(
        ["run", "approved", "withdrawn"], pinned + made
    )


def make_monitor_server(site: Path, listen: str, tls_cert: str | None = None, tls_key: str | None = None,
                        token_file: str | None = None) -> Server:  # fmt: skip
    """A bound, not yet serving, monitor server; ValueError (exposure, token, site files) or RuntimeError
    (the address) before anything listens."""
    site_report(site)  # a directory whose files do not read fails now, not at the first scrape
    return bind(monitor_app(Path(site)), listen, tls_cert, tls_key, token_file, realm="fedlora participant")


def serve(site: Path, listen: str, tls_cert: str | None = None, tls_key: str | None = None, token_file: str | None = None) -> int:
    """Run the monitor in the foreground until interrupted."""
    server = make_monitor_server(site, listen, tls_cert, tls_key, token_file)
    where = url(server)
    print(f"monitor of {Path(site).resolve()}: status page {where}/, metrics {where}/metrics (read-only"
          + (", token required)" if token_file else ")"), flush=True)  # fmt: skip
    serve_forever(server)
    return 0
