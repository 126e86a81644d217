"""Kubernetes manifests for a coordinator, generated from its own directory (`fedlora coordinator manifests`).

What the directory says is what the cluster runs: the port of coordinator.toml's address is the
Service's, the container's, the probes' and the NetworkPolicies'; run.toml is the configuration
the round loop submits; pki/ and coordinator.key become Secrets. (docs/decisions.md: why this
and not a Helm chart.)

In the pods the directory is MOUNT, a volume of the StatefulSet's that keeps what the coordinator
writes (state/, runs/, participants.json, withdrawals/, flwr/); its configuration files are
mounted over it one by one from a ConfigMap and two Secrets.

- The SuperLink is a StatefulSet of one (`fedlora coordinator start`), listening on every
  interface; the operator's `flwr` calls in its pod (`kubectl exec ... register`) dial 127.0.0.1.
- The round loop is a Job (`fedlora coordinator run --start-or-resume`): it submits the run and
  follows it; the loop itself runs in the SuperLink's pod, as Flower starts it. The Job mounts the
  same volume (the checkpoint says whether to start or resume; the run's lock says whether a loop
  is still going), so it is scheduled onto the SuperLink's node, and it dials the Service by its
  in-cluster name, which the server certificate must cover.
- A LoadBalancer Service gives the participants the port. NetworkPolicies: the SuperLink accepts
  connections on that port only and opens none but DNS; the Job reaches that port and DNS only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.deploy import Settings, app_pyproject, flower_connection, read_settings, settings_toml
from coordinator.participants import BOOK, ParticipantBook
from fedlora.config import load_config
from fedlora.kube import (
    LIGHT,
    SUBPATH_NOTE,
    VIEW_PORTS,
    Doc,
    SecretFiles,
    Target,
    claim_spec,
    claim_volume,
    config_map,
    container,
    dns_name,
    labels,
    metadata,
    network_policy,
    pod_spec,
    read_only_view,
    resources,
    secret_command,
    secret_object,
    secret_volume,
    tcp_port,
    template,
    volume_mount,
)
from fedlora.pki import certificate_hosts

MOUNT = "/srv/fedlora/coordinator"
APP = "fedlora-coordinator"
POD = f"{APP}-0"
STATE = "state"  # the StatefulSet's claim template: the claim is STATE-APP-0
PORT = "superlink"
# For containers that only run a command: `prepare`, and the round-loop Job's `coordinator run`, which
# submits the run and follows its log (the round loop itself runs in the SuperLink's pod).
# ConfigMap key -> where under MOUNT both pods see it
SHARED_FILES = {"coordinator.toml": "coordinator.toml", "run.toml": "run.toml", "pyproject.toml": "app/pyproject.toml", "coordinator.pub": "coordinator.pub"}


@dataclass(frozen=True)
class Coordinator:
    """What the manifests take from a coordinator directory."""

    directory: Path
    settings: Settings
    run_toml: str
    model: str  # run.toml's model.name: a directory the SuperLink's pod must hold, unless built in
    public_key: str
    hosts: list[str]  # what pki/server.crt covers
    registered: list[str]  # participants.json, revoked ones left out


def read_coordinator(directory: Path) -> Coordinator:
    directory = Path(directory).resolve()
    settings = read_settings(directory)
    return Coordinator(
        directory=directory,
        settings=settings,
        run_toml=(directory / "run.toml").read_text(),
        model=load_config(directory / "run.toml").model.name,
        public_key=(directory / "coordinator.pub").read_text(),
        hosts=certificate_hosts(directory / "pki" / "server.crt"),
        registered=[entry.name for entry in ParticipantBook(directory / BOOK).entries if not entry.revoked],
    )


def service_host(target: Target) -> str:
    """The Service's in-cluster name, which the round loop dials."""
    return f"{APP}.{target.namespace}.svc"


def secrets(coordinator: Coordinator) -> list[SecretFiles]:
    """The TLS files the SuperLink serves with (ca.key stays with the operator) and the adapters' signing key."""
    pki = coordinator.directory / "pki"
    return [
        SecretFiles(f"{APP}-tls", {name: pki / name for name in ("ca.crt", "server.crt", "server.key")}),
        SecretFiles(f"{APP}-signing", {"coordinator.key": coordinator.directory / "coordinator.key"}),
    ]


def config_data(coordinator: Coordinator, target: Target) -> dict[str, str]:
    """The ConfigMap: the directory's files as the pods need them (listening on every interface, each pod's `flwr` connection)."""
    port, ca = coordinator.settings.port, Path(MOUNT) / "pki" / "ca.crt"
    return {
        "coordinator.toml": settings_toml(Settings(coordinator.settings.address, "0.0.0.0")),
        "run.toml": coordinator.run_toml,
        "pyproject.toml": app_pyproject(),
        "coordinator.pub": coordinator.public_key,
        "flwr-superlink.toml": flower_connection(Settings(f"127.0.0.1:{port}", ""), ca),
        "flwr-round-loop.toml": flower_connection(Settings(f"{service_host(target)}:{port}", ""), ca),
    }


def directory_mounts(connection: str, ca_only: bool) -> tuple[list[Doc], list[Doc]]:
    """Mounts and volumes that make MOUNT the coordinator directory; `connection`: the ConfigMap key of its flwr/config.toml."""
    files = {**SHARED_FILES, connection: "flwr/config.toml"}
    mounts = [
        volume_mount(STATE, MOUNT, read_only=False),
        *(volume_mount("config", f"{MOUNT}/{path}", key) for key, path in files.items()),
        volume_mount("tls", f"{MOUNT}/pki"),
    ]
    volumes = [{"name": "config", "configMap": {"name": APP}}, secret_volume("tls", f"{APP}-tls", ["ca.crt"] if ca_only else None)]
    return mounts, volumes


def prepare(target: Target) -> Doc:
    """Make the directories that files are mounted into as the pod's user: left to the runtime they would be root's."""
    command = ["mkdir", "-p", *(f"{MOUNT}/{name}" for name in ("app", "flwr", "pki", "state", "runs"))]
    return container("prepare", target, command, [volume_mount(STATE, MOUNT, read_only=False)], LIGHT)


def model_mount(model: str) -> tuple[list[Doc], list[Doc]]:
    """run.toml's base model, from a claim named APP-model, at the path run.toml names (none for a built-in one)."""
    if model.startswith("builtin:"):
        return [], []
    if not Path(model).is_absolute():
        raise ValueError(f"run.toml model.name {model!r}: give the base model's absolute path, the SuperLink's pod mounts it there")
    return [volume_mount("model", model)], [claim_volume("model", f"{APP}-model", read_only=True)]


def superlink(coordinator: Coordinator, target: Target, config: dict[str, str]) -> Doc:
    mounts, volumes = directory_mounts("flwr-superlink.toml", ca_only=False)
    model_mounts, model_volumes = model_mount(coordinator.model)
    mounts += [volume_mount("signing", f"{MOUNT}/coordinator.key", "coordinator.key"), *model_mounts]
    volumes += [secret_volume("signing", f"{APP}-signing"), *model_volumes]
    probe = {"tcpSocket": {"port": PORT}}
    main = container(
        "superlink", target, ["fedlora", "coordinator", "start", MOUNT], mounts, resources(target),
        ports=[{"name": PORT, "containerPort": coordinator.settings.port, "protocol": "TCP"}],
        startupProbe={**probe, "periodSeconds": 5, "failureThreshold": 60},
        readinessProbe={**probe, "periodSeconds": 10},
        livenessProbe={**probe, "periodSeconds": 20, "failureThreshold": 3},
    )  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(APP, target, "superlink", APP),
        "spec": {
            "serviceName": APP,
            "replicas": 1,
            "selector": {"matchLabels": labels("superlink", APP)},
            "template": template("superlink", APP, pod_spec([main, dashboard(target, mounts)], volumes, initContainers=[prepare(target)]), config),
            "volumeClaimTemplates": [{"metadata": {"name": STATE}, "spec": claim_spec(target)}],
        },
    }


def dashboard(target: Target, superlink_mounts: list[Doc]) -> Doc:
    """The operator's dashboard and /metrics beside the SuperLink, on the pod's loopback (`kubectl port-forward`),
    every volume read-only: it can change nothing."""
    port = VIEW_PORTS["dashboard"]
    command = ["fedlora", "coordinator", "dashboard", MOUNT, "--listen", f"127.0.0.1:{port}"]
    probe = {"exec": {"command": ["python", "-c", f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=20)"]}}
    return read_only_view("dashboard", target, command, superlink_mounts, readinessProbe={**probe, "periodSeconds": 30, "timeoutSeconds": 25})


def job_name(run: str) -> str:
    return dns_name(f"fedlora-run-{run}")


def round_loop(target: Target, run: str, config: dict[str, str]) -> Doc:
    """The Job: start the run, or resume it, and follow it until it finishes; retried (and so resumed) when it fails."""
    mounts, volumes = directory_mounts("flwr-round-loop.toml", ca_only=True)
    volumes[0:0] = [claim_volume(STATE, f"{STATE}-{POD}", read_only=False)]
    command = ["fedlora", "coordinator", "run", MOUNT, "--name", run, "--start-or-resume"]
    near = {"labelSelector": {"matchLabels": labels("superlink", APP)}, "topologyKey": "kubernetes.io/hostname"}  # the same volume
    spec = pod_spec(
        [container("round-loop", target, command, mounts, LIGHT)], volumes, initContainers=[prepare(target)],
        restartPolicy="OnFailure", affinity={"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [near]}},
    )  # fmt: skip
    name = job_name(run)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(name, target, "round-loop", name),
        "spec": {"backoffLimit": 6, "template": template("round-loop", name, spec, config)},
    }


def to_superlink(port: int) -> Doc:
    return {"to": [{"podSelector": {"matchLabels": labels("superlink", APP)}}], "ports": tcp_port(port)}


def service(coordinator: Coordinator, target: Target) -> Doc:
    port = {"name": PORT, "port": coordinator.settings.port, "targetPort": PORT, "protocol": "TCP"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(APP, target, "superlink", APP),
        "spec": {"type": "LoadBalancer", "selector": labels("superlink", APP), "ports": [port]},
    }


def coordinator_manifests(coordinator: Coordinator, target: Target, run: str, include_secrets: bool) -> dict[str, list[Doc]]:
    """File name -> the objects it holds; ValueError when the certificate does not cover the Service's in-cluster name."""
    if service_host(target) not in coordinator.hosts:
        raise ValueError(
            f"{coordinator.directory / 'pki' / 'server.crt'} does not cover {service_host(target)}, the name the round loop dials "
            f"in the cluster (it covers {', '.join(coordinator.hosts)}): create the coordinator directory with "
            f"`fedlora coordinator init DIR --address {coordinator.settings.address} --host {service_host(target)}`"
        )
    config = config_data(coordinator, target)
    port = coordinator.settings.port
    files = {
        "coordinator.yaml": [
            config_map(APP, target, "superlink", APP, config),
            service(coordinator, target),
            superlink(coordinator, target, config),
            network_policy(APP, target, "superlink", APP, [{"ports": tcp_port(port)}], [to_superlink(port)]),
        ],
        f"run-{run}.yaml": [round_loop(target, run, config), network_policy(job_name(run), target, "round-loop", job_name(run), [], [to_superlink(port)])],
    }
    if include_secrets:
        files["secrets.yaml"] = [secret_object(secret, target, "superlink", APP) for secret in secrets(coordinator)]
    return files


def readme(coordinator: Coordinator, target: Target, run: str, participants: list[str], include_secrets: bool) -> str:
    """What to do with the files, in order, with this coordinator's names filled in."""
    ns, job = target.namespace, job_name(run)
    inside = f"kubectl exec -n {ns} {POD} -- fedlora coordinator"
    if include_secrets:
        create = "kubectl apply -f secrets.yaml && shred -u secrets.yaml   # it holds the private keys"
    else:
        create = "\n".join(secret_command(secret, target) for secret in secrets(coordinator))
    register = "\n".join(
        f"kubectl cp {name}.pub {ns}/{POD}:/tmp/{name}.pub\n{inside} register {MOUNT} /tmp/{name}.pub --name {name}" for name in participants or ["NAME"]
    )
    model = "" if coordinator.model.startswith("builtin:") else (
        f"\nThe SuperLink's pod mounts the base model {coordinator.model} from the claim `{APP}-model` (read-only): create it and copy the "
        "model's files into it first.\n"
    )  # fmt: skip
    return f"""# fedlora coordinator on Kubernetes

Generated by `fedlora coordinator manifests {coordinator.directory}` for namespace `{ns}` and image `{target.image}`.
Participants dial {coordinator.settings.address}; the SuperLink listens on port {coordinator.settings.port}.

| file | objects |
|---|---|
| coordinator.yaml | ConfigMap `{APP}` (the directory's configuration), Service `{APP}` (LoadBalancer), StatefulSet `{APP}` (the SuperLink; its volume `{STATE}-{POD}` keeps state/ and runs/), NetworkPolicy `{APP}` |
| run-{run}.yaml | Job `{job}` (the round loop of run `{run}`), NetworkPolicy `{job}` |
{"| secrets.yaml | the Secrets, private keys included |" if include_secrets else ""}
## 1. Namespace and Secrets

```bash
kubectl create namespace {ns}
{create}
```
{model}
## 2. The SuperLink

```bash
kubectl apply -f coordinator.yaml
kubectl rollout status -n {ns} statefulset/{APP}
kubectl get service -n {ns} {APP}     # point {coordinator.settings.host} at its EXTERNAL-IP
```

## 3. Register the participants, write the roster

```bash
{register}
{inside} roster {MOUNT} --out /tmp/roster.toml
kubectl cp {ns}/{POD}:/tmp/roster.toml roster.toml
```

## 4. Run

Send the sites run.toml and its hash (`{inside} status {MOUNT}`), then, once they approved it:

```bash
kubectl apply -f run-{run}.yaml
kubectl logs -n {ns} -f job/{job}
{inside} status {MOUNT}
```

A failed attempt is retried by the Job (up to 6 times) with the same command, which resumes from the
last checkpoint; it waits for a round loop that is still going and stops at once when the run has
finished. If the Job has failed for good, fix the cause, then:

```bash
kubectl delete job -n {ns} {job} && kubectl apply -f run-{run}.yaml
```

After editing the coordinator directory, generate the manifests again and apply coordinator.yaml:
{SUBPATH_NOTE}; a run in progress resumes by itself.
"""
