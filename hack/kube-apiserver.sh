#!/usr/bin/env bash
# Builds kube-apiserver from the k8s.io/kubernetes module through the Go module proxy and caches
# the binary outside the repository, keyed by version. Prints the binary's path.
# The kubernetes module replaces its staging modules with local paths, so a plain `go install`
# refuses; a scratch module that requires it and points every staging module at its published
# version builds it.
set -euo pipefail
version=${KUBE_VERSION:-1.34.4}
cache=${MESHCRYPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshcrypt}
bin=$cache/kube-apiserver-v$version
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
go mod init meshcrypt.local/kube-apiserver-build >/dev/null 2>&1
go mod download -json "k8s.io/kubernetes@v$version" >"$scratch/dl.json"
gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' "$scratch/dl.json")
{
  echo "require k8s.io/kubernetes v$version"
  grep -E '=> \./staging/' "$gomod" | awk -v v="v0${version#1}" '{print "replace " $1 " => " $1 " " v}'
} >>go.mod
cat >main.go <<'GO'
package main

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"

func main() {}
GO
go mod tidy >/dev/null 2>&1 || true
echo "building kube-apiserver v$version (a few minutes, once)" >&2
CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$bin.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv "$bin.tmp" "$bin"
echo "$bin"
