package agent

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// localNode is what this node announces, derived from its Kubernetes Node.
type localNode struct {
	Underlay []netip.Addr   // at most one per family, IPv4 first
	PodCIDRs []netip.Prefix // canonical (masked)
}

// localFromNode derives the node's underlay addresses and pod CIDRs from its Kubernetes
// Node: InternalIP addresses (the first of each family) and spec.podCIDRs (or spec.podCIDR).
// An explicit underlay list overrides the Node's addresses.
func localFromNode(node *corev1.Node, underlayOverride []netip.Addr) (localNode, error) {
	var ln localNode
	addrs := underlayOverride
	if len(addrs) == 0 {
		for _, a := range node.Status.Addresses {
			if a.Type != corev1.NodeInternalIP {
				continue
			}
			ip, err := netip.ParseAddr(a.Address)
			if err != nil {
				return ln, fmt.Errorf("node %s: internal IP %q: %w", node.Name, a.Address, err)
			}
			addrs = append(addrs, ip)
		}
	}
	var have4, have6 bool
	for _, ip := range addrs {
		ip = ip.Unmap()
		switch {
		case ip.Is4() && !have4:
			have4 = true
			ln.Underlay = append(ln.Underlay, ip)
		case ip.Is6() && !have6:
			have6 = true
			ln.Underlay = append(ln.Underlay, ip)
		}
	}
	if len(ln.Underlay) == 0 {
		return ln, fmt.Errorf("node %s has no InternalIP address", node.Name)
	}
	slices.SortFunc(ln.Underlay, func(a, b netip.Addr) int { return cmp.Compare(a.BitLen(), b.BitLen()) })
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return ln, fmt.Errorf("node %s: pod CIDR %q: %w", node.Name, c, err)
		}
		ln.PodCIDRs = append(ln.PodCIDRs, p.Masked())
	}
	return ln, nil
}

// meshNodeSpec is the spec this node publishes.
func meshNodeSpec(ln localNode, pub wgtypes.Key, port int, bootID string) v1alpha1.MeshNodeSpec {
	spec := v1alpha1.MeshNodeSpec{
		WireGuard: &v1alpha1.WireGuardSpec{PublicKey: pub.String(), ListenPort: int32(port)},
		BootID:    bootID,
	}
	for _, ip := range ln.Underlay {
		spec.UnderlayIPs = append(spec.UnderlayIPs, v1alpha1.IP(ip.String()))
	}
	for _, p := range ln.PodCIDRs {
		spec.PodCIDRs = append(spec.PodCIDRs, v1alpha1.CIDR(p.String()))
	}
	return spec
}

// skip records a MeshNode the agent refused to configure and why.
type skip struct {
	Node   string
	Reason string
	// Pending is true when the node is simply not ready yet (no key published): not a fault.
	Pending bool
}

// peersFromMeshNodes validates every remote MeshNode and turns it into a WireGuard peer whose
// AllowedIPs are exactly its pod CIDRs. Nodes with invalid fields, pod CIDRs overlapping this
// node's or another node's, or a public key another node also claims are skipped with a
// reason, never configured. The result is sorted by node name.
//
// assigned holds each Kubernetes Node's spec.podCIDRs, which only the control plane writes: a
// MeshNode may announce exactly those, so a compromised node cannot claim another node's
// pods. A nil map skips the check. Remote clusters' nodes (named cluster/node, see
// clustermesh.go) have no Node here and skip it; a remote node overlapping a local one is
// refused, the local one kept.
func peersFromMeshNodes(self string, local localNode, nodes []v1alpha1.MeshNode, assigned map[string][]netip.Prefix) ([]wireguard.Peer, []skip) {
	var skips []skip
	type cand struct {
		peer  wireguard.Peer
		drop  bool
		cidrs []netip.Prefix
	}
	var cands []*cand
	for i := range nodes {
		mn := &nodes[i]
		if mn.Name == self {
			continue
		}
		p, reason, pending := peerFromMeshNode(mn, local)
		if reason == "" && assigned != nil && !isRemote(mn.Name) {
			reason = checkAssigned(p.AllowedIPs, assigned[mn.Name], assigned != nil && assigned[mn.Name] != nil)
		}
		if reason != "" {
			skips = append(skips, skip{Node: mn.Name, Reason: reason, Pending: pending})
			continue
		}
		cands = append(cands, &cand{peer: p, cidrs: p.AllowedIPs})
	}

	// A public key claimed by two nodes identifies neither: refuse both.
	byKey := map[wgtypes.Key][]*cand{}
	for _, c := range cands {
		byKey[c.peer.PublicKey] = append(byKey[c.peer.PublicKey], c)
	}
	for _, cs := range byKey {
		if len(cs) < 2 {
			continue
		}
		names := make([]string, len(cs))
		for i, c := range cs {
			names[i] = c.peer.Name
		}
		slices.Sort(names)
		for _, c := range cs {
			c.drop = true
			skips = append(skips, skip{Node: c.peer.Name, Reason: "public key also claimed by " + strings.Join(without(names, c.peer.Name), ", ")})
		}
	}

	// Overlapping pod CIDRs: a packet could be bound to either key. Refuse every node
	// involved. Sorting by start address makes this O(n log n): CIDRs either nest or are
	// disjoint, so each one need only be checked against the widest one still open.
	//
	// A remote cluster's node overlapping anything is refused, and only it: another cluster
	// cannot take this one's pods off the air. So this cluster's nodes are swept among
	// themselves, and then everything is swept for the remote nodes' sake.
	type owned struct {
		p netip.Prefix
		c *cand // nil: this node's own CIDR
	}
	remote := func(o owned) bool { return o.c != nil && isRemote(o.c.peer.Name) }
	name := func(o owned) string {
		if o.c == nil {
			return self + " (this node)"
		}
		return o.c.peer.Name
	}
	conflicts := map[*cand][]string{}
	sweep := func(all []owned, refuse func(owned) bool) {
		slices.SortFunc(all, func(a, b owned) int {
			if c := a.p.Addr().Compare(b.p.Addr()); c != 0 {
				return c
			}
			return cmp.Compare(a.p.Bits(), b.p.Bits())
		})
		var open *owned
		for i := range all {
			cur := &all[i]
			if open != nil && open.p.Overlaps(cur.p) && open.c != cur.c {
				if cur.c != nil && refuse(*cur) {
					conflicts[cur.c] = append(conflicts[cur.c], fmt.Sprintf("%s overlaps %s of %s", cur.p, open.p, name(*open)))
				}
				if open.c != nil && refuse(*open) {
					conflicts[open.c] = append(conflicts[open.c], fmt.Sprintf("%s overlaps %s of %s", open.p, cur.p, name(*cur)))
				}
			}
			if open == nil || !open.p.Contains(cur.p.Addr()) || lastAddr(cur.p).Compare(lastAddr(open.p)) > 0 {
				open = cur
			}
		}
	}
	var here, all []owned
	for _, p := range local.PodCIDRs {
		here = append(here, owned{p: p})
	}
	hasRemote := false
	for _, c := range cands {
		for _, p := range c.cidrs {
			o := owned{p: p, c: c}
			if remote(o) {
				hasRemote = true
			} else {
				here = append(here, o)
			}
			all = append(all, o)
		}
	}
	all = append(all, here...)
	sweep(here, func(owned) bool { return true })
	if hasRemote {
		sweep(all, remote)
	}
	for c, why := range conflicts {
		if c.drop {
			continue
		}
		c.drop = true
		slices.Sort(why)
		skips = append(skips, skip{Node: c.peer.Name, Reason: "pod CIDR conflict: " + strings.Join(slices.Compact(why), "; ")})
	}

	var peers []wireguard.Peer
	for _, c := range cands {
		if !c.drop {
			peers = append(peers, c.peer)
		}
	}
	slices.SortFunc(peers, func(a, b wireguard.Peer) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(skips, func(a, b skip) int { return strings.Compare(a.Node, b.Node) })
	return peers, skips
}

// peerFromMeshNode validates one remote MeshNode. A non-empty reason means it is skipped.
func peerFromMeshNode(mn *v1alpha1.MeshNode, local localNode) (p wireguard.Peer, reason string, pending bool) {
	p.Name = mn.Name
	wg := mn.Spec.WireGuard
	if wg == nil || wg.PublicKey == "" {
		return p, "no WireGuard key published yet", true
	}
	key, err := wgtypes.ParseKey(wg.PublicKey)
	if err != nil {
		return p, fmt.Sprintf("invalid public key: %v", err), false
	}
	if key == (wgtypes.Key{}) {
		return p, "invalid public key: all zero", false
	}
	p.PublicKey = key
	if wg.ListenPort < 1 || wg.ListenPort > 65535 {
		return p, fmt.Sprintf("invalid listen port %d", wg.ListenPort), false
	}
	var remote []netip.Addr
	for _, s := range mn.Spec.UnderlayIPs {
		ip, err := netip.ParseAddr(string(s))
		if err != nil {
			return p, fmt.Sprintf("invalid underlay IP %q", s), false
		}
		remote = append(remote, ip.Unmap())
	}
	ep, ok := pickEndpoint(local.Underlay, remote)
	if !ok {
		return p, "no underlay address in a family this node has", false
	}
	p.Endpoint = netip.AddrPortFrom(ep, uint16(wg.ListenPort))
	for _, s := range mn.Spec.PodCIDRs {
		pr, err := netip.ParsePrefix(string(s))
		if err != nil {
			return p, fmt.Sprintf("invalid pod CIDR %q", s), false
		}
		if pr != pr.Masked() {
			return p, fmt.Sprintf("pod CIDR %q has host bits set", s), false
		}
		p.AllowedIPs = append(p.AllowedIPs, pr)
	}
	return p, "", false
}

// checkAssigned says why announced pod CIDRs are refused: they must be exactly the ones the
// Kubernetes Node was assigned.
func checkAssigned(announced, assigned []netip.Prefix, nodeExists bool) string {
	if !nodeExists {
		return "no Kubernetes Node of that name assigns it pod CIDRs"
	}
	key := func(ps []netip.Prefix) string {
		ss := make([]string, len(ps))
		for i, p := range ps {
			ss[i] = p.Masked().String()
		}
		slices.Sort(ss)
		return strings.Join(ss, ",")
	}
	if key(announced) != key(assigned) {
		return fmt.Sprintf("announces pod CIDRs [%s] but its Node was assigned [%s]", key(announced), key(assigned))
	}
	return ""
}

// pickEndpoint chooses the remote underlay address in the family of this node's first
// underlay address (IPv4 when it has one), else in any family both have.
func pickEndpoint(local, remote []netip.Addr) (netip.Addr, bool) {
	for _, l := range local {
		for _, r := range remote {
			if l.Is4() == r.Is4() {
				return r, true
			}
		}
	}
	return netip.Addr{}, false
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(a)*8; i++ {
		a[i/8] |= 1 << (7 - i%8)
	}
	out, _ := netip.AddrFromSlice(a)
	return out
}

func without(names []string, drop string) []string {
	var out []string
	for _, n := range names {
		if n != drop {
			out = append(out, n)
		}
	}
	return out
}

// routePrefixes are the destinations to route through the tunnel: every peer's pod CIDRs.
func routePrefixes(peers []wireguard.Peer) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range peers {
		out = append(out, p.AllowedIPs...)
	}
	return out
}

// peerStatuses reports each configured peer of dev by node name, sorted.
func peerStatuses(dev *wgtypes.Device, nameByKey map[wgtypes.Key]string) []v1alpha1.PeerStatus {
	var out []v1alpha1.PeerStatus
	for _, p := range dev.Peers {
		name, ok := nameByKey[p.PublicKey]
		if !ok {
			continue
		}
		ps := v1alpha1.PeerStatus{
			Node:      name,
			PublicKey: p.PublicKey.String(),
		}
		if p.Endpoint != nil {
			ps.Endpoint = p.Endpoint.String()
		}
		if !p.LastHandshakeTime.IsZero() {
			t := metav1.NewTime(p.LastHandshakeTime.Truncate(1e9))
			ps.LastHandshakeTime = &t
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b v1alpha1.PeerStatus) int { return strings.Compare(a.Node, b.Node) })
	return out
}

// peerStatusesAfter is peerStatuses of the device as a successful Apply of applied left it,
// computed from cur, the device as read just before that Apply: every applied peer, with its
// endpoint (or the one the device had when it sets none) and the handshake the device had
// with its key (none for a key new to the device). publishStatus, right after a reconcile
// read every peer, so needs no second read.
func peerStatusesAfter(cur *wgtypes.Device, applied []wireguard.Peer) []v1alpha1.PeerStatus {
	had := make(map[wgtypes.Key]int, len(cur.Peers))
	for i := range cur.Peers {
		had[cur.Peers[i].PublicKey] = i
	}
	out := make([]v1alpha1.PeerStatus, 0, len(applied))
	for _, p := range applied {
		ps := v1alpha1.PeerStatus{Node: p.Name, PublicKey: p.PublicKey.String()}
		i, ok := had[p.PublicKey]
		switch {
		case p.Endpoint.IsValid():
			ps.Endpoint = net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.Endpoint.Addr().Unmap(), p.Endpoint.Port())).String()
		case ok && cur.Peers[i].Endpoint != nil:
			ps.Endpoint = cur.Peers[i].Endpoint.String()
		}
		if ok && !cur.Peers[i].LastHandshakeTime.IsZero() {
			t := metav1.NewTime(cur.Peers[i].LastHandshakeTime.Truncate(1e9))
			ps.LastHandshakeTime = &t
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b v1alpha1.PeerStatus) int { return strings.Compare(a.Node, b.Node) })
	return out
}
