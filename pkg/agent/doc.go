// Package agent is the node agent's reconcile loop: it reads the cluster's MeshConfig, the
// node's Kubernetes Node and every MeshNode through informers, publishes this node's MeshNode,
// and drives the WireGuard device (pkg/crypto/wireguard) and the tunnel routes (pkg/datapath)
// to the desired state.
//
// The translation from Kubernetes objects to desired state lives in pure functions
// (translate.go); the kernel is reached only through pkg/crypto/wireguard and pkg/datapath.
package agent
