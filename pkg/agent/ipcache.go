package agent

import (
	"net/netip"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// podEntry is a pod the ipcache maps: its addresses, node and identity.
type podEntry struct {
	Namespace, Name string
	Node            string
	IPs             []netip.Addr
	Identity        identity.Identity
}

// ipcacheInput is what the ipcache of node self is computed from.
type ipcacheInput struct {
	self string
	pods []podEntry
	// nodes are the MeshNodes of this cluster and of the remote ones.
	nodes []v1alpha1.MeshNode
	// tunnelReady are the nodes whose tunnel is ready.
	tunnelReady map[string]bool
	// assigned are the pod CIDRs Kubernetes assigned to each node.
	assigned map[string][]netip.Prefix
	// hostAddrs are this node's own addresses (datapath.HostAddrs): the underlay's and the CNI
	// gateways'.
	hostAddrs []netip.Addr
	// cidrs are the CIDR identities of the compiled policies (policy.Result.CIDRs).
	cidrs map[netip.Prefix]uint32
}

// ipcacheEntries computes the ipcache of node self: every pod address to its identity (local
// pods flagged local; remote pods flagged remote, and tunnel-ready when their node's peer is
// configured), every node's underlay address to host (this node) or remote-node, every other
// address of this node (CNI gateways: what a kubelet probe may come from) to host, and every
// remote pod CIDR to world with the remote and tunnel-ready flags, so that traffic to a pod
// not yet known is still recognised as cross-node. Host routes win over CIDRs in the LPM trie.
//
// assigned are the pod CIDRs Kubernetes assigned to each node: a node with no (usable)
// MeshNode still has its pods recognised as remote, so strict mode and Required policies drop
// traffic to them instead of letting it out in clear.
//
// The policies' CIDR identities come last (see withCIDRs).
func ipcacheEntries(in ipcacheInput) map[netip.Prefix]datapath.IPCacheEntry {
	self, pods, nodes, tunnelReady, assigned := in.self, in.pods, in.nodes, in.tunnelReady, in.assigned
	out := make(map[netip.Prefix]datapath.IPCacheEntry, 2*len(nodes)+len(pods)+len(in.hostAddrs)+len(in.cidrs))
	remote := func(node string) datapath.IPCacheFlags {
		f := datapath.IPCacheRemotePod
		if tunnelReady[node] {
			f |= datapath.IPCacheTunnelReady
		}
		return f
	}
	for i := range nodes {
		mn := &nodes[i]
		id := uint32(identity.RemoteNode)
		if mn.Name == self {
			id = uint32(identity.Host)
		}
		for _, s := range mn.Spec.UnderlayIPs {
			if ip, err := netip.ParseAddr(string(s)); err == nil {
				out[netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen())] = datapath.IPCacheEntry{Identity: id}
			}
		}
		if mn.Name == self {
			continue
		}
		for _, s := range mn.Spec.PodCIDRs {
			if p, err := netip.ParsePrefix(string(s)); err == nil && p == p.Masked() {
				out[p] = datapath.IPCacheEntry{Identity: uint32(identity.World), Flags: remote(mn.Name)}
			}
		}
	}
	for node, cidrs := range assigned {
		if node == self {
			continue
		}
		for _, p := range cidrs {
			if _, ok := out[p]; !ok {
				out[p] = datapath.IPCacheEntry{Identity: uint32(identity.World), Flags: remote(node)}
			}
		}
	}
	for _, ip := range in.hostAddrs {
		ip = ip.Unmap()
		out[netip.PrefixFrom(ip, ip.BitLen())] = datapath.IPCacheEntry{Identity: uint32(identity.Host)}
	}
	for _, p := range pods {
		f := datapath.IPCacheLocalPod
		if p.Node != self {
			f = remote(p.Node)
		}
		for _, ip := range p.IPs {
			ip = ip.Unmap()
			out[netip.PrefixFrom(ip, ip.BitLen())] = datapath.IPCacheEntry{Identity: uint32(p.Identity), Flags: f}
		}
	}
	withCIDRs(out, in.cidrs)
	return out
}

// mappedV4 is the IPv6 prefix under which the ipcache (an LPM trie over 16-byte keys) stores
// every IPv4 address.
var mappedV4 = netip.MustParsePrefix("::ffff:0.0.0.0/96")

// withCIDRs adds the policies' CIDR identities to the ipcache entries out:
//   - a prefix that is a pod's or a node's address keeps that identity: ipBlocks do not select
//     known endpoints;
//   - a prefix that is a remote pod CIDR's takes the CIDR identity and keeps the flags;
//   - any other prefix inherits the flags of the longest entry that contains it: a CIDR inside
//     a remote pod CIDR stays a remote pod destination (strict mode and Required policies keep
//     applying), one outside every pod CIDR has none.
//
// An IPv6 prefix that covers the IPv4-mapped range (::/0 up to ::ffff:0:0/96) would, in the
// trie, also cover every IPv4 address; a 0.0.0.0/0 world entry then keeps IPv4 addresses out
// of it, unless an IPv4 default is already there.
func withCIDRs(out map[netip.Prefix]datapath.IPCacheEntry, cidrs map[netip.Prefix]uint32) {
	if len(cidrs) == 0 {
		return
	}
	base := make(map[netip.Prefix]datapath.IPCacheFlags, len(out))
	for p, e := range out {
		if p.Bits() < p.Addr().BitLen() {
			base[p] = e.Flags // the prefixes a CIDR can lie strictly inside
		}
	}
	inherit := func(p netip.Prefix) datapath.IPCacheFlags {
		for bits := p.Bits() - 1; bits >= 0; bits-- {
			q, _ := p.Addr().Prefix(bits)
			if f, ok := base[q]; ok {
				return f
			}
		}
		return 0
	}
	for p, id := range cidrs {
		if e, ok := out[p]; ok {
			if e.Identity == uint32(identity.World) {
				out[p] = datapath.IPCacheEntry{Identity: id, Flags: e.Flags}
			}
			continue
		}
		out[p] = datapath.IPCacheEntry{Identity: id, Flags: inherit(p)}
	}
	for p := range cidrs {
		if p.Addr().Is6() && p.Bits() <= mappedV4.Bits() && p.Contains(mappedV4.Addr()) {
			v4 := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
			if _, ok := out[v4]; !ok {
				out[v4] = datapath.IPCacheEntry{Identity: uint32(identity.World)}
			}
			break
		}
	}
}
