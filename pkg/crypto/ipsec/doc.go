// Package ipsec owns meshcrypt's IPsec data plane on one node: the keyring,
// per-node-pair key derivation, and the XFRM states and policies that
// encrypt pod traffic between nodes with tunnel-mode ESP.
//
// The package is a pure core and a thin kernel edge, like
// pkg/crypto/wireguard:
//
//   - [ParseKeyring] reads the Secret meshcrypt-ipsec-keys (one line per
//     key, `SPI ALGORITHM KEY...`; see its documentation for the syntax).
//   - [DeriveKey] derives, with HKDF-SHA256, one key per [SA] (node pair,
//     direction and pod address family) from a keyring key, both node IDs,
//     both boot IDs and both underlay addresses; no keyring key is ever
//     used on the wire.
//   - [SA.SPI] lays out the 32-bit SPI: keyring SPI (4 bits), source node
//     ID (16 bits), pod family (1 bit), low 11 bits of the destination node
//     ID: unique per (key, sender, family) at every receiver.
//   - [Plan] computes the [Desired] states and policies as values, without
//     I/O.
//   - [XFRM.Apply], the kernel edge, reconciles the kernel with a Desired
//     through a netlink handle bound to the node's namespace, in an order
//     that never lets matching traffic go in clear (see its documentation).
//     [Supported] detects a kernel without ESP ([ErrNotSupported]).
//   - [FIPSEnabled] and [CheckFIPS] implement the FIPS rule; [ReadXfrmStat]
//     and [XFRM.Status] feed the status output; [TunnelMTU] the MTU.
//
// # Data path
//
// Between the local node L and every remote node R, for every pair of pod
// CIDRs of one family F (IPv4 or IPv6 pods, over an IPv4 or IPv6
// underlay: tunnel mode mixes families freely):
//
//	out  L-pods -> R-pods  tmpl esp tunnel L->R  spi SA{L, R, F}.SPI(outbound key)
//	in   R-pods -> L-pods  tmpl esp tunnel R->L  (any SPI)
//	fwd  R-pods -> L-pods  tmpl esp tunnel R->L  (any SPI)
//
// and, for every pod family F the two nodes share and every keyring key K,
// an outbound state L->R with DeriveKey(K, SA{L, R, F}) and an inbound
// state R->L with DeriveKey(K, SA{R, L, F}), each selecting F's 0/0. (One
// state cannot carry both families: without the XFRM_STATE_AF_UNSPEC flag,
// which vishvananda/netlink cannot set, the kernel gives a state the
// selector family of its outer addresses, and IPv6 pods over an IPv4
// underlay are silently dropped. Hence one SA per family.) The in and fwd
// policies bind a decrypted packet's source pod CIDR to the node whose key
// decrypted it, and make the receiver drop plaintext claiming to come from
// remote pods (unless [PlanOptions.AcceptPlaintext]).
//
// Ownership: every state and policy carries the reqid [DefaultReqID] (or
// [XFRMOptions.ReqID]); Apply never changes or deletes anything else, and
// refuses ([ErrConflict]) to overwrite a foreign entry in its way.
//
// # Rotation without loss
//
// Inbound states exist for every keyring SPI, and outbound states too (the
// out policy's template pins the one in use, PlanOptions.OutboundSPI). So a
// rotation is: (1) add the new key to the keyring; every node installs its
// states (inbound ready); (2) once every node reports the new SPI, set
// OutboundSPI to it: Apply updates each out policy in place, creating and
// deleting no state, so no packet meets a missing or dying state; (3) after
// the grace period, remove the old key: its states go, after nothing
// points at them.
//
// # Using it (the agent)
//
// Once per node: h := netlink.NewHandleAt(nodeNS) (or netlink.NewHandle in
// the host namespace); refuse the IPsec mode with a clear condition when
// [Supported](h) wraps [ErrNotSupported]; under [FIPSEnabled], refuse
// WireGuard and keyrings failing [CheckFIPS]; x := [NewXFRM](h, opts).
// On every change of the keyring Secret, a MeshNode or the MeshConfig:
// [ParseKeyring], [Plan] with the local node, the remote nodes (node ID,
// boot ID, underlay from MeshNodes; pod CIDRs from the Kubernetes Nodes)
// and the outbound SPI of the rotation, then x.Apply. Publish the keyring
// SPIs installed (Keyring.SPIs, once Apply succeeded) in the MeshNode, and
// move OutboundSPI to the keyring's current SPI only when every MeshNode
// reports it. Give pod interfaces [TunnelMTU]. Turning IPsec off is
// x.Apply(ctx, Desired{}), after routes to remote pods stop (or strict mode
// drops them): a deleted policy no longer encrypts.
//
// # Sequence numbers
//
// States use 32-bit ESP sequence numbers (no ESN: vishvananda/netlink does
// not decode the ESN replay state, so [XFRM.Status] could not report it).
// An outbound state stops at [SeqLimit]; rotate keys before that.
//
// This package must not import client-go or anything under k8s.io, nor
// other meshcrypt packages: it deals in keys, prefixes and addresses only.
// The sub-package ipsectest holds an in-memory fake of the netlink handle
// that records every operation.
package ipsec
