// Package identity owns meshcrypt's security identities: the numbers the datapath compares
// instead of labels, and the canonical label sets they stand for.
//
//   - [Identity] is a 32-bit number, clusterID<<16 | local. Locals below 256 are reserved
//     ([Host], [World], ...); [MinLocal]..[MaxLocal] are allocated to label sets.
//   - [Canonical] turns a pod's labels, namespace, service account and cluster name into
//     [Labels]: churn labels dropped (see [ChurnLabels]), the meshcrypt.io/ keys added, every
//     key and value checked. [Labels.Key] is an injective string form; [Labels.Hash] hashes it.
//   - [Preferred] and [Probe] map a label set to its deterministic first choice and its probe
//     sequence (double hashing over the local range, visiting every local exactly once).
//   - [Allocator] walks the probe sequence against a [Store] whose Create is an atomic
//     create-if-absent. Every agent walking the same sequence stops at the same number, so
//     agents agree without talking to each other; a cache fed by [Allocator.Sync] and by
//     watch events ([Allocator.Observe], [Allocator.Forget]) answers the common case with no
//     API call, and with [AllocatorOptions.Watched] a new set costs a single Create.
//
// This package is pure: it must not import client-go or anything under k8s.io or sigs.k8s.io,
// nor netlink, wgctrl or cilium/ebpf (deps_test.go checks). The Store over the MeshIdentity
// CRD and the garbage collector live in the sub-package kube; identitytest holds an in-memory
// Store for tests.
package identity
