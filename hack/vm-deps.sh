#!/usr/bin/env bash
# Installs what the kernel VM suite (tests/vm, `make test-vm`) needs on a fresh Debian machine:
# qemu (TCG; KVM is not used), a static busybox for the initramfs, kmod's depmod, and package lists
# that name the Debian cloud kernel. The kernel package itself is downloaded by tests/vm
# (apt-get download) and cached in ~/.cache/meshcrypt/vm, keyed by package and version.
set -euo pipefail

# binary -> Debian package
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86
  [depmod]=kmod
)
missing=()
for bin in "${!need[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/sbin/$bin" ] || missing+=("${need[$bin]}")
done
# The initramfs needs a static busybox: Debian's busybox package is dynamic, busybox-static is not
# (the two replace each other).
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || missing+=(busybox-static)
# tests/vm asks apt which kernel linux-image-cloud-amd64 depends on.
lists_ok=true
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ok=false

if [ ${#missing[@]} -gt 0 ] || ! $lists_ok; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "vm-deps: missing ${missing[*]:-} (package lists ok: $lists_ok); run as root (or: sudo apt-get update && sudo apt-get install ${missing[*]:-})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    echo "vm-deps: installing ${missing[*]}" >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
echo "vm-deps: ok (kernel $(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'))" >&2
