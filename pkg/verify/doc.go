// Package verify is the pure core of `meshcrypt verify`, the active proof of encryption:
// the probe and echo messages the agents exchange between health endpoints, the inspection
// of the packets a node sends on its underlay (does a packet to the peer carry the marker,
// is it ESP or WireGuard), and the verdict for a pair of nodes.
//
// It imports nothing that touches the kernel or the API server: the agent
// (pkg/agent/verify.go) opens the sockets and captures (pkg/datapath), this package judges.
package verify
