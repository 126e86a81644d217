"""Kubernetes manifests from a coordinator directory and a participant directory, checked offline.

The directories are real (`fedlora coordinator init`, `fedlora participant init`, a roster from
the participant book); every object written is validated in strict mode (an unknown field fails)
against the schemas of two Kubernetes versions by kubernetes-validate, and what the directories
say (the port, the CA's path, the records' directory) is what the objects say.
"""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from coordinator.deploy import write_roster
from coordinator.participants import BOOK, ParticipantBook
from fedlora.cli import main
from fedlora.pki import public_key_fingerprint

VERSIONS = ("1.30.0", "1.34.0")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deployment" / "run.toml"
IN_CLUSTER = "fedlora-coordinator.fedlora.svc"


def init_coordinator(directory: Path, *flags: str) -> Path:
    assert main(["coordinator", "init", str(directory), "--address", "coordinator.example.org:9093", "--config", str(EXAMPLE), *flags]) == 0
    return directory


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_coordinator(tmp_path_factory.mktemp("k8s") / "coordinator", "--host", IN_CLUSTER)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, coordinator: Path) -> Path:
    """hospital-a's directory, registered in the coordinator's book, with the roster pinned."""
    root = tmp_path_factory.mktemp("hospital-a")
    (root / "data").mkdir()
    (root / "data" / "records.csv").write_text("Age,Outcome\n50,yes\n30,no\n41,no\n")
    directory = root / "participant"
    assert main([
        "participant", "init", str(directory), "--name", "hospital-a", "--data", str(root / "data" / "records.csv"),
        "--label-column", "Outcome", "--superlink", "coordinator.example.org:9093", "--ca", str(coordinator / "pki" / "ca.crt"),
    ]) == 0  # fmt: skip
    book = ParticipantBook(coordinator / BOOK)
    book.add("hospital-a", 11, public_key_fingerprint(directory / "node.pub"))
    write_roster(coordinator, directory / "roster.toml")
    return directory


def edited(directory: Path, copy: Path, name: str, old: str, new: str) -> Path:
    """`directory` at `copy` (its files linked), but for `old` replaced by `new` in its file `name`."""
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).symlink_to(path)
    (copy / name).unlink()
    text = (directory / name).read_text()
    assert old in text
    (copy / name).write_text(text.replace(old, new))
    return copy


def generate(tmp_path: Path, *argv: str) -> dict[str, list[dict]]:
    """`fedlora ARGV --out DIR`: each YAML file written, as its objects."""
    assert main([*argv, "--out", str(tmp_path)]) == 0
    return {path.name: list(yaml.safe_load_all(path.read_text())) for path in sorted(tmp_path.glob("*.yaml"))}


def assert_valid(files: dict[str, list[dict]]) -> None:
    for version in VERSIONS:
        for document in (document for documents in files.values() for document in documents):
            kubernetes_validate.validate(document, version, strict=True)


def find(files: dict[str, list[dict]], kind: str, name: str = "") -> dict:
    return next(d for documents in files.values() for d in documents if d["kind"] == kind and d["metadata"]["name"].startswith(name))


def mounts(workload: dict) -> dict[str, dict]:
    return {mount["mountPath"]: mount for mount in workload["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}


def test_every_coordinator_object_is_valid_kubernetes_in_strict_mode(coordinator: Path, tmp_path: Path) -> None:
    files = generate(tmp_path, "coordinator", "manifests", str(coordinator), "--include-secrets")
    assert {name: [d["kind"] for d in documents] for name, documents in files.items()} == {
        "coordinator.yaml": ["ConfigMap", "Service", "StatefulSet", "NetworkPolicy"],
        "run-main.yaml": ["Job", "NetworkPolicy"],
        "secrets.yaml": ["Secret", "Secret"],
    }
    assert_valid(files)
    assert (tmp_path / "secrets.yaml").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "README.md").is_file()


def test_a_misspelled_field_fails_validation_so_the_validator_really_runs(coordinator: Path, tmp_path: Path) -> None:
    superlink = find(generate(tmp_path, "coordinator", "manifests", str(coordinator)), "StatefulSet")
    superlink["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = superlink["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    for version in VERSIONS:
        with pytest.raises(ValidationError, match="readinesProbe"):
            kubernetes_validate.validate(superlink, version, strict=True)


def test_the_port_in_coordinator_toml_is_the_port_the_cluster_serves_probes_and_allows(coordinator: Path, tmp_path: Path) -> None:
    settings = tomllib.loads((coordinator / "coordinator.toml").read_text())["superlink"]
    assert settings["address"].endswith(":9093")
    moved = edited(coordinator, tmp_path / "moved", "coordinator.toml", ":9093", ":9443")
    files = generate(tmp_path / "out", "coordinator", "manifests", str(moved))
    assert_valid(files)
    superlink = find(files, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert superlink["ports"] == [{"name": "superlink", "containerPort": 9443, "protocol": "TCP"}]
    assert superlink["readinessProbe"]["tcpSocket"] == {"port": "superlink"}
    assert find(files, "Service")["spec"]["ports"][0]["port"] == 9443
    policies = {d["metadata"]["name"]: d["spec"] for d in files["coordinator.yaml"] + files["run-main.yaml"] if d["kind"] == "NetworkPolicy"}
    assert policies["fedlora-coordinator"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 9443}]}]
    assert policies["fedlora-run-main"]["ingress"] == [] and policies["fedlora-run-main"]["egress"][1]["ports"] == [{"protocol": "TCP", "port": 9443}]
    config = find(files, "ConfigMap")["data"]
    assert tomllib.loads(config["coordinator.toml"])["superlink"] == {"address": "coordinator.example.org:9443", "listen": "0.0.0.0"}
    assert tomllib.loads(config["flwr-round-loop.toml"])["superlink"]["fedlora"]["address"] == f"{IN_CLUSTER}:9443"
    assert tomllib.loads(config["flwr-superlink.toml"])["superlink"]["fedlora"]["address"] == "127.0.0.1:9443"


def test_private_keys_stay_out_of_the_manifests_unless_asked_for(coordinator: Path, tmp_path: Path) -> None:
    files = generate(tmp_path / "plain", "coordinator", "manifests", str(coordinator))
    written = "".join(path.read_text() for path in (tmp_path / "plain").iterdir())
    assert "Secret" not in [d["kind"] for documents in files.values() for d in documents] and "PRIVATE KEY" not in written
    readme = (tmp_path / "plain" / "README.md").read_text()
    assert f"--from-file=server.key={coordinator / 'pki' / 'server.key'}" in readme and "ca.key" not in readme
    assert f"--from-file=coordinator.key={coordinator / 'coordinator.key'}" in readme

    secrets = {d["metadata"]["name"]: d["data"] for d in generate(tmp_path / "with", "coordinator", "manifests", str(coordinator), "--include-secrets")["secrets.yaml"]}
    assert base64.b64decode(secrets["fedlora-coordinator-tls"]["server.key"]) == (coordinator / "pki" / "server.key").read_bytes()
    assert base64.b64decode(secrets["fedlora-coordinator-signing"]["coordinator.key"]) == (coordinator / "coordinator.key").read_bytes()
    assert "ca.key" not in secrets["fedlora-coordinator-tls"]  # the CA's key never leaves the operator's machine


def test_the_round_loop_job_starts_or_resumes_its_run_beside_the_superlink_with_the_ca_only(coordinator: Path, tmp_path: Path) -> None:
    files = generate(tmp_path, "coordinator", "manifests", str(coordinator), "--name", "trial")
    job = find(files, "Job", "fedlora-run-trial")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == ["fedlora", "coordinator", "run", "/srv/fedlora/coordinator", "--name", "trial", "--start-or-resume"]
    assert pod["restartPolicy"] == "OnFailure"
    assert pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "state-fedlora-coordinator-0"
    assert volumes["tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}] and "signing" not in volumes
    assert mounts(job)["/srv/fedlora/coordinator/flwr/config.toml"]["subPath"] == "flwr-round-loop.toml"


def test_the_pods_run_as_a_non_root_user_on_a_read_only_root_with_the_resources_asked_for(coordinator: Path, tmp_path: Path) -> None:
    files = generate(tmp_path, "coordinator", "manifests", str(coordinator), "--cpu", "3", "--memory", "6Gi", "--storage", "20Gi")
    superlink = find(files, "StatefulSet")
    pod = superlink["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001 and not pod["automountServiceAccountToken"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] and container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "3", "memory": "6Gi"}, "limits": {"cpu": "3", "memory": "6Gi"}}
    assert superlink["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert mounts(superlink)["/srv/fedlora/coordinator/pki"]["readOnly"] and "subPath" not in mounts(superlink)["/srv/fedlora/coordinator"]


def test_a_changed_run_toml_changes_the_pod_templates_so_apply_restarts_them(coordinator: Path, tmp_path: Path) -> None:
    before = find(generate(tmp_path / "before", "coordinator", "manifests", str(coordinator)), "StatefulSet")
    longer = edited(coordinator, tmp_path / "longer", "run.toml", "rounds = 5", "rounds = 6")
    after = find(generate(tmp_path / "after", "coordinator", "manifests", str(longer)), "StatefulSet")
    annotation = "fedlora/config-sha256"
    assert before["spec"]["template"]["metadata"]["annotations"][annotation] != after["spec"]["template"]["metadata"]["annotations"][annotation]


def test_a_certificate_that_does_not_name_the_service_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = init_coordinator(tmp_path / "coordinator")
    assert main(["coordinator", "manifests", str(directory), "--out", str(tmp_path / "k8s")]) == 2
    assert f"--host {IN_CLUSTER}" in capsys.readouterr().err and not (tmp_path / "k8s").exists()


def test_every_participant_object_is_valid_and_mounts_what_participant_toml_names(site: Path, tmp_path: Path) -> None:
    files = generate(tmp_path, "participant", "manifests", str(site), "--include-secrets")
    assert {name: [d["kind"] for d in documents] for name, documents in files.items()} == {
        "participant.yaml": ["ConfigMap", "PersistentVolumeClaim", "Deployment", "NetworkPolicy"],
        "secrets.yaml": ["Secret"],
    }
    assert_valid(files)
    deployment = find(files, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    mounted = mounts(deployment)
    ca = tomllib.loads((site / "participant.toml").read_text())["supernode"]["root_certificates"]
    assert mounted[ca]["subPath"] == "ca.crt" and mounted[str(site.parent / "data")]["readOnly"]
    assert mounted["/srv/fedlora/participant/node.key"]["subPath"] == "node.key"
    assert find(files, "ConfigMap")["data"]["roster.toml"] == (site / "roster.toml").read_text()
    assert find(files, "ConfigMap")["data"]["participant.toml"] == (site / "participant.toml").read_text()  # unchanged: the site's own
    assert base64.b64decode(find(files, "Secret")["data"]["node.key"]) == (site / "node.key").read_bytes()
    policy = find(files, "NetworkPolicy")["spec"]
    assert policy["ingress"] == [] and policy["egress"][1] == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 9093}]}


def test_a_coordinator_at_an_ip_address_is_the_only_place_a_participant_may_connect_to(site: Path, tmp_path: Path) -> None:
    moved = edited(site, tmp_path / "participant", "participant.toml", "coordinator.example.org:9093", "203.0.113.7:9443")
    files = generate(tmp_path / "out", "participant", "manifests", str(moved))
    assert_valid(files)
    assert find(files, "NetworkPolicy")["spec"]["egress"][1] == {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [{"protocol": "TCP", "port": 9443}]}
    assert "Secret" not in [d["kind"] for d in files["participant.yaml"]] and "kubectl create secret generic fedlora-hospital-a-node-key" in (
        tmp_path / "out" / "README.md"
    ).read_text()


def test_the_dashboard_runs_beside_the_superlink_on_loopback_and_mounts_everything_read_only(coordinator: Path, tmp_path: Path) -> None:
    pod = find(generate(tmp_path, "coordinator", "manifests", str(coordinator)), "StatefulSet")["spec"]["template"]["spec"]
    dashboard = next(container for container in pod["containers"] if container["name"] == "dashboard")
    assert dashboard["command"] == ["fedlora", "coordinator", "dashboard", "/srv/fedlora/coordinator", "--listen", "127.0.0.1:8050"]
    writable = [mount["mountPath"] for mount in dashboard["volumeMounts"] if not mount.get("readOnly")]
    assert writable == ["/tmp"], writable  # the coordinator directory, keys and configuration: read-only
    superlink = next(container for container in pod["containers"] if container["name"] == "superlink")
    assert {m["mountPath"] for m in superlink["volumeMounts"]} == {m["mountPath"] for m in dashboard["volumeMounts"]}


def test_the_site_monitor_runs_beside_the_daemon_read_only_and_without_the_node_key(site: Path, tmp_path: Path) -> None:
    pod = find(generate(tmp_path, "participant", "manifests", str(site)), "Deployment")["spec"]["template"]["spec"]
    monitor = next(container for container in pod["containers"] if container["name"] == "monitor")
    assert monitor["command"][:3] == ["fedlora", "participant", "monitor"] and monitor["command"][-2:] == ["--listen", "127.0.0.1:9464"]
    assert [mount["mountPath"] for mount in monitor["volumeMounts"] if not mount.get("readOnly")] == ["/tmp"]
    assert not any(mount["name"] == "node-key" for mount in monitor["volumeMounts"])  # it cannot act as the site
