// Package status computes what `meshcrypt status` reports from the cluster's MeshConfig, its
// MeshNodes and its Kubernetes node names: per node, what its agent applied; per node pair,
// whether traffic between them is encrypted, judged from both sides' published state; and the
// verdict, compliant or not, that the CLI's exit code follows. It is pure: no I/O, no
// client-go (a test checks the imports).
package status
