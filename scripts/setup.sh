#!/usr/bin/env bash
# Installs everything thunderfs, its tests and its benchmarks need on a fresh Debian machine:
# system packages, the project venv (.venv), and venvs of their own with a real Glance (.venv-glance),
# Keystone (.venv-keystone) and Nova (.venv-nova) for the tests.
# Idempotent: what is already there is kept.  `scripts/setup.sh --bench` adds what the VM boot
# benchmarks need.  Python packages are pinned to the versions the figures were measured with
# (constraints/*.txt; `pip freeze` of each venv).  Checked on a fresh Debian bookworm root:
# scripts/check_fresh_setup.sh.  Any failing step fails the setup, with its name.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "setup: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

# systemd: systemd-analyze, which checks the units in the tests; nftables: packet loss in the chaos run;
# redis-server: the tracker replicas' shared store in the tests; qemu, a kernel and busybox: the
# tests boot the small VM that Nova's instance disk holds (tests/test_nova.py), and the daemon on Debian's
# 6.1 kernel in a guest (tests/test_old_kernel.py, cpio for its initramfs, zstd for Ubuntu's modules); nginx: Glance
# behind TLS (tests/test_tls_glance.py) and the benchmarks' plain HTTP baseline.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config curl fio iproute2 e2fsprogs systemd nftables redis-server nginx-light
              qemu-system-x86 qemu-utils linux-image-amd64 busybox-static cpio zstd)
# --bench: also what the benchmarks need beyond that: debootstrap (the Debian boot image),
# httpdirfs (the C FUSE HTTP client baseline of benchmarks/dataplane_bench.py).
if [ "${1:-}" = "--bench" ]; then
    APT_PACKAGES+=(debootstrap httpdirfs)
fi
# Debian's Python (unless PYTHON names another), with its venv module (ensurepip), which Debian
# ships apart, and what builds the packages that come without a wheel (C extensions among the
# OpenStack services' dependencies).  A fresh Debian container has none of them.
PY=${PYTHON:-python3}
[ -n "${PYTHON:-}" ] || APT_PACKAGES+=(python3 python3-venv python3-dev build-essential)
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

# pip, quiet, without the warnings some package mirrors print for every package; its failure
# fails the setup (pipefail: the pipeline's status is pip's).
pip_install() {
    local venv=$1; shift
    "$venv/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored" || true; }
}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
EXTRAS=test
[ "${1:-}" = "--bench" ] && EXTRAS=test,bench
pip_install .venv -c constraints/project.txt -e ".[$EXTRAS]"
# The checkout itself on the venv's path: the benchmarks and scripts import the harness (and each
# other) as packages, run from anywhere, with no sys.path edits of their own; the test harness is
# not shipped in the thunderfs package for that.
echo "$PWD" > "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/thunderfs-checkout.pth"
.venv/bin/python -c "import trio, lmdb, xxhash, blake3, httpx, aiohttp, cryptography"

# More kernels without FUSE_NOTIFY_RESEND for the daemon in a guest (tests/test_old_kernel.py,
# harness/guest_kernel.py): Ubuntu 22.04's 5.15 and 24.04's 6.8, their releases' own (the archive
# keeps a release pocket for good), checked by sha256 and unpacked, not installed (this machine
# boots its own kernel).  NAME RELEASE VERSION IMAGE_SHA256 MODULES_SHA256
GUEST_KERNELS=${THUNDERFS_GUEST_KERNELS:-/var/cache/thunderfs/kernels}
guest_kernel() {
    local name=$1 release=$2 version=$3
    [ -f "$GUEST_KERNELS/$name/boot/vmlinuz-$release" ] && return
    echo "setup: fetching $name's kernel $release for the guest tests"
    local fetched base=http://archive.ubuntu.com/ubuntu/pool/main/l
    fetched=$(mktemp -d)
    curl -fsS --retry 3 -o "$fetched/image.deb" "$base/linux-signed/linux-image-${release}_${version}_amd64.deb"
    curl -fsS --retry 3 -o "$fetched/modules.deb" "$base/linux/linux-modules-${release}_${version}_amd64.deb"
    printf '%s  image.deb\n%s  modules.deb\n' "$4" "$5" | (cd "$fetched" && sha256sum -c --quiet -)
    mkdir -p "$fetched/root" "$GUEST_KERNELS"
    dpkg-deb -x "$fetched/image.deb" "$fetched/root"
    dpkg-deb -x "$fetched/modules.deb" "$fetched/root"
    rm -rf "${GUEST_KERNELS:?}/$name"
    mv "$fetched/root" "$GUEST_KERNELS/$name"
    rm -rf "$fetched"
}
guest_kernel ubuntu-22.04 5.15.0-25-generic 5.15.0-25.25 \
    ad56f8c442a54d4f5ff2dff010d00321d53e32b543f3a92f3ba4e042d20a71da \
    d0ba4087d9e1d497925b3481d3531fba6c2a852855f8019d73b0b1385aa4da1f
guest_kernel ubuntu-24.04 6.8.0-31-generic 6.8.0-31.31 \
    fd2ed023c84163e62c73d3b7b613a9b004bd31e335641c23d42bd249e489fbe6 \
    3f17f2c279257eb50e40da44390bdf8272c440ca078831c348773d1314b5c2fe

# A venv of its own for an OpenStack project the tests run for real: DIR "PACKAGES" "MODULES".
# DIR CONSTRAINTS "PACKAGES" "MODULES"
service_venv() {
    if ! "$1/bin/python" -W ignore -c "import $4" 2>/dev/null; then
        echo "setup: installing $3 into $1 (a few minutes)"
        "$PY" -m venv "$1"
        # shellcheck disable=SC2086
        pip_install "$1" -c "constraints/$2.txt" $3
    fi
    "$1/bin/python" -W ignore -c "import $4"
}
service_venv "${THUNDERFS_GLANCE_VENV:-.venv-glance}" glance "glance gunicorn" "glance, gunicorn"
# Keystone: for the tests of Glance behind Keystone (tests/test_keystone.py).
service_venv "${THUNDERFS_KEYSTONE_VENV:-.venv-keystone}" keystone "keystone gunicorn" "keystone, gunicorn"
# Nova: the tests run its own image cache code against the mount (tests/test_nova.py); pinned,
# since harness/nova_probe.py calls Nova's private methods.
service_venv "${THUNDERFS_NOVA_VENV:-.venv-nova}" nova nova "nova.virt.libvirt.imagebackend"
echo "setup: ready"
