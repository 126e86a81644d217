#!/usr/bin/env bash
# Build the fedlora image without a container registry: a Debian bookworm root file system made by
# mmdebstrap from Debian's package archive (a tarball), imported with buildah, fedlora installed
# from a wheel of this checkout. The same image as the Containerfile's (non-root user 10001,
# entrypoint `fedlora`, nothing secret inside), for sites whose build hosts reach only a Debian
# mirror and a Python package index.
#
#   examples/deployment/build-debian.sh                  # as root: mmdebstrap and buildah
#   IMAGE=localhost/fedlora:0.1.0 WHEELS=/opt/wheels examples/deployment/build-debian.sh
#
# Settings (environment):
#   IMAGE        the image to commit (default localhost/fedlora:0.1.0)
#   MIRROR       the Debian mirror (default http://deb.debian.org/debian)
#   TORCH_INDEX  where torch's CPU build comes from (default PyTorch's CPU index; empty: the
#                Python package index and WHEELS only)
#   WHEELS       a directory of wheels pip may take first (e.g. a torch CPU wheel), optional
#   PIP_CERT     a CA bundle pip needs to reach the index (a TLS-inspecting proxy), optional;
#                used while building, not kept in the image
#   STORAGE_DRIVER  buildah's storage driver (default: its own; vfs where overlay mounts fail)
#   BUILDAH_ISOLATION  how `buildah run` isolates the install step (default chroot: no user
#                namespaces or container runtime needed)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
IMAGE=${IMAGE:-localhost/fedlora:0.1.0}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
buildah=(buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"})
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== fedlora wheel from $root"
python3 -m pip wheel --no-deps --no-cache-dir --wheel-dir "$work/wheels" "$root"
cp "$root/constraints.txt" "$work/wheels/"
if [ -n "${WHEELS:-}" ]; then cp "$WHEELS"/*.whl "$work/wheels/"; fi

echo "== Debian bookworm root file system (mmdebstrap, $MIRROR)"
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd bookworm "$work/rootfs.tar" "$MIRROR"

echo "== image $IMAGE (buildah, isolation $BUILDAH_ISOLATION)"
container=$("${buildah[@]}" from scratch)
trap '"${buildah[@]}" rm "$container" >/dev/null; rm -rf "$work"' EXIT
"${buildah[@]}" add "$container" "$work/rootfs.tar" /
mounts=(--volume "$work/wheels:/wheels:ro")
pip_env=""
if [ -n "${PIP_CERT:-}" ]; then
  mounts+=(--volume "$PIP_CERT:/run/pip-cert.pem:ro")
  pip_env="PIP_CERT=/run/pip-cert.pem"
fi
torch_index=""
if [ -n "$TORCH_INDEX" ]; then torch_index="--index-url $TORCH_INDEX"; fi
"${buildah[@]}" run "${mounts[@]}" "$container" -- sh -euc "
  python3 -m venv /opt/fedlora
  env $pip_env /opt/fedlora/bin/pip install --no-cache-dir --find-links /wheels $torch_index torch==2.13.0
  env $pip_env /opt/fedlora/bin/pip install --no-cache-dir --find-links /wheels -c /wheels/constraints.txt /wheels/fedlora-*.whl
  useradd --system --uid 10001 --user-group --home-dir /srv/fedlora --create-home fedlora
  apt-get clean && rm -rf /var/lib/apt/lists/*
"
"${buildah[@]}" config \
  --env PATH=/opt/fedlora/bin:/usr/local/bin:/usr/bin:/bin --env HF_HUB_OFFLINE=1 --env HOME=/tmp --env PYTHONDONTWRITEBYTECODE=1 \
  --user 10001:10001 --workingdir /srv/fedlora --entrypoint '["fedlora"]' --cmd '--help' \
  --label org.opencontainers.image.title=fedlora --label org.opencontainers.image.base.name=debian:bookworm \
  "$container"
"${buildah[@]}" commit "$container" "$IMAGE"
echo "== built $IMAGE: \`podman run --rm $IMAGE --help\`; for a cluster \`podman push $IMAGE REGISTRY/fedlora:0.1.0\`"
