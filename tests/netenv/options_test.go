package netenv

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestOptionsDefaults(t *testing.T) {
	o, err := Options{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if len(o.Prefix) != 7 || !strings.HasPrefix(o.Prefix, "mc") {
		t.Errorf("prefix %q: want mc and 5 hex digits", o.Prefix)
	}
	o2, _ := Options{}.withDefaults()
	if o2.Prefix == o.Prefix {
		t.Errorf("two runs got the same prefix %q", o.Prefix)
	}
	got := fmt.Sprint(o.UnderlayV4, o.UnderlayV6, o.PodCIDRV4, o.PodCIDRV6, o.UnderlayMTU, o.PodMTU, o.IPv4Only)
	if want := "10.77.0.0/24 fd77::/64 10.244.0.0/16 fd44::/48 1500 1500 false"; got != want {
		t.Errorf("defaults: %s, want %s", got, want)
	}
	o, _ = Options{UnderlayMTU: 9000}.withDefaults()
	if o.PodMTU != 9000 {
		t.Errorf("PodMTU %d, want the underlay MTU", o.PodMTU)
	}
}

func TestOptionsInvalid(t *testing.T) {
	tests := []struct {
		name string
		opts Options
	}{
		{"prefix with dash", Options{Prefix: "a-b"}},
		{"prefix too long", Options{Prefix: strings.Repeat("a", 21)}},
		{"underlay v4 too long", Options{UnderlayV4: netip.MustParsePrefix("10.0.0.0/25")}},
		{"underlay v4 is v6", Options{UnderlayV4: netip.MustParsePrefix("fd00::/64")}},
		{"underlay v6 is v4", Options{UnderlayV6: netip.MustParsePrefix("10.0.0.0/8")}},
		{"pod v4 too long", Options{PodCIDRV4: netip.MustParsePrefix("10.0.0.0/24")}},
		{"pod v6 too long", Options{PodCIDRV6: netip.MustParsePrefix("fd00::/64")}},
		{"mtu too small", Options{UnderlayMTU: 1000}},
		{"pod mtu too large", Options{PodMTU: 70000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := tt.opts.withDefaults(); err == nil {
				t.Errorf("withDefaults accepted %+v", tt.opts)
			}
		})
	}
}

func TestAddressing(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		node int
		want string // underlayV4 underlayV6 podV4 podV6 | pod0 v4 v6 | pod k v4 v6
		k    int
	}{
		{"node 1", Options{}, 1, "10.77.0.11 fd77::11 10.244.1.0/24 fd44:0:0:1::/64 | 10.244.1.10 fd44:0:0:1::10 | 10.244.1.11 fd44:0:0:1::11", 1},
		{"node 10", Options{}, 10, "10.77.0.20 fd77::20 10.244.10.0/24 fd44:0:0:10::/64 | 10.244.10.10 fd44:0:0:10::10 | 10.244.10.254 fd44:0:0:10::254", 244},
		{"last node", Options{}, 244, "10.77.0.254 fd77::254 10.244.244.0/24 fd44:0:0:244::/64 | 10.244.244.10 fd44:0:0:244::10 | 10.244.244.100 fd44:0:0:244::100", 90},
		{"custom ranges", Options{
			UnderlayV4: netip.MustParsePrefix("192.168.0.0/16"), UnderlayV6: netip.MustParsePrefix("2001:db8:1::/112"),
			PodCIDRV4: netip.MustParsePrefix("172.16.0.0/12"), PodCIDRV6: netip.MustParsePrefix("2001:db8:2::/48"),
		}, 3, "192.168.0.13 2001:db8:1::13 172.16.3.0/24 2001:db8:2:3::/64 | 172.16.3.10 2001:db8:2:3::10 | 172.16.3.12 2001:db8:2:3::12", 2},
		{"ipv4 only", Options{IPv4Only: true}, 2, "10.77.0.12 invalid IP 10.244.2.0/24 invalid Prefix | 10.244.2.10 invalid IP | 10.244.2.11 invalid IP", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := tt.opts.withDefaults()
			if err != nil {
				t.Fatal(err)
			}
			a, err := o.addrsForNode(tt.node)
			if err != nil {
				t.Fatal(err)
			}
			p0v4, p0v6, err := addrsForPod(a.podV4, a.podV6, 0)
			if err != nil {
				t.Fatal(err)
			}
			pkv4, pkv6, err := addrsForPod(a.podV4, a.podV6, tt.k)
			if err != nil {
				t.Fatal(err)
			}
			got := fmt.Sprintf("%s %s %s %s | %s %s | %s %s", a.underlayV4, a.underlayV6, a.podV4, a.podV6, p0v4, p0v6, pkv4, pkv6)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
	o, _ := Options{}.withDefaults()
	for _, i := range []int{0, maxNodes + 1} {
		if _, err := o.addrsForNode(i); err == nil {
			t.Errorf("addrsForNode(%d) accepted", i)
		}
	}
	a, _ := o.addrsForNode(1)
	if _, _, err := addrsForPod(a.podV4, a.podV6, maxPodsByNode); err == nil {
		t.Errorf("addrsForPod(%d) accepted", maxPodsByNode)
	}
}

func TestHostVethName(t *testing.T) {
	taken := map[string]bool{}
	isTaken := func(s string) bool { return taken[s] }
	tests := []struct{ pod, want string }{
		{"web", "lxcweb"},
		{"abcdefghijkl", "lxcabcdefghijkl"},
	}
	for _, tt := range tests {
		if got := hostVethName(tt.pod, isTaken); got != tt.want {
			t.Errorf("hostVethName(%q) = %q, want %q", tt.pod, got, tt.want)
		}
	}
	long := "database-primary-0"
	seen := map[string]bool{}
	for range 50 {
		n := hostVethName(long, isTaken)
		if len(n) != ifNameMax || !strings.HasPrefix(n, "lxcdatabas") || seen[n] {
			t.Fatalf("hostVethName(%q) = %q: want a fresh 15-byte lxcdatabas… name", long, n)
		}
		seen[n], taken[n] = true, true
	}
	taken["lxcweb"] = true
	if n := hostVethName("web", isTaken); n == "lxcweb" || len(n) > ifNameMax {
		t.Errorf("hostVethName on a taken short name = %q", n)
	}
}

func TestPortName(t *testing.T) {
	for _, tt := range []struct {
		i          int
		node, want string
	}{
		{1, "node-a", "p1-node-a"},
		{12, "a-very-long-node-name", "p12-a-very-long"},
	} {
		if got := portName(tt.i, tt.node); got != tt.want {
			t.Errorf("portName(%d, %q) = %q, want %q", tt.i, tt.node, got, tt.want)
		}
	}
}

func TestCheckName(t *testing.T) {
	for name, ok := range map[string]bool{
		"node-a": true, "a": true, "0": true, "Node": false, "-a": false, "a-": false,
		"a_b": false, "": false, strings.Repeat("a", 40): true, strings.Repeat("a", 41): false,
	} {
		if err := checkName("node", name); (err == nil) != ok {
			t.Errorf("checkName(%q) = %v, want ok %v", name, err, ok)
		}
	}
}

func TestParseOwner(t *testing.T) {
	start, err := parseStatStart([]byte("1234 (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100 18446744073709551615\n"))
	if err != nil || start != 98765 {
		t.Errorf("parseStatStart = %d, %v, want 98765", start, err)
	}
	if _, err := parseStatStart([]byte("1234 (x) S 1")); err == nil {
		t.Errorf("parseStatStart accepted a short line")
	}
	o, err := parseOwner([]byte(owner{pid: 42, start: 7}.String()))
	if err != nil || o != (owner{pid: 42, start: 7}) {
		t.Errorf("parseOwner round trip = %+v, %v", o, err)
	}
	if o, err := parseOwner([]byte("42\n")); err != nil || o.pid != 42 || o.start != 0 {
		t.Errorf("parseOwner(pid only) = %+v, %v", o, err)
	}
	for _, bad := range []string{"", "x", "-1", "42 x"} {
		if _, err := parseOwner([]byte(bad)); err == nil {
			t.Errorf("parseOwner(%q) accepted", bad)
		}
	}
	me, err := selfOwner()
	if err != nil || !me.alive() {
		t.Errorf("own process not alive: %+v, %v", me, err)
	}
	if (owner{pid: me.pid, start: me.start + 1}).alive() {
		t.Errorf("owner with another start time reported alive")
	}
}
