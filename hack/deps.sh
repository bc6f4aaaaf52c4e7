#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a fresh Debian machine: Debian packages
# (only the missing ones; apt-get update once when something is missing) and the Kubernetes
# binaries, built from the Go module proxy and cached outside the repository
# (hack/kube-binaries.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# binary (or file) -> Debian package. clang, llvm and libbpf-dev compile bpf/ for
# `make generate` (which `make lint` checks is current).
declare -A need=(
  [etcd]=etcd-server
  [ip]=iproute2
  [iperf3]=iperf3
  [clang]=clang
  [llvm-strip]=llvm
  [/usr/include/bpf/bpf_helpers.h]=libbpf-dev
  # The real-cluster tier (tests/k8s): container runtime, CNI plugins, kube-proxy's tools.
  [containerd]=containerd
  [runc]=runc
  [/usr/lib/cni/ptp]=containernetworking-plugins
  [iptables]=iptables
  [conntrack]=conntrack
)
missing=()
for what in "${!need[@]}"; do
  case "$what" in
    /*) [ -e "$what" ] || missing+=("${need[$what]}") ;;
    *) command -v "$what" >/dev/null 2>&1 || missing+=("${need[$what]}") ;;
  esac
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get or dpkg may hold the lock (an engineer's run, unattended upgrades): retry.
  for attempt in $(seq 1 60); do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
      break
    fi
    [ "$attempt" -lt 60 ] || { echo "deps: apt-get failed" >&2; exit 1; }
    echo "deps: apt-get failed (dpkg lock?), retrying in 5 s" >&2
    sleep 5
  done
fi
# The kernel VM suite: qemu, static busybox, kmod, and package lists naming the cloud kernel.
hack/vm-deps.sh
# A packaged etcd starts a system service on install on some images; the harness runs its own.
hack/kube-binaries.sh >/dev/null
echo "deps: ok (Kubernetes binaries: $(hack/kube-binaries.sh | xargs -n1 basename | xargs))" >&2
