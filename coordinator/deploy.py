"""The operator's coordinator directory and the commands over it (`fedlora coordinator ...`).

    DIR/coordinator.toml      where the SuperLink listens and what participants dial
    DIR/run.toml              the run configuration (fedlora Config; states label names and base hash)
    DIR/pki/                  private CA, the SuperLink's TLS certificate and key (fedlora/pki.py)
    DIR/coordinator.key/.pub  Ed25519 key that signs every adapter version
    DIR/participants.json     registered participants (coordinator/participants.py)
    DIR/state/superlink.db    the SuperLink's SQLite state (registered node keys, runs)
    DIR/flwr/                 FLWR_HOME: the connection `flwr` uses, installed app bundles
    DIR/app/pyproject.toml    the Flower app bundle: our ServerApp/ClientApp from the installed package
    DIR/runs/<name>/          a run: metrics.jsonl, audit.jsonl, adapters/, checkpoint.npz

The ServerApp is the one `fedlora simulate` runs; only the engine differs.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from coordinator.checkpoint import CHECKPOINT, load_checkpoint
from coordinator.outcome import Outcome, read_outcome
from coordinator.outputs import Lineage, read_metrics
from coordinator.participants import BOOK, ParticipantBook
from coordinator.runlock import wait_for_round_loop
from coordinator.withdrawal import WITHDRAWALS, requested_by, withdraw_from_run
from fedlora.audit import read_records
from fedlora.audit import verify as verify_audit
from fedlora.config import Config, ConfigError, config_sha256, load_config
from fedlora.pki import create_ca, issue_server_certificate, public_key_fingerprint
from fedlora.secagg.identity import roster_toml
from fedlora.registry import WITHDRAWAL, load_or_create_key, verify_adapter
from fedlora.service import executable, flower_environment, run_command, run_service
from fedlora.withdrawal_request import read_request, request_problems

CONNECTION = "fedlora"  # the name of the SuperLink connection in DIR/flwr/config.toml
SETTINGS = "coordinator.toml"
RUN_CONFIG_KEYS = {"config-file": "", "out": "", "coordinator-dir": "", "resume": False}


@dataclass(frozen=True)
class Settings:
    address: str  # host:port participants dial; the certificate names the host
    listen: str  # interface the SuperLink binds

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def settings_toml(settings: Settings) -> str:
    return tomli_w.dumps({"superlink": {"address": settings.address, "listen": settings.listen}})


def read_settings(directory: Path) -> Settings:
    path = Path(directory) / SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a coordinator directory (no {SETTINGS}); run `fedlora coordinator init {directory}`")
    raw = tomllib.loads(path.read_text())["superlink"]
    return Settings(str(raw["address"]), str(raw["listen"]))


def app_pyproject() -> str:
    """A Flower app bundle naming our components; the code comes from the installed fedlora package."""
    return tomli_w.dumps({
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedlora-run",
            "version": "0.1.0",
            "description": "fedlora's coordinator ServerApp and participant ClientApp, run from the installed fedlora package",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {
            "publisher": "fedlora",
            "components": {"serverapp": "coordinator.app:app", "clientapp": "participant.app:app"},
            "config": RUN_CONFIG_KEYS,
        }}},
    })


def flower_connection(settings: Settings, ca_certificate: Path) -> str:
    return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: {"address": settings.address, "root-certificates": str(ca_certificate)}}})


def init(directory: Path, address: str, listen: str, run_config: Path | None, extra_hosts: list[str]) -> Path:
    """Create a coordinator directory: CA, TLS certificate, signing key, connection, app bundle, run config."""
    directory = Path(directory).resolve()
    if (directory / SETTINGS).exists():
        raise FileExistsError(f"{directory} is already a coordinator directory")
    if address.count(":") != 1 or not address.rsplit(":", 1)[1].isdigit():
        raise ValueError(f"--address must be host:port, got {address!r}")
    cfg = load_config(run_config) if run_config else Config()
    settings = Settings(address, listen or address.rsplit(":", 1)[0])
    directory.mkdir(parents=True, exist_ok=True)
    pki = directory / "pki"
    create_ca(pki)
    issue_server_certificate(pki, list(dict.fromkeys([settings.host, "localhost", "127.0.0.1", *extra_hosts])))
    load_or_create_key(directory / "coordinator.key")
    (directory / SETTINGS).write_text(settings_toml(settings))
    (directory / "run.toml").write_text(cfg.to_toml())
    (directory / "flwr").mkdir(exist_ok=True)
    (directory / "flwr" / "config.toml").write_text(flower_connection(settings, pki / "ca.crt"))
    (directory / "app").mkdir(exist_ok=True)
    (directory / "app" / "pyproject.toml").write_text(app_pyproject())
    (directory / "state").mkdir(exist_ok=True)
    ParticipantBook(directory / BOOK).save()
    return directory


def start(directory: Path) -> int:
    """Run the SuperLink (TLS, SuperNode authentication, SQLite state) in the foreground."""
    directory = Path(directory).resolve()
    settings = read_settings(directory)
    pki = directory / "pki"
    (directory / "state").mkdir(exist_ok=True)  # a fresh volume under a container holds none yet
    argv = [
        executable("flower-superlink"),
        "--ssl-ca-certfile", str(pki / "ca.crt"),
        "--ssl-certfile", str(pki / "server.crt"),
        "--ssl-keyfile", str(pki / "server.key"),
        "--enable-supernode-auth",
        "--database", str(directory / "state" / "superlink.db"),
        "--host", settings.listen,
        "--port", str(settings.port),
        "--disable-runtime-dependency-installation",  # nothing is installed at run time
    ]  # fmt: skip
    print(f"coordinator {directory.name}: SuperLink on {settings.listen}:{settings.port} for participants dialling {settings.address}", flush=True)
    return run_service(argv, flower_environment(directory / "flwr"))


def flwr(directory: Path, *arguments: str) -> dict[str, Any]:
    """One `flwr ... --format json` call against this coordinator's SuperLink; its JSON answer."""
    result = run_command([executable("flwr"), *arguments, CONNECTION, "--format", "json"], flower_environment(Path(directory) / "flwr"))
    text = result.stdout
    try:
        answer = json.loads(text[text.index("{") :])
    except ValueError:
        answer = {"success": False, "error-message": (result.stderr or text).strip()[-500:]}
    if result.returncode != 0 or not answer.get("success", False):
        raise RuntimeError(f"flwr {' '.join(arguments)} failed: {answer.get('error-message') or answer}")
    return answer


def register(directory: Path, public_key: Path, name: str) -> int:
    """Register a participant's public key with the SuperLink under `name`; its node id."""
    directory = Path(directory).resolve()
    book = ParticipantBook(directory / BOOK)
    fingerprint = public_key_fingerprint(Path(public_key))  # refuses anything but an EC key on a NIST curve
    book.check_new(name, fingerprint)
    answer = flwr(directory, "supernode", "register", str(Path(public_key).resolve()), "--name", name)
    node_id = int(answer["node-id"])
    book.add(name, node_id, fingerprint)
    return node_id


def write_roster(directory: Path, out: Path) -> Path:
    """Write the consortium roster (registered, unrevoked participants by name -> key fingerprint)
    for the operator to hand every site out of band, like ca.crt; sites pin it as DIR/roster.toml."""
    roster = ParticipantBook(Path(directory).resolve() / BOOK).roster()
    if not roster.members:
        raise ValueError(f"no participant is registered in {directory}: register them (`fedlora coordinator register`) first")
    out = Path(out)
    out.write_text(roster_toml(roster))
    return out


def revoke(directory: Path, name: str, reason: str) -> str:
    """Refuse `name` from the next round on, and remove its key from the SuperLink; what was done."""
    directory = Path(directory).resolve()
    entry = ParticipantBook(directory / BOOK).revoke(name, reason)
    try:
        flwr(directory, "supernode", "unregister", str(entry.node_id))
    except RuntimeError as err:  # the book's revocation holds whatever the SuperLink says
        return f"{name} revoked in {BOOK}; the SuperLink did not unregister node {entry.node_id}: {err}"
    return f"{name} revoked: node {entry.node_id} unregistered from the SuperLink and refused by the coordinator"


def withdraw(directory: Path, name: str, reason: str, request_file: Path | None) -> list[str]:
    """Withdraw `name` from the consortium: revoked at once, then each run it took part in (what was done).

    A run whose round loop is going leaves it out from now on (the round in progress included)
    and applies the rest when its loop ends (`Coordinator.withdraw_pending`); any other run is
    withdrawn from here, and its certificate copied to DIR/withdrawals/.
    """
    directory = Path(directory).resolve()
    book = ParticipantBook(directory / BOOK)
    entry = book.find(name)
    request = read_request(request_file) if request_file else None
    if request is not None:
        problems = request_problems(request, name, entry.fingerprint)
        if problems:
            raise ValueError(f"refusing the withdrawal request {request_file}: {'; '.join(problems)}")
        reason = reason or str(request.get("reason", ""))
    if not reason.strip():
        raise ValueError("say why (--reason): the certificate, the audit log and every withdrawn version keep it")
    if entry.withdrawal:
        raise ValueError(f"{name} is already withdrawn ({entry.withdrawal['reason']}, {entry.withdrawal['at']})")
    done = [revoke(directory, name, f"withdrawn: {reason}")]
    book = ParticipantBook(directory / BOOK)
    book.withdraw(name, reason, requested_by(request))
    key = load_or_create_key(directory / "coordinator.key")
    for out in sorted((directory / "runs").glob("*")) if (directory / "runs").is_dir() else []:
        if not (out / CHECKPOINT).is_file():  # never got past its start: nothing was published
            continue
        if run_is_live(out):
            done.append(f"run {out.name} is running: {name} is left out from now on, this round included; its versions are withdrawn when the run's rounds end")
            continue
        try:
            certificate = withdraw_from_run(out, name, reason, key, requested_by(request))
        except KeyError:  # it never took part in this run
            continue
        kept = directory / WITHDRAWALS / f"{name}-{out.name}.json"
        kept.parent.mkdir(exist_ok=True)
        shutil.copyfile(out / WITHDRAWALS / f"{name}.json", kept)
        versions = certificate["withdrawn_versions"]
        done.append(
            f"run {out.name}: {len(versions)} versions withdrawn ({', '.join(versions) or 'none'}); head rolled back to "
            f"{certificate['rolled_back_to']}; certificate {kept}"
            + (f"; re-train rounds {certificate['replay_from_round']}+ without it: `fedlora coordinator run {directory} {out.name} --resume`" if versions else "")
        )
    return done


def run_is_live(out: Path) -> bool:
    """Whether a run's round loop is going: its coordinator process is alive and has not ended the run."""
    pid_file = out / "coordinator.pid"
    if not pid_file.is_file() or not psutil.pid_exists(int(pid_file.read_text().strip() or 0)):
        return False
    records = read_records(out / "audit.jsonl") if (out / "audit.jsonl").is_file() else []
    return not records or records[-1].get("event") not in {"ended", "withdrawal"}


def run_directory(directory: Path, name: str) -> Path:
    return Path(directory).resolve() / "runs" / name


def run_config_for(directory: Path, out: Path, resume: bool, config: Path | None) -> Path:
    """The configuration file a run uses: a resumed run its own resolved config.toml, else the operator's."""
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"no checkpoint in {out}: nothing to resume (run without --resume)")
        return out / "config.toml"
    if (out / CHECKPOINT).is_file():
        raise FileExistsError(f"{out} already holds a run; resume it with --resume or choose another --name")
    path = Path(config).resolve() if config else Path(directory).resolve() / "run.toml"
    cfg = load_config(path)
    if not cfg.data.label_names:
        raise ConfigError(f"{path}: data.label_names must be stated in a deployed run (the coordinator holds no data)")
    if not cfg.model.sha256:
        raise ConfigError(f"{path}: model.sha256 must state the base model (`fedlora model hash {cfg.model.name}`); participants check it")
    return path


def run_config_sha256(path: Path) -> str:
    """The hash sites approve a run by: of the resolved configuration the ServerApp sends (`config_from_flat`
    of this file), which is what `fedlora.config.config_sha256` gives a participant for its instructions."""
    return config_sha256(load_config(path).to_toml())


def run(directory: Path, name: str, resume: bool, config: Path | None) -> int:
    """Submit the run to the SuperLink (`flwr run --stream`) and wait for it; 0 when it finished."""
    directory = Path(directory).resolve()
    read_settings(directory)
    out = run_directory(directory, name)
    config_file = run_config_for(directory, out, resume, config)
    overrides = tomli_w.dumps({"config-file": str(config_file), "out": str(out), "coordinator-dir": str(directory), "resume": resume})
    overrides_file = directory / "state" / f"run-{name}.toml"
    overrides_file.write_text(overrides)
    sha = run_config_sha256(config_file)
    print(f"run {name}: configuration sha256 {sha}; sites take part once they approve it (`fedlora participant approve DIR {sha}`)", flush=True)
    argv = [executable("flwr"), "run", str(directory / "app"), CONNECTION, "--run-config", str(overrides_file), "--stream"]
    run_service(argv, flower_environment(directory / "flwr"))
    return 0 if finished(out) else 1


def start_or_resume(directory: Path, name: str, config: Path | None) -> int:
    """`run`, resumed when the run has a checkpoint: the one command a supervisor (a Kubernetes Job) repeats.

    A round loop that an earlier attempt started and that is still going is waited for, not
    doubled (coordinator/runlock.py); a run that has finished is left as it is (a `--resume`
    would train one more round).
    """
    out = run_directory(directory, name)
    if wait_for_round_loop(out):
        print(f"run {name}: waited for the round loop an earlier attempt started", flush=True)
    if finished(out):
        print(f"run {name}: finished already; nothing to do", flush=True)
        return 0
    return run(directory, name, (out / CHECKPOINT).is_file(), config)


def run_outcome(out: Path) -> Outcome:
    """Rounds planned, run and applied, and why the run stopped early, from its metrics."""
    rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
    return read_outcome(rows, load_config(out / "config.toml").federation.rounds)


def finished(out: Path) -> bool:
    """Whether a run completed (every round, or until its privacy budget), applied a round and published `final`."""
    if not (out / CHECKPOINT).is_file() or not (out / "adapters" / "final").is_dir():
        return False
    return run_outcome(out).succeeded


def status(directory: Path) -> dict[str, Any]:
    """Participants, and per run: rounds done, epsilon spent, last adapter version, rejections, checks."""
    directory = Path(directory).resolve()
    settings = read_settings(directory)
    report: dict[str, Any] = {"address": settings.address, "run_toml_config_sha256": next_run_sha256(directory), "participants": [], "runs": {}}
    for entry in ParticipantBook(directory / BOOK).entries:
        report["participants"].append({
            "name": entry.name, "node_id": entry.node_id, "fingerprint": entry.fingerprint, "revoked": entry.revoked,
            "withdrawn": {key: entry.withdrawal[key] for key in ("reason", "at")} if entry.withdrawal else {},
        })
    public_key = (directory / "coordinator.pub").read_bytes()
    for out in sorted((directory / "runs").glob("*")) if (directory / "runs").is_dir() else []:
        report["runs"][out.name] = run_status(out, public_key)
    return report


def run_status(out: Path, public_key: bytes, verify: Callable[[Path, bytes], list[str]] = verify_adapter) -> dict[str, Any]:
    """One run's rounds done, epsilon spent, last adapter version, rejections and checks (`coordinator status`);
    `verify` checks the head version (the dashboard passes one that remembers its results)."""
    rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
    rounds = [row for row in rows if row.get("round", 0) > 0 and "stopped" not in row]
    versions = sorted((out / "adapters").glob("round-*")) if (out / "adapters").is_dir() else []
    audit_problems, audit_last = verify_audit(out / "audit.jsonl") if (out / "audit.jsonl").is_file() else (["no audit log"], "")
    outcome = run_outcome(out) if (out / "config.toml").is_file() else None
    done = load_checkpoint(out / CHECKPOINT)["round"] if (out / CHECKPOINT).is_file() else 0
    lineage = Lineage.load(out)
    head = out / "adapters" / lineage.version(done) if (out / CHECKPOINT).is_file() else None
    return {
        "rounds_done": done,
        "rounds_planned": outcome.rounds_planned if outcome else None,
        "rounds_run": outcome.rounds_run if outcome else 0,
        "rounds_applied": outcome.rounds_applied if outcome else 0,
        "outcome": outcome.summary() if outcome else "no configuration",
        "config_sha256": run_config_sha256(out / "config.toml") if outcome else None,
        "finished": finished(out),
        "final": (out / "adapters" / "final").is_dir(),
        "epsilon": next((row["epsilon"] for row in reversed(rows) if row.get("epsilon") is not None), None),
        "epsilon_coordinator": next((row["epsilon_coordinator"] for row in reversed(rows) if row.get("epsilon_coordinator") is not None), None),
        "last_version": head.name if head else None,  # the head of the current lineage
        "last_version_verifies": not verify(head, public_key) if head else None,
        "rejections": sum(len(row.get("skipped", [])) for row in rounds),
        "last_rejections": rounds[-1].get("skipped", []) if rounds else [],
        "stopped": next((row["stopped"] for row in rows if "stopped" in row), None),
        "audit": "intact" if not audit_problems else "; ".join(audit_problems),
        "lineage": lineage.number,
        "withdrawn": lineage.withdrawn,
        "withdrawn_versions": sorted(v.name for v in versions if (v / WITHDRAWAL).is_file()),
        "audit_last_hash": audit_last,
    }


def next_run_sha256(directory: Path) -> str | None:
    """The configuration hash of DIR/run.toml, for the operator to send the sites before the run (None if it
    does not load: `fedlora config --config DIR/run.toml` says why)."""
    try:
        return run_config_sha256(Path(directory) / "run.toml")
    except ConfigError:
        return None
