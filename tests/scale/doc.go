// Package scale benchmarks meshcrypt's control plane at scale against the harness's real
// kube-apiserver and etcd: one real node with a real agent and WireGuard device (userspace on
// hosts without kernel WireGuard), and N simulated nodes that exist only as API objects (a
// Kubernetes Node with its pod CIDR and a MeshNode with a random WireGuard key), which the
// agent must configure as peers.
//
// BenchmarkControlPlaneScale measures, per N: the time from the first object created to every
// peer on the device, the time from an agent start on an empty device to every peer on it,
// the latency of one node's key change and of one node's endpoint change to the device, the
// WireGuard configuration calls, peers written, nodes updated and netlink route writes each
// change costs
// (read from the agent's /metrics), and the agent's memory and CPU. It writes
// bench/scale.json and bench/scale-convergence.svg. It runs only with -bench and -benchtime 1x
// (make bench), never in make test; MESHCRYPT_SCALE_N chooses the sizes (default
// 100,1000,5000), and MESHCRYPT_SCALE_REPLOT=1 only redraws the plot from bench/scale.json.
// See docs/performance.md.
//
// Simulated nodes use addresses nothing routes: underlay addresses from 198.18.0.0/15 (RFC
// 2544's benchmarking range) and pod CIDRs from 10.128.0.0/10, outside the harness's
// 10.244.0.0/16.
package scale
