#!/usr/bin/env bash
# podman with this project's settings (deploy/containers.conf), installing what is missing first.
#
#   deploy/podman.sh setup          install podman/runc/debootstrap/iptables when missing (root, apt)
#   deploy/podman.sh ARGS...        run `podman ARGS...` with CONTAINERS_CONF pointing at our settings
#
# Exit status 77 from `setup`: no container engine can be provided here (the reason is on stderr).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${FS_STATE_DIR:-/var/tmp/fashion-search}"
conf="$state/containers.conf"

cannot() { echo "no container engine: $*" >&2; exit 77; }

install_tools() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v iptables >/dev/null || missing+=(iptables)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || cannot "${missing[*]} not installed, and installing needs root"
    command -v apt-get >/dev/null || cannot "${missing[*]} not installed, and there is no apt-get"
    echo "installing ${missing[*]} (apt)" >&2
    apt-get update -q >&2 || cannot "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        "${missing[@]}" uidmap slirp4netns fuse-overlayfs >&2 || cannot "apt-get install ${missing[*]} failed"
}

write_conf() {
    mkdir -p "$state"
    local nofile
    nofile="$(ulimit -Hn)"
    [ "$nofile" = unlimited ] && nofile=1048576
    sed "s/@NOFILE@/$nofile/g" "$here/containers.conf" >"$conf.tmp"
    mv "$conf.tmp" "$conf"
}

if [ "${1:-}" = setup ]; then
    install_tools
    write_conf
    exit 0
fi
[ -f "$conf" ] && command -v podman >/dev/null || { install_tools; write_conf; }
export CONTAINERS_CONF="$conf"
exec podman "$@"
