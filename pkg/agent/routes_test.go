package agent

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
)

// TestRouteStateSkipsOnlyWhatWasApplied checks when applyRoutes may skip the full Apply (the
// table dump): only for the routes last applied in full through the same link, until
// invalidated.
func TestRouteStateSkipsOnlyWhatWasApplied(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	addLink := func() {
		t.Helper()
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, PeerName: "tun0p"}); err != nil {
			t.Fatal(err)
		}
	}
	addLink()
	ctx := context.Background()
	p := netip.MustParsePrefix
	cfg := datapath.RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{p("10.244.1.0/24"), p("10.244.2.0/24")}}
	other := cfg
	other.Prefixes = []netip.Prefix{p("10.244.1.0/24")}
	blocked := datapath.RouteConfig{Device: "tun0", Blocked: cfg.Prefixes}

	var s routeState
	var fail error
	calls := 0
	apply := func(cfg datapath.RouteConfig) bool {
		t.Helper()
		before := calls
		_, err := s.apply(ctx, h, cfg, func(datapath.RouteConfig) (datapath.RouteStats, error) {
			calls++
			return datapath.RouteStats{Added: 1}, fail
		})
		if !errors.Is(err, fail) {
			t.Fatalf("apply: %v, want %v", err, fail)
		}
		return calls > before
	}
	steps := []struct {
		name string
		do   func() bool
		full bool
	}{
		{"first", func() bool { return apply(cfg) }, true},
		{"same routes", func() bool { return apply(cfg) }, false},
		{"same routes, a copy", func() bool {
			c := cfg
			c.Prefixes = append([]netip.Prefix(nil), cfg.Prefixes...)
			return apply(c)
		}, false},
		{"a route's source changes (node encryption)", func() bool {
			c := cfg
			c.Sources = map[netip.Prefix]netip.Addr{p("10.244.2.0/24"): netip.MustParseAddr("10.77.0.1")}
			return apply(c)
		}, true},
		{"the rule's mark changes", func() bool {
			c := cfg
			c.FirewallMark = datapath.DefaultFirewallMark
			return apply(c)
		}, true},
		{"back to plain", func() bool { return apply(cfg) }, true},
		{"other routes", func() bool { return apply(other) }, true},
		{"back", func() bool { return apply(cfg) }, true},
		{"invalidated", func() bool { s.invalidate(); return apply(cfg) }, true},
		{"then quiet", func() bool { return apply(cfg) }, false},
		{"device recreated", func() bool {
			l, err := h.LinkByName("tun0")
			if err != nil {
				t.Fatal(err)
			}
			if err := h.LinkDel(l); err != nil {
				t.Fatal(err)
			}
			addLink()
			return apply(cfg)
		}, true},
		{"failed apply", func() bool { fail = errors.New("boom"); return apply(other) }, true},
		{"after a failure, the same routes", func() bool { fail = nil; return apply(other) }, true},
		{"blocked only, no device needed", func() bool { return apply(blocked) }, true},
		{"blocked only again", func() bool { return apply(blocked) }, false},
		{"device missing", func() bool {
			l, _ := h.LinkByName("tun0")
			if err := h.LinkDel(l); err != nil {
				t.Fatal(err)
			}
			return apply(cfg)
		}, true},
		{"device still missing: the apply that reports it is not skipped", func() bool { return apply(cfg) }, true},
	}
	for _, st := range steps {
		if got := st.do(); got != st.full {
			t.Errorf("%s: full apply %t, want %t", st.name, got, st.full)
		}
	}
}
