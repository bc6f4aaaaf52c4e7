#!/usr/bin/env bash
# Builds Kubernetes binaries from the k8s.io/kubernetes module through the Go module proxy and
# caches them outside the repository, one file per binary keyed by version
# ($cache/NAME-vVERSION). Prints each binary's path, one a line, in the order asked.
#
#   hack/kube-binaries.sh [NAME...]   # default: every binary the real-cluster tier (tests/k8s) runs
#
# The kubernetes module replaces its ~31 staging modules with local paths, so a plain
# `go install` refuses; a scratch module that requires it and points every staging module at its
# published version builds it. All binaries missing from the cache are built by one `go build`,
# with the version ldflags (else nodes report v0.0.0-master). A lock serialises concurrent runs.
set -euo pipefail
version=${KUBE_VERSION:-1.34.4}
cache=${MESHCRYPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshcrypt}
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
fi

# pkg NAME: the main package of a binary.
pkg() { echo "k8s.io/kubernetes/cmd/$1"; }
# dep NAME: a non-main package that pulls the binary's modules into the scratch go.mod.
dep() {
  case "$1" in
    kubectl) echo "k8s.io/kubectl/pkg/cmd" ;;
    *) echo "k8s.io/kubernetes/cmd/$1/app" ;;
  esac
}

print() { for n in "${names[@]}"; do echo "$cache/$n-v$version"; done; }
# reports NAME: the version a cached binary reports (one built without the ldflags, as earlier
# versions of this script did, says v0.0.0-master and is rebuilt).
reports() {
  case "$1" in
    kubectl) "$cache/$1-v$version" version --client 2>/dev/null | head -1 ;;
    *) "$cache/$1-v$version" --version 2>/dev/null ;;
  esac
}
missing() {
  local n
  for n in "${names[@]}"; do
    if [ ! -x "$cache/$n-v$version" ] || ! reports "$n" | grep -qF "v$version"; then echo "$n"; fi
  done
}
if [ -z "$(missing)" ]; then print; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
mapfile -t todo < <(missing) # another run may have built them while we waited
if [ ${#todo[@]} -eq 0 ]; then print; exit 0; fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
go mod init meshcrypt.local/kube-build >/dev/null 2>&1
go mod download -json "k8s.io/kubernetes@v$version" >"$scratch/dl.json"
gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' "$scratch/dl.json")
{
  echo "require k8s.io/kubernetes v$version"
  grep -E '=> \./staging/' "$gomod" | awk -v v="v0${version#1}" '{print "replace " $1 " => " $1 " " v}'
} >>go.mod
{
  echo "package main"
  echo
  for n in "${todo[@]}"; do echo "import _ \"$(dep "$n")\""; done
  echo
  echo "func main() {}"
} >main.go
go mod tidy >/dev/null 2>&1 || true
minor=$(echo "$version" | cut -d. -f2)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
pkgs=()
for n in "${todo[@]}"; do pkgs+=("$(pkg "$n")"); done
echo "building ${todo[*]} v$version (minutes, once)" >&2
mkdir -p "$scratch/out"
CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$scratch/out/" "${pkgs[@]}"
for n in "${todo[@]}"; do
  mv "$scratch/out/$n" "$cache/$n-v$version.tmp"
  mv "$cache/$n-v$version.tmp" "$cache/$n-v$version"
done
print
