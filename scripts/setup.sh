#!/usr/bin/env bash
# Installs everything thunderfs, its tests and its benchmarks need on a fresh Debian machine:
# system packages, the project venv (.venv) and a separate venv with a real Glance (.venv-glance).
# Idempotent: what is already there is kept.  `scripts/setup.sh --bench` adds what the VM boot
# benchmarks need.
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: systemd-analyze, which checks the units in the tests.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config curl fio iproute2 e2fsprogs systemd)
# --bench: also what the VM boot benchmarks need (qemu, a kernel to boot, debootstrap).
if [ "${1:-}" = "--bench" ]; then
    APT_PACKAGES+=(qemu-system-x86 qemu-utils linux-image-amd64 debootstrap)
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

GLANCE_VENV=${THUNDERFS_GLANCE_VENV:-.venv-glance}
if [ ! -x "$GLANCE_VENV/bin/gunicorn" ] || ! "$GLANCE_VENV/bin/python" -c "import glance" 2>/dev/null; then
    echo "setup: installing Glance into $GLANCE_VENV (about a minute)"
    "$PY" -m venv "$GLANCE_VENV"
    "$GLANCE_VENV/bin/pip" install -q glance gunicorn 2>&1 | grep -v "is ignored" || true
fi
"$GLANCE_VENV/bin/python" -c "import glance" 

# A real Keystone for the tests of Glance behind Keystone (tests/test_keystone.py).
KEYSTONE_VENV=${THUNDERFS_KEYSTONE_VENV:-.venv-keystone}
if [ ! -x "$KEYSTONE_VENV/bin/gunicorn" ] || ! "$KEYSTONE_VENV/bin/python" -c "import keystone" 2>/dev/null; then
    echo "setup: installing Keystone into $KEYSTONE_VENV (about a minute)"
    "$PY" -m venv "$KEYSTONE_VENV"
    "$KEYSTONE_VENV/bin/pip" install -q keystone gunicorn 2>&1 | grep -v "is ignored" || true
fi
"$KEYSTONE_VENV/bin/python" -c "import keystone"
echo "setup: ready"
