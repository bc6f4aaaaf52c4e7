#!/usr/bin/env bash
# Installs what the kernel VM suite (tests/vm, `make test-vm`) needs on a fresh Debian machine:
# qemu (TCG; KVM is not used), a static busybox for the initramfs, kmod's depmod, xz and zstd
# (the 6.12 kernel's modules are compressed; tests/vm decompresses them on the host), and package
# lists that name the machine's Debian cloud kernel (bookworm: 6.1). The kernel packages
# themselves are downloaded by tests/vm (apt-get download) and cached in ~/.cache/meshcrypt/vm,
# keyed by package and version.
set -euo pipefail

# binary -> Debian package
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86
  [depmod]=kmod
  [xz]=xz-utils
  [zstd]=zstd
)
missing=()
for bin in "${!need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/sbin/$bin" ] || missing+=("${need[$bin]}")
done
# The initramfs needs a static busybox: Debian's busybox package is dynamic, busybox-static is not
# (the two replace each other).
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || missing+=(busybox-static)

# tests/vm asks apt which kernel linux-image-cloud-amd64 depends on. The 6.12 kernel comes from
# trixie through an apt state of tests/vm's own in ~/.cache/meshcrypt/vm/apt (it fills it; the
# machine's sources stay bookworm's), verified with Debian's archive keyring.
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
lists_ok=true
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ok=false

# apt-get waits for another apt's lock (another checkout's `make deps`) instead of failing.
apt_get() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }
if [ ${#missing[@]} -gt 0 ] || ! $lists_ok; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "vm-deps: missing ${missing[*]:-} (package lists ok: $lists_ok); run as root (or: sudo apt-get update && sudo apt-get install ${missing[*]:-})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt_get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    echo "vm-deps: installing ${missing[*]}" >&2
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
echo "vm-deps: ok (kernel $(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'), and trixie's 6.12 through tests/vm's own apt state)" >&2
