package datapath

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNoPodLink is wrapped by PodLink when the node routes the address to no local interface
// (the pod is gone, or not on this node).
var ErrNoPodLink = errors.New("no local interface for pod address")

// PodLink returns the host-side interface of a local pod: with a routed-veth CNI (Calico,
// Cilium, the test harness) the node's main table has a host route (/32 or /128) to each pod
// address through the pod's veth. Addresses merely reachable on a connected subnet (underlay
// neighbours) have no such route and are not pods.
func PodLink(h *netlink.Handle, addr netip.Addr) (netlink.Link, error) {
	family := netlink.FAMILY_V4
	if !addr.Unmap().Is4() {
		family = netlink.FAMILY_V6
	}
	addr = addr.Unmap()
	var routes []netlink.Route
	err := retryDump(func() error {
		var err error
		routes, err = h.RouteListFiltered(family, &netlink.Route{
			Dst:   prefixToIPNet(netip.PrefixFrom(addr, addr.BitLen())),
			Table: unix.RT_TABLE_MAIN,
		}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("routes to pod %s: %w", addr, err)
	}
	for _, r := range routes {
		if r.Gw != nil || r.LinkIndex == 0 {
			continue // via a gateway: not a local pod
		}
		l, err := h.LinkByIndex(r.LinkIndex)
		if err != nil {
			return nil, fmt.Errorf("link of route to pod %s: %w", addr, err)
		}
		if l.Type() != "veth" {
			continue // e.g. the tunnel device or the underlay
		}
		return l, nil
	}
	return nil, fmt.Errorf("%w: %s", ErrNoPodLink, addr)
}
