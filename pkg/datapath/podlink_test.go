package datapath

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/vishvananda/netlink"
)

func TestPodLink(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	mustLink := func(l netlink.Link) netlink.Link {
		if err := h.LinkAdd(l); err != nil {
			t.Fatal(err)
		}
		got, err := h.LinkByName(l.Attrs().Name)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(got); err != nil {
			t.Fatal(err)
		}
		return got
	}
	pod := mustLink(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lxcpod1"}, PeerName: "pod1peer"})
	uplink := mustLink(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0peer"})
	if err := h.AddrAdd(uplink, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 77, 0, 11), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*netlink.Route{
		{LinkIndex: pod.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4(10, 244, 1, 10), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK},
		{LinkIndex: uplink.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4(10, 244, 2, 0), Mask: net.CIDRMask(24, 32)}, Gw: net.IPv4(10, 77, 0, 12)},
	} {
		if err := h.RouteAdd(r); err != nil {
			t.Fatal(err)
		}
	}
	l, err := PodLink(h, netip.MustParseAddr("10.244.1.10"))
	if err != nil || l.Attrs().Name != "lxcpod1" {
		t.Fatalf("PodLink(local pod) = %v, %v; want lxcpod1", l, err)
	}
	for _, a := range []string{"10.244.2.7", "10.77.0.99"} {
		if _, err := PodLink(h, netip.MustParseAddr(a)); !errors.Is(err, ErrNoPodLink) {
			t.Errorf("PodLink(%s) err = %v, want ErrNoPodLink", a, err)
		}
	}
}
