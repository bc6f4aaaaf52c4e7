package datapath

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
)

// HostAddrs lists the addresses of the handle's network namespace that the kernel may pick as
// the source of the node's own traffic to a pod: every unicast address of every interface
// (the underlay, and CNI gateways such as a bridge's address or a ptp host veth's address,
// which lie inside the node's own pod CIDR), except loopback and IPv6 link-local addresses,
// which never reach a pod, and the Service addresses kube-proxy's IPVS mode puts on its dummy
// interface kube-ipvs0 (they are Services, not the node). Sorted, each once. The agent maps
// them to the identity host.
func HostAddrs(h *netlink.Handle) ([]netip.Addr, error) {
	var addrs []netlink.Addr
	err := retryDump(func() error {
		var err error
		addrs, err = h.AddrList(nil, netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list host addresses: %w", err)
	}
	skip := map[int]bool{}
	if l, err := h.LinkByName(ipvsDevice); err == nil {
		skip[l.Attrs().Index] = true
	} else if _, ok := err.(netlink.LinkNotFoundError); !ok {
		return nil, fmt.Errorf("look up %s: %w", ipvsDevice, err)
	}
	return hostAddrs(addrs, skip), nil
}

// ipvsDevice is kube-proxy's IPVS mode dummy interface, which holds every Service address.
const ipvsDevice = "kube-ipvs0"

// hostAddrs is HostAddrs' filter; addresses on the interfaces in skip (by index) are left out.
func hostAddrs(addrs []netlink.Addr, skip map[int]bool) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if a.IPNet == nil || skip[a.LinkIndex] {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsLoopback() || ip.IsMulticast() || (ip.Is6() && ip.IsLinkLocalUnicast()) {
			continue
		}
		out = append(out, ip)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}
