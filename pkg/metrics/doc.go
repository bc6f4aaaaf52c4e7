// Package metrics exports the meshcrypt agent's Prometheus metrics and serves them, with the
// agent's health and readiness, over HTTP.
//
// It owns a private prometheus.Registry (no global state, so several agents can run in one
// test binary) and two kinds of metrics:
//
//   - read at scrape time from a Source the agent implements: WireGuard peers (state, last
//     handshake age, bytes), the classifier's per-reason counters (policy verdicts, drop
//     reasons, strict drops as reason drop_not_encrypted), the private key's age, and, through
//     an optional XFRMSource, the kernel's XFRM error counters (/proc/net/xfrm_stat);
//   - recorded by the agent as things happen, through Recorder's methods: reconcile
//     durations, key rotations, the applied encryption mode, WireGuard configuration calls and
//     peers written, netlink route and rule writes.
//
// Every name starts with meshcrypt_ (plus the Go runtime's go_* and process_*). Server serves /metrics, /healthz
// (the process is up) and /readyz (the readiness function the agent passes).
//
// The package is a leaf: it imports neither the agent nor the datapath, netlink, wgctrl,
// cilium/ebpf or client-go. The agent adapts its state to the small Source interface.
package metrics
