// Package flow is the wire format of flow events between the node agents and their clients:
// an agent serves GET /flows on its metrics port as JSON lines of [Record], and
// `meshcrypt monitor` reads them (docs/monitor.md). It holds the record types, the [Filter]
// both sides understand (as URL query parameters), and the one-line text form.
//
// It is pure: it must not import pkg/datapath, netlink, cilium/ebpf or client-go (deps_test.go
// checks), so the CLI can decode flows without the agent's kernel code. The agent converts
// the classifier's events into Records (pkg/agent/flows.go).
package flow
