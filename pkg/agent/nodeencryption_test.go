package agent

import (
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
)

func TestWithNodeAddresses(t *testing.T) {
	a, p := netip.MustParseAddr, netip.MustParsePrefix
	mn := func(name string, announced bool, ips ...string) v1alpha1.MeshNode {
		m := v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}}
		for _, ip := range ips {
			m.Spec.UnderlayIPs = append(m.Spec.UnderlayIPs, v1alpha1.IP(ip))
		}
		m.Spec.NodeEncryption = announced
		return m
	}
	local := localNode{Underlay: []netip.Addr{a("10.77.0.1"), a("fd77::1")}, PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}}
	peer := func(name string, cidrs ...string) wireguard.Peer {
		wp := wireguard.Peer{Name: name}
		for _, c := range cidrs {
			wp.AllowedIPs = append(wp.AllowedIPs, p(c))
		}
		return wp
	}
	peers := []wireguard.Peer{
		peer("n2", "10.244.2.0/24"),
		peer("n3", "10.244.3.0/24", "fd44:0:0:3::/64"),
		peer("b/n9", "10.245.9.0/24"),
	}
	type view struct {
		Allowed map[string][]netip.Prefix
		Routes  []netip.Prefix
		Sources map[netip.Prefix]netip.Addr
	}
	viewOf := func(h hostRouting) view {
		v := view{Allowed: map[string][]netip.Prefix{}, Routes: h.routes, Sources: h.sources}
		for _, wp := range h.peers {
			v.Allowed[wp.Name] = wp.AllowedIPs
		}
		return v
	}
	pods := map[string][]netip.Prefix{"n2": {p("10.244.2.0/24")}, "n3": {p("10.244.3.0/24"), p("fd44:0:0:3::/64")}, "b/n9": {p("10.245.9.0/24")}}
	with := func(extra map[string][]netip.Prefix) map[string][]netip.Prefix {
		out := map[string][]netip.Prefix{}
		for k, v := range pods {
			out[k] = append(append([]netip.Prefix{}, v...), extra[k]...)
		}
		return out
	}
	tests := []struct {
		name  string
		nodes []v1alpha1.MeshNode
		on    bool
		want  view
	}{
		{"off, nobody announces: pod CIDRs only",
			[]v1alpha1.MeshNode{mn("n2", false, "10.77.0.2"), mn("n3", false, "10.77.0.3")}, false,
			view{Allowed: pods}},
		{"on, nobody announces yet: accept, do not route",
			[]v1alpha1.MeshNode{mn("n2", false, "10.77.0.2", "fd77::2"), mn("n3", false, "10.77.0.3")}, true,
			view{Allowed: with(map[string][]netip.Prefix{"n2": {p("10.77.0.2/32"), p("fd77::2/128")}, "n3": {p("10.77.0.3/32")}})}},
		{"on, n2 announces: route n2 with this node's address of the family as source",
			[]v1alpha1.MeshNode{mn("n2", true, "10.77.0.2", "fd77::2"), mn("n3", false, "10.77.0.3")}, true,
			view{
				Allowed: with(map[string][]netip.Prefix{"n2": {p("10.77.0.2/32"), p("fd77::2/128")}, "n3": {p("10.77.0.3/32")}}),
				Routes:  []netip.Prefix{p("10.77.0.2/32"), p("fd77::2/128")},
				Sources: map[netip.Prefix]netip.Addr{p("10.77.0.2/32"): a("10.77.0.1"), p("fd77::2/128"): a("fd77::1")},
			}},
		{"off, n2 still announces: keep accepting what it sends, route nothing",
			[]v1alpha1.MeshNode{mn("n2", true, "10.77.0.2"), mn("n3", false, "10.77.0.3")}, false,
			view{Allowed: with(map[string][]netip.Prefix{"n2": {p("10.77.0.2/32")}})}},
		{"an address two nodes announce identifies neither",
			[]v1alpha1.MeshNode{mn("n2", true, "10.77.0.2"), mn("n3", true, "10.77.0.2"), mn("n4", false, "10.77.0.2")}, true,
			view{Allowed: pods}},
		{"this node's own address or one inside a pod CIDR is never a peer's",
			[]v1alpha1.MeshNode{mn("n2", true, "10.77.0.1"), mn("n3", true, "10.244.1.7")}, true,
			view{Allowed: pods}},
		{"an IPv6 address inside a peer's IPv6 pod CIDR is refused too",
			[]v1alpha1.MeshNode{mn("n2", true, "10.77.0.2", "fd44:0:0:3::9")}, true,
			view{
				Allowed: with(map[string][]netip.Prefix{"n2": {p("10.77.0.2/32")}}),
				Routes:  []netip.Prefix{p("10.77.0.2/32")},
				Sources: map[netip.Prefix]netip.Addr{p("10.77.0.2/32"): a("10.77.0.1")},
			}},
		{"remote clusters' nodes are left alone",
			[]v1alpha1.MeshNode{mn("b/n9", true, "10.78.0.9")}, true,
			view{Allowed: pods}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := viewOf(hostRouting{peers: peers})
			got := viewOf(withNodeAddresses(peers, tt.nodes, local, tt.on))
			if d := cmp.Diff(tt.want, got, cmpNetip); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
			if d := cmp.Diff(before, viewOf(hostRouting{peers: peers}), cmpNetip); d != "" {
				t.Errorf("the input peers changed (-before +after):\n%s", d)
			}
		})
	}
}
