package agent

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

func TestIPCacheEntries(t *testing.T) {
	a, p := netip.MustParseAddr, netip.MustParsePrefix
	nodes := []v1alpha1.MeshNode{
		meshNode("n1", key(t, 1), 1, []string{"10.77.0.11", "fd77::11"}, "10.244.1.0/24"),
		meshNode("n2", key(t, 2), 1, []string{"10.77.0.12"}, "10.244.2.0/24", "fd44:0:0:2::/64"),
		meshNode("n3", key(t, 3), 1, []string{"10.77.0.13"}, "10.244.3.0/24"),
	}
	pods := []podEntry{
		{Name: "web", Node: "n1", IPs: []netip.Addr{a("10.244.1.10"), a("fd44:0:0:1::10")}, Identity: 300},
		{Name: "db", Node: "n2", IPs: []netip.Addr{a("10.244.2.10")}, Identity: 301},
		{Name: "cache", Node: "n3", IPs: []netip.Addr{a("10.244.3.10")}, Identity: 302},
	}
	remoteReady := datapath.IPCacheRemotePod | datapath.IPCacheTunnelReady
	want := map[netip.Prefix]datapath.IPCacheEntry{
		p("10.77.0.11/32"):      {Identity: uint32(identity.Host)},
		p("fd77::11/128"):       {Identity: uint32(identity.Host)},
		p("10.77.0.12/32"):      {Identity: uint32(identity.RemoteNode)},
		p("10.77.0.13/32"):      {Identity: uint32(identity.RemoteNode)},
		p("10.244.2.0/24"):      {Identity: uint32(identity.World), Flags: remoteReady},
		p("fd44:0:0:2::/64"):    {Identity: uint32(identity.World), Flags: remoteReady},
		p("10.244.3.0/24"):      {Identity: uint32(identity.World), Flags: datapath.IPCacheRemotePod},
		p("10.244.1.10/32"):     {Identity: 300, Flags: datapath.IPCacheLocalPod},
		p("fd44:0:0:1::10/128"): {Identity: 300, Flags: datapath.IPCacheLocalPod},
		p("10.244.2.10/32"):     {Identity: 301, Flags: remoteReady},
		p("10.244.3.10/32"):     {Identity: 302, Flags: datapath.IPCacheRemotePod}, // n3's tunnel is not ready
	}
	want[p("10.244.4.0/24")] = datapath.IPCacheEntry{Identity: uint32(identity.World), Flags: datapath.IPCacheRemotePod} // a Node without MeshNode
	assigned := map[string][]netip.Prefix{"n1": {p("10.244.1.0/24")}, "n2": {p("10.244.2.0/24")}, "n4": {p("10.244.4.0/24")}}
	got := ipcacheEntries(ipcacheInput{self: "n1", pods: pods, nodes: nodes, tunnelReady: map[string]bool{"n2": true}, assigned: assigned})
	if d := cmp.Diff(want, got, cmpNetip); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

func TestStillReady(t *testing.T) {
	p := netip.MustParsePrefix
	ipn := func(s string) net.IPNet {
		pr := p(s)
		return net.IPNet{IP: pr.Addr().AsSlice(), Mask: net.CIDRMask(pr.Bits(), pr.Addr().BitLen())}
	}
	a := wireguard.Peer{Name: "a", PublicKey: key(t, 1), AllowedIPs: []netip.Prefix{p("10.244.1.0/24"), p("fd44:0:0:1::/64")}}
	b := wireguard.Peer{Name: "b", PublicKey: key(t, 2), AllowedIPs: []netip.Prefix{p("10.244.2.0/24")}}
	bRekeyed := b
	bRekeyed.PublicKey = key(t, 9)
	c := wireguard.Peer{Name: "c", PublicKey: key(t, 3), AllowedIPs: []netip.Prefix{p("10.244.3.0/24")}}
	dev := &wgtypes.Device{Peers: []wgtypes.Peer{
		// The kernel reports allowed IPs in its own order, IPv4 possibly 16-byte.
		{PublicKey: key(t, 1), AllowedIPs: []net.IPNet{ipn("fd44:0:0:1::/64"), {IP: net.ParseIP("10.244.1.0"), Mask: net.CIDRMask(24, 32)}}},
		{PublicKey: key(t, 2), AllowedIPs: []net.IPNet{ipn("10.244.2.0/24")}},
		{PublicKey: key(t, 3), AllowedIPs: []net.IPNet{ipn("10.244.99.0/24")}},
	}}
	got := stillReady(dev, []wireguard.Peer{a, bRekeyed, c})
	if d := cmp.Diff(map[string]bool{"a": true}, got); d != "" {
		t.Errorf("only peers the device carries unchanged stay ready (-want +got):\n%s", d)
	}
	if got := stillReady(nil, []wireguard.Peer{a}); len(got) != 0 {
		t.Errorf("no device: %v, want none ready", got)
	}
}

// stillReadyNaive is stillReady as first written, a set per device peer: the model the
// allocation-free version is checked against.
func stillReadyNaive(dev *wgtypes.Device, desired []wireguard.Peer) map[string]bool {
	out := map[string]bool{}
	if dev == nil {
		return out
	}
	have := make(map[wgtypes.Key]map[netip.Prefix]bool, len(dev.Peers))
	for _, p := range dev.Peers {
		set := map[netip.Prefix]bool{}
		for _, n := range p.AllowedIPs {
			if a, ok := netip.AddrFromSlice(n.IP); ok {
				ones, _ := n.Mask.Size()
				set[netip.PrefixFrom(a.Unmap(), ones).Masked()] = true
			}
		}
		have[p.PublicKey] = set
	}
	for _, p := range desired {
		set, ok := have[p.PublicKey]
		if !ok || len(set) != len(p.AllowedIPs) {
			continue
		}
		same := true
		for _, pr := range p.AllowedIPs {
			same = same && set[pr.Masked()]
		}
		if same {
			out[p.Name] = true
		}
	}
	return out
}

func TestStillReadyRandomized(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	pool := []netip.Prefix{
		netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("10.244.2.0/25"),
		netip.MustParsePrefix("fd44:0:0:1::/64"), netip.MustParsePrefix("fd44:0:0:2::/64"),
	}
	keys := []wgtypes.Key{key(t, 1), key(t, 2), key(t, 3), key(t, 4)}
	pick := func() []netip.Prefix {
		var out []netip.Prefix
		for range rng.IntN(4) {
			out = append(out, pool[rng.IntN(len(pool))])
		}
		return out
	}
	for i := range 2000 {
		dev := &wgtypes.Device{}
		for _, k := range keys {
			if rng.IntN(4) == 0 {
				continue
			}
			wp := wgtypes.Peer{PublicKey: k}
			for _, pr := range pick() {
				ip := net.IP(pr.Addr().AsSlice())
				if pr.Addr().Is4() && rng.IntN(2) == 0 {
					ip = ip.To16() // the kernel may report IPv4 in 16 bytes
				}
				wp.AllowedIPs = append(wp.AllowedIPs, net.IPNet{IP: ip, Mask: net.CIDRMask(pr.Bits(), pr.Addr().BitLen())})
			}
			if rng.IntN(10) == 0 {
				wp.AllowedIPs = append(wp.AllowedIPs, net.IPNet{IP: net.IP{1, 2, 3}, Mask: net.CIDRMask(8, 32)}) // not an address
			}
			dev.Peers = append(dev.Peers, wp)
		}
		var desired []wireguard.Peer
		for j, k := range keys {
			if rng.IntN(4) == 0 {
				continue
			}
			desired = append(desired, wireguard.Peer{Name: fmt.Sprint("n", j), PublicKey: k, AllowedIPs: pick()})
		}
		if d := cmp.Diff(stillReadyNaive(dev, desired), stillReady(dev, desired)); d != "" {
			t.Fatalf("case %d: stillReady differs from the model (-model +got):\n%s\ndevice %+v\ndesired %+v", i, d, dev.Peers, desired)
		}
	}
}

// TestIPCacheCIDRs: the policies' CIDR identities and this node's other addresses in the
// ipcache, next to the pod and node entries.
func TestIPCacheCIDRs(t *testing.T) {
	a, p := netip.MustParseAddr, netip.MustParsePrefix
	nodes := []v1alpha1.MeshNode{
		meshNode("n1", key(t, 1), 1, []string{"10.77.0.11"}, "10.244.1.0/24"),
		meshNode("n2", key(t, 2), 1, []string{"10.77.0.12"}, "10.244.2.0/24", "fd44:0:0:2::/64"),
		meshNode("n3", key(t, 3), 1, []string{"10.77.0.13"}, "10.244.3.0/24"),
	}
	pods := []podEntry{
		{Name: "web", Node: "n1", IPs: []netip.Addr{a("10.244.1.10")}, Identity: 300},
		{Name: "db", Node: "n2", IPs: []netip.Addr{a("10.244.2.10")}, Identity: 301},
	}
	const c = uint32(identity.MinCIDR)
	remoteReady := datapath.IPCacheRemotePod | datapath.IPCacheTunnelReady
	world := uint32(identity.World)
	tests := []struct {
		name      string
		hostAddrs []netip.Addr
		cidrs     map[netip.Prefix]uint32
		want      map[netip.Prefix]datapath.IPCacheEntry // beyond the base entries
	}{
		{name: "nothing more"},
		{
			name:      "the node's other addresses (a CNI bridge's, inside its own pod CIDR) are host",
			hostAddrs: []netip.Addr{a("10.77.0.11"), a("10.244.1.1"), a("::ffff:10.244.1.2")},
			want: map[netip.Prefix]datapath.IPCacheEntry{
				p("10.244.1.1/32"): {Identity: uint32(identity.Host)},
				p("10.244.1.2/32"): {Identity: uint32(identity.Host)},
			},
		},
		{
			name: "a CIDR outside the cluster has no flags; inside a remote pod CIDR it keeps that CIDR's flags",
			cidrs: map[netip.Prefix]uint32{
				p("192.0.2.0/24"): c, p("10.244.2.128/25"): c + 1, p("10.244.3.0/26"): c + 2, p("fd44:0:0:2::/80"): c + 3,
			},
			want: map[netip.Prefix]datapath.IPCacheEntry{
				p("192.0.2.0/24"):    {Identity: c},
				p("10.244.2.128/25"): {Identity: c + 1, Flags: remoteReady},
				p("10.244.3.0/26"):   {Identity: c + 2, Flags: datapath.IPCacheRemotePod}, // n3's tunnel is not ready
				p("fd44:0:0:2::/80"): {Identity: c + 3, Flags: remoteReady},
			},
		},
		{
			name: "a CIDR that is exactly a remote pod CIDR takes it over with its flags; one that is a pod's or node's address does not",
			cidrs: map[netip.Prefix]uint32{
				p("10.244.2.0/24"): c, p("10.244.2.10/32"): c + 1, p("10.77.0.12/32"): c + 2, p("10.0.0.0/8"): c + 3,
			},
			want: map[netip.Prefix]datapath.IPCacheEntry{
				p("10.244.2.0/24"): {Identity: c, Flags: remoteReady},
				p("10.0.0.0/8"):    {Identity: c + 3}, // contains pod CIDRs, lies inside none
			},
		},
		{
			name:  "an IPv6 block over the IPv4-mapped range does not swallow IPv4 addresses",
			cidrs: map[netip.Prefix]uint32{p("::/0"): c},
			want: map[netip.Prefix]datapath.IPCacheEntry{
				p("::/0"):      {Identity: c},
				p("0.0.0.0/0"): {Identity: world},
			},
		},
		{
			name:  "an IPv4 default block stays",
			cidrs: map[netip.Prefix]uint32{p("::/0"): c, p("0.0.0.0/0"): c + 1},
			want: map[netip.Prefix]datapath.IPCacheEntry{
				p("::/0"):      {Identity: c},
				p("0.0.0.0/0"): {Identity: c + 1},
			},
		},
	}
	ready := map[string]bool{"n2": true}
	base := ipcacheEntries(ipcacheInput{self: "n1", pods: pods, nodes: nodes, tunnelReady: ready})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := maps.Clone(base)
			maps.Copy(want, tt.want)
			got := ipcacheEntries(ipcacheInput{self: "n1", pods: pods, nodes: nodes, tunnelReady: ready, hostAddrs: tt.hostAddrs, cidrs: tt.cidrs})
			if d := cmp.Diff(want, got, cmpNetip); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}
