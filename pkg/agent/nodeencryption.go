package agent

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

// hostRouting is node encryption's part of the WireGuard state: the peers with the underlay
// addresses they may send from added to their AllowedIPs, and the underlay addresses routed
// into the tunnel with this node's own address as source.
type hostRouting struct {
	peers   []wireguard.Peer
	routes  []netip.Prefix
	sources map[netip.Prefix]netip.Addr
}

// withNodeAddresses adds node encryption to peers (this cluster's nodes only; remote
// clusters' nodes, named cluster/node, are left as they are). The rules, which let either
// side turn it on or off without dropping a packet:
//   - a peer's underlay addresses are accepted through the tunnel when this node encrypts host
//     traffic (on) or the peer announces it does (MeshNode spec.nodeEncryption): whoever
//     routes into the tunnel finds the other side accepting;
//   - they are routed into the tunnel when this node is on and the peer announces it: the
//     peer accepts them, since it announces only what it has applied.
//
// An underlay address is never added when it is this node's own, lies in a pod CIDR of this
// node or of any peer, or is announced by two nodes: it would identify neither. peers is not
// modified.
func withNodeAddresses(peers []wireguard.Peer, nodes []v1alpha1.MeshNode, local localNode, on bool) hostRouting {
	out := hostRouting{peers: peers}
	if !on && !slices.ContainsFunc(nodes, func(mn v1alpha1.MeshNode) bool { return mn.Spec.NodeEncryption }) {
		return out // nothing to accept or route: the common case, kept free of per-node work
	}
	byName := make(map[string]*v1alpha1.MeshNode, len(nodes))
	claims := make(map[netip.Addr]int, len(nodes))
	for i := range nodes {
		mn := &nodes[i]
		byName[mn.Name] = mn
		for _, s := range mn.Spec.UnderlayIPs {
			if ip, err := netip.ParseAddr(string(s)); err == nil {
				claims[ip.Unmap()]++
			}
		}
	}
	// The pod CIDRs by prefix length: an address lies in one when its prefix of that length is
	// one, a lookup per length in use rather than a scan of every peer's CIDRs per address.
	pods := map[int]map[netip.Prefix]bool{}
	addPods := func(ps []netip.Prefix) {
		for _, p := range ps {
			if pods[p.Bits()] == nil {
				pods[p.Bits()] = map[netip.Prefix]bool{}
			}
			pods[p.Bits()][p.Masked()] = true
		}
	}
	addPods(local.PodCIDRs)
	for _, p := range peers {
		addPods(p.AllowedIPs)
	}
	usable := func(ip netip.Addr) bool {
		if claims[ip] != 1 || slices.Contains(local.Underlay, ip) {
			return false
		}
		for bits, set := range pods {
			if bits <= ip.BitLen() {
				if pfx, err := ip.Prefix(bits); err == nil && set[pfx] {
					return false
				}
			}
		}
		return true
	}
	source := func(ip netip.Addr) (netip.Addr, bool) {
		for _, l := range local.Underlay {
			if l.Is4() == ip.Is4() {
				return l, true
			}
		}
		return netip.Addr{}, false
	}
	changed := false
	result := make([]wireguard.Peer, len(peers))
	copy(result, peers)
	for i := range result {
		p := &result[i]
		mn, ok := byName[p.Name]
		if !ok || isRemote(p.Name) || (!on && !mn.Spec.NodeEncryption) {
			continue
		}
		var hosts []netip.Prefix
		for _, s := range mn.Spec.UnderlayIPs {
			ip, err := netip.ParseAddr(string(s))
			if ip = ip.Unmap(); err != nil || !usable(ip) {
				continue
			}
			host := netip.PrefixFrom(ip, ip.BitLen())
			hosts = append(hosts, host)
			if src, ok := source(ip); ok && on && mn.Spec.NodeEncryption {
				out.routes = append(out.routes, host)
				if out.sources == nil {
					out.sources = map[netip.Prefix]netip.Addr{}
				}
				out.sources[host] = src
			}
		}
		if len(hosts) > 0 {
			p.AllowedIPs = append(slices.Clip(p.AllowedIPs), hosts...)
			changed = true
		}
	}
	if changed {
		out.peers = result
	}
	return out
}

// nodeEncryption decides whether this node encrypts host traffic now, and withdraws the
// announcement (MeshNode spec.nodeEncryption) at once when it stops: the other nodes then
// route this node's addresses to the underlay again, while this node still accepts what
// they send through the tunnel until they do. The announcement goes up only once applied
// (reconcile). On the first call it takes over what an earlier run announced.
func (a *Agent) nodeEncryption(enc v1alpha1.EncryptionSpec, node *corev1.Node, nodes []v1alpha1.MeshNode) bool {
	if !a.host.known {
		a.host.known = true
		for i := range nodes {
			if nodes[i].Name == a.opts.NodeName {
				a.host.announced = nodes[i].Spec.NodeEncryption
			}
		}
	}
	on, err := enc.NodeEncryptionFor(node.Labels)
	if on && a.fipsMode() {
		on = false // WireGuard is refused in FIPS mode: no tunnel for host traffic either
	}
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != a.host.optOutErr {
		a.host.optOutErr = msg
		if msg != "" {
			a.log.Warn("node encryption not applied: invalid opt-out selector; host traffic stays as it is", "err", msg)
			a.recorder.Eventf(a.meshNodeRef(), corev1.EventTypeWarning, "NodeEncryptionOptOutInvalid",
				"node %s does not encrypt host traffic: %s", a.opts.NodeName, msg)
		}
	}
	if !on && a.host.announced {
		a.host.announced = false
		a.log.Info("node encryption off: withdrawing the announcement")
	}
	return on
}
