package datapath

import (
	"net"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

func TestHostAddrsFilter(t *testing.T) {
	addr := func(s string) netlink.Addr {
		ip, n, err := net.ParseCIDR(s)
		if err != nil {
			t.Fatal(err)
		}
		n.IP = ip
		return netlink.Addr{IPNet: n}
	}
	tests := []struct {
		name string
		in   []netlink.Addr
		want []netip.Addr
	}{
		{"none", nil, nil},
		{
			name: "kube-ipvs0's Service addresses left out",
			in:   []netlink.Addr{addr("10.77.0.11/24"), func() netlink.Addr { a := addr("10.96.0.10/32"); a.LinkIndex = 9; return a }()},
			want: []netip.Addr{netip.MustParseAddr("10.77.0.11")},
		},
		{
			name: "underlay, bridge gateway, IPv6; loopback, link-local and duplicates left out",
			in: []netlink.Addr{
				addr("10.77.0.11/24"), addr("127.0.0.1/8"), addr("::1/128"), addr("fe80::1/64"),
				addr("10.244.1.1/24"), addr("fd77::11/64"), addr("10.77.0.11/32"), {},
			},
			want: []netip.Addr{netip.MustParseAddr("10.77.0.11"), netip.MustParseAddr("10.244.1.1"), netip.MustParseAddr("fd77::11")},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if d := cmp.Diff(tt.want, hostAddrs(tt.in, map[int]bool{9: true}), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

// TestHostAddrs reads a namespace's addresses: the uplink's and a CNI bridge's (not the
// loopback's, nor the IPv6 link-local ones the kernel gives every interface, nor the Service
// addresses on kube-ipvs0).
func TestHostAddrs(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	for _, l := range []struct {
		link netlink.Link
		addr string
	}{
		{&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0peer"}, "10.77.0.11/24"},
		{&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cni0"}}, "10.244.1.1/24"},
		{&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "kube-ipvs0"}, PeerName: "ipvspeer"}, "10.96.0.10/32"}, // a Service's
	} {
		if err := h.LinkAdd(l.link); err != nil {
			t.Fatal(err)
		}
		ip, n, _ := net.ParseCIDR(l.addr)
		n.IP = ip
		if err := h.AddrAdd(l.link, &netlink.Addr{IPNet: n}); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l.link); err != nil {
			t.Fatal(err)
		}
	}
	got, err := HostAddrs(h)
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Addr{netip.MustParseAddr("10.77.0.11"), netip.MustParseAddr("10.244.1.1")}
	if d := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}
