package datapath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ApplyHealth puts the node's health endpoint addresses on the loopback device of h's
// namespace (a /32 or /128 each, no duplicate address detection), so probes from other nodes
// for them are delivered locally and the node's own probes can use them as source. It is
// idempotent; addresses it put there before and no longer wants stay (the pod CIDRs they
// come from do not change while a node lives).
func ApplyHealth(h *netlink.Handle, addrs []netip.Addr) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("health endpoint: find lo: %w", err)
	}
	var have []netlink.Addr
	err = retryDump(func() (err error) {
		have, err = h.AddrList(lo, netlink.FAMILY_ALL)
		return err
	})
	if err != nil {
		return fmt.Errorf("health endpoint: list addresses on lo: %w", err)
	}
	for _, a := range addrs {
		found := false
		for _, x := range have {
			if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
				found = true
			}
		}
		if found {
			continue
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}, Flags: unix.IFA_F_NODAD}
		if err := h.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("health endpoint: add %s on lo: %w", a, err)
		}
	}
	return nil
}
