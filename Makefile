SHELL := /bin/bash
# meshcrypt: transparent encryption for Kubernetes pod traffic.
# `make demo` and `make test` install what they need (hack/deps.sh) and clean up after themselves.

GO      ?= go
BIN     := $(CURDIR)/bin
GOTEST  := $(GO) test -count=1
export MESHCRYPT_BIN_DIR := $(BIN)
export CGO_ENABLED ?= 0

.DEFAULT_GOAL := help
.PHONY: help deps build generate lint test test-unit test-api test-harness test-e2e test-k8s test-vm demo bench clean cleanup

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install Debian packages (etcd-server, iproute2, iperf3) and build kube-apiserver (cached in ~/.cache/meshcrypt)
	@hack/deps.sh

build: ## build bin/meshcrypt-agent and bin/meshcrypt
	$(GO) build -o $(BIN)/ ./cmd/meshcrypt-agent ./cmd/meshcrypt

generate: ## regenerate deepcopy code, CRD manifests and the BPF objects (commit the result)
	$(GO) tool controller-gen object paths=./pkg/api/... crd:crdVersions=v1 output:crd:artifacts:config=manifests/crds
	$(GO) generate ./pkg/datapath/
	cp manifests/crds/*.yaml manifests/helm/meshcrypt/crds/
	$(GO) test -count=1 -run 'TestInstallManifest|TestChartDefault' ./tests/manifests/ -update >/dev/null

lint: ## gofmt, go vet, staticcheck, and generated code up to date
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt wants to change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@$(MAKE) --no-print-directory generate >/dev/null
	@git diff --exit-code --stat -- manifests/crds manifests/helm/meshcrypt/crds manifests/install pkg/api pkg/datapath/classifier_bpfel.go pkg/datapath/classifier_bpfel.o || (echo "generated files are stale: run make generate and commit"; exit 1)

test: deps build lint ## every test tier in order (needs root: netns, WireGuard devices); cleans up even on failure
	@$(GO) run ./tests/cleanup
	@$(MAKE) --no-print-directory test-unit test-api test-harness test-e2e test-k8s test-vm; rc=$$?; \
	  $(GO) run ./tests/cleanup; exit $$rc

test-unit: ## unit and privileged package tests (pure logic, netns, routes, userspace WireGuard)
	$(GOTEST) -timeout 10m ./pkg/... ./internal/... ./cmd/...

test-api: ## control plane tests against a real kube-apiserver + etcd: harness, CRD validation, RBAC and admission, the CLI, manifests and Helm chart (server-side dry-run), every command in the docs
	$(GOTEST) -timeout 10m ./tests/controlplane/ ./tests/api/ ./tests/manifests/ ./tests/docs/

test-harness: ## the network-namespace harness itself (and the tests' shared helpers)
	$(GOTEST) -timeout 10m ./tests/netenv/ ./tests/cluster/ ./tests/internal/...

test-e2e: ## end-to-end: agents on netns nodes, traffic with a marker, underlay capture
	$(GOTEST) -timeout 25m -v ./tests/e2e/ 2>&1 | grep -Ev '^\s+cluster.go:[0-9]+: time=' ; exit $${PIPESTATUS[0]}

test-k8s: build ## a real cluster (kubelets, containerd, ptp and bridge CNI, kube-proxy): the install manifest applied unchanged, WireGuard on, marker absent from the underlay between kubelet-made pods (present with Disabled)
	$(GOTEST) -timeout 10m -v ./tests/k8s/ 2>&1 | grep -Ev '^\s+helpers_test\.go:[0-9]+: time=' ; exit $${PIPESTATUS[0]}

test-vm: ## the kernel suite in a qemu VM and the e2e suites there (WireGuard, IPsec, policy, faults), on Debian's cloud kernels 6.1 (kernel WireGuard, ESP, legacy tc) and 6.12 (kernel WireGuard, ESP, TCX); MESHCRYPT_VM_KERNELS=6.12 runs one
	$(GOTEST) -timeout 60m -v ./tests/vm/ 2>&1 | grep -Ev '^\s+(cluster|harness)\.go:[0-9]+: time=' ; exit $${PIPESTATUS[0]}

demo: deps build ## run a 3-node cluster on this machine, turn WireGuard on, prove it, print meshcrypt status (KEEP=1 keeps it up)
	$(GO) run ./tests/demo $(if $(KEEP),--keep,)

bench: deps build ## benchmarks: classifier cost per packet, pod-to-pod throughput (WireGuard vs wireguard-go by hand vs clear, classifier on/off), node join time, control plane at 100/1000/5000 nodes, and in the VM WireGuard vs IPsec vs clear
	$(GOTEST) -run '^$$' -bench Classifier -benchtime 1x -timeout 20m ./pkg/datapath/ | tee bench/classifier.txt
	$(GOTEST) -run '^$$' -bench . -benchtime 1x -timeout 20m ./tests/e2e/ | tee bench/results.txt
	$(GOTEST) -run '^$$' -bench ControlPlaneScale -benchtime 1x -timeout 60m ./tests/scale/ | tee bench/scale.txt
	$(GOTEST) -run '^$$' -bench UserspaceApplyOneChange -benchtime 5x ./pkg/crypto/wireguard/ | tee bench/wireguard-apply.txt
	$(GOTEST) -run '^$$' -bench PodThroughputInVM -benchtime 1x -timeout 20m ./tests/vm/ | tee bench/vm.txt

cleanup: ## remove namespaces and processes left by killed test runs
	$(GO) run ./tests/cleanup

clean: cleanup ## remove build output
	rm -rf $(BIN)
