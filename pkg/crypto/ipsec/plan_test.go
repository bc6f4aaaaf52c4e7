package ipsec

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func pfx(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

// testNodes: three dual-stack nodes with an IPv4 underlay.
var (
	planA = Node{Name: "a", ID: 1, BootID: "boot-a", Underlay: netip.MustParseAddr("10.0.0.1"), PodCIDRs: pfx("10.244.1.0/24", "fd44:0:0:1::/64")}
	planB = Node{Name: "b", ID: 2, BootID: "boot-b", Underlay: netip.MustParseAddr("10.0.0.2"), PodCIDRs: pfx("10.244.2.0/24", "fd44:0:0:2::/64")}
	planC = Node{Name: "c", ID: 3, BootID: "boot-c", Underlay: netip.MustParseAddr("10.0.0.3"), PodCIDRs: pfx("10.244.3.0/24")}
)

func testKeyring(t testing.TB, spis ...uint8) Keyring {
	t.Helper()
	var kr Keyring
	for _, spi := range spis {
		var err error
		if kr, err = kr.Add(mustKey(t, spi, AESGCM, bytesOf(20, spi*16), 0)); err != nil {
			t.Fatal(err)
		}
	}
	return kr
}

func lines(s string) []string {
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

func TestPlan(t *testing.T) {
	const r = "reqid=0x6d637279"
	for _, tt := range []struct {
		name    string
		local   Node
		remotes []Node
		keyring Keyring
		opts    PlanOptions
		want    []string // Desired.String() lines
	}{
		{
			name: "two nodes, dual-stack", local: planA, remotes: []Node{planB}, keyring: testKeyring(t, 1),
			want: []string{
				"state in b ipv4 10.0.0.2->10.0.0.1 spi=0x10002001 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state in b ipv6 10.0.0.2->10.0.0.1 spi=0x10002801 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state out b ipv4 10.0.0.1->10.0.0.2 spi=0x10001002 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"state out b ipv6 10.0.0.1->10.0.0.2 spi=0x10001802 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"policy out b 10.244.1.0/24->10.244.2.0/24 tmpl 10.0.0.1->10.0.0.2 spi=0x10001002 " + r + " prio=4096",
				"policy out b fd44:0:0:1::/64->fd44:0:0:2::/64 tmpl 10.0.0.1->10.0.0.2 spi=0x10001802 " + r + " prio=4096",
				"policy in b 10.244.2.0/24->10.244.1.0/24 tmpl 10.0.0.2->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy in b fd44:0:0:2::/64->fd44:0:0:1::/64 tmpl 10.0.0.2->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy fwd b 10.244.2.0/24->10.244.1.0/24 tmpl 10.0.0.2->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy fwd b fd44:0:0:2::/64->fd44:0:0:1::/64 tmpl 10.0.0.2->10.0.0.1 spi=0x0 " + r + " prio=4096",
			},
		},
		{
			name: "three nodes, one IPv4-only; options", local: planB, remotes: []Node{planC, planA}, keyring: testKeyring(t, 7),
			opts: PlanOptions{ReqID: 9, Priority: 5, AcceptPlaintext: true},
			want: []string{
				"state out a ipv4 10.0.0.2->10.0.0.1 spi=0x70002001 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=0",
				"state out a ipv6 10.0.0.2->10.0.0.1 spi=0x70002801 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=0",
				"state in a ipv4 10.0.0.1->10.0.0.2 spi=0x70001002 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=32",
				"state in a ipv6 10.0.0.1->10.0.0.2 spi=0x70001802 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=32",
				"state in c ipv4 10.0.0.3->10.0.0.2 spi=0x70003002 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=32",
				"state out c ipv4 10.0.0.2->10.0.0.3 spi=0x70002003 key=7 rfc4106(gcm(aes)) icv=128 reqid=0x9 replay=0",
				"policy out a 10.244.2.0/24->10.244.1.0/24 tmpl 10.0.0.2->10.0.0.1 spi=0x70002001 reqid=0x9 prio=5",
				"policy out c 10.244.2.0/24->10.244.3.0/24 tmpl 10.0.0.2->10.0.0.3 spi=0x70002003 reqid=0x9 prio=5",
				"policy out a fd44:0:0:2::/64->fd44:0:0:1::/64 tmpl 10.0.0.2->10.0.0.1 spi=0x70002801 reqid=0x9 prio=5",
				"policy in a 10.244.1.0/24->10.244.2.0/24 tmpl 10.0.0.1->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
				"policy in c 10.244.3.0/24->10.244.2.0/24 tmpl 10.0.0.3->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
				"policy in a fd44:0:0:1::/64->fd44:0:0:2::/64 tmpl 10.0.0.1->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
				"policy fwd a 10.244.1.0/24->10.244.2.0/24 tmpl 10.0.0.1->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
				"policy fwd c 10.244.3.0/24->10.244.2.0/24 tmpl 10.0.0.3->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
				"policy fwd a fd44:0:0:1::/64->fd44:0:0:2::/64 tmpl 10.0.0.1->10.0.0.2 spi=0x0 reqid=0x9 prio=5 optional",
			},
		},
		{
			name: "rotation: two SPIs, outbound still on the old one", local: planA, remotes: []Node{planC}, keyring: testKeyring(t, 1, 2),
			opts: PlanOptions{OutboundSPI: 1},
			want: []string{
				"state in c ipv4 10.0.0.3->10.0.0.1 spi=0x10003001 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state in c ipv4 10.0.0.3->10.0.0.1 spi=0x20003001 key=2 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state out c ipv4 10.0.0.1->10.0.0.3 spi=0x10001003 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"state out c ipv4 10.0.0.1->10.0.0.3 spi=0x20001003 key=2 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"policy out c 10.244.1.0/24->10.244.3.0/24 tmpl 10.0.0.1->10.0.0.3 spi=0x10001003 " + r + " prio=4096",
				"policy in c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy fwd c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
			},
		},
		{
			name: "rotation: outbound defaults to the highest SPI", local: planA, remotes: []Node{planC}, keyring: testKeyring(t, 1, 2),
			want: []string{
				"state in c ipv4 10.0.0.3->10.0.0.1 spi=0x10003001 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state in c ipv4 10.0.0.3->10.0.0.1 spi=0x20003001 key=2 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state out c ipv4 10.0.0.1->10.0.0.3 spi=0x10001003 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"state out c ipv4 10.0.0.1->10.0.0.3 spi=0x20001003 key=2 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"policy out c 10.244.1.0/24->10.244.3.0/24 tmpl 10.0.0.1->10.0.0.3 spi=0x20001003 " + r + " prio=4096",
				"policy in c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy fwd c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
			},
		},
		{
			name: "inbound only: states and in/fwd policies, no out policy", local: planA,
			remotes: []Node{func() Node { c := planC; c.InboundOnly = true; return c }()}, keyring: testKeyring(t, 1),
			want: []string{
				"state in c ipv4 10.0.0.3->10.0.0.1 spi=0x10003001 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state out c ipv4 10.0.0.1->10.0.0.3 spi=0x10001003 key=1 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"policy in c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
				"policy fwd c 10.244.3.0/24->10.244.1.0/24 tmpl 10.0.0.3->10.0.0.1 spi=0x0 " + r + " prio=4096",
			},
		},
		{
			name:  "IPv4 pods over an IPv6 underlay",
			local: Node{Name: "x", ID: 10, BootID: "bx", Underlay: netip.MustParseAddr("fd77::10"), PodCIDRs: pfx("10.8.0.0/16")},
			remotes: []Node{{Name: "y", ID: 0x1abc, BootID: "by", Underlay: netip.MustParseAddr("fd77::11"), PodCIDRs: pfx("10.9.0.0/16")},
				{Name: "z", ID: 12, BootID: "bz", Underlay: netip.MustParseAddr("10.0.0.12")}},
			keyring: testKeyring(t, 3),
			want: []string{
				"state in y ipv4 fd77::11->fd77::10 spi=0x31abc00a key=3 rfc4106(gcm(aes)) icv=128 " + r + " replay=32",
				"state out y ipv4 fd77::10->fd77::11 spi=0x3000a2bc key=3 rfc4106(gcm(aes)) icv=128 " + r + " replay=0",
				"policy out y 10.8.0.0/16->10.9.0.0/16 tmpl fd77::10->fd77::11 spi=0x3000a2bc " + r + " prio=4096",
				"policy in y 10.9.0.0/16->10.8.0.0/16 tmpl fd77::11->fd77::10 spi=0x0 " + r + " prio=4096",
				"policy fwd y 10.9.0.0/16->10.8.0.0/16 tmpl fd77::11->fd77::10 spi=0x0 " + r + " prio=4096",
				"skipped z: underlay 10.0.0.12 is not of the local underlay's family (fd77::10)",
			},
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Plan(tt.local, tt.remotes, tt.keyring, tt.opts)
			if err != nil {
				t.Fatalf("Plan: %v", err)
			}
			if diff := cmp.Diff(tt.want, lines(d.String())); diff != "" {
				t.Errorf("Plan (-want +got):\n%s", diff)
			}
			for _, s := range d.States {
				src, dst := tt.local, byName(tt.remotes, s.Node)
				if s.Dir == DirIn {
					src, dst = dst, src
				}
				k, _ := tt.keyring.Key(s.KeyringSPI)
				want, err := DeriveKey(k, SA{Src: src, Dst: dst, IPv6: s.IPv6})
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(s.Key, want) {
					t.Errorf("state %s: key is not DeriveKey(key %d, %s, %s)", s, s.KeyringSPI, src.Name, dst.Name)
				}
			}
		})
	}
}

func byName(nodes []Node, name string) Node {
	for _, n := range nodes {
		if n.Name == name {
			return n
		}
	}
	return Node{}
}

// TestPlanPeersAgree checks that what one node sends, its peer can
// receive: A's outbound state to B is B's inbound state from A (same
// endpoints, SPI and key), for every key, and the out policy's SPI names
// one of the receiver's inbound states.
func TestPlanPeersAgree(t *testing.T) {
	kr := testKeyring(t, 1, 2, 5)
	nodes := []Node{planA, planB, planC}
	plans := map[string]Desired{}
	for i, local := range nodes {
		remotes := append(append([]Node{}, nodes[:i]...), nodes[i+1:]...)
		d, err := Plan(local, remotes, kr, PlanOptions{OutboundSPI: 2})
		if err != nil {
			t.Fatal(err)
		}
		plans[local.Name] = d
	}
	for name, d := range plans {
		for _, out := range d.States {
			if out.Dir != DirOut {
				continue
			}
			found := false
			for _, in := range plans[out.Node].States {
				if in.Dir == DirIn && in.Node == name && in.SPI == out.SPI {
					found = true
					if in.Src != out.Src || in.Dst != out.Dst || !bytes.Equal(in.Key, out.Key) {
						t.Errorf("%s's %s and %s's %s disagree", name, out, out.Node, in)
					}
				}
			}
			if !found {
				t.Errorf("%s's %s has no inbound state on %s", name, out, out.Node)
			}
		}
		for _, p := range d.Policies {
			if p.Dir != DirOut {
				continue
			}
			if k, _, _, v6 := SplitSPI(p.SPI); k != 2 || v6 != p.Dst.Addr().Is6() {
				t.Errorf("%s: %s does not use outbound SPI 2", name, p)
			}
			ok := false
			for _, s := range d.States {
				ok = ok || s.Dir == DirOut && s.SPI == p.SPI && s.Dst == p.TmplDst
			}
			if !ok {
				t.Errorf("%s: %s has no outbound state", name, p)
			}
		}
	}
	// Keys differ per pair and direction.
	seen := map[string]string{}
	for name, d := range plans {
		for _, s := range d.States {
			if s.Dir != DirOut {
				continue
			}
			if other, dup := seen[string(s.Key)]; dup {
				t.Errorf("%s %s reuses the key of %s", name, s, other)
			}
			seen[string(s.Key)] = name + " " + s.String()
		}
	}
}

func TestPlanSkipsAndErrors(t *testing.T) {
	kr := testKeyring(t, 1)
	with := func(n Node, edit func(*Node)) Node {
		n.PodCIDRs = append([]netip.Prefix(nil), n.PodCIDRs...)
		edit(&n)
		return n
	}
	mk := func(name string, id uint16, underlay string, cidrs ...string) Node {
		return Node{Name: name, ID: id, BootID: "boot-" + name, Underlay: netip.MustParseAddr(underlay), PodCIDRs: pfx(cidrs...)}
	}
	d, err := Plan(planA, []Node{
		with(planB, func(n *Node) { n.Name = "no-id"; n.ID = 0 }),
		with(planB, func(n *Node) { n.Name = "local-id"; n.ID = 1 }),
		with(planB, func(n *Node) { n.Name = "no-boot"; n.BootID = "" }),
		with(planB, func(n *Node) { n.Name = "no-underlay"; n.Underlay = netip.Addr{} }),
		with(planB, func(n *Node) { n.Name = "local-underlay"; n.Underlay = planA.Underlay }),
		with(planB, func(n *Node) { n.Name = "overlaps-local"; n.PodCIDRs = pfx("10.244.0.0/16") }),
		with(planB, func(n *Node) { n.Name = "bad-cidr"; n.PodCIDRs = []netip.Prefix{{}} }),
		with(planB, func(n *Node) { n.Name = "mapped-cidr"; n.PodCIDRs = pfx("::ffff:10.9.0.0/112") }),
		with(planB, func(n *Node) { n.Name = "a" }),
		with(planB, func(n *Node) { n.Name = "dup"; n.ID = 40 }),
		with(planB, func(n *Node) { n.Name = "dup"; n.ID = 41 }),
		mk("same-id-1", 50, "10.0.0.50", "10.50.0.0/24"),
		mk("same-id-2", 50, "10.0.0.51", "10.51.0.0/24"),
		mk("same-ul-1", 60, "10.0.0.60", "10.60.0.0/24"),
		mk("same-ul-2", 61, "10.0.0.60", "10.61.0.0/24"),
		mk("cidr-1", 70, "10.0.0.70", "10.70.0.0/16"),
		mk("cidr-2", 71, "10.0.0.71", "10.70.5.0/24"),
		mk("good", 80, "::ffff:10.0.0.80", "10.80.0.0/24", "10.80.0.7/24"),
	}, kr, PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Skipped{
		{"a", "has the local node's name"},
		{"bad-cidr", "invalid pod CIDR invalid Prefix"},
		{"cidr-1", "shares overlapping pod CIDRs 10.70.5.0/24 and 10.70.0.0/16 with node cidr-2"},
		{"cidr-2", "shares overlapping pod CIDRs 10.70.5.0/24 and 10.70.0.0/16 with node cidr-1"},
		{"dup", "node name listed more than once"},
		{"local-id", "IPsec node ID 1 is the local node's"},
		{"local-underlay", "underlay 10.0.0.1 is the local node's"},
		{"mapped-cidr", "pod CIDR ::ffff:10.9.0.0/112 is IPv4-mapped IPv6; use the IPv4 form"},
		{"no-boot", "boot ID of 0 bytes, want 1-255"},
		{"no-id", "no IPsec node ID"},
		{"no-underlay", "no underlay address"},
		{"overlaps-local", "pod CIDR 10.244.0.0/16 overlaps local pod CIDR 10.244.1.0/24"},
		{"same-id-1", "shares IPsec node ID 50 with node same-id-2"},
		{"same-id-2", "shares IPsec node ID 50 with node same-id-1"},
		{"same-ul-1", "shares underlay 10.0.0.60 with node same-ul-2"},
		{"same-ul-2", "shares underlay 10.0.0.60 with node same-ul-1"},
	}
	if diff := cmp.Diff(want, d.Skipped); diff != "" {
		t.Errorf("Skipped (-want +got):\n%s", diff)
	}
	var nodes []string
	for _, s := range d.States {
		nodes = append(nodes, s.Node+" "+s.Src.String()+"->"+s.Dst.String())
	}
	if diff := cmp.Diff([]string{"good 10.0.0.80->10.0.0.1", "good 10.0.0.1->10.0.0.80"}, nodes); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
	if len(d.Policies) != 3 || d.Policies[0].Dst != netip.MustParsePrefix("10.80.0.0/24") {
		t.Errorf("policies of good: %v", d.Policies)
	}

	for _, tt := range []struct {
		name    string
		local   Node
		kr      Keyring
		opts    PlanOptions
		wantErr string
	}{
		{"empty keyring", planA, Keyring{}, PlanOptions{}, "plan: empty keyring"},
		{"outbound SPI not in keyring", planA, kr, PlanOptions{OutboundSPI: 2}, "outbound SPI 2 is not in the keyring (SPIs [1])"},
		{"local without ID", with(planA, func(n *Node) { n.ID = 0 }), kr, PlanOptions{}, "local node a needs an IPsec node ID"},
		{"local without boot ID", with(planA, func(n *Node) { n.BootID = "" }), kr, PlanOptions{}, "local node a needs"},
		{"local without underlay", with(planA, func(n *Node) { n.Underlay = netip.Addr{} }), kr, PlanOptions{}, "local node a needs"},
		{"local bad CIDR", with(planA, func(n *Node) { n.PodCIDRs = []netip.Prefix{{}} }), kr, PlanOptions{}, "local node a: invalid pod CIDR"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Plan(tt.local, []Node{planB}, tt.kr, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Plan error = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

func TestStateStringHidesKey(t *testing.T) {
	d, err := Plan(planA, []Node{planB}, testKeyring(t, 1), PlanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := d.States[0]
	for _, out := range []string{s.String(), s.GoString(), d.String()} {
		if strings.Contains(out, string(s.Key)) || strings.Contains(out, hexOf(s.Key)) {
			t.Errorf("key printed: %s", out)
		}
	}
}

func hexOf(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&0xf])
	}
	return string(out)
}

func TestTunnelMTU(t *testing.T) {
	gcm := mustKey(t, 1, AESGCM, bytesOf(36, 1), 0)
	gcm64 := mustKey(t, 1, AESGCM, bytesOf(20, 1), 64)
	cbc := mustKey(t, 1, AESCBCHMACSHA256, bytesOf(64, 1), 0)
	for _, tt := range []struct {
		mtu  int
		k    Key
		v6   bool
		want int
	}{
		{1500, gcm, false, 1446}, // ((1500-20-8-8-16) & ^3) - 2
		{1500, gcm, true, 1426},
		{1500, gcm64, false, 1454},
		{1500, cbc, false, 1438}, // ((1500-20-8-16-16) & ^15) - 2
		{1500, cbc, true, 1406},  // ((1500-40-8-16-16) & ^15) - 2
		{9000, gcm, false, 8946},
		{40, gcm, false, 0},
	} {
		if got := TunnelMTU(tt.mtu, tt.k, tt.v6); got != tt.want {
			t.Errorf("TunnelMTU(%d, %v, v6=%v) = %d, want %d", tt.mtu, tt.k, tt.v6, got, tt.want)
		}
	}
}
