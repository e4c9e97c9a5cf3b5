#!/usr/bin/env bash
# Installs everything thunderfs, its tests and its benchmarks need on a fresh Debian machine:
# system packages, the project venv (.venv), and venvs of their own with a real Glance (.venv-glance),
# Keystone (.venv-keystone) and Nova (.venv-nova) for the tests.
# Idempotent: what is already there is kept.  `scripts/setup.sh --bench` adds what the VM boot
# benchmarks need.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: systemd-analyze, which checks the units in the tests; nftables: packet loss in the chaos run;
# redis-server: the tracker replicas' shared store in the tests; qemu, a kernel and busybox: the
# tests boot the small VM that Nova's instance disk holds (tests/test_nova.py).
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config curl fio iproute2 e2fsprogs systemd nftables redis-server
              qemu-system-x86 qemu-utils linux-image-amd64 busybox-static)
# --bench: also what the benchmarks need beyond that: debootstrap (the Debian boot image),
# httpdirfs and nginx (the C FUSE HTTP client baseline of benchmarks/dataplane_bench.py).
if [ "${1:-}" = "--bench" ]; then
    APT_PACKAGES+=(debootstrap httpdirfs nginx-light)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
EXTRAS=test
[ "${1:-}" = "--bench" ] && EXTRAS=test,bench
.venv/bin/pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import pyfuse3, trio, lmdb, xxhash, httpx" 

# A venv of its own for an OpenStack project the tests run for real: DIR "PACKAGES" "MODULES".
service_venv() {
    if ! "$1/bin/python" -W ignore -c "import $3" 2>/dev/null; then
        echo "setup: installing $2 into $1 (about a minute)"
        "$PY" -m venv "$1"
        "$1/bin/pip" install -q $2 2>&1 | grep -v "is ignored" || true
    fi
    "$1/bin/python" -W ignore -c "import $3"
}
service_venv "${THUNDERFS_GLANCE_VENV:-.venv-glance}" "glance gunicorn" "glance, gunicorn"
# Keystone: for the tests of Glance behind Keystone (tests/test_keystone.py).
service_venv "${THUNDERFS_KEYSTONE_VENV:-.venv-keystone}" "keystone gunicorn" "keystone, gunicorn"
# Nova: the tests run its own image cache code against the mount (tests/test_nova.py).
service_venv "${THUNDERFS_NOVA_VENV:-.venv-nova}" nova "nova.virt.libvirt.imagebackend"
echo "setup: ready"
