package datapath

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// modelSeed makes the random comparison reproducible; change it to explore.
const modelSeed = 0x6d637279

// randomWorld fills a model with random ipcache, policy and enforce state over a small pool
// of identities, addresses and ports, so that lookups hit often.
func randomWorld(rng *rand.Rand) (*model, []netip.Addr) {
	ids := []uint32{1, identityWorld, 1000, 1001, 1002, 0x10000 | 1000, 0x20000 | 7}
	anyID := func() uint32 { return ids[rng.IntN(len(ids))] }
	flags := func() IPCacheFlags { return IPCacheFlags(rng.Uint32N(8)) }
	m := &model{
		ipcache: map[netip.Prefix]IPCacheEntry{},
		policy:  map[PolicyKey]PolicyValue{},
		enforce: map[EnforceKey]EnforceValue{},
	}
	// Nested prefixes make the trie's longest match matter; some addresses miss (world).
	for _, p := range []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24",
		"fd00::/16", "fd00:1::/32", "fd00:1:2::/64", "fd00:1:2::3/128", "2001:db8::/64"} {
		if rng.IntN(4) != 0 {
			m.ipcache[netip.MustParsePrefix(p)] = IPCacheEntry{anyID(), flags()}
		}
	}
	addrs := []netip.Addr{}
	for _, a := range []string{"10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "192.0.2.1", "198.51.100.1",
		"fd00:1:2::3", "fd00:1:2::4", "fd00:1:9::9", "fd00:9::9", "2001:db8::1", "2001:db8:1::1"} {
		addrs = append(addrs, netip.MustParseAddr(a))
	}
	protos := []uint8{0, protoICMP, protoTCP, protoUDP, protoICMPv6, protoSCTP}
	ports := []uint16{0, 53, 80, 443}
	for range rng.IntN(40) {
		k := PolicyKey{Subject: anyID(), Dir: Direction(rng.IntN(2))}
		if rng.IntN(3) != 0 {
			k.Peer = anyID()
		}
		k.Proto = protos[rng.IntN(len(protos))]
		if k.Proto == protoTCP || k.Proto == protoUDP {
			k.Port = ports[rng.IntN(len(ports))]
		}
		var v PolicyValue
		if rng.IntN(4) == 0 {
			v.Flags = PolicyEncrypt
		}
		v.Rule = rng.Uint32()
		m.policy[k] = v
	}
	for _, id := range ids {
		for _, dir := range []Direction{Egress, Ingress} {
			if f := EnforceFlags(rng.UintN(4)); f != 0 && rng.IntN(3) != 0 {
				m.enforce[EnforceKey{id, dir}] = EnforceValue{f}
			}
		}
	}
	return m, addrs
}

// randomPacket builds a frame between two addresses of one family.
func randomPacket(rng *rand.Rand, addrs []netip.Addr) []byte {
	var src, dst netip.Addr
	for {
		src, dst = addrs[rng.IntN(len(addrs))], addrs[rng.IntN(len(addrs))]
		if src.Is4() == dst.Is4() {
			break
		}
	}
	protos := []uint8{protoTCP, protoTCP, protoUDP, protoUDP, protoICMP, protoICMPv6, protoSCTP, 0}
	ports := []uint16{53, 80, 443, 8080, uint16(rng.Uint32())}
	p := testPacket{Src: src, Dst: dst, Proto: protos[rng.IntN(len(protos))], Dport: ports[rng.IntN(len(ports))]}
	if src.Is4() {
		if p.Proto == 0 {
			p.Proto = protoSCTP // IPv4 protocol 0 is not an extension header
		}
		if rng.IntN(8) == 0 {
			p.IHL = uint8(6 + rng.IntN(10))
		}
		switch rng.IntN(10) {
		case 0:
			p.MoreFrags = true
		case 1:
			p.FragOffset = uint16(1 + rng.IntN(1000))
			p.L4 = []byte("fragment")
		}
		return p.bytes()
	}
	if p.Proto == 0 {
		p.Proto = 59 // no next header
	}
	exts := []uint8{extHopByHop, extRouting, extDestOpts, extAH, extFragment}
	for range rng.IntN(4) {
		e := extHdr{Type: exts[rng.IntN(len(exts))], Len: 8 * (1 + rng.IntN(3))}
		if e.Type == extFragment && rng.IntN(2) == 0 {
			e.FragOffset = uint16(1 + rng.IntN(1000))
		}
		p.Ext = append(p.Ext, e)
	}
	return p.bytes()
}

// TestClassifierMatchesModel checks both programs against the naive model on random state
// and random packets.
func TestClassifierMatchesModel(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	const worlds, packets = 40, 150
	seen := matchModel(t, c, worlds, packets, nil)
	t.Logf("%d cases by reason: %v", 2*worlds*packets, seen)
	for _, r := range []Reason{ReasonAllowed, ReasonDeniedEgress, ReasonDeniedIngress, ReasonDropNotEncrypted, ReasonAllowedNoPolicy} {
		if seen[r] < 20 {
			t.Errorf("only %d cases of %s: the random state does not exercise it", seen[r], r)
		}
	}
}

// loadWorld makes the classifier's maps and strict mode those of m, with an empty connection
// table: each random world starts afresh.
func (c *Classifier) loadWorld(t testing.TB, m *model) {
	t.Helper()
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, m.ipcache); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, m.policy, m.enforce); err != nil {
		t.Fatal(err)
	}
	if err := c.SetStrict(m.strict); err != nil {
		t.Fatal(err)
	}
	c.clearConntrack(t)
}

// matchModel runs random packets through both programs, in random worlds, and fails t when a
// counted reason differs from the model's or the verdict does not follow from it. after, if
// not nil, is called after each run. It returns how many cases each reason had.
func matchModel(t *testing.T, c *Classifier, worlds, packets int, after func(w int, m *model, fromPod bool, frame []byte, res modelResult)) map[Reason]int {
	t.Helper()
	rng := rand.New(rand.NewPCG(modelSeed, 1))
	seen := map[Reason]int{}
	for w := range worlds {
		m, addrs := randomWorld(rng)
		m.strict = w%3 == 0
		// Within a world, packets are a sequence (from_pod's first packet enters a
		// connection to_pod then finds).
		c.loadWorld(t, m)
		for i := range packets {
			frame := randomPacket(rng, addrs)
			for _, fromPod := range []bool{true, false} {
				prog := c.objs.FromPod
				if !fromPod {
					prog = c.objs.ToPod
				}
				verdict, got, err := c.tryRun(prog, frame)
				if err != nil {
					t.Fatalf("world %d packet %d: %v", w, i, err)
				}
				now, err := bootTime()
				if err != nil {
					t.Fatal(err)
				}
				m.now = now
				res := m.classifyFull(fromPod, frame)
				want := res.Reason
				seen[want]++
				if got != want {
					pkt, _ := modelParse(frame)
					t.Fatalf("world %d packet %d (from_pod=%v) %+v: classifier says %s, model %s\nframe % x\nipcache %v\npolicy %v\nenforce %v",
						w, i, fromPod, pkt, got, want, frame, m.ipcache, m.policy, m.enforce)
				}
				if wantVerdict := map[bool]uint32{false: verdictPass, true: verdictDrop}[got.Dropped()]; verdict != wantVerdict {
					t.Fatalf("world %d packet %d (from_pod=%v): verdict %d for reason %s", w, i, fromPod, verdict, got)
				}
				if after != nil {
					after(w, m, fromPod, frame, res)
				}
			}
		}
	}
	return seen
}
