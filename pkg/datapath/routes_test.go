package datapath

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/vishvananda/netlink"
)

func TestRoutesApply(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	for _, name := range []string{"tun0", "tun1"} {
		// No dummy driver on every kernel (CONFIG_DUMMY); a veth end serves as a device.
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			t.Fatal(err)
		}
		l, _ := h.LinkByName(name)
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	r := NewRoutes(h)
	p := netip.MustParsePrefix
	a, b, c := p("10.244.2.0/24"), p("10.244.3.0/24"), p("fd44:0:0:2::/64")

	steps := []struct {
		name      string
		cfg       RouteConfig
		wantStats RouteStats
		want      []netip.Prefix
		wantRules int
	}{
		{"install", RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{a, b, c}}, RouteStats{Added: 6, RulesAdded: 2}, []netip.Prefix{a, b, c}, 2},
		{"idempotent", RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{c, b, a}}, RouteStats{}, []netip.Prefix{a, b, c}, 2},
		{"one change is one route and its fallback", RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{a, c}}, RouteStats{Removed: 2}, []netip.Prefix{a, c}, 2},
		{"v6 gone drops its rule", RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{a}}, RouteStats{Removed: 2, RulesRemoved: 1}, []netip.Prefix{a}, 1},
		{"device change moves the route", RouteConfig{Device: "tun1", Prefixes: []netip.Prefix{a}}, RouteStats{Added: 1}, []netip.Prefix{a}, 1},
		{"strict: a blocked prefix has only its blackhole", RouteConfig{Device: "tun1", Prefixes: []netip.Prefix{a}, Blocked: []netip.Prefix{b}}, RouteStats{Added: 1}, []netip.Prefix{a}, 1},
		{"a blocked prefix becomes a tunnel", RouteConfig{Device: "tun1", Prefixes: []netip.Prefix{a, b}}, RouteStats{Added: 1}, []netip.Prefix{a, b}, 1},
		{"a tunnel becomes blocked", RouteConfig{Device: "tun1", Prefixes: []netip.Prefix{a}, Blocked: []netip.Prefix{b}}, RouteStats{Removed: 1}, []netip.Prefix{a}, 1},
		{"empty removes everything", RouteConfig{Device: "tun1"}, RouteStats{Removed: 3, RulesRemoved: 1}, nil, 0},
	}
	for _, st := range steps {
		got, err := r.Apply(ctx, st.cfg)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if d := cmp.Diff(st.wantStats, got); d != "" {
			t.Errorf("%s: stats (-want +got):\n%s", st.name, d)
		}
		have, err := r.Prefixes(0)
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(st.want, have, cmpopts.EquateComparable(netip.Prefix{})); d != "" {
			t.Errorf("%s: routes (-want +got):\n%s", st.name, d)
		}
		fb, err := r.Fallbacks(0)
		if err != nil {
			t.Fatal(err)
		}
		wantFB := append(slices.Clone(st.want), st.cfg.Blocked...)
		slices.SortFunc(wantFB, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
		if d := cmp.Diff(wantFB, fb, cmpopts.EquateComparable(netip.Prefix{})); d != "" {
			t.Errorf("%s: blackhole fallbacks (-want +got):\n%s", st.name, d)
		}
		rules := 0
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rl, err := h.RuleListFiltered(fam, &netlink.Rule{Table: DefaultTable}, netlink.RT_FILTER_TABLE)
			if err != nil {
				t.Fatal(err)
			}
			rules += len(rl)
		}
		if rules != st.wantRules {
			t.Errorf("%s: %d rules, want %d", st.name, rules, st.wantRules)
		}
	}
	// The route really points at the device the last config named.
	if _, err := r.Apply(ctx, RouteConfig{Device: "tun1", Prefixes: []netip.Prefix{b}}); err != nil {
		t.Fatal(err)
	}
	got, err := h.RouteGet(netip.MustParseAddr("10.244.3.7").AsSlice())
	if err != nil {
		t.Fatal(err)
	}
	l1, _ := h.LinkByName("tun1")
	if len(got) != 1 || got[0].LinkIndex != l1.Attrs().Index {
		t.Errorf("route lookup for 10.244.3.7 = %+v, want via tun1 (index %d)", got, l1.Attrs().Index)
	}
}

func TestApplyMissingDevice(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	_, err := NewRoutes(h).Apply(context.Background(), RouteConfig{Device: "nope0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
	if err == nil {
		t.Fatal("Apply with a missing device succeeded")
	}
}

// TestBlockedWithoutDevice: blackholes alone (strict mode before any tunnel is ready, or a
// refused mode) need no device, and are added once.
func TestBlockedWithoutDevice(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	r := NewRoutes(h)
	cfg := RouteConfig{Device: "nope0", Blocked: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd01::/64")}}
	st, err := r.Apply(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st.Added != 2 {
		t.Errorf("first Apply added %d routes, want 2", st.Added)
	}
	if st, err = r.Apply(context.Background(), cfg); err != nil || st != (RouteStats{}) {
		t.Errorf("second Apply: %+v, %v; want nothing changed", st, err)
	}
	got, err := r.Fallbacks(0)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[10.1.0.0/16 fd01::/64]" {
		t.Errorf("blackholes %v", got)
	}
}

// TestDeviceLossDropsInsteadOfClear: when the tunnel device disappears, its routes go with
// it; traffic for the prefixes must then hit the blackhole fallback, not the main table.
func TestDeviceLossDropsInsteadOfClear(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, PeerName: "tun0p"}); err != nil {
		t.Fatal(err)
	}
	up, _ := h.LinkByName("tun0")
	if err := h.LinkSetUp(up); err != nil {
		t.Fatal(err)
	}
	// The underlay route a CNI installed in main: the clear path.
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0p"}); err != nil {
		t.Fatal(err)
	}
	eth, _ := h.LinkByName("eth0")
	if err := h.LinkSetUp(eth); err != nil {
		t.Fatal(err)
	}
	p := netip.MustParsePrefix("10.244.2.0/24")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: prefixToIPNet(p), Scope: netlink.SCOPE_LINK}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewRoutes(h).Apply(context.Background(), RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{p}}); err != nil {
		t.Fatal(err)
	}
	dst := netip.MustParseAddr("10.244.2.7").AsSlice()
	got, err := h.RouteGet(dst)
	if err != nil || len(got) != 1 || got[0].LinkIndex != up.Attrs().Index {
		t.Fatalf("with the device: route %+v, %v; want via tun0", got, err)
	}
	if err := h.LinkDel(up); err != nil {
		t.Fatal(err)
	}
	got, err = h.RouteGet(dst)
	if err == nil && len(got) == 1 && got[0].LinkIndex == eth.Attrs().Index {
		t.Fatalf("device gone: traffic falls back to eth0 (clear): %+v", got)
	}
	if err == nil {
		t.Fatalf("device gone: route lookup succeeded (%+v); want the blackhole to refuse it", got)
	}
}

// TestNodeAddressesThroughTunnel checks node encryption's routing: another node's underlay
// address goes through the tunnel device with this node's underlay address as source, while
// packets carrying the tunnel device's mark (its encapsulated UDP) still take the underlay.
// Changing the mark replaces the rule without a moment without one.
func TestNodeAddressesThroughTunnel(t *testing.T) {
	_, h := testutil.NewNetNS(t)
	for _, name := range []string{"tun0", "eth0"} {
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			t.Fatal(err)
		}
		l, _ := h.LinkByName(name)
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	eth0, _ := h.LinkByName("eth0")
	tun0, _ := h.LinkByName("tun0")
	addr, _ := netlink.ParseAddr("192.0.2.1/24")
	if err := h.AddrAdd(eth0, addr); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	r := NewRoutes(h)
	self, peer := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	peerHost := netip.PrefixFrom(peer, 32)
	cfg := RouteConfig{
		Device:       "tun0",
		Prefixes:     []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24"), peerHost},
		Sources:      map[netip.Prefix]netip.Addr{peerHost: self},
		FirewallMark: DefaultFirewallMark,
	}
	st, err := r.Apply(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(RouteStats{Added: 4, RulesAdded: 1}, st); d != "" {
		t.Errorf("stats (-want +got):\n%s", d)
	}
	routeVia := func(mark uint32) (int, netip.Addr) {
		t.Helper()
		got, err := h.RouteGetWithOptions(peer.AsSlice(), &netlink.RouteGetOptions{Mark: mark})
		if err != nil || len(got) != 1 {
			t.Fatalf("route lookup for %s with mark %#x: %v %+v", peer, mark, err, got)
		}
		src, _ := netip.AddrFromSlice(got[0].Src)
		return got[0].LinkIndex, src.Unmap()
	}
	if link, src := routeVia(0); link != tun0.Attrs().Index || src != self {
		t.Errorf("unmarked packets to %s: link %d source %s, want tun0 (%d) source %s", peer, link, src, tun0.Attrs().Index, self)
	}
	if link, _ := routeVia(DefaultFirewallMark); link != eth0.Attrs().Index {
		t.Errorf("the tunnel's own packets to %s: link %d, want the underlay eth0 (%d)", peer, link, eth0.Attrs().Index)
	}
	if link, _ := routeVia(0x4000); link != tun0.Attrs().Index {
		t.Errorf("packets with another mark (0x4000) to %s: link %d, want tun0 (%d)", peer, link, tun0.Attrs().Index)
	}
	if st, err := r.Apply(ctx, cfg); err != nil || st != (RouteStats{}) {
		t.Errorf("second apply: %+v %v, want no change", st, err)
	}
	// A source change rewrites that route only; a rule without mark replaces the marked one.
	delete(cfg.Sources, peerHost)
	cfg.FirewallMark = 0
	st, err = r.Apply(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(RouteStats{Added: 1, RulesAdded: 1, RulesRemoved: 1}, st); d != "" {
		t.Errorf("stats after source and mark change (-want +got):\n%s", d)
	}
	if link, _ := routeVia(DefaultFirewallMark); link != tun0.Attrs().Index {
		t.Errorf("without the mark rule, marked packets to %s: link %d, want tun0 (%d)", peer, link, tun0.Attrs().Index)
	}
}
