"""The operator's read-only dashboard (`fedlora coordinator dashboard DIR`), built with Dash.

Four pages over one snapshot (`coordinator.observe`): an overview with the alerts and every run,
the participants, one page per run (accuracy against the majority class, loss, epsilon in both
views against the budget, where the seconds and bytes go, each round's skips and buckets), and
the adapter versions with the audit chains. A `dcc.Interval` re-renders the page from a fresh
snapshot, so it follows a live run without a reload. The app only reads files: its one callback
renders components, and it has no route that writes (docs/decisions.md, "Operator dashboard").
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from coordinator.observe import observe
from coordinator.outputs import GENERATION_LABELS

CALLBACK_PATH = "/_dash-update-component"  # Dash's render callback: the dashboard's one POST
PAGES = (("/", "Overview"), ("/participants", "Participants"), ("/versions", "Versions and audit"))


def when(timestamp: float | None) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if timestamp else "-"


def number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


CELL = {"border": "1px solid #ccc", "padding": "3px 8px", "textAlign": "left", "verticalAlign": "top"}


def table(header: list[str], rows: list[list[Any]], table_id: str) -> html.Table:
    return html.Table(
        [
            html.Thead(html.Tr([html.Th(cell, style=CELL | {"background": "#eee"}) for cell in header])),
            html.Tbody([html.Tr([html.Td(cell, style=CELL) for cell in row]) for row in rows]),
        ],
        id=table_id, style={"borderCollapse": "collapse", "fontSize": "90%"},
    )  # fmt: skip


def alert_list(alerts: list[dict[str, str]]) -> html.Div:
    if not alerts:
        return html.Div("No alerts.", id="alerts", style={"color": "darkgreen"})
    items = [html.Li(a["text"], className=f"alert {a['kind']}") for a in alerts]
    return html.Div([html.H3(f"Alerts ({len(alerts)})"), html.Ul(items)], id="alerts", style={"color": "firebrick"})


def epsilon_text(run: dict[str, Any]) -> str:
    spent = f"{number(run.get('epsilon'))} (against the coordinator {number(run.get('epsilon_coordinator'))})"
    return spent + (f" of budget {run['epsilon_budget']:g}" if run.get("epsilon_budget") else "")


def overview(snapshot: dict[str, Any]) -> list[Any]:
    runs = [
        [
            dcc.Link(name, href=f"/runs/{quote(name)}"), run.get("outcome", "-"),
            f"{run['last_round'] if run['last_round'] is not None else '-'} / {run.get('rounds_planned', '-')}", epsilon_text(run),
            f"{run.get('last_version') or '-'} ({'verifies' if run.get('last_version_verifies') else 'DOES NOT VERIFY'})"
            if run.get("last_version") else "-", run.get("audit", "-"), when(run.get("updated")),
        ]
        for name, run in snapshot["runs"].items()
    ]  # fmt: skip
    people = snapshot["participants"]
    known = [p for p in people if p.get("connected") is not None]
    connected = f"{sum(bool(p['connected']) for p in known)} connected" if known else "connections unknown (no SuperLink state)"
    counts = (
        f"{sum(bool(p.get('registered')) for p in people)} registered, {connected}, "
        f"{sum(bool(p.get('revoked')) for p in people)} revoked, {sum(bool(p.get('withdrawn')) for p in people)} withdrawn, "
        f"{sum(bool(p.get('quarantined')) for p in people)} quarantined"
    )
    return [
        html.H2("Overview"),
        html.P(f"SuperLink {snapshot['address'] or '(simulation)'}; participants: {counts}"),
        alert_list(snapshot["alerts"]),
        html.H3("Runs"),
        table(["run", "outcome", "round / planned", "epsilon", "head version", "audit", "updated"], runs, "runs"),
    ]


def participant_state(view: dict[str, Any]) -> str:
    if view.get("withdrawn"):
        return f"WITHDRAWN {view['withdrawn'].get('at', '')}: {view['withdrawn'].get('reason', '')}"
    if view.get("revoked"):
        return f"REVOKED: {view['revoked']}"
    if view.get("quarantined"):
        return f"QUARANTINED: {view['quarantined']}"
    return "registered" if view.get("registered") else "not registered"


def participants(snapshot: dict[str, Any]) -> list[Any]:
    rows = []
    for view in snapshot["participants"]:
        last = view["skips"][-1] if view["skips"] else None
        connected = {True: "yes", False: "no", None: "unknown"}[view.get("connected")]
        rows.append([
            view["name"], participant_state(view), connected, when(view.get("last_seen")), len(view["refusals"]),
            ", ".join(f"{k} {v}" for k, v in view["by_category"].items()) or "-",
            f"{last['run']} round {last['round']}: {last['reason']}" if last else "-",
            "; ".join(f"{b['run']} round {b['round']}: {b['reason']}" for b in view["blame"]) or "-",
        ])  # fmt: skip
    header = ["participant", "state", "connected", "last seen", "refusals", "skipped by reason", "last skip", "blame"]
    return [html.H2("Participants"), table(header, rows, "participants")]


def figure(title: str, y_title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title="round", yaxis_title=y_title, height=300, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    fig.update_xaxes(dtick=1)
    return fig


def series(rounds: list[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """x (rounds) and y of the rounds that have `key` (non-finite values were left out by the snapshot)."""
    points = [(entry["round"], entry[key]) for entry in rounds if key in entry]
    return {"x": [p[0] for p in points], "y": [p[1] for p in points]}


def run_figures(run: dict[str, Any]) -> list[dcc.Graph]:
    rounds = run["rounds"]
    generated = {label: key for label, key in GENERATION_LABELS.items() if any(key in entry for entry in rounds)}
    accuracy = figure("Held-out generation quality" if generated else "Held-out accuracy", "score" if generated else "accuracy")
    for name, key in generated.items() or [("global adapter", "eval_accuracy")]:  # free-form answers: scores, not accuracy
        accuracy.add_scatter(**series(rounds, key), name=name, mode="lines+markers")
    majority = [entry["majority_accuracy"] for entry in rounds if "majority_accuracy" in entry]
    if majority:
        accuracy.add_hline(majority[-1], line_dash="dash", line_color="firebrick", annotation_text=f"majority class {majority[-1]:.3f}")
    loss = figure("Loss", "loss")
    loss.add_scatter(**series(rounds, "eval_loss"), name="held-out", mode="lines+markers")
    loss.add_scatter(**series(rounds, "train_loss"), name="train (claimed)", mode="lines+markers")
    epsilon = figure("Epsilon spent", "epsilon")
    epsilon.add_scatter(**series(rounds, "epsilon"), name="against consumers", mode="lines+markers")
    epsilon.add_scatter(**series(rounds, "epsilon_coordinator"), name="against the coordinator", mode="lines+markers")
    if run.get("epsilon_budget"):
        epsilon.add_hline(run["epsilon_budget"], line_dash="dash", annotation_text=f"budget {run['epsilon_budget']:g}")
    stages = figure("Seconds per stage", "seconds")
    for stage in sorted({stage for entry in rounds for stage in entry["stage_seconds"]}):
        stages.add_bar(x=[e["round"] for e in rounds], y=[e["stage_seconds"].get(stage, 0.0) for e in rounds], name=stage)
    stages.update_layout(barmode="stack")
    traffic = figure("Bytes", "bytes")
    traffic.add_bar(**series(rounds, "bytes_up"), name="up (updates)")
    traffic.add_bar(**series(rounds, "bytes_down"), name="down (adapter, protocol)")
    names = ("accuracy", "loss", "epsilon", "stages", "bytes")
    return [dcc.Graph(id=f"chart-{n}", figure=f, config={"displaylogo": False}) for n, f in zip(names, (accuracy, loss, epsilon, stages, traffic))]


def bucket_text(buckets: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"[{', '.join(b['members'])}] {b['status']}" + (f" blamed {', '.join(b['blamed'])}" if b["blamed"] else "") for b in buckets
    ) or "-"


def run_page(snapshot: dict[str, Any], name: str) -> list[Any]:
    run = snapshot["runs"].get(name)
    if run is None:
        return [html.H2(f"No run {name!r}"), html.P(f"runs: {', '.join(snapshot['runs']) or 'none yet'}")]
    rows = [
        [
            entry["round"], "applied" if entry.get("applied") else ("baseline" if entry["round"] == 0 else "NOT applied"),
            f"{entry.get('participants', '-')} / {entry.get('sampled', '-')}", number(entry.get("eval_accuracy")), number(entry.get("eval_loss")),
            number(entry.get("epsilon")), number(entry.get("seconds")),
            "; ".join(f"{s['participant']}: {s['reason']}" for s in entry["skipped"]) or "-", bucket_text(entry["buckets"]),
        ]
        for entry in reversed(run["rounds"])
    ]  # fmt: skip
    last = run["last_round"]
    header = ["round", "outcome", "answered / sampled", "accuracy", "loss", "epsilon", "seconds", "skipped (reason)", "buckets"]
    return [
        html.H2(f"Run {name}"),
        html.P(
            f"round {last if last is not None else '-'} of {run.get('rounds_planned', '-')}; {run.get('outcome', '')}; epsilon {epsilon_text(run)}",
            id="run-progress",
        ),
        alert_list([a for a in snapshot["alerts"] if a["subject"] == name]),
        html.Div(run_figures(run), style={"display": "grid", "gridTemplateColumns": "repeat(auto-fill, minmax(520px, 1fr))"}),
        html.H3("Rounds"),
        table(header, rows, "rounds"),
    ]


def versions_page(snapshot: dict[str, Any]) -> list[Any]:
    out: list[Any] = [html.H2("Versions and audit")]
    for name, run in snapshot["runs"].items():
        rows = [
            [v["version"], v["round"], v["parent"] or "-", v["lineage"], "verifies" if v["verifies"] else "; ".join(v["problems"]), "WITHDRAWN" if v["withdrawn"] else "-"]
            for v in reversed(run["versions"])
        ]  # fmt: skip
        withdrawn = ", ".join(run["lineage_withdrawn"]) or "nobody"
        out += [
            html.H3(f"Run {name}"),
            html.P(f"audit chain: {run.get('audit', '-')}; last hash {run.get('audit_last_hash', '-')}; lineage {run.get('lineage', 0)} leaves out {withdrawn}"),
            table(["version", "round", "parent", "lineage", "verification", "withdrawal"], rows, f"versions-{name}"),
        ]
    return out


def render(path: str, snapshot: dict[str, Any]) -> list[Any]:
    """The page for a URL path."""
    if path.startswith("/runs/"):
        return run_page(snapshot, unquote(path.removeprefix("/runs/")))
    return {"/participants": participants, "/versions": versions_page}.get(path, overview)(snapshot)


def build_app(directory: Path, refresh_s: float) -> Dash:
    """The Dash app over `directory`; every `refresh_s` seconds the page re-renders from a new snapshot."""
    observe(directory)  # a directory that cannot be read fails now, not in the browser
    app = Dash(__name__, title="fedlora coordinator", update_title=None, serve_locally=True)
    app.layout = html.Div([
        dcc.Location(id="url"),
        dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
        html.Nav([dcc.Link(label, href=href, className="nav") for href, label in PAGES], style={"display": "flex", "gap": "1.5em"}),
        html.Div(id="snapshot-time"),
        html.Div(id="page"),
    ], style={"fontFamily": "sans-serif", "margin": "1em 2em"})  # fmt: skip

    @app.callback(Output("page", "children"), Output("snapshot-time", "children"), Input("url", "pathname"), Input("tick", "n_intervals"))
    def update(path: str | None, _: int | None) -> tuple[list[Any], str]:
        snapshot = observe(directory)
        runs = [html.Span(" | runs: ")] + [dcc.Link(name, href=f"/runs/{quote(name)}", style={"marginRight": "1em"}) for name in snapshot["runs"]]
        return render(path or "/", snapshot), html.Small([f"{snapshot['directory']}, read {when(snapshot['taken'])} (read-only)", *runs])

    return app


def wsgi_app(directory: Path, refresh_s: float) -> Any:
    """The dashboard with the Prometheus exporter at /metrics, as one WSGI app (served read-only:
    CALLBACK_PATH, where Dash's callbacks only render, is its one POST)."""
    from prometheus_client import make_wsgi_app
    from prometheus_client.registry import CollectorRegistry
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from coordinator.prometheus import CoordinatorCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(directory))
    return DispatcherMiddleware(build_app(directory, refresh_s).server, {"/metrics": make_wsgi_app(registry)})
