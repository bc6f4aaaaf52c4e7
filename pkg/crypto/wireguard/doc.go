// Package wireguard owns meshcrypt's WireGuard data plane on one node: the
// node's private key file, the WireGuard network device (kernel WireGuard
// through netlink when the kernel has it, otherwise an embedded userspace
// wireguard-go device running in its own long-lived process), and the
// incremental reconciliation of the device's peers through wgctrl.
//
// The package is split into a pure core and a thin kernel edge:
//
//   - [Plan] and [Diff] compute, as values and without I/O, the minimal
//     [wgtypes.Config] that turns the device's current state into the desired
//     [Config]: only changed peers are configured, removed peers carry
//     Remove, and ReplacePeers is never set, so a change to one node touches
//     only that node's peer.
//   - [TunnelMTU] derives the tunnel MTU from the underlay MTU.
//   - [LoadOrCreateKey] manages the private key file.
//   - [Ensure] creates or adopts the device and returns a [Device], a small
//     declarative seam whose Apply is idempotent. [RunDevice] is the body of
//     the userspace device process.
//
// Lifecycle rule: nothing in this package tears down the device or its peers
// when the agent stops. [Device.Close] only releases handles; an agent
// restart re-adopts the running device (kernel link or userspace process),
// so traffic is not interrupted. Only [Device.Delete] removes the link. If
// the device dies (its process crashed, its link was deleted), Device
// methods fail with [ErrDeviceGone]; calling [Ensure] again recreates it.
// Deleting the UAPI socket file stops a userspace device (wireguard-go
// watches it), so /var/run/wireguard must persist across agent restarts.
//
// Network namespaces: a userspace device's TUN interface and UDP sockets live
// in the network namespace of the process that runs [RunDevice], so that
// process must be started inside the node's namespace ([EnsureOptions.NetNS]
// or by running the agent inside it). UAPI sockets are file system paths
// (/var/run/wireguard/<name>.sock), not per namespace: two devices on one
// host need different interface names.
//
// This package must not import client-go or anything under k8s.io, nor other
// meshcrypt packages but internal/netnsutil (the shared netns runner): it deals in
// keys, prefixes and addresses only. The
// sub-package wgtest holds an in-memory model of a WireGuard device and a
// fake [Device] for tests of callers.
package wireguard
