package wireguard

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// key returns a deterministic test key.
func key(b byte) wgtypes.Key {
	var k wgtypes.Key
	for i := range k {
		k[i] = b
	}
	return k
}

func pfxs(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// ipnets builds wgctrl allowed IPs the way the plan emits them (4-byte IPv4).
func ipnets(ss ...string) []net.IPNet {
	out := make([]net.IPNet, len(ss))
	for i, s := range ss {
		p := netip.MustParsePrefix(s)
		out[i] = net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	return out
}

func udp(s string) *net.UDPAddr {
	return net.UDPAddrFromAddrPort(netip.MustParseAddrPort(s))
}

func TestPlan(t *testing.T) {
	priv := key(1)
	peerA := Peer{Name: "a", PublicKey: key(0xa), Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"), AllowedIPs: pfxs("10.1.0.0/24", "fd00:1::/64"), PersistentKeepalive: 25 * time.Second}
	peerB := Peer{Name: "b", PublicKey: key(0xb), Endpoint: netip.MustParseAddrPort("[2001:db8::2]:51820"), AllowedIPs: pfxs("10.2.0.0/24")}
	curA := wgtypes.Peer{PublicKey: key(0xa), Endpoint: udp("192.0.2.1:51820"), AllowedIPs: ipnets("10.1.0.0/24", "fd00:1::/64"), PersistentKeepaliveInterval: 25 * time.Second}
	curB := wgtypes.Peer{PublicKey: key(0xb), Endpoint: udp("[2001:db8::2]:51820"), AllowedIPs: ipnets("10.2.0.0/24")}
	cfgA := wgtypes.PeerConfig{PublicKey: key(0xa), Endpoint: udp("192.0.2.1:51820"), PersistentKeepaliveInterval: new(25 * time.Second), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24", "fd00:1::/64")}
	cfgB := wgtypes.PeerConfig{PublicKey: key(0xb), Endpoint: udp("[2001:db8::2]:51820"), PersistentKeepaliveInterval: new(time.Duration(0)), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.2.0.0/24")}
	synced := &wgtypes.Device{PrivateKey: priv, ListenPort: 51820, Peers: []wgtypes.Peer{curA, curB}}

	with := func(p Peer, f func(*Peer)) Peer { f(&p); return p }
	withCur := func(p wgtypes.Peer, f func(*wgtypes.Peer)) wgtypes.Peer { f(&p); return p }
	withCfg := func(c wgtypes.PeerConfig, f func(*wgtypes.PeerConfig)) wgtypes.PeerConfig { f(&c); return c }
	dev := func(peers ...wgtypes.Peer) *wgtypes.Device {
		return &wgtypes.Device{PrivateKey: priv, ListenPort: 51820, Peers: peers}
	}

	tests := []struct {
		name      string
		current   *wgtypes.Device
		desired   Config
		want      wgtypes.Config
		wantStats PlanStats
	}{
		{
			name:      "new device",
			current:   nil,
			desired:   Config{PrivateKey: priv, ListenPort: 51820, Peers: []Peer{peerA, peerB}},
			want:      wgtypes.Config{PrivateKey: new(priv), ListenPort: new(51820), Peers: []wgtypes.PeerConfig{cfgA, cfgB}},
			wantStats: PlanStats{Added: 2, Settings: true},
		},
		{
			name:    "in sync",
			current: synced,
			desired: Config{PrivateKey: priv, ListenPort: 51820, Peers: []Peer{peerA, peerB}},
		},
		{
			name:    "zero key and port leave the device alone",
			current: synced,
			desired: Config{Peers: []Peer{peerA, peerB}},
		},
		{
			name:      "key and port changed",
			current:   synced,
			desired:   Config{PrivateKey: key(2), ListenPort: 51821, Peers: []Peer{peerA, peerB}},
			want:      wgtypes.Config{PrivateKey: new(key(2)), ListenPort: new(51821)},
			wantStats: PlanStats{Settings: true},
		},
		{
			name:      "firewall mark set",
			current:   synced,
			desired:   Config{FirewallMark: 0x6d63, Peers: []Peer{peerA, peerB}},
			want:      wgtypes.Config{FirewallMark: new(0x6d63)},
			wantStats: PlanStats{Settings: true},
		},
		{
			name: "firewall mark unchanged",
			current: func() *wgtypes.Device {
				d := *synced
				d.FirewallMark = 0x6d63
				return &d
			}(),
			desired: Config{FirewallMark: 0x6d63, Peers: []Peer{peerA, peerB}},
		},
		{
			name: "device order and forms of allowed IPs do not matter",
			current: dev(withCur(curA, func(p *wgtypes.Peer) {
				p.AllowedIPs = []net.IPNet{
					ipnets("fd00:1::/64")[0],
					{IP: net.ParseIP("10.1.0.0"), Mask: net.CIDRMask(24, 32)}, // 16-byte IPv4
				}
			}), curB),
			desired: Config{Peers: []Peer{peerB, peerA}},
		},
		{
			name:    "host bits in desired prefixes are ignored",
			current: synced,
			desired: Config{Peers: []Peer{with(peerA, func(p *Peer) { p.AllowedIPs = pfxs("fd00:1::1/64", "10.1.0.7/24", "10.1.0.0/24") }), peerB}},
		},
		{
			name:      "one peer's allowed IPs changed",
			current:   synced,
			desired:   Config{Peers: []Peer{with(peerA, func(p *Peer) { p.AllowedIPs = pfxs("10.1.0.0/24", "fd00:1::/64", "10.1.1.0/24") }), peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Endpoint: udp("192.0.2.1:51820"), PersistentKeepaliveInterval: new(25 * time.Second), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24", "10.1.1.0/24", "fd00:1::/64")}}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:      "allowed IP removed",
			current:   synced,
			desired:   Config{Peers: []Peer{with(peerA, func(p *Peer) { p.AllowedIPs = pfxs("10.1.0.0/24") }), peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Endpoint: udp("192.0.2.1:51820"), PersistentKeepaliveInterval: new(25 * time.Second), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24")}}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:      "peer removed",
			current:   synced,
			desired:   Config{Peers: []Peer{peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Remove: true}}},
			wantStats: PlanStats{Removed: 1},
		},
		{
			name:      "all peers removed, sorted by key",
			current:   dev(curB, curA),
			desired:   Config{},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Remove: true}, {PublicKey: key(0xb), Remove: true}}},
			wantStats: PlanStats{Removed: 2},
		},
		{
			name:      "removals come before additions",
			current:   dev(curB),
			desired:   Config{Peers: []Peer{peerA}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xb), Remove: true}, cfgA}},
			wantStats: PlanStats{Added: 1, Removed: 1},
		},
		{
			name:      "endpoint changed",
			current:   synced,
			desired:   Config{Peers: []Peer{with(peerA, func(p *Peer) { p.Endpoint = netip.MustParseAddrPort("192.0.2.9:51820") }), peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Endpoint: udp("192.0.2.9:51820"), PersistentKeepaliveInterval: new(25 * time.Second), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24", "fd00:1::/64")}}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:    "no desired endpoint keeps the roaming one",
			current: synced,
			desired: Config{Peers: []Peer{with(peerA, func(p *Peer) { p.Endpoint = netip.AddrPort{} }), peerB}},
		},
		{
			name:      "desired endpoint set, device has none",
			current:   dev(withCur(curA, func(p *wgtypes.Peer) { p.Endpoint = nil }), curB),
			desired:   Config{Peers: []Peer{peerA, peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{cfgA}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:    "IPv4-mapped endpoint on the device equals the IPv4 one",
			current: dev(withCur(curA, func(p *wgtypes.Peer) { p.Endpoint = &net.UDPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 51820} }), curB),
			desired: Config{Peers: []Peer{peerA, peerB}},
		},
		{
			name:    "keepalive compared at one-second resolution",
			current: synced,
			desired: Config{Peers: []Peer{with(peerA, func(p *Peer) { p.PersistentKeepalive = 25*time.Second + 700*time.Millisecond }), peerB}},
		},
		{
			name:      "keepalive turned off",
			current:   synced,
			desired:   Config{Peers: []Peer{with(peerA, func(p *Peer) { p.PersistentKeepalive = 0 }), peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xa), Endpoint: udp("192.0.2.1:51820"), PersistentKeepaliveInterval: new(time.Duration(0)), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24", "fd00:1::/64")}}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name: "IPv4-mapped IPv6 allowed IP on the device is not the IPv4 prefix",
			current: dev(withCur(curA, func(p *wgtypes.Peer) {
				p.AllowedIPs = []net.IPNet{{IP: net.ParseIP("::ffff:10.1.0.0"), Mask: net.CIDRMask(120, 128)}, ipnets("fd00:1::/64")[0]}
			}), curB),
			desired:   Config{Peers: []Peer{peerA, peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{cfgA}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:      "key change: the old key removed, the new one added, one node rekeyed",
			current:   synced,
			desired:   Config{Peers: []Peer{peerA, with(peerB, func(p *Peer) { p.PublicKey = key(0xc) })}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xb), Remove: true}, withCfg(cfgB, func(c *wgtypes.PeerConfig) { c.PublicKey = key(0xc) })}},
			wantStats: PlanStats{Added: 1, Removed: 1, Rekeyed: 1},
		},
		{
			name:    "key change with a prompt: keepalive on and off again in the same call",
			current: synced,
			desired: Config{Peers: []Peer{peerA, with(peerB, func(p *Peer) { p.PublicKey, p.Prompt = key(0xc), true })}},
			want: wgtypes.Config{Peers: []wgtypes.PeerConfig{
				{PublicKey: key(0xb), Remove: true},
				withCfg(cfgB, func(c *wgtypes.PeerConfig) {
					c.PublicKey, c.PersistentKeepaliveInterval = key(0xc), new(promptKeepalive)
				}),
				{PublicKey: key(0xc), UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))},
			}},
			wantStats: PlanStats{Added: 1, Removed: 1, Rekeyed: 1, Prompted: 1},
		},
		{
			name:    "prompts follow every addition",
			current: nil,
			desired: Config{Peers: []Peer{with(peerB, func(p *Peer) { p.Prompt = true }), with(peerA, func(p *Peer) { p.Prompt = true; p.PersistentKeepalive = 0 })}},
			want: wgtypes.Config{Peers: []wgtypes.PeerConfig{
				withCfg(cfgB, func(c *wgtypes.PeerConfig) { c.PersistentKeepaliveInterval = new(promptKeepalive) }),
				withCfg(cfgA, func(c *wgtypes.PeerConfig) { c.PersistentKeepaliveInterval = new(promptKeepalive) }),
				{PublicKey: key(0xb), UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))},
				{PublicKey: key(0xa), UpdateOnly: true, PersistentKeepaliveInterval: new(time.Duration(0))},
			}},
			wantStats: PlanStats{Added: 2, Prompted: 2},
		},
		{
			name:    "a prompt does not concern a peer the device has",
			current: synced,
			desired: Config{Peers: []Peer{with(peerA, func(p *Peer) { p.Prompt = true }), with(peerB, func(p *Peer) { p.Prompt = true })}},
		},
		{
			name:      "a prompt does not concern an updated peer",
			current:   synced,
			desired:   Config{Peers: []Peer{peerA, with(peerB, func(p *Peer) { p.Prompt, p.AllowedIPs = true, pfxs("10.2.0.0/24", "10.3.0.0/24") })}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{withCfg(cfgB, func(c *wgtypes.PeerConfig) { c.AllowedIPs = ipnets("10.2.0.0/24", "10.3.0.0/24") })}},
			wantStats: PlanStats{Updated: 1},
		},
		{
			name:      "a new peer with a keepalive of its own needs no prompt",
			current:   dev(curB),
			desired:   Config{Peers: []Peer{with(peerA, func(p *Peer) { p.Prompt = true }), peerB}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{cfgA}},
			wantStats: PlanStats{Added: 1},
		},
		{
			name:      "a node leaves, another joins: not rekeyed",
			current:   synced,
			desired:   Config{Peers: []Peer{peerA, with(peerB, func(p *Peer) { p.PublicKey, p.AllowedIPs = key(0xc), pfxs("10.3.0.0/24") })}},
			want:      wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: key(0xb), Remove: true}, withCfg(cfgB, func(c *wgtypes.PeerConfig) { c.PublicKey, c.AllowedIPs = key(0xc), ipnets("10.3.0.0/24") })}},
			wantStats: PlanStats{Added: 1, Removed: 1},
		},
		{
			name:    "two new keys take over one old key's allowed IPs: one rekeyed",
			current: dev(curA),
			desired: Config{Peers: []Peer{
				{Name: "a1", PublicKey: key(0xc), AllowedIPs: pfxs("10.1.0.0/24")},
				{Name: "a2", PublicKey: key(0xd), AllowedIPs: pfxs("fd00:1::/64")},
			}},
			want: wgtypes.Config{Peers: []wgtypes.PeerConfig{
				{PublicKey: key(0xa), Remove: true},
				{PublicKey: key(0xc), PersistentKeepaliveInterval: new(time.Duration(0)), ReplaceAllowedIPs: true, AllowedIPs: ipnets("10.1.0.0/24")},
				{PublicKey: key(0xd), PersistentKeepaliveInterval: new(time.Duration(0)), ReplaceAllowedIPs: true, AllowedIPs: ipnets("fd00:1::/64")},
			}},
			wantStats: PlanStats{Added: 2, Removed: 1, Rekeyed: 1},
		},
		{
			name:      "duplicate public key: the last peer wins",
			current:   dev(curB),
			desired:   Config{Peers: []Peer{with(peerB, func(p *Peer) { p.AllowedIPs = pfxs("10.9.0.0/24") }), peerB}},
			wantStats: PlanStats{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, stats := Diff(tt.current, tt.desired)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Diff config mismatch (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantStats, stats); diff != "" {
				t.Errorf("Diff stats mismatch (-want +got):\n%s", diff)
			}
			_, changed := Plan(tt.current, tt.desired)
			if changed != tt.wantStats.Changed() {
				t.Errorf("Plan changed = %t, want %t", changed, tt.wantStats.Changed())
			}
			if got.ReplacePeers {
				t.Error("ReplacePeers set")
			}
		})
	}
}

// TestDiffOneChangeAmongMany checks the O(1)-per-change property the agent
// relies on: one changed node among many yields one peer in the config.
func TestDiffOneChangeAmongMany(t *testing.T) {
	cur, desired := manyPeers(1000)
	desired.Peers[500].AllowedIPs = pfxs("10.250.0.0/24")
	cfg, stats := Diff(cur, desired)
	if diff := cmp.Diff(PlanStats{Updated: 1}, stats); diff != "" {
		t.Errorf("stats (-want +got):\n%s", diff)
	}
	if len(cfg.Peers) != 1 || cfg.Peers[0].PublicKey != desired.Peers[500].PublicKey {
		t.Errorf("config has %d peers, want only the changed one", len(cfg.Peers))
	}
}

// manyPeers returns a device with n peers and the Config that matches it.
func manyPeers(n int) (*wgtypes.Device, Config) {
	cur := &wgtypes.Device{}
	var desired Config
	for i := range n {
		var k wgtypes.Key
		k[0], k[1], k[2] = byte(i>>8), byte(i), 1
		p := Peer{
			PublicKey:  k,
			Endpoint:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}), 51820),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)},
		}
		desired.Peers = append(desired.Peers, p)
		cur.Peers = append(cur.Peers, wgtypes.Peer{
			PublicKey:  k,
			Endpoint:   net.UDPAddrFromAddrPort(p.Endpoint),
			AllowedIPs: ipnets(p.AllowedIPs[0].String()),
		})
	}
	return cur, desired
}

func BenchmarkDiff1000PeersOneChange(b *testing.B) {
	cur, desired := manyPeers(1000)
	desired.Peers[500].AllowedIPs = pfxs("10.250.0.0/24")
	for b.Loop() {
		if _, stats := Diff(cur, desired); stats.Updated != 1 {
			b.Fatal(stats)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	priv := key(1)
	ok := Peer{Name: "ok", PublicKey: key(0xa), Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"), AllowedIPs: pfxs("10.1.0.0/24")}
	with := func(f func(*Peer)) Peer { p := ok; p.AllowedIPs = pfxs("10.1.0.0/24"); f(&p); return p }
	tests := []struct {
		name    string
		cfg     Config
		wantErr string // substring; "" means valid
	}{
		{"valid", Config{PrivateKey: priv, ListenPort: 51820, Peers: []Peer{ok}}, ""},
		{"empty", Config{}, ""},
		{"no endpoint", Config{Peers: []Peer{with(func(p *Peer) { p.Endpoint = netip.AddrPort{} })}}, ""},
		{"port", Config{ListenPort: 70000}, "listen port"},
		{"zero public key", Config{Peers: []Peer{with(func(p *Peer) { p.PublicKey = wgtypes.Key{} })}}, "zero public key"},
		{"own key", Config{PrivateKey: priv, Peers: []Peer{with(func(p *Peer) { p.PublicKey = priv.PublicKey() })}}, "device's own"},
		{"duplicate key", Config{Peers: []Peer{ok, with(func(p *Peer) { p.Name = "dup"; p.AllowedIPs = nil })}}, "also used by peer ok"},
		{"endpoint port 0", Config{Peers: []Peer{with(func(p *Peer) { p.Endpoint = netip.MustParseAddrPort("192.0.2.1:0") })}}, "invalid endpoint"},
		{"keepalive", Config{Peers: []Peer{with(func(p *Peer) { p.PersistentKeepalive = -time.Second })}}, "keepalive"},
		{"invalid prefix", Config{Peers: []Peer{with(func(p *Peer) { p.AllowedIPs = []netip.Prefix{{}} })}}, "invalid allowed IP"},
		{"mapped prefix", Config{Peers: []Peer{with(func(p *Peer) { p.AllowedIPs = pfxs("::ffff:10.0.0.0/104") })}}, "IPv4-mapped"},
		{"shared prefix", Config{Peers: []Peer{ok, {Name: "other", PublicKey: key(0xb), AllowedIPs: pfxs("10.1.0.9/24")}}}, "also allowed for peer ok"},
		{"repeated prefix within a peer", Config{Peers: []Peer{with(func(p *Peer) { p.AllowedIPs = pfxs("10.1.0.0/24", "10.1.0.0/24") })}}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate: %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate = %v, want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestParseBackend(t *testing.T) {
	for in, want := range map[string]Backend{"": BackendAuto, "auto": BackendAuto, "kernel": BackendKernel, "userspace": BackendUserspace} {
		got, err := ParseBackend(in)
		if err != nil || got != want {
			t.Errorf("ParseBackend(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseBackend("Kernel"); err == nil {
		t.Error(`ParseBackend("Kernel") succeeded, want error`)
	}
}
