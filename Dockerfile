# syntax=docker/dockerfile:1
#
# The meshcrypt image: meshcrypt-agent (the entrypoint, run by the DaemonSet) and the
# meshcrypt CLI, statically linked. Build from the repository root:
#   docker build -t ghcr.io/meshcrypt/meshcrypt:0.1.0 .
# tests/manifests checks that every source below exists, that the build names existing
# packages, and that the entrypoint is a binary the build stage produces.

# --platform=$BUILDPLATFORM: cross-compile natively instead of emulating the target. The BPF
# objects are committed (pkg/datapath/*_bpfel.o, little-endian: amd64, arm64), so the build
# needs neither clang nor cgo.
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY cmd/ cmd/
COPY internal/ internal/
COPY pkg/ pkg/
ARG TARGETOS=linux
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/ ./cmd/meshcrypt-agent ./cmd/meshcrypt

# distroless/static: no shell, no package manager, CA certificates and /etc/passwd only. The
# agent needs nothing else: it talks netlink and bpf(2) directly (no iproute2), and starts the
# userspace WireGuard device by re-executing itself (/proc/self/exe wireguard-device).
#
# It runs as root (the image's default user), and cannot run otherwise: it creates links,
# routes, rules, WireGuard devices and BPF programs in the node's network namespace and pins
# objects on the host's bpffs, which take capabilities (NET_ADMIN, BPF, PERFMON; see the
# DaemonSet) that are effective only for root unless granted as file or ambient capabilities,
# and the files it manages on the host (its private key, the bpffs pins, the WireGuard UAPI
# sockets) are root's. It is not privileged: the DaemonSet drops every capability and adds
# back only those, with a read-only root filesystem.
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/meshcrypt-agent /out/meshcrypt /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/meshcrypt-agent"]
