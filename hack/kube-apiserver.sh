#!/usr/bin/env bash
# Builds kube-apiserver from the k8s.io/kubernetes module through the Go module proxy and caches
# the binary outside the repository, keyed by version. Prints the binary's path.
# The recipe (a scratch module that requires k8s.io/kubernetes and points every staging module
# at its published version) is hack/kube-binaries.sh's.
set -euo pipefail
exec "$(dirname "$0")/kube-binaries.sh" kube-apiserver
