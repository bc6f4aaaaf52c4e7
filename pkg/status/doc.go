// Package status computes what `meshcrypt status` reports from the cluster's MeshConfig and
// MeshNodes: per node, what its agent applied; per node pair, whether traffic between them is
// encrypted, judged from both sides' published state. It is pure: no I/O, no client-go.
package status
