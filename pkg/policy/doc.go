// Package policy compiles MeshPolicy objects into identity-pair allow entries and per-identity
// default-deny flags: the content of the classifier's policy and enforce maps
// (docs/datapath.md). Decide evaluates those entries the way the classifier does, so the CLI
// can explain a verdict.
//
// It is pure: it imports the API types and apimachinery's label selectors, never client-go,
// netlink, wgctrl or ebpf.
package policy
