#!/usr/bin/env bash
# Build the image on a machine without an image registry, the way the container test does:
# a debootstrapped Debian base (deploy/base-image.sh), the host's CA bundle as a build secret, and
# the CPU torch wheel from the local wheel folder that pip's configuration names (mounted read-only).
#
#   deploy/build-local.sh [TAG] [extra podman build args...]     default TAG fashion-search:local
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
tag="${1:-fashion-search:local}"
shift || true
podman=("$here/podman.sh")

base="$("$here/base-image.sh")"

# The wheel folder pip's configuration names (find-links), and the CPU torch wheel in it.
pip_get() { python3 -m pip config get "$1" 2>/dev/null || true; }
wheels="${FS_WHEELS:-${PIP_FIND_LINKS:-$(pip_get global.find-links)}}"
wheels="${wheels%% *}"
index="${PIP_INDEX_URL:-$(pip_get global.index-url)}"
index="${index:-https://pypi.org/simple}"
ca="${FS_CA_BUNDLE:-${PIP_CERT:-$(pip_get global.cert)}}"
ca="${ca:-/etc/ssl/certs/ca-certificates.crt}"

args=(--format docker --network host --build-arg "BASE_IMAGE=$base" --build-arg "PYPI_INDEX_URL=$index")
[ -s "$ca" ] && args+=(--secret "id=ca,src=$ca")
torch_whl="$(ls "$wheels"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -1 || true)"
if [ -n "$torch_whl" ]; then
    # torch 2.N pairs with torchvision 0.(N+15). PyPI has only CUDA-linked torchvision wheels: its C++
    # operators cannot load beside a CPU torch, so the build lets it import without them.
    torch_version="$(basename "$torch_whl" | cut -d- -f2)"
    minor="$(echo "$torch_version" | cut -d. -f2)"
    args+=(-v "$wheels:/wheels:ro"
        --build-arg "TORCH_INDEX_URL="
        --build-arg "TORCH_PACKAGES=torch==$torch_version torchvision==0.$((minor + 15)).*"
        --build-arg "PIP_ARGS=--find-links /wheels"
        --build-arg "TORCHVISION_WITHOUT_OPS=1")
    echo "torch $torch_version from $wheels" >&2
else
    echo "no CPU torch wheel in '${wheels:-}': torch from PyTorch's CPU index" >&2
fi
exec "${podman[@]}" build "${args[@]}" "$@" -t "$tag" "$repo"
