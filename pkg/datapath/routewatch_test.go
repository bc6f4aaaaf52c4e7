package datapath

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestWatchRouteDeletions deletes routes of the tunnel table behind the watch's back and checks
// that each deletion is reported, and that additions and deletions in other tables are not.
func TestWatchRouteDeletions(t *testing.T) {
	ns, h := testutil.NewNetNS(t)
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, PeerName: "tun0p"}); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName("tun0")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	deleted := make(chan struct{}, 100)
	done := make(chan error, 1)
	go func() {
		done <- WatchRouteDeletions(ctx, RouteWatchOptions{NS: ns, Deleted: func() { deleted <- struct{}{} }})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("WatchRouteDeletions = %v, want context.Canceled", err)
		}
	})
	// The subscription starts asynchronously: delete a route of the table until a deletion is
	// reported.
	r := NewRoutes(h)
	cfg := RouteConfig{Device: "tun0", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("fd44::/64")}}
	quiet := func(d time.Duration) int {
		n := 0
		timeout := time.After(d)
		for {
			select {
			case <-deleted:
				n++
			case <-timeout:
				return n
			}
		}
	}
	subscribed := false
	for range 50 {
		if _, err := r.Apply(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		if err := h.RouteDel(r.route(cfg.Prefixes[0], DefaultTable, l.Attrs().Index)); err != nil {
			t.Fatal(err)
		}
		if quiet(100*time.Millisecond) > 0 {
			subscribed = true
			break
		}
	}
	if !subscribed {
		t.Fatal("no deletion reported while routes of the table were deleted")
	}

	// Additions, and deletions in another table, are not reported.
	if _, err := r.Apply(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	main := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixToIPNet(netip.MustParsePrefix("10.99.0.0/16"))}
	if err := h.RouteAdd(main); err != nil {
		t.Fatal(err)
	}
	if err := h.RouteDel(main); err != nil {
		t.Fatal(err)
	}
	if n := quiet(300 * time.Millisecond); n != 0 {
		t.Errorf("%d deletions reported for route additions and a deletion in main", n)
	}

	// Each deletion from the table, IPv4 and IPv6, tunnel route and fallback, is reported.
	for _, rt := range []*netlink.Route{
		r.route(cfg.Prefixes[0], DefaultTable, l.Attrs().Index),
		r.blackhole(cfg.Prefixes[0], DefaultTable),
		r.route(cfg.Prefixes[1], DefaultTable, l.Attrs().Index),
	} {
		if err := h.RouteDel(rt); err != nil {
			t.Fatalf("delete %v: %v", rt.Dst, err)
		}
		select {
		case <-deleted:
		case <-time.After(5 * time.Second):
			t.Fatalf("deletion of %v (blackhole %v) not reported", rt.Dst, rt.Type == unix.RTN_BLACKHOLE)
		}
	}
}
