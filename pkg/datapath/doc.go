// Package datapath owns the node's kernel datapath state: tunnel routes and policy-routing
// rules, and the policy classifier. It loads the BPF objects generated from bpf/ (committed;
// `go generate ./pkg/datapath` rebuilds them with clang), keeps the ipcache, policy and enforce
// maps equal to the desired state (ApplyIPCache, ApplyPolicy), reads the per-reason counters,
// attaches from_pod/to_pod to pod interfaces with TCX, falling back to tc clsact +
// cls_bpf, and reads the classifier's flow events (FlowReader). docs/datapath.md is its
// contract with bpf/ and pkg/policy.
//
// It is the kernel edge: it takes handles bound to a namespace and applies desired state
// given as values; it imports no client-go or Kubernetes types, and callers never see
// cilium/ebpf types.
package datapath
