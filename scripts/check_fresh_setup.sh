#!/usr/bin/env bash
# Checks that scripts/setup.sh works on a fresh Debian bookworm root, as CI's fresh machine
# would run it: debootstrap a minimal bookworm (no Python, no compiler, no pip config, nothing of
# this machine's but the CAs its network needs), copy this checkout's HEAD into it, run `bash scripts/setup.sh` there as root
# with only the package registries (the Debian mirror, PyPI) to reach, then the fast test layer
# with what it installed.  Prints how long each step took; exits non-zero if any step fails.
#
#   bash scripts/check_fresh_setup.sh [--keep] [ROOT]     (root; default ROOT /var/tmp/thunderfs-fresh-root)
#
# The root shares this machine's kernel and network (a chroot, not a VM): what it checks is the
# packages and the Python environment.  Service starts are refused inside it (policy-rc.d), as in
# a container.  --keep leaves the root for a look (chroot ROOT bash); it is removed otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && { KEEP=1; shift; }
ROOT=${1:-/var/tmp/thunderfs-fresh-root}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "check_fresh_setup: run as root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "check_fresh_setup: needs debootstrap (scripts/setup.sh --bench)" >&2; exit 2; }

mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
    if [ "$KEEP" = 0 ]; then rm -rf --one-file-system "$ROOT"; else echo "check_fresh_setup: root kept at $ROOT"; fi
}
trap cleanup EXIT
step() {  # NAME COMMAND...: run it, print its time
    local t0=$SECONDS
    echo "== $1"
    shift
    "$@"
    echo "== done in $((SECONDS - t0)) s"
}

rm -rf --one-file-system "$ROOT"
quiet() { "$@" >/dev/null; }
step "debootstrap bookworm (minbase) into $ROOT" \
    quiet debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOT" "$MIRROR"
for m in proc sys dev dev/pts; do
    mount --bind "/$m" "$ROOT/$m"
    mounted+=("$ROOT/$m")
done
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The network's trust, and nothing else of this machine: the local CAs (where a TLS-inspecting
# egress proxy stands between the machine and PyPI, its CA) go into the root's bundle, and pip is
# told to use that bundle (its own, certifi's, knows only the public CAs).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null
fi
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
mkdir -p "$ROOT/work"
git archive --format=tar --prefix=thunderfs/ HEAD | tar -x -C "$ROOT/work"
echo "checkout: $(git rev-parse --short HEAD) (HEAD; uncommitted changes are not in it)"

in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt bash -c "cd /work/thunderfs && $1"; }
step "scripts/setup.sh in the fresh root" in_root "bash scripts/setup.sh"
step "the fast test layer with what it installed" in_root "bash scripts/test.sh -m 'not slow' -q"
in_root "for v in .venv .venv-glance .venv-keystone .venv-nova; do printf '%s: ' \$v; \$v/bin/python --version; done"
echo "check_fresh_setup: setup.sh passed on a fresh bookworm root"
