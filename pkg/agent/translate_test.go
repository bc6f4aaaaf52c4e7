package agent

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard/wgtest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

var cmpNetip = cmp.Options{
	cmpopts.EquateComparable(netip.Prefix{}, netip.Addr{}, netip.AddrPort{}),
	cmpopts.EquateEmpty(),
}

func TestLocalFromNode(t *testing.T) {
	mk := func(cidrs []string, single string, addrs ...corev1.NodeAddress) *corev1.Node {
		return &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "n1"},
			Spec:       corev1.NodeSpec{PodCIDRs: cidrs, PodCIDR: single},
			Status:     corev1.NodeStatus{Addresses: addrs},
		}
	}
	in := func(ip string) corev1.NodeAddress {
		return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip}
	}
	ext := func(ip string) corev1.NodeAddress {
		return corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: ip}
	}
	a, p := netip.MustParseAddr, netip.MustParsePrefix
	tests := []struct {
		name     string
		node     *corev1.Node
		override []netip.Addr
		want     localNode
		wantErr  string
	}{
		{"dual stack, IPv4 first", mk([]string{"fd44:0:0:1::/64", "10.244.1.0/24"}, "", in("fd77::11"), in("10.77.0.11"), in("10.77.0.99")),
			nil, localNode{Underlay: []netip.Addr{a("10.77.0.11"), a("fd77::11")}, PodCIDRs: []netip.Prefix{p("fd44:0:0:1::/64"), p("10.244.1.0/24")}}, ""},
		{"legacy podCIDR field", mk(nil, "10.244.9.0/24", in("10.77.0.19")),
			nil, localNode{Underlay: []netip.Addr{a("10.77.0.19")}, PodCIDRs: []netip.Prefix{p("10.244.9.0/24")}}, ""},
		{"host bits are masked", mk([]string{"10.244.1.7/24"}, "", in("10.77.0.11")),
			nil, localNode{Underlay: []netip.Addr{a("10.77.0.11")}, PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}}, ""},
		{"external IPs are not underlay", mk(nil, "", ext("1.2.3.4")), nil, localNode{}, "no InternalIP"},
		{"override wins", mk(nil, "", in("10.77.0.11")), []netip.Addr{a("192.0.2.1")},
			localNode{Underlay: []netip.Addr{a("192.0.2.1")}}, ""},
		{"bad CIDR", mk([]string{"10.244.1.0/33"}, "", in("10.77.0.11")), nil, localNode{}, "pod CIDR"},
		{"bad IP", mk(nil, "", in("10.77.0.300")), nil, localNode{}, "internal IP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := localFromNode(tt.node, tt.override)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got, cmpNetip); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

func key(t testing.TB, seed byte) wgtypes.Key {
	t.Helper()
	var k wgtypes.Key
	for i := range k {
		k[i] = seed + byte(i)
	}
	return k
}

func meshNode(name string, pub wgtypes.Key, port int32, underlay []string, cidrs ...string) v1alpha1.MeshNode {
	mn := v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}}
	for _, u := range underlay {
		mn.Spec.UnderlayIPs = append(mn.Spec.UnderlayIPs, v1alpha1.IP(u))
	}
	for _, c := range cidrs {
		mn.Spec.PodCIDRs = append(mn.Spec.PodCIDRs, v1alpha1.CIDR(c))
	}
	if pub != (wgtypes.Key{}) {
		mn.Spec.WireGuard = &v1alpha1.WireGuardSpec{PublicKey: pub.String(), ListenPort: port}
	}
	return mn
}

func TestPeersFromMeshNodes(t *testing.T) {
	a, p := netip.MustParseAddr, netip.MustParsePrefix
	local := localNode{Underlay: []netip.Addr{a("10.77.0.11"), a("fd77::11")}, PodCIDRs: []netip.Prefix{p("10.244.1.0/24"), p("fd44:0:0:1::/64")}}
	k2, k3, k4, k5 := key(t, 2), key(t, 3), key(t, 4), key(t, 5)
	u := func(ips ...string) []string { return ips }
	tests := []struct {
		name      string
		nodes     []v1alpha1.MeshNode
		wantPeers []wireguard.Peer
		wantSkips []skip
	}{
		{
			name: "self is not a peer; dual stack peer gets both CIDRs and an IPv4 endpoint",
			nodes: []v1alpha1.MeshNode{
				meshNode("n1", key(t, 1), 51871, u("10.77.0.11"), "10.244.1.0/24"),
				meshNode("n2", k2, 51871, u("fd77::12", "10.77.0.12"), "10.244.2.0/24", "fd44:0:0:2::/64"),
			},
			wantPeers: []wireguard.Peer{{Name: "n2", PublicKey: k2, Endpoint: netip.MustParseAddrPort("10.77.0.12:51871"),
				AllowedIPs: []netip.Prefix{p("10.244.2.0/24"), p("fd44:0:0:2::/64")}}},
		},
		{
			name: "IPv6-only remote underlay is reached over IPv6",
			nodes: []v1alpha1.MeshNode{
				meshNode("n2", k2, 4000, u("fd77::12"), "10.244.2.0/24"),
			},
			wantPeers: []wireguard.Peer{{Name: "n2", PublicKey: k2, Endpoint: netip.MustParseAddrPort("[fd77::12]:4000"),
				AllowedIPs: []netip.Prefix{p("10.244.2.0/24")}}},
		},
		{
			name: "not yet published is pending, not a fault",
			nodes: []v1alpha1.MeshNode{
				meshNode("n2", wgtypes.Key{}, 0, u("10.77.0.12"), "10.244.2.0/24"),
			},
			wantSkips: []skip{{Node: "n2", Reason: "no WireGuard key published yet", Pending: true}},
		},
		{
			name: "malformed fields are refused, good nodes still configured",
			nodes: []v1alpha1.MeshNode{
				func() v1alpha1.MeshNode {
					mn := meshNode("bad-key", k2, 1, u("10.77.0.12"), "10.244.2.0/24")
					mn.Spec.WireGuard.PublicKey = "not-a-key"
					return mn
				}(),
				meshNode("bad-cidr", k3, 1, u("10.77.0.13"), "10.244.3.1/24"),
				meshNode("bad-ip", k4, 1, u("10.77.0.400"), "10.244.4.0/24"),
				meshNode("bad-port", k5, 70000, u("10.77.0.15"), "10.244.5.0/24"),
				meshNode("good", key(t, 6), 1, u("10.77.0.16"), "10.244.6.0/24"),
			},
			wantPeers: []wireguard.Peer{{Name: "good", PublicKey: key(t, 6), Endpoint: netip.MustParseAddrPort("10.77.0.16:1"),
				AllowedIPs: []netip.Prefix{p("10.244.6.0/24")}}},
			wantSkips: []skip{
				{Node: "bad-cidr", Reason: `pod CIDR "10.244.3.1/24" has host bits set`},
				{Node: "bad-ip", Reason: `invalid underlay IP "10.77.0.400"`},
				{Node: "bad-key", Reason: "invalid public key: wgtypes: failed to parse base64-encoded key: illegal base64 data at input byte 3"},
				{Node: "bad-port", Reason: "invalid listen port 70000"},
			},
		},
		{
			name: "a duplicate public key refuses both claimants",
			nodes: []v1alpha1.MeshNode{
				meshNode("n2", k2, 1, u("10.77.0.12"), "10.244.2.0/24"),
				meshNode("n3", k2, 1, u("10.77.0.13"), "10.244.3.0/24"),
			},
			wantSkips: []skip{
				{Node: "n2", Reason: "public key also claimed by n3"},
				{Node: "n3", Reason: "public key also claimed by n2"},
			},
		},
		{
			name: "a pod CIDR overlapping this node's is refused",
			nodes: []v1alpha1.MeshNode{
				meshNode("n2", k2, 1, u("10.77.0.12"), "10.244.0.0/16"),
			},
			wantSkips: []skip{{Node: "n2", Reason: "pod CIDR conflict: 10.244.0.0/16 overlaps 10.244.1.0/24 of n1 (this node)"}},
		},
		{
			name: "a remote cluster's node overlapping this cluster's nodes is refused alone",
			nodes: []v1alpha1.MeshNode{
				meshNode("n2", k2, 1, u("10.77.0.12"), "10.244.2.0/24"),
				meshNode("b/n9", k3, 1, u("10.77.0.19"), "10.244.2.0/23"),
				meshNode("b/n8", k4, 1, u("10.77.0.18"), "10.245.8.0/24"),
			},
			wantPeers: []wireguard.Peer{
				{Name: "b/n8", PublicKey: k4, Endpoint: netip.MustParseAddrPort("10.77.0.18:1"), AllowedIPs: []netip.Prefix{p("10.245.8.0/24")}},
				{Name: "n2", PublicKey: k2, Endpoint: netip.MustParseAddrPort("10.77.0.12:1"), AllowedIPs: []netip.Prefix{p("10.244.2.0/24")}},
			},
			wantSkips: []skip{{Node: "b/n9", Reason: "pod CIDR conflict: 10.244.2.0/23 overlaps 10.244.2.0/24 of n2"}},
		},
		{
			name: "nested and overlapping remote CIDRs refuse every node involved",
			nodes: []v1alpha1.MeshNode{
				meshNode("wide", k2, 1, u("10.77.0.12"), "10.0.0.0/8"),
				meshNode("a", k3, 1, u("10.77.0.13"), "10.1.0.0/16"),
				meshNode("b", k4, 1, u("10.77.0.14"), "10.2.0.0/16"),
				meshNode("ok", k5, 1, u("10.77.0.15"), "10.245.0.0/16"),
			},
			wantPeers: nil,
			wantSkips: []skip{
				{Node: "a", Reason: "pod CIDR conflict: 10.1.0.0/16 overlaps 10.0.0.0/8 of wide"},
				{Node: "b", Reason: "pod CIDR conflict: 10.2.0.0/16 overlaps 10.0.0.0/8 of wide"},
				{Node: "ok", Reason: "pod CIDR conflict: 10.245.0.0/16 overlaps 10.0.0.0/8 of wide"},
				{Node: "wide", Reason: "pod CIDR conflict: 10.0.0.0/8 overlaps 10.1.0.0/16 of a; 10.0.0.0/8 overlaps 10.2.0.0/16 of b; 10.0.0.0/8 overlaps 10.244.1.0/24 of n1 (this node); 10.0.0.0/8 overlaps 10.245.0.0/16 of ok"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			peers, skips := peersFromMeshNodes("n1", local, tt.nodes, nil)
			if d := cmp.Diff(tt.wantPeers, peers, cmpNetip); d != "" {
				t.Errorf("peers (-want +got):\n%s", d)
			}
			if d := cmp.Diff(tt.wantSkips, skips, cmpNetip); d != "" {
				t.Errorf("skips (-want +got):\n%s", d)
			}
		})
	}
}

// TestOverlapMatchesNaive checks the sorted overlap detection against the obvious quadratic
// check on random CIDR sets.
func TestOverlapMatchesNaive(t *testing.T) {
	// The naive rule: a node is refused when it overlaps another node, except that this
	// cluster's node is not refused for overlapping a remote cluster's.
	rnd := rand.New(rand.NewPCG(1, 1))
	for iter := range 300 {
		var nodes []v1alpha1.MeshNode
		n := 2 + rnd.IntN(8)
		for i := range n {
			bits := 8 + rnd.IntN(17)
			addr := netip.AddrFrom4([4]byte{10, byte(rnd.IntN(4)), byte(rnd.IntN(4)), 0})
			pr := netip.PrefixFrom(addr, bits).Masked()
			name := string(rune('a' + i))
			if rnd.IntN(3) == 0 {
				name = "remote/" + name // a remote cluster's node: refused alone
			}
			nodes = append(nodes, meshNode(name, key(t, byte(10+i)), 1, []string{"10.77.0.1"}, pr.String()))
		}
		local := localNode{Underlay: []netip.Addr{netip.MustParseAddr("10.77.0.9")}}
		peers, skips := peersFromMeshNodes("self", local, nodes, nil)
		naive := map[string]bool{}
		for i := range nodes {
			for j := range nodes {
				pi := netip.MustParsePrefix(string(nodes[i].Spec.PodCIDRs[0]))
				pj := netip.MustParsePrefix(string(nodes[j].Spec.PodCIDRs[0]))
				if i != j && pi.Overlaps(pj) && (isRemote(nodes[i].Name) || !isRemote(nodes[j].Name)) {
					naive[nodes[i].Name] = true
				}
			}
		}
		got := map[string]bool{}
		for _, s := range skips {
			got[s.Node] = true
		}
		if d := cmp.Diff(naive, got, cmpopts.EquateEmpty()); d != "" {
			t.Fatalf("iteration %d: refused nodes (-naive +got):\n%s\nnodes: %+v", iter, d, nodes)
		}
		if len(peers)+len(skips) != len(nodes) {
			t.Fatalf("iteration %d: %d peers + %d skips != %d nodes", iter, len(peers), len(skips), len(nodes))
		}
	}
}

func TestRoutePrefixes(t *testing.T) {
	p := netip.MustParsePrefix
	got := routePrefixes([]wireguard.Peer{
		{Name: "a", AllowedIPs: []netip.Prefix{p("10.244.2.0/24"), p("fd44:0:0:2::/64")}},
		{Name: "b", AllowedIPs: []netip.Prefix{p("10.244.3.0/24")}},
	})
	want := []netip.Prefix{p("10.244.2.0/24"), p("fd44:0:0:2::/64"), p("10.244.3.0/24")}
	if d := cmp.Diff(want, got, cmpNetip); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

func TestPeersMustAnnounceAssignedCIDRs(t *testing.T) {
	p := netip.MustParsePrefix
	local := localNode{Underlay: []netip.Addr{netip.MustParseAddr("10.77.0.11")}, PodCIDRs: []netip.Prefix{p("10.244.1.0/24")}}
	nodes := []v1alpha1.MeshNode{
		meshNode("honest", key(t, 2), 1, []string{"10.77.0.12"}, "fd44:0:0:2::/64", "10.244.2.0/24"),
		meshNode("thief", key(t, 3), 1, []string{"10.77.0.13"}, "10.244.3.0/24", "10.244.9.0/24"),
		meshNode("ghost", key(t, 4), 1, []string{"10.77.0.14"}, "10.244.4.0/24"),
	}
	assigned := map[string][]netip.Prefix{
		"honest": {p("10.244.2.0/24"), p("fd44:0:0:2::/64")},
		"thief":  {p("10.244.3.0/24")},
		"victim": {p("10.244.9.0/24")},
	}
	peers, skips := peersFromMeshNodes("n1", local, nodes, assigned)
	if len(peers) != 1 || peers[0].Name != "honest" {
		t.Fatalf("peers %v: want only honest", peers)
	}
	want := []skip{
		{Node: "ghost", Reason: "no Kubernetes Node of that name assigns it pod CIDRs"},
		{Node: "thief", Reason: "announces pod CIDRs [10.244.3.0/24,10.244.9.0/24] but its Node was assigned [10.244.3.0/24]"},
	}
	if d := cmp.Diff(want, skips); d != "" {
		t.Errorf("skips (-want +got):\n%s", d)
	}
}

// TestPeerStatusesAfter checks peerStatusesAfter against the real thing on random input: the
// peer statuses of a model device read after Diff's configuration was applied to it.
func TestPeerStatusesAfter(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	base := time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	for i := range 300 {
		m := wgtest.NewModel("wg0", wgtypes.Userspace)
		var before wgtypes.Config
		for k := range 8 {
			if rng.IntN(2) == 0 {
				continue
			}
			pc := wgtypes.PeerConfig{PublicKey: wgtest.PublicKey(k)}
			if rng.IntN(3) > 0 {
				pc.Endpoint = net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(4))}), 51871))
			}
			before.Peers = append(before.Peers, pc)
		}
		if err := m.Configure(before); err != nil {
			t.Fatal(err)
		}
		for _, pc := range before.Peers {
			if rng.IntN(2) == 0 {
				m.SetHandshake(pc.PublicKey, base.Add(time.Duration(rng.IntN(5000))*time.Millisecond))
			}
		}
		var desired []wireguard.Peer
		nameByKey := map[wgtypes.Key]string{}
		for n := range 6 {
			if rng.IntN(3) == 0 {
				continue
			}
			p := wireguard.Peer{
				Name:       fmt.Sprint("node", n),
				PublicKey:  wgtest.PublicKey(n + rng.IntN(3)), // often a key the device has, sometimes not
				AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(n), 0}), 24)},
			}
			if _, taken := nameByKey[p.PublicKey]; taken {
				continue
			}
			switch rng.IntN(3) {
			case 0: // no endpoint: the device keeps its own
			case 1:
				p.Endpoint = netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(n)}), 51871)
			default:
				p.Endpoint = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(n)}), 51871)
			}
			nameByKey[p.PublicKey] = p.Name
			desired = append(desired, p)
		}
		cur := m.Device()
		cfg, _ := wireguard.Diff(cur, wireguard.Config{Peers: desired})
		if err := m.Configure(cfg); err != nil {
			t.Fatal(err)
		}
		want := peerStatuses(m.Device(), nameByKey)
		if d := cmp.Diff(want, peerStatusesAfter(cur, desired), cmpopts.EquateEmpty()); d != "" {
			t.Fatalf("case %d (-read after apply +computed):\n%s", i, d)
		}
	}
}
