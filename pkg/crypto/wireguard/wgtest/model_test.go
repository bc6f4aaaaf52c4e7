package wgtest

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func ipnet(s string) net.IPNet {
	p := netip.MustParsePrefix(s)
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func TestModelSemantics(t *testing.T) {
	m := NewModel("wg0", wgtypes.LinuxKernel)
	a, b := PublicKey(1), PublicKey(2)
	steps := []wgtypes.Config{
		{PrivateKey: new(PrivateKey(0)), ListenPort: new(51820), Peers: []wgtypes.PeerConfig{
			{PublicKey: a, Endpoint: &net.UDPAddr{IP: net.ParseIP("192.0.2.1"), Port: 51820}, AllowedIPs: []net.IPNet{ipnet("10.1.0.0/24"), ipnet("10.9.0.0/24")}},
			{PublicKey: b, PersistentKeepaliveInterval: new(25 * time.Second), AllowedIPs: []net.IPNet{ipnet("fd00:2::/64")}},
		}},
		// An allowed IP moves from a to b; b appends.
		{Peers: []wgtypes.PeerConfig{{PublicKey: b, AllowedIPs: []net.IPNet{ipnet("10.9.0.0/24")}}}},
		// UpdateOnly on an unknown peer is ignored; ReplaceAllowedIPs replaces.
		{Peers: []wgtypes.PeerConfig{
			{PublicKey: PublicKey(3), UpdateOnly: true},
			{PublicKey: a, ReplaceAllowedIPs: true, AllowedIPs: []net.IPNet{ipnet("10.1.0.7/24")}},
		}},
	}
	for _, s := range steps {
		if err := m.Configure(s); err != nil {
			t.Fatal(err)
		}
	}
	want := "device wg0 public=" + PublicKey(0).String() + " port=51820 fwmark=0\n"
	lines := []string{
		"peer " + a.String() + " endpoint=192.0.2.1:51820 keepalive=0s allowed=10.1.0.0/24\n",
		"peer " + b.String() + " endpoint=none keepalive=25s allowed=10.9.0.0/24,fd00:2::/64\n",
	}
	if a.String() > b.String() {
		lines[0], lines[1] = lines[1], lines[0]
	}
	want += lines[0] + lines[1]
	if diff := cmp.Diff(want, m.String()); diff != "" {
		t.Errorf("state (-want +got):\n%s", diff)
	}

	if err := m.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: a, Remove: true}}, ReplacePeers: false}); err != nil {
		t.Fatal(err)
	}
	if n := len(m.Device().Peers); n != 1 {
		t.Errorf("%d peers after removal, want 1", n)
	}
	if n := len(m.Configs()); n != 4 {
		t.Errorf("%d configs recorded, want 4", n)
	}
}

func TestDeviceApply(t *testing.T) {
	ctx := context.Background()
	d := NewDevice("wg0", wireguard.BackendUserspace)
	cfg := wireguard.Config{PrivateKey: PrivateKey(0), ListenPort: 51820, Peers: []wireguard.Peer{
		{Name: "n1", PublicKey: PublicKey(1), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}},
		{Name: "n2", PublicKey: PublicKey(2), AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.2.0.0/24")}},
	}}
	check := func(want wireguard.PlanStats) {
		t.Helper()
		got, err := d.Apply(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("Apply stats (-want +got):\n%s", diff)
		}
	}
	check(wireguard.PlanStats{Added: 2, Settings: true})
	check(wireguard.PlanStats{})
	cfg.Peers[1].AllowedIPs = append(cfg.Peers[1].AllowedIPs, netip.MustParsePrefix("10.3.0.0/24"))
	check(wireguard.PlanStats{Updated: 1})
	cfg.Peers = cfg.Peers[1:]
	check(wireguard.PlanStats{Removed: 1})
	if got := len(d.Model.Configs()); got != 3 {
		t.Errorf("%d configure calls, want 3 (none for the no-op apply)", got)
	}
	if err := d.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if !d.Deleted() || len(d.Model.Device().Peers) != 0 {
		t.Error("Delete did not empty the device")
	}
	if _, err := d.Apply(ctx, cfg); err == nil {
		t.Error("Apply after Delete succeeded")
	}
}
