#!/usr/bin/env bash
# Make a Debian bookworm base image without an image registry: debootstrap (minbase) from the apt
# mirror this host already uses, then `podman import`. Reused when the tag exists; prints the tag.
#
#   deploy/base-image.sh [TAG]      default localhost/fashion-search-base:bookworm
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
tag="${1:-localhost/fashion-search-base:bookworm}"
podman=("$here/podman.sh")

if "${podman[@]}" image exists "$tag"; then
    echo "$tag"
    exit 0
fi

# The mirror apt already uses (deb822 sources or the classic list), else Debian's default.
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | head -1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root="$(mktemp -d /var/tmp/fashion-search-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror (about a minute)" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# Package lists and downloaded .debs are caches: the image's own apt-get update refetches them.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*
tar -C "$root" -c . | "${podman[@]}" import \
    --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "$tag"
