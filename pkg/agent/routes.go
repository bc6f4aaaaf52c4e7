package agent

import (
	"context"
	"maps"
	"slices"
	"sync/atomic"

	"github.com/vishvananda/netlink"

	"github.com/meshcrypt/meshcrypt/pkg/datapath"
)

// routeState remembers the tunnel routing state last applied, so that a reconcile that wants
// the same routes through the same device does not dump and diff the whole tunnel table again
// (two routes per remote pod CIDR: 10000 at 5000 nodes, the largest cost of a reconcile after
// a change that moves no route). The table is applied in full, as before, when the desired
// routes differ, when the tunnel device is another link (recreated: the kernel removed its
// routes with it), after a failed Apply, and once invalidated: on every resync period, when a
// route of the table is deleted (datapath.WatchRouteDeletions; so a route deleted behind the
// agent's back is back at once, not at the next reconcile), and when the device is (re)created.
// Apply is the only writer of the table (the IPsec path goes through it too).
type routeState struct {
	// stale is set from other goroutines: the next apply is a full one.
	stale atomic.Bool
	// Owned by the reconcile loop.
	valid   bool
	applied datapath.RouteConfig
	ifindex int
}

// invalidate makes the next apply a full one. Safe for concurrent use.
func (s *routeState) invalidate() { s.stale.Store(true) }

// apply calls full with cfg unless cfg and the tunnel device are what the last successful full
// apply had and nothing invalidated it since; then it returns zero stats. h looks up the
// tunnel device's link index.
func (s *routeState) apply(ctx context.Context, h *netlink.Handle, cfg datapath.RouteConfig, full func(datapath.RouteConfig) (datapath.RouteStats, error)) (datapath.RouteStats, error) {
	if err := ctx.Err(); err != nil {
		return datapath.RouteStats{}, err
	}
	ifindex := tunnelIndex(h, cfg)
	// Swapped before the dump: a deletion seen from here on makes the next apply full again.
	stale := s.stale.Swap(false)
	if !stale && s.valid && ifindex == s.ifindex && sameRoutes(s.applied, cfg) {
		return datapath.RouteStats{}, nil
	}
	st, err := full(cfg)
	if err != nil {
		s.valid = false
		return st, err
	}
	s.valid, s.ifindex = ifindex >= 0, ifindex // a missing device is looked for again
	s.applied = cfg
	s.applied.Prefixes, s.applied.Blocked = slices.Clone(cfg.Prefixes), slices.Clone(cfg.Blocked)
	return st, nil
}

// tunnelIndex is the link index of cfg's device when cfg routes through it, 0 when it routes
// nothing through a device, -1 when the device is not found (Apply reports why).
func tunnelIndex(h *netlink.Handle, cfg datapath.RouteConfig) int {
	if len(cfg.Prefixes) == 0 {
		return 0
	}
	l, err := h.LinkByName(cfg.Device)
	if err != nil {
		return -1
	}
	return l.Attrs().Index
}

// sameRoutes reports whether a and b are the same desired routing state, prefixes in the same
// order (the agent computes them in a stable order; a reordering only costs a full apply).
func sameRoutes(a, b datapath.RouteConfig) bool {
	return a.Device == b.Device && a.Table == b.Table && a.RulePriority == b.RulePriority &&
		a.FirewallMark == b.FirewallMark && maps.Equal(a.Sources, b.Sources) &&
		slices.Equal(a.Prefixes, b.Prefixes) && slices.Equal(a.Blocked, b.Blocked)
}
