package wireguard_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard/wgtest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// peerState is the comparable, normalised state of one peer.
type peerState struct {
	Endpoint  string
	Keepalive time.Duration
	Allowed   string
}

// TestPlanRandomized applies random sequences of desired configurations to
// the WireGuard model through Diff and checks, after every step, that the
// device equals the desired state, that planning again changes nothing, that
// the plan touched exactly the peers whose state differed, and that a keepalive
// was sent (a handshake started) exactly for the new peers that were prompted
// and the peers whose keepalive was turned on.
func TestPlanRandomized(t *testing.T) {
	const (
		steps     = 300
		keyPool   = 12
		prefixes  = 40
		seedCount = 20
	)
	var pool []netip.Prefix
	for i := range prefixes {
		if i%2 == 0 {
			pool = append(pool, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16+i%9))
		} else {
			pool = append(pool, netip.MustParsePrefix(fmt.Sprintf("fd00:%x::/%d", i, 48+i%17)))
		}
	}
	for seed := range uint64(seedCount) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 42))
			m := wgtest.NewModel("wg0", wgtypes.LinuxKernel)
			m.Rand = rand.New(rand.NewPCG(seed, 7))
			endpoints := map[wgtypes.Key]string{} // last endpoint set, for peers whose desired endpoint is unset
			for step := range steps {
				desired := randomConfig(rng, keyPool, pool)
				beforeDev := m.Device()
				before := stateOf(beforeDev)
				sentBefore := map[wgtypes.Key]int{}
				for i := range keyPool {
					sentBefore[wgtest.PublicKey(i+1)] = m.KeepalivesSent(wgtest.PublicKey(i + 1))
				}

				cfg, stats := wireguard.Diff(m.Device(), desired)
				if cfg.ReplacePeers {
					t.Fatal("ReplacePeers set")
				}
				if err := m.Configure(cfg); err != nil {
					t.Fatalf("step %d: configure: %v", step, err)
				}
				after := m.Device()
				if _, again := wireguard.Diff(after, desired); again.Changed() {
					t.Fatalf("step %d: not converged, second plan %s\nstate:\n%s", step, again, m)
				}

				want := map[wgtypes.Key]peerState{}
				for _, p := range desired.Peers {
					ep := endpoints[p.PublicKey]
					if p.Endpoint.IsValid() {
						ep = p.Endpoint.String()
					}
					if _, existed := before[p.PublicKey]; !existed && !p.Endpoint.IsValid() {
						ep = ""
					}
					want[p.PublicKey] = peerState{ep, p.PersistentKeepalive.Truncate(time.Second), allowedString(p.AllowedIPs)}
				}
				got := stateOf(after)
				if !maps.Equal(want, got) {
					t.Fatalf("step %d: device != desired (-want +got):\n%s", step, cmp.Diff(want, got))
				}
				for k, s := range got {
					endpoints[k] = s.Endpoint
				}

				// Naive count of the work: every peer whose state differs.
				var wantStats wireguard.PlanStats
				for k, s := range want {
					if old, ok := before[k]; !ok {
						wantStats.Added++
					} else if old != s {
						wantStats.Updated++
					}
				}
				for k := range before {
					if _, ok := want[k]; !ok {
						wantStats.Removed++
					}
				}
				wantStats.Rekeyed = naiveRekeyed(beforeDev, desired)
				for _, p := range desired.Peers {
					_, existed := before[p.PublicKey]
					ka := p.PersistentKeepalive.Truncate(time.Second)
					prompted := !existed && p.Prompt && ka == 0
					if prompted {
						wantStats.Prompted++
					}
					// A keepalive goes out when a peer's keepalive is turned on.
					wantSent := 0
					if prompted || (ka != 0 && (!existed || before[p.PublicKey].Keepalive == 0)) {
						wantSent = 1
					}
					if got := m.KeepalivesSent(p.PublicKey) - sentBefore[p.PublicKey]; got != wantSent {
						t.Fatalf("step %d: peer %s: %d keepalives sent, want %d", step, p.Name, got, wantSent)
					}
				}
				stats.Settings = false
				if wantStats != stats {
					t.Fatalf("step %d: stats (-want +got):\n%s", step, cmp.Diff(wantStats, stats))
				}
				if n := wantStats.Added + wantStats.Updated + wantStats.Removed + wantStats.Prompted; len(cfg.Peers) != n {
					t.Fatalf("step %d: config carries %d peers, want %d", step, len(cfg.Peers), n)
				}
			}
		})
	}
}

// randomConfig returns a valid Config: a random subset of the key pool,
// each prefix given to at most one peer. Consecutive configs often share
// most peers, like a cluster where one node changes at a time.
func randomConfig(rng *rand.Rand, keys int, pool []netip.Prefix) wireguard.Config {
	cfg := wireguard.Config{PrivateKey: wgtest.PrivateKey(0), ListenPort: 51820 + rng.IntN(2)}
	free := slices.Clone(pool)
	rng.Shuffle(len(free), func(i, j int) { free[i], free[j] = free[j], free[i] })
	for i := range keys {
		if rng.IntN(4) == 0 {
			continue
		}
		p := wireguard.Peer{Name: fmt.Sprint("node", i), PublicKey: wgtest.PublicKey(i + 1)}
		switch rng.IntN(4) {
		case 0: // unset: keep what the device has
		case 1:
			p.Endpoint = netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), 51820)
		default:
			p.Endpoint = netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i + rng.IntN(2))}), 51820)
		}
		if rng.IntN(3) == 0 {
			p.PersistentKeepalive = time.Duration(rng.IntN(3)) * 12500 * time.Millisecond
		}
		p.Prompt = rng.IntN(2) == 0
		for range rng.IntN(4) {
			if len(free) == 0 {
				break
			}
			pfx := free[0]
			free = free[1:]
			if rng.IntN(3) == 0 && pfx.Addr().Is4() { // host bits set
				a := pfx.Addr().As4()
				a[3] = 9
				pfx = netip.PrefixFrom(netip.AddrFrom4(a), pfx.Bits())
			}
			p.AllowedIPs = append(p.AllowedIPs, pfx)
		}
		cfg.Peers = append(cfg.Peers, p)
	}
	rng.Shuffle(len(cfg.Peers), func(i, j int) { cfg.Peers[i], cfg.Peers[j] = cfg.Peers[j], cfg.Peers[i] })
	return cfg
}

// naiveRekeyed pairs the peers desired adds to dev, in desired's order, each with a removed
// peer of dev not paired yet that held one of its allowed IPs, trying the allowed IPs in the
// order given: the number of pairs is Diff's Rekeyed.
func naiveRekeyed(dev *wgtypes.Device, desired wireguard.Config) int {
	wanted := map[wgtypes.Key]bool{}
	for _, p := range desired.Peers {
		wanted[p.PublicKey] = true
	}
	var removed []wgtypes.Peer
	existed := map[wgtypes.Key]bool{}
	for _, p := range dev.Peers {
		existed[p.PublicKey] = true
		if !wanted[p.PublicKey] {
			removed = append(removed, p)
		}
	}
	paired := map[wgtypes.Key]bool{}
	n := 0
	for _, p := range desired.Peers {
		if existed[p.PublicKey] {
			continue
		}
	next:
		for _, q := range p.AllowedIPs {
			for _, r := range removed {
				if paired[r.PublicKey] {
					continue
				}
				for _, a := range r.AllowedIPs {
					ones, _ := a.Mask.Size()
					ip, _ := netip.AddrFromSlice(a.IP)
					if netip.PrefixFrom(ip.Unmap(), ones).Masked() == q.Masked() {
						paired[r.PublicKey] = true
						n++
						break next
					}
				}
			}
		}
	}
	return n
}

func stateOf(d *wgtypes.Device) map[wgtypes.Key]peerState {
	out := map[wgtypes.Key]peerState{}
	for _, p := range d.Peers {
		var allowed []netip.Prefix
		for _, n := range p.AllowedIPs {
			ones, bits := n.Mask.Size()
			ip := n.IP.To16()
			if bits == 32 {
				ip = n.IP.To4()
			}
			a, _ := netip.AddrFromSlice(ip)
			allowed = append(allowed, netip.PrefixFrom(a, ones))
		}
		ep := ""
		if p.Endpoint != nil {
			ep = p.Endpoint.AddrPort().String()
		}
		out[p.PublicKey] = peerState{ep, p.PersistentKeepaliveInterval, allowedString(allowed)}
	}
	return out
}

func allowedString(ps []netip.Prefix) string {
	var ss []string
	for _, p := range ps {
		ss = append(ss, p.Masked().String())
	}
	slices.Sort(ss)
	ss = slices.Compact(ss)
	return fmt.Sprint(ss)
}
