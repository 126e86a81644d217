"""The hospital's participant directory and its daemon (`fedlora participant init|start`).

    DIR/participant.toml   this site's own configuration and policy (participant/local_config.py)
    DIR/node.key, node.pub EC P-384 key pair; node.pub goes to the operator to register
    DIR/roster.toml        the consortium's members and key fingerprints, from the operator out of band:
                           whom this site's secure aggregation accepts as neighbours (participant/site.py)
    DIR/signing.key        Ed25519 key, certified by node.key, that signs this site's secure-aggregation messages
    DIR/known-cards.json   other members' signing keys whose certificates this site checked (participant/site.py)
    DIR/events.jsonl       every refused instruction with the rules it broke, and each round trained, update sent and
                           global adapter evaluated (participant/site.py; `participant status` and `monitor` read it)
    DIR/accountant.json    sample-level privacy spent by DP-SGD on this site's records
    DIR/ledger.json        user-level privacy spent by every contribution, across runs (participant/ledger.py)
    DIR/flwr/              FLWR_HOME of the SuperNode (installed app bundles)

`start` checks the base model's files against the recorded fingerprint, then runs a Flower
SuperNode with our ClientApp: TLS to the coordinator trusting only the operator's CA,
authenticated with node.key, and this directory passed as node config.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.data import answer_choices, load_examples
from fedlora.config import ConfigError, DataSection
from fedlora.model import model_fingerprint
from fedlora.atomic import write_bytes_atomic
from fedlora.pki import create_node_key
from fedlora.secagg.identity import parse_roster
from fedlora.service import executable, flower_environment, run_service
from participant.local_config import (
    LOCAL_CONFIG,
    LocalConfig,
    LocalDataSection,
    LocalModelSection,
    PolicySection,
    SiteSection,
    SupernodeSection,
    load_local_config,
)
from participant.site import ROSTER, SITE_KEY

# Flower reports a refused node key and a failed TLS handshake alike ("Exit Code: 305", exit
# status 1); the TLS failure also names the certificate check, so that line decides which it was.
REFUSED = {
    "CERTIFICATE_VERIFY_FAILED": "TLS failed: the coordinator's certificate does not verify with supernode.root_certificates (the operator's ca.crt?)",
    "Exit Code: 305": "the coordinator refused this participant: its key is not registered (or was revoked); send node.pub to the operator",
}
# A SuperNode whose key the coordinator unregisters (`fedlora coordinator revoke`) stops itself
# (Flower sends itself SIGINT when the coordinator answers 401) and exits 0, as if someone had stopped it.
REVOKED = (
    "the SuperNode stopped by itself: most likely the coordinator revoked this participant (unregistered its key). "
    "Ask the operator; if it was revoked, stop the service (a restart is refused)"
)


def init(
    directory: Path, name: str, data: str, label_column: str, model: str, superlink: str, ca_certificate: Path | None, runtime_port: int,
    roster: Path | None = None,
) -> LocalConfig:
    """Create a participant directory: node key pair and participant.toml (labels read from the data),
    and the consortium roster when given (`install_roster`)."""
    directory = Path(directory).resolve()
    if (directory / LOCAL_CONFIG).exists():
        raise FileExistsError(f"{directory / LOCAL_CONFIG} exists; edit it instead")
    data_section = DataSection(dataset=str(Path(data).resolve()) if Path(data).suffix else data, label_column=label_column)
    labels = answer_choices(load_examples(data_section))
    if not labels:
        raise ConfigError(f"{data}: no small set of answers to use as label names; name them in {LOCAL_CONFIG}")
    local = LocalConfig(
        site=SiteSection(name=name),
        supernode=SupernodeSection(superlink=superlink, root_certificates=str(Path(ca_certificate).resolve()) if ca_certificate else "", runtime_port=runtime_port),
        model=LocalModelSection(path=model, sha256=model_fingerprint(model)),
        data=LocalDataSection(path=data_section.dataset, label_column=label_column, label_names=labels),
        policy=PolicySection(),
    )
    create_node_key(directory, "node")
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    if roster is not None:
        install_roster(directory, roster)
    return local


def install_roster(directory: Path, roster: Path) -> Path:
    """Pin the operator's roster as DIR/roster.toml, once it parses (a later roster replaces it)."""
    text = Path(roster).read_text()
    parse_roster(text, str(roster))
    target = Path(directory) / ROSTER
    write_bytes_atomic(target, text.encode(), 0o644)
    return target


def start(directory: Path) -> int:
    """Run the SuperNode in the foreground; refuse to start on a changed base model or missing CA."""
    directory = Path(directory).resolve()
    local = load_local_config(directory)
    actual = model_fingerprint(local.model.path)
    if actual != local.model.sha256:
        raise ConfigError(f"model.path {local.model.path}: its files have fingerprint {actual}, not the recorded model.sha256 {local.model.sha256}")
    ca = Path(local.supernode.root_certificates)
    if not ca.is_file():
        raise FileNotFoundError(f"supernode.root_certificates: {ca} does not exist (the operator's ca.crt)")
    if not local.supernode.superlink:
        raise ConfigError(f"{directory / LOCAL_CONFIG}: supernode.superlink must give the coordinator's host:port")
    argv = [
        executable("flower-supernode"),
        "--superlink", local.supernode.superlink,
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(directory / "node.key"),
        "--node-config", f"{SITE_KEY}={json.dumps(str(directory))}",
        "--port", str(local.supernode.runtime_port),  # reconnects without limit when the coordinator restarts
    ]  # fmt: skip
    print(f"participant {local.site.name or directory.name}: base model verified; serving the coordinator at {local.supernode.superlink}", flush=True)
    return run_service(argv, flower_environment(directory / "flwr"), REFUSED, REVOKED)
