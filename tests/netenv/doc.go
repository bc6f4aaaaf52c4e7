// Package netenv builds test clusters out of Linux network namespaces: Kubernetes
// "nodes" joined by an underlay switch and "pods" attached to their node with
// routed veth pairs, wired like a host-gateway CNI (flannel host-gw, Calico
// without overlay).
//
// The topology is:
//
//   - a switch namespace "<prefix>-sw" holding the bridge br0 (the underlay);
//   - a namespace "<prefix>-<node>" per node, whose eth0 is a veth with its peer
//     plugged into br0; the node forwards IPv4 and IPv6, rp_filter is off, and it
//     routes every other node's pod CIDRs via that node's underlay address;
//   - a namespace "<prefix>-<node>-<pod>" per pod, whose eth0 is a veth with its
//     peer "lxc…" in the node namespace. The pod has a /32 and a /128 from its
//     node's pod CIDRs and default routes via 169.254.1.1 and fe80::1, both of
//     which live on the host-side veth; the node routes the pod's addresses to
//     that veth.
//
// Every namespace is a named namespace under /run/netns, so `ip netns exec` works
// on it, and every link is created directly inside its target namespace: nothing
// is ever created in the caller's namespace, and parallel runs (each with its own
// prefix) never collide. The calling thread's namespace is never changed except
// on a goroutine locked to its OS thread (see [NS.Do]); a thread that cannot be
// restored is discarded.
//
// The package also owns the tools the end-to-end tests measure with: sockets
// opened inside a namespace ([NS.ListenTCP], [NS.DialUDP], ...), a DF ping
// ([NS.Ping]), a TCP forwarder from a namespace to the caller's namespace
// ([NS.ForwardTCP], how agents reach the API server), and an AF_PACKET capture
// ([StartCapture], [Topology.CaptureUnderlay]) that counts marker strings on the
// wire.
//
// Owners are recorded in /run/meshcrypt-netenv/<prefix>.pid; [CleanupStale]
// removes the namespaces of owners that died without [Topology.Close].
//
// The core API takes a context and returns errors, so plain programs (make demo)
// use it as well as tests; [NewT] is the testing wrapper.
//
// netenv is test infrastructure: it must not import any meshcrypt package under
// pkg/ or cmd/, so that the harness never depends on the code it tests.
package netenv
