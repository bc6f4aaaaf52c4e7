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

// ipcacheEntries computes the ipcache of node self: every pod address to its identity (local
// pods flagged local; remote pods flagged remote, and tunnel-ready when their node's peer is
// configured), every node's underlay address to host (this node) or remote-node, and every
// remote pod CIDR to world with the remote and tunnel-ready flags, so that traffic to a pod
// not yet known is still recognised as cross-node. Host routes win over CIDRs in the LPM trie.
//
// assigned are the pod CIDRs Kubernetes assigned to each node: a node with no (usable)
// MeshNode still has its pods recognised as remote, so strict mode and Required policies drop
// traffic to them instead of letting it out in clear.
func ipcacheEntries(self string, pods []podEntry, nodes []v1alpha1.MeshNode, tunnelReady map[string]bool, assigned map[string][]netip.Prefix) map[netip.Prefix]datapath.IPCacheEntry {
	out := make(map[netip.Prefix]datapath.IPCacheEntry, 2*len(nodes)+len(pods))
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
	return out
}
