#!/usr/bin/env bash
# Installs what the kernel VM suite (tests/vm, `make test-vm`) needs on a fresh Debian machine:
# qemu (TCG; KVM is not used), a static busybox for the initramfs, kmod's depmod, xz and zstd
# (the 6.12 kernel's modules are compressed; tests/vm decompresses them on the host), and package
# lists that name the Debian cloud kernels: linux-image-cloud-amd64 of the machine's release
# (bookworm: 6.1) and of bookworm-backports (6.12). The kernel packages themselves are downloaded
# by tests/vm (apt-get download) and cached in ~/.cache/meshcrypt/vm, keyed by package and version.
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

# The second kernel (6.12: kernel WireGuard with TCX) comes from bookworm-backports. Its source
# goes into a file of our own, written only when it differs, so running this again changes
# nothing. Backports have priority 100 (NotAutomatic, ButAutomaticUpgrades): apt never installs
# or upgrades anything from them unless asked by name, and tests/vm only downloads the kernel.
backports=bookworm-backports
backports_file=/etc/apt/sources.list.d/meshcrypt-bookworm-backports.sources
backports_src="# Written by meshcrypt's hack/vm-deps.sh: the 6.12 cloud kernel of tests/vm (make test-vm).
Types: deb
URIs: http://deb.debian.org/debian
Suites: $backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
want_backports=false
[ "$codename" = bookworm ] && want_backports=true
source_changed=false
if $want_backports && [ "$(cat "$backports_file" 2>/dev/null)" != "$(printf '%s' "$backports_src")" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "vm-deps: $backports_file is missing or differs; run as root" >&2
    exit 1
  fi
  printf '%s' "$backports_src" >"$backports_file.tmp"
  mv "$backports_file.tmp" "$backports_file"
  echo "vm-deps: wrote $backports_file" >&2
  source_changed=true
fi

# tests/vm asks apt which kernel linux-image-cloud-amd64 depends on, in each suite.
lists_ok=true
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || lists_ok=false
if $want_backports; then
  apt-cache show "linux-image-cloud-amd64/$backports" >/dev/null 2>&1 || lists_ok=false
fi
$source_changed && lists_ok=false

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
kernel() { apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
msg="kernel $(kernel linux-image-cloud-amd64)"
$want_backports && msg="$msg and $(kernel "linux-image-cloud-amd64/$backports")"
$want_backports || msg="$msg; not bookworm ($codename): no $backports source, so the VM suite lacks its 6.12 kernel"
echo "vm-deps: ok ($msg)" >&2
