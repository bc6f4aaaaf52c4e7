package datapath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultTable is the routing table meshcrypt installs its tunnel routes into.
const DefaultTable = 0x6d63 // "mc"

// DefaultRulePriority is the priority of the rule that looks up DefaultTable: after the local
// table (0) and before main (32766), so tunnel routes win over the underlay routes.
const DefaultRulePriority = 1000

// DefaultFirewallMark is the mark the WireGuard device puts on the packets it sends. The rule
// that looks up the tunnel table skips packets carrying it, so the tunnel's own encapsulated
// packets leave through the underlay routes even when the peers' underlay addresses are
// routed into the tunnel (node encryption). Compared on all 32 bits: other marks (kube-proxy's
// 0x4000, ...) still use the table.
const DefaultFirewallMark = 0x6d63

// routeProtocol marks the routes meshcrypt installs (RTPROT values above 4 are free for
// routing daemons; 0x6d is unassigned).
const routeProtocol netlink.RouteProtocol = 0x6d

// RouteConfig is the desired tunnel routing state of a node.
type RouteConfig struct {
	// Device is the tunnel device the routes point at.
	Device string
	// Prefixes are the destinations routed through Device. Empty (with Blocked) removes every
	// route and rule.
	Prefixes []netip.Prefix
	// Blocked are destinations with a blackhole route only (strict mode: remote pods whose
	// tunnel is not ready are dropped, never routed to the underlay).
	Blocked []netip.Prefix
	// Sources are preferred source addresses for some of Prefixes: a node's own underlay
	// address for the routes to other nodes' underlay addresses (node encryption), so the
	// peer sees a source it allows from this node.
	Sources map[netip.Prefix]netip.Addr
	// FirewallMark, when not 0, makes the policy rule skip packets carrying it (the
	// tunnel device's own); see DefaultFirewallMark.
	FirewallMark uint32
	// Table and RulePriority default to DefaultTable and DefaultRulePriority.
	Table, RulePriority int
}

// RouteStats counts what one Apply changed.
type RouteStats struct {
	Added, Removed, RulesAdded, RulesRemoved int
}

// Routes applies RouteConfig to the kernel of one network namespace.
type Routes struct {
	h *netlink.Handle
}

// NewRoutes returns a Routes working through h (a handle bound to the node's namespace).
func NewRoutes(h *netlink.Handle) *Routes { return &Routes{h: h} }

// fallbackMetric is the metric of the blackhole route behind every tunnel route. When the
// tunnel device disappears (a userspace device process dies, a link is deleted) the kernel
// removes the device's routes; the blackhole then matches, so pod traffic is dropped (and
// retransmitted once the device is back) instead of falling through to the underlay routes
// in main and leaving in clear. Only turning encryption off removes both.
const fallbackMetric = 0x6d63

// routeKey identifies one route of the tunnel table: its destination and whether it is the
// blackhole fallback.
type routeKey struct {
	dst       netip.Prefix
	blackhole bool
}

// Apply makes the table hold exactly, for every prefix of cfg, a route through the device and
// a blackhole fallback behind it, and installs (or, with no prefixes, removes) the policy
// rules for both address families. It is idempotent and touches only what differs: a change
// to one prefix is two route operations. Not safe for concurrent use.
func (r *Routes) Apply(ctx context.Context, cfg RouteConfig) (RouteStats, error) {
	var st RouteStats
	if cfg.Table == 0 {
		cfg.Table = DefaultTable
	}
	if cfg.RulePriority == 0 {
		cfg.RulePriority = DefaultRulePriority
	}
	want := map[netip.Prefix]bool{}   // every prefix with a blackhole
	tunnel := map[netip.Prefix]bool{} // those also routed through the device
	for _, p := range cfg.Prefixes {
		want[p.Masked()] = true
		tunnel[p.Masked()] = true
	}
	for _, p := range cfg.Blocked {
		want[p.Masked()] = true
	}
	var link netlink.Link
	if len(tunnel) > 0 {
		l, err := r.h.LinkByName(cfg.Device)
		if err != nil {
			return st, fmt.Errorf("find tunnel device %s: %w", cfg.Device, err)
		}
		link = l
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		have, err := r.list(family, cfg.Table)
		if err != nil {
			return st, err
		}
		familyWanted := false
		for p := range want {
			if familyOf(p) == family {
				familyWanted = true
				break
			}
		}
		// Device routes first, then blackholes, then removals. A new prefix gets its device
		// route before its fallback: the other order would leave a moment with only the
		// blackhole, dropping what was flowing in clear through main until then (a node
		// address under node encryption, a pod CIDR when encryption turns on). A prefix
		// already wanted keeps a route throughout.
		for _, blackhole := range []bool{false, true} {
			for p := range want {
				if familyOf(p) != family || (!blackhole && !tunnel[p]) {
					continue
				}
				cur, ok := have[routeKey{p, blackhole}]
				var rt *netlink.Route
				if blackhole {
					if ok {
						continue
					}
					rt = r.blackhole(p, cfg.Table)
				} else {
					src := cfg.Sources[p]
					if ok && cur.LinkIndex == link.Attrs().Index && srcOf(cur) == src {
						continue
					}
					rt = r.route(p, cfg.Table, link.Attrs().Index)
					if src.IsValid() {
						rt.Src = src.AsSlice()
					}
				}
				if err := r.h.RouteReplace(rt); err != nil {
					return st, fmt.Errorf("route %s (blackhole %v) in table %d: %w", p, blackhole, cfg.Table, err)
				}
				st.Added++
			}
		}
		// Removals: blackholes before device routes, so a prefix leaving the table goes from
		// the tunnel straight to main, never through a moment with only its blackhole.
		for _, blackhole := range []bool{true, false} {
			for k, cur := range have {
				if k.blackhole != blackhole || (k.blackhole && want[k.dst]) || (!k.blackhole && tunnel[k.dst]) {
					continue
				}
				if err := r.h.RouteDel(&cur); err != nil && !errors.Is(err, unix.ESRCH) {
					return st, fmt.Errorf("delete route %s: %w", k.dst, err)
				}
				st.Removed++
			}
		}
		added, removed, err := r.applyRule(family, cfg.Table, cfg.RulePriority, cfg.FirewallMark, familyWanted)
		st.RulesAdded += added
		st.RulesRemoved += removed
		if err != nil {
			return st, err
		}
	}
	return st, nil
}

// Prefixes returns the destinations currently routed through a device in table (both
// families), sorted; blackhole fallbacks are not listed (see Fallbacks).
func (r *Routes) Prefixes(table int) ([]netip.Prefix, error) { return r.prefixes(table, false) }

// Fallbacks returns the destinations that have a blackhole fallback in table, sorted.
func (r *Routes) Fallbacks(table int) ([]netip.Prefix, error) { return r.prefixes(table, true) }

func (r *Routes) prefixes(table int, blackhole bool) ([]netip.Prefix, error) {
	if table == 0 {
		table = DefaultTable
	}
	var out []netip.Prefix
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		have, err := r.list(family, table)
		if err != nil {
			return nil, err
		}
		for k := range have {
			if k.blackhole == blackhole {
				out = append(out, k.dst)
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out, nil
}

func (r *Routes) blackhole(p netip.Prefix, table int) *netlink.Route {
	return &netlink.Route{
		Dst:      prefixToIPNet(p),
		Table:    table,
		Type:     unix.RTN_BLACKHOLE,
		Priority: fallbackMetric,
		Protocol: routeProtocol,
	}
}

func (r *Routes) route(p netip.Prefix, table, linkIndex int) *netlink.Route {
	return &netlink.Route{
		LinkIndex: linkIndex,
		Dst:       prefixToIPNet(p),
		Table:     table,
		Scope:     netlink.SCOPE_LINK,
		Protocol:  routeProtocol,
	}
}

// list returns the routes of one family in table, retrying interrupted dumps.
func (r *Routes) list(family, table int) (map[routeKey]netlink.Route, error) {
	var routes []netlink.Route
	err := retryDump(func() error {
		var err error
		routes, err = r.h.RouteListFiltered(family, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("list routes in table %d: %w", table, err)
	}
	out := make(map[routeKey]netlink.Route, len(routes))
	for _, rt := range routes {
		if rt.Dst == nil {
			continue
		}
		if p, ok := ipNetToPrefix(rt.Dst); ok {
			out[routeKey{p, rt.Type == unix.RTN_BLACKHOLE}] = rt
		}
	}
	return out, nil
}

// applyRule makes the family's rules for table exactly one when want ("lookup table", or
// "not fwmark mark lookup table" when mark is set, at priority), none otherwise. A changed
// rule is added before the old one goes, so the table is never out of reach meanwhile.
func (r *Routes) applyRule(family, table, priority int, mark uint32, want bool) (added, removed int, err error) {
	var rules []netlink.Rule
	err = retryDump(func() error {
		var err error
		rules, err = r.h.RuleListFiltered(family, &netlink.Rule{Table: table}, netlink.RT_FILTER_TABLE)
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("list rules for table %d: %w", table, err)
	}
	keep := -1
	for i, rl := range rules {
		if want && rl.Priority == priority && rl.Mark == mark && rl.Invert == (mark != 0) && fullMask(rl.Mask) {
			keep = i
			break
		}
	}
	if want && keep < 0 {
		rl := netlink.NewRule()
		rl.Family = family
		rl.Table = table
		rl.Priority = priority
		if mark != 0 {
			rl.Mark = mark
			rl.Mask = new(uint32(0xffffffff))
			rl.Invert = true
		}
		if err := r.h.RuleAdd(rl); err != nil {
			return added, removed, fmt.Errorf("add rule for table %d: %w", table, err)
		}
		added++
	}
	for i, rl := range rules {
		if i == keep {
			continue
		}
		rl.Family = family
		if err := r.h.RuleDel(&rl); err != nil && !errors.Is(err, unix.ENOENT) {
			return added, removed, fmt.Errorf("delete rule for table %d: %w", table, err)
		}
		removed++
	}
	return added, removed, nil
}

// fullMask reports whether a listed rule's fwmark mask compares every bit (the kernel's
// default when a mark is given without a mask).
func fullMask(m *uint32) bool { return m == nil || *m == 0xffffffff }

// srcOf is a listed route's preferred source address, or the zero Addr.
func srcOf(rt netlink.Route) netip.Addr {
	a, ok := netip.AddrFromSlice(rt.Src)
	if !ok {
		return netip.Addr{}
	}
	return a.Unmap()
}

// retryDump runs a netlink dump again when the kernel reports it was interrupted: a partial
// dump is never trusted.
func retryDump(dump func() error) error {
	var err error
	for range 10 {
		err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}

func familyOf(p netip.Prefix) int {
	if p.Addr().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipNetToPrefix(n *net.IPNet) (netip.Prefix, bool) {
	addr, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(addr.Unmap(), ones).Masked(), true
}
