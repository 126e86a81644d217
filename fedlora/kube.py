"""Kubernetes objects as plain dicts, for the manifests `fedlora coordinator|participant manifests` write.

The coordinator's and a participant's manifests are generated from their own directories
(coordinator/manifests.py, participant/manifests.py); what both need is here, once: labels,
a locked-down pod (non-root, read-only root file system, no capabilities, no service-account
token), files mounted one by one from ConfigMaps and Secrets at the paths the directory
names, NetworkPolicies that allow DNS and one port, and Secrets either as objects or as the
`kubectl create secret` command that reads them from the directory. Nothing here reads a file
except `secret_object`, which is asked for only with `--include-secrets`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedlora.atomic import write_bytes_atomic

Doc = dict[str, Any]

USER = 10001  # the image's non-root user and group (examples/deployment/Containerfile)
LIGHT = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}  # a view or a Job that waits
VIEW_PORTS = {"dashboard": 8050, "monitor": 9464}  # the views' default ports, on the pod's loopback
TMP = "/tmp"  # an emptyDir: HOME and the libraries' caches under a read-only root file system
SUBPATH_NOTE = "files mounted one by one (subPath) do not follow a changed ConfigMap: the pod template carries its hash, so applying a change restarts the pod"


@dataclass(frozen=True)
class Target:
    """Where and with what the manifests deploy: the same for every object of one command."""

    namespace: str
    image: str
    cpu: str  # requested and limited alike: a training pod gets what it asked for, no more
    memory: str
    storage: str  # the state volume

    def __post_init__(self) -> None:
        if dns_name(self.namespace) != self.namespace:
            raise ValueError(f"--namespace {self.namespace!r} is not a Kubernetes name (lower-case letters, digits and '-')")


@dataclass(frozen=True)
class SecretFiles:
    """A Secret made of files of the directory: key -> file."""

    name: str
    files: dict[str, Path]


def dns_name(text: str) -> str:
    """`text` as a Kubernetes object name (RFC 1123 label); ValueError when nothing of it is left."""
    name = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:63].rstrip("-")
    if not name:
        raise ValueError(f"{text!r} gives no Kubernetes name (letters, digits and '-')")
    return name


def labels(component: str, instance: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fedlora", "app.kubernetes.io/component": component, "app.kubernetes.io/instance": instance}


def metadata(name: str, target: Target, component: str, instance: str) -> Doc:
    return {"name": name, "namespace": target.namespace, "labels": labels(component, instance)}


def config_map(name: str, target: Target, component: str, instance: str, data: dict[str, str]) -> Doc:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(name, target, component, instance), "data": data}


def data_sha256(data: dict[str, str]) -> str:
    """The hash a pod template carries of its ConfigMap's data (SUBPATH_NOTE)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def secret_object(secret: SecretFiles, target: Target, component: str, instance: str) -> Doc:
    """The Secret with the files' bytes in it (`--include-secrets`): the output then holds private keys."""
    data = {key: base64.b64encode(path.read_bytes()).decode() for key, path in secret.files.items()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": metadata(secret.name, target, component, instance), "data": data}


def secret_command(secret: SecretFiles, target: Target) -> str:
    """The `kubectl create secret generic` that makes the Secret from the directory's files, keys never written elsewhere."""
    files = " ".join(f"--from-file={key}={shlex.quote(str(path))}" for key, path in secret.files.items())
    return f"kubectl create secret generic {secret.name} -n {target.namespace} {files}"


def volume_mount(volume: str, path: str, key: str = "", read_only: bool = True) -> Doc:
    """A volume at `path`, or (with `key`) only that file of a ConfigMap or Secret."""
    return {"name": volume, "mountPath": path, "readOnly": read_only, **({"subPath": key} if key else {})}


def secret_volume(name: str, secret: str, keys: list[str] | None = None) -> Doc:
    """Group-readable (0440, group USER through fsGroup), never world-readable."""
    source: Doc = {"secretName": secret, "defaultMode": 0o440}
    if keys:
        source["items"] = [{"key": key, "path": key} for key in keys]
    return {"name": name, "secret": source}


def claim_volume(name: str, claim: str, read_only: bool) -> Doc:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def resources(target: Target) -> Doc:
    amounts = {"cpu": target.cpu, "memory": target.memory}
    return {"requests": amounts, "limits": dict(amounts)}


def container(name: str, target: Target, command: list[str], mounts: list[Doc], amounts: Doc, **extra: Any) -> Doc:
    """A non-root container with a read-only root file system; ValueError when two mounts share a path."""
    paths = [mount["mountPath"] for mount in mounts]
    clashes = sorted({path for path in paths if paths.count(path) > 1})
    if clashes:
        raise ValueError(f"{name}: two volumes would be mounted at {', '.join(clashes)}; keep the directory, data and model apart")
    return {
        "name": name,
        "image": target.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": "HOME", "value": TMP}, {"name": "HF_HUB_OFFLINE", "value": "1"}],
        "resources": amounts,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [*mounts, volume_mount("tmp", TMP, read_only=False)],
        **extra,
    }


def read_only_view(name: str, target: Target, command: list[str], mounts: list[Doc], **extra: Any) -> Doc:
    """A read-only view (dashboard, site monitor) beside the main container: the same volumes, every one
    mounted read-only, and little CPU and memory."""
    return container(name, target, command, [mount | {"readOnly": True} for mount in mounts], LIGHT, **extra)


def pod_spec(containers: list[Doc], volumes: list[Doc], **extra: Any) -> Doc:
    """Runs as USER (files of Secrets and fresh volumes group-owned by it), seccomp RuntimeDefault, no API token."""
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsUser": USER,
            "runAsGroup": USER,
            "fsGroup": USER,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": [*volumes, {"name": "tmp", "emptyDir": {}}],
        **extra,
    }


def template(component: str, instance: str, spec: Doc, config: dict[str, str]) -> Doc:
    return {"metadata": {"labels": labels(component, instance), "annotations": {"fedlora/config-sha256": data_sha256(config)}}, "spec": spec}


def claim(name: str, target: Target, component: str, instance: str) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(name, target, component, instance),
        "spec": claim_spec(target),
    }


def claim_spec(target: Target) -> Doc:
    return {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": target.storage}}}


def dns_egress() -> Doc:
    """Name lookups through the cluster's DNS (kube-dns / CoreDNS in kube-system)."""
    return {
        "to": [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }  # fmt: skip


def tcp_port(port: int) -> list[Doc]:
    return [{"protocol": "TCP", "port": port}]


def network_policy(name: str, target: Target, component: str, instance: str, ingress: list[Doc], egress: list[Doc]) -> Doc:
    """Only what `ingress` and `egress` allow reaches or leaves the component's pods (empty: nothing)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(name, target, component, instance),
        "spec": {
            "podSelector": {"matchLabels": labels(component, instance)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [dns_egress(), *egress],
        },
    }


class _Dumper(yaml.SafeDumper):
    """safe_dump's dumper, writing a shared sub-object out in full each time: no YAML anchors for a reader to chase."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(out: Path, files: dict[str, list[Doc]], readme: str) -> list[Path]:
    """Write each list of objects as one YAML stream, and README.md; the paths written.

    A file holding a Secret object is readable by its owner only, from its first byte.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name, documents in files.items():
        secret = any(document["kind"] == "Secret" for document in documents)
        write_bytes_atomic(out / name, yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False).encode(), 0o600 if secret else 0o644)
    write_bytes_atomic(out / "README.md", readme.encode(), 0o644)
    return [out / name for name in [*files, "README.md"]]
