package datapath

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// TCP flags for test packets.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
)

// tcpPkt is a TCP packet from src:sport to dst:dport with flags.
func tcpPkt(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, flags uint8) []byte {
	return testPacket{Src: src, Dst: dst, Proto: protoTCP, Sport: sport, Dport: dport, TCPFlags: flags}.bytes()
}

// icmpError builds an ICMP (IPv4) or ICMPv6 error of type typ/code from router to the sender
// of quoted, quoting quoted's IP header and its first 8 L4 bytes.
func icmpError(router netip.Addr, quoted []byte, typ, code uint8) []byte {
	ip := quoted[14:]
	hl := 40
	proto := uint8(protoICMPv6)
	if router.Is4() {
		hl = int(ip[0]&0xf) * 4
		proto = protoICMP
	}
	ip = ip[:min(len(ip), hl+8)]
	var sender netip.Addr
	if router.Is4() {
		sender = netip.AddrFrom4([4]byte(quoted[14+12 : 14+16]))
	} else {
		sender = netip.AddrFrom16([16]byte(quoted[14+8 : 14+24]))
	}
	l4 := append([]byte{typ, code, 0, 0, 0, 0, 0x05, 0xdc}, ip...) // MTU 1500 where it applies
	return testPacket{Src: router, Dst: sender, Proto: proto, L4: l4}.bytes()
}

// TestConntrackReplies: a policy allows connections, and their replies follow, on both
// programs and both families, while a connection the other way is still refused.
func TestConntrackReplies(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	for _, fam := range []struct {
		name       string
		a, b, remC netip.Addr
	}{{"v4", podA4, podB4, remC4}, {"v6", podA6, podB6, remC6}} {
		t.Run(fam.name, func(t *testing.T) {
			a, b := fam.a, fam.b
			t.Run("default-deny-ingress-own-connection", func(t *testing.T) {
				// The issue as first seen: A is default-deny ingress, no egress policy; its
				// own connection to B gets its SYN-ACK back.
				if _, err := c.ApplyPolicy(ctx, nil, map[ek]EnforceValue{{idA, Ingress}: denyOnly}); err != nil {
					t.Fatal(err)
				}
				c.clearConntrack(t)
				// A -> B: A's egress is open and B's ingress too: allowed without policy.
				if _, r := c.run(t, c.objs.FromPod, tcpPkt(a, 41000, b, 80, tcpSYN)); r != ReasonAllowedNoPolicy {
					t.Fatalf("A's SYN: %s", r)
				}
				// B's SYN-ACK leaves B (from_pod) and reaches A (to_pod): a reply.
				if _, r := c.run(t, c.objs.FromPod, tcpPkt(b, 80, a, 41000, tcpSYN|tcpACK)); r != ReasonAllowedNoPolicy {
					t.Fatalf("B's SYN-ACK from_pod: %s", r)
				}
				if _, r := c.run(t, c.objs.ToPod, tcpPkt(b, 80, a, 41000, tcpSYN|tcpACK)); r.Dropped() {
					t.Fatalf("B's SYN-ACK to A dropped: %s", r)
				}
				// Positive control: B's own connection to A is refused by A's ingress.
				if _, r := c.run(t, c.objs.FromPod, tcpPkt(b, 41000, a, 80, tcpSYN)); r != ReasonDeniedIngress {
					t.Fatalf("B -> A SYN: %s, want denied_ingress", r)
				}
				if _, r := c.run(t, c.objs.ToPod, tcpPkt(b, 41000, a, 80, tcpSYN)); r != ReasonDeniedIngress {
					t.Fatalf("B -> A SYN at to_pod: %s, want denied_ingress", r)
				}
			})
			t.Run("both-default-deny-both-ways", func(t *testing.T) {
				// Both pods default-deny in both directions; only A's egress to B:80 and B's
				// ingress from A:80 are allowed.
				pol := map[pk]pv{
					{idA, idB, 80, protoTCP, Egress}:  {},
					{idB, idA, 80, protoTCP, Ingress}: {},
				}
				enf := map[ek]EnforceValue{{idA, Egress}: denyOnly, {idA, Ingress}: denyOnly, {idB, Egress}: denyOnly, {idB, Ingress}: denyOnly}
				if _, err := c.ApplyPolicy(ctx, pol, enf); err != nil {
					t.Fatal(err)
				}
				c.clearConntrack(t)
				for i, s := range []struct {
					fromPod bool
					frame   []byte
					want    Reason
				}{
					{true, tcpPkt(a, 42000, b, 80, tcpSYN), ReasonAllowed},
					{false, tcpPkt(a, 42000, b, 80, tcpSYN), ReasonAllowed},
					{true, tcpPkt(b, 80, a, 42000, tcpSYN|tcpACK), ReasonAllowed},
					{false, tcpPkt(b, 80, a, 42000, tcpSYN|tcpACK), ReasonAllowed},
					{true, tcpPkt(a, 42000, b, 80, tcpACK|tcpPSH), ReasonAllowed},
					{true, tcpPkt(b, 80, a, 42000, tcpACK|tcpPSH), ReasonAllowed},
					{true, tcpPkt(a, 42000, b, 80, tcpFIN|tcpACK), ReasonAllowed},
					{true, tcpPkt(b, 80, a, 42000, tcpFIN|tcpACK), ReasonAllowed},
					{true, tcpPkt(a, 42000, b, 80, tcpACK), ReasonAllowed},
					// The other way: B may not connect to A, nor A accept it.
					{true, tcpPkt(b, 43000, a, 80, tcpSYN), ReasonDeniedEgress},
					{false, tcpPkt(b, 43000, a, 80, tcpSYN), ReasonDeniedIngress},
					// A packet that only looks like a reply of a connection that does not exist.
					{true, tcpPkt(b, 80, a, 44000, tcpSYN|tcpACK), ReasonDeniedEgress},
				} {
					prog := c.objs.FromPod
					if !s.fromPod {
						prog = c.objs.ToPod
					}
					if _, r := c.run(t, prog, s.frame); r != s.want {
						t.Fatalf("step %d: %s, want %s", i, r, s.want)
					}
				}
				conns, err := c.Connections()
				if err != nil {
					t.Fatal(err)
				}
				want := []Connection{{Src: netip.AddrPortFrom(a, 42000), Dst: netip.AddrPortFrom(b, 80), Proto: protoTCP,
					SrcIdentity: idA, DstIdentity: idB, Reason: ReasonAllowed, Flags: ConnFromPod | ConnReplied | ConnFinOrig | ConnFinReply}}
				if diff := cmp.Diff(want, conns, cmpopts.IgnoreFields(Connection{}, "Epoch", "Idle"), cmpopts.EquateComparable(netip.AddrPort{})); diff != "" {
					t.Errorf("connection table (-want +got):\n%s", diff)
				}
			})
			t.Run("udp-and-icmp-echo", func(t *testing.T) {
				enf := map[ek]EnforceValue{{idA, Ingress}: denyOnly}
				if _, err := c.ApplyPolicy(ctx, nil, enf); err != nil {
					t.Fatal(err)
				}
				c.clearConntrack(t)
				req := testPacket{Src: a, Dst: b, Proto: protoUDP, Sport: 5353, Dport: 53}.bytes()
				resp := testPacket{Src: b, Dst: a, Proto: protoUDP, Sport: 53, Dport: 5353}.bytes()
				icmp := uint8(protoICMP)
				if a.Is6() {
					icmp = protoICMPv6
				}
				echo := testPacket{Src: a, Dst: b, Proto: icmp, ICMPID: 77}.bytes()
				echoReply := testPacket{Src: b, Dst: a, Proto: icmp, ICMPID: 77, ICMPEchoReply: true}.bytes()
				otherReply := testPacket{Src: b, Dst: a, Proto: icmp, ICMPID: 78, ICMPEchoReply: true}.bytes()
				if _, r := c.run(t, c.objs.ToPod, resp); r != ReasonDeniedIngress {
					t.Fatalf("an answer before its question: %s, want denied_ingress", r)
				}
				c.run(t, c.objs.FromPod, req)
				if _, r := c.run(t, c.objs.ToPod, resp); r.Dropped() {
					t.Fatalf("the DNS answer: %s", r)
				}
				c.run(t, c.objs.FromPod, echo)
				if _, r := c.run(t, c.objs.ToPod, echoReply); r.Dropped() {
					t.Fatalf("the echo reply: %s", r)
				}
				if _, r := c.run(t, c.objs.ToPod, otherReply); r != ReasonDeniedIngress {
					t.Fatalf("an echo reply with another identifier: %s, want denied_ingress", r)
				}
			})
			t.Run("icmp-errors", func(t *testing.T) {
				// A is default-deny both ways and may only reach remote C on TCP 443; routers
				// on the path (world) answer with errors about that connection.
				pol := map[pk]pv{{idA, idC, 443, protoTCP, Egress}: {}}
				enf := map[ek]EnforceValue{{idA, Egress}: denyOnly, {idA, Ingress}: denyOnly}
				if _, err := c.ApplyPolicy(ctx, pol, enf); err != nil {
					t.Fatal(err)
				}
				c.clearConntrack(t)
				syn := tcpPkt(a, 45000, fam.remC, 443, tcpSYN)
				router := world4
				tooBig, unreach, ttl := uint8(3), uint8(3), uint8(11)
				code := uint8(4) // fragmentation needed
				if a.Is6() {
					router, tooBig, unreach, ttl, code = world6, 2, 1, 3, 0
				}
				for _, typ := range []uint8{tooBig, unreach, ttl} {
					if _, r := c.run(t, c.objs.ToPod, icmpError(router, syn, typ, code)); r != ReasonDeniedIngress {
						t.Fatalf("error type %d about no connection: %s, want denied_ingress", typ, r)
					}
				}
				if _, r := c.run(t, c.objs.FromPod, syn); r != ReasonAllowed {
					t.Fatalf("SYN: %s", r)
				}
				for _, typ := range []uint8{tooBig, unreach, ttl} {
					if _, r := c.run(t, c.objs.ToPod, icmpError(router, syn, typ, code)); r != ReasonAllowed {
						t.Fatalf("error type %d about the connection: %s, want allowed", typ, r)
					}
				}
				// An error about the connection addressed to someone else is not related.
				other := icmpError(router, syn, tooBig, code)
				if a.Is4() {
					copy(other[14+16:], podB4.AsSlice())
				} else {
					copy(other[14+24:], podB6.AsSlice())
				}
				if _, r := c.run(t, c.objs.FromPod, other); r != ReasonAllowedNoPolicy {
					// B is under no policy, and world may reach it: judged on its own.
					t.Fatalf("misaddressed error: %s, want allowed_no_policy (judged on its own)", r)
				}
				if _, r := c.run(t, c.objs.ToPod, icmpError(router, tcpPkt(a, 45001, fam.remC, 443, tcpSYN), tooBig, code)); r != ReasonDeniedIngress {
					t.Fatalf("error quoting another port: %s, want denied_ingress", r)
				}
			})
		})
	}
}

// TestConntrackPolicyChange: a policy change that no longer allows an established connection
// stops it at its next packet, both ways; allowing it again lets it go on.
func TestConntrackPolicyChange(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	allow := map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}}
	enf := map[ek]EnforceValue{{idA, Egress}: denyOnly, {idA, Ingress}: denyOnly}
	if _, err := c.ApplyPolicy(ctx, allow, enf); err != nil {
		t.Fatal(err)
	}
	fwd, back := tcpPkt(podA4, 46000, podB4, 80, tcpACK), tcpPkt(podB4, 80, podA4, 46000, tcpACK)
	c.run(t, c.objs.FromPod, tcpPkt(podA4, 46000, podB4, 80, tcpSYN))
	for range 3 {
		if _, r := c.run(t, c.objs.FromPod, fwd); r != ReasonAllowed {
			t.Fatalf("established: %s", r)
		}
		if _, r := c.run(t, c.objs.ToPod, back); r != ReasonAllowed {
			t.Fatalf("reply: %s", r)
		}
	}
	st0, err := c.ConntrackStats()
	if err != nil {
		t.Fatal(err)
	}
	e0, _ := c.Epoch()
	if _, err := c.ApplyPolicy(ctx, nil, enf); err != nil {
		t.Fatal(err)
	}
	if e1, _ := c.Epoch(); e1 == e0 {
		t.Fatalf("the epoch did not move (%d)", e1)
	}
	if _, r := c.run(t, c.objs.FromPod, fwd); r != ReasonDeniedEgress {
		t.Fatalf("after the allow went: %s, want denied_egress", r)
	}
	if _, r := c.run(t, c.objs.ToPod, back); r != ReasonDeniedEgress {
		// Judged again as the connection was first judged (from_pod: A's egress).
		t.Fatalf("its reply: %s, want denied_egress", r)
	}
	if _, err := c.ApplyPolicy(ctx, allow, enf); err != nil {
		t.Fatal(err)
	}
	if _, r := c.run(t, c.objs.ToPod, back); r != ReasonAllowed {
		t.Fatalf("allowed again: %s", r)
	}
	st1, err := c.ConntrackStats()
	if err != nil {
		t.Fatal(err)
	}
	if d := st1.Rejudged - st0.Rejudged; d != 3 {
		t.Errorf("rejudged %d packets, want 3", d)
	}
	// An unchanged apply changes nothing: no epoch, no judging again.
	e2, _ := c.Epoch()
	if _, err := c.ApplyPolicy(ctx, allow, enf); err != nil {
		t.Fatal(err)
	}
	if err := c.SetStrict(false); err != nil {
		t.Fatal(err)
	}
	if e3, _ := c.Epoch(); e3 != e2 {
		t.Errorf("an unchanged apply moved the epoch %d -> %d", e2, e3)
	}
}

// TestConntrackEncryption: the encryption requirement holds for every packet of a
// connection, replies included, and follows the tunnel's state.
func TestConntrackEncryption(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	ipc := fixtureIPCache() // remC's pod CIDR has no ready tunnel
	if _, err := c.ApplyIPCache(ctx, ipc); err != nil {
		t.Fatal(err)
	}
	// A connection from remote C to local B arrives (to_pod); strict mode is then turned on:
	// B's replies must not leave in clear.
	c.run(t, c.objs.ToPod, tcpPkt(remC4, 47000, podB4, 80, tcpSYN))
	if _, r := c.run(t, c.objs.FromPod, tcpPkt(podB4, 80, remC4, 47000, tcpSYN|tcpACK)); r != ReasonAllowedNoPolicy {
		t.Fatalf("reply without strict mode: %s", r)
	}
	if err := c.SetStrict(true); err != nil {
		t.Fatal(err)
	}
	if _, r := c.run(t, c.objs.FromPod, tcpPkt(podB4, 80, remC4, 47000, tcpACK)); r != ReasonDropNotEncrypted {
		t.Fatalf("reply in strict mode without a tunnel: %s, want drop_not_encrypted", r)
	}
	// The tunnel becomes ready: the reply goes.
	for p, e := range ipc {
		if e.Identity == idC {
			e.Flags |= IPCacheTunnelReady
			ipc[p] = e
		}
	}
	if _, err := c.ApplyIPCache(ctx, ipc); err != nil {
		t.Fatal(err)
	}
	if _, r := c.run(t, c.objs.FromPod, tcpPkt(podB4, 80, remC4, 47000, tcpACK)); r != ReasonAllowedNoPolicy {
		t.Fatalf("reply with the tunnel ready: %s", r)
	}
}

// TestConntrackFull: a full table never turns into an allow. With a table of 64, 1000
// connections from A (default-deny ingress) push the oldest out; the replies of the pushed
// out connections are judged on their own and denied, those still in the table pass.
func TestConntrackFull(t *testing.T) {
	const size, conns = 64, 1000
	c := newTestClassifier(t, ClassifierOptions{ConntrackSize: size})
	if got := c.ConntrackCapacity(); got != size {
		t.Fatalf("capacity %d, want %d", got, size)
	}
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, nil, map[ek]EnforceValue{{idA, Ingress}: denyOnly}); err != nil {
		t.Fatal(err)
	}
	for i := range conns {
		c.run(t, c.objs.FromPod, testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Sport: uint16(20000 + i), Dport: 53}.bytes())
	}
	tab, err := c.Connections()
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.ConntrackStats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d connections through a table of %d: %d entries, %+v", conns, size, len(tab), st)
	if len(tab) > size {
		t.Errorf("%d entries in a table of %d", len(tab), size)
	}
	inTable := map[uint16]bool{}
	for _, cn := range tab {
		inTable[cn.Src.Port()] = true
	}
	allowed, denied := 0, 0
	for i := range conns {
		port := uint16(20000 + i)
		_, r := c.run(t, c.objs.ToPod, testPacket{Src: podB4, Dst: podA4, Proto: protoUDP, Sport: 53, Dport: port}.bytes())
		switch {
		case r == ReasonDeniedIngress:
			denied++
		case !r.Dropped() && inTable[port]:
			allowed++
		default:
			t.Fatalf("reply to port %d (in table: %v): %s", port, inTable[port], r)
		}
	}
	t.Logf("replies: %d allowed (their connection was in the table), %d denied", allowed, denied)
	if denied < conns-size || allowed == 0 {
		t.Errorf("replies: %d allowed, %d denied", allowed, denied)
	}
}

// TestConntrackSurvivesReload: the table is pinned with the other maps, so a restarted agent
// (a new Classifier on the same pin path) keeps established connections.
func TestConntrackSurvivesReload(t *testing.T) {
	pin := bpffsDir(t)
	ctx := context.Background()
	enf := map[ek]EnforceValue{{idA, Ingress}: denyOnly}
	c1, err := LoadClassifier(ClassifierOptions{PinPath: pin, ConntrackSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c1.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c1.ApplyPolicy(ctx, nil, enf); err != nil {
		t.Fatal(err)
	}
	c1.run(t, c1.objs.FromPod, tcpPkt(podA4, 48000, podB4, 80, tcpSYN))
	c1.Close()

	c2 := newTestClassifier(t, ClassifierOptions{PinPath: pin, ConntrackSize: 1024})
	if _, err := c2.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.ApplyPolicy(ctx, nil, enf); err != nil {
		t.Fatal(err)
	}
	if _, r := c2.run(t, c2.objs.ToPod, tcpPkt(podB4, 80, podA4, 48000, tcpSYN|tcpACK)); r.Dropped() {
		t.Fatalf("reply after the reload: %s", r)
	}
	// Positive control: an unknown connection's "reply" is still denied.
	if _, r := c2.run(t, c2.objs.ToPod, tcpPkt(podB4, 80, podA4, 48001, tcpSYN|tcpACK)); r != ReasonDeniedIngress {
		t.Fatalf("reply of no connection: %s", r)
	}
}

// ageConn sets the last-seen time of the connection between a and b (in either order) to
// seen, in the kernel's table.
func (c *Classifier) ageConn(t testing.TB, a, b netip.AddrPort, proto uint8, seen time.Duration) {
	t.Helper()
	var k classifierCtKey
	var v classifierCtEntry
	it := c.objs.Conntrack.Iterate()
	for it.Next(&k, &v) {
		cn := decodeConnection(k, v, 0)
		if cn.Proto == proto && (cn.Src == a && cn.Dst == b || cn.Src == b && cn.Dst == a) {
			v.Seen = uint64(seen)
			if err := c.objs.Conntrack.Update(k, v, ebpf.UpdateExist); err != nil {
				t.Fatalf("age connection: %v", err)
			}
			return
		}
	}
	t.Fatalf("no connection %s - %s in the table (%v)", a, b, it.Err())
}

// seqFlow is one connection of the random sequence test.
type seqFlow struct {
	src, dst     netip.Addr
	proto        uint8
	sport, dport uint16
}

func (f seqFlow) packet(rev bool, flags uint8) []byte {
	p := testPacket{Src: f.src, Dst: f.dst, Proto: f.proto, Sport: f.sport, Dport: f.dport, TCPFlags: flags, ICMPID: f.sport}
	if rev {
		p.Src, p.Dst, p.Sport, p.Dport = f.dst, f.src, f.dport, f.sport
		p.ICMPEchoReply = true
	}
	return p.bytes()
}

// TestClassifierConnectionsMatchModel compares both programs with the model on random
// sequences: packets of a few connections both ways with random TCP flags, ICMP errors about
// them, policy, ipcache and strict mode changing under them, and connections aged past (or
// not quite to) their timeouts. After every step it compares the verdict, the flow event's
// connection flags and the whole connection table.
func TestClassifierConnectionsMatchModel(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{ConntrackSize: 1024})
	if err := c.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
	r := newFlowReader(t, c)
	rng := rand.New(rand.NewPCG(modelSeed, 2))
	const worlds, steps = 30, 250
	seen := map[string]int{}
	for w := range worlds {
		m, addrs := randomWorld(rng)
		c.loadWorld(t, m)
		var flows []seqFlow
		for range 6 {
			var f seqFlow
			for {
				f.src, f.dst = addrs[rng.IntN(len(addrs))], addrs[rng.IntN(len(addrs))]
				if f.src.Is4() == f.dst.Is4() {
					break
				}
			}
			f.proto = []uint8{protoTCP, protoTCP, protoUDP, protoICMP, protoSCTP}[rng.IntN(5)]
			if f.proto == protoICMP && f.src.Is6() {
				f.proto = protoICMPv6
			}
			if f.proto == protoSCTP {
				f.sport = 0
			} else {
				f.sport = []uint16{40000, 40001, 53}[rng.IntN(3)]
				if f.proto != protoICMP && f.proto != protoICMPv6 {
					f.dport = []uint16{53, 80, 443}[rng.IntN(3)]
				}
			}
			flows = append(flows, f)
		}
		check := func(step int, fromPod bool, frame []byte) {
			t.Helper()
			now, err := bootTime()
			if err != nil {
				t.Fatal(err)
			}
			m.now = now
			want := m.classifyFull(fromPod, frame)
			prog := c.objs.FromPod
			if !fromPod {
				prog = c.objs.ToPod
			}
			_, got, err := c.tryRun(prog, frame)
			if err != nil {
				t.Fatal(err)
			}
			f := readFlow(t, r)
			if got != want.Reason || f.Tracked != want.Tracked || f.Reply != want.Reply {
				pkt, _ := modelParse(frame)
				t.Fatalf("world %d step %d (from_pod=%v) %+v: classifier %s tracked=%v reply=%v, model %+v\nframe % x\nmodel table %v",
					w, step, fromPod, pkt, got, f.Tracked, f.Reply, want, frame, m.conns)
			}
			key := want.Reason.String()
			if want.Reply {
				key += "/reply"
			} else if want.Tracked {
				key += "/tracked"
			}
			seen[key]++
		}
		for step := range steps {
			f := flows[rng.IntN(len(flows))]
			switch x := rng.IntN(100); {
			case x < 60:
				flags := []uint8{tcpSYN, tcpSYN | tcpACK, tcpACK, tcpACK | tcpPSH, tcpFIN | tcpACK, tcpRST}[rng.IntN(6)]
				check(step, rng.IntN(2) == 0, f.packet(rng.IntN(2) == 0, flags))
			case x < 70:
				router := addrs[rng.IntN(len(addrs))]
				if router.Is4() != f.src.Is4() {
					continue
				}
				typ, code := uint8(3), uint8(4)
				if router.Is6() {
					typ, code = []uint8{1, 2, 3, 4}[rng.IntN(4)], 0
				}
				check(step, rng.IntN(2) == 0, icmpError(router, f.packet(rng.IntN(2) == 0, tcpACK), typ, code))
			case x < 80:
				if ch := mutateWorld(t, rng, c, m); ch {
					m.changed()
				}
			case x < 88:
				now, err := bootTime()
				if err != nil {
					t.Fatal(err)
				}
				for _, mc := range m.conns {
					if rng.IntN(2) == 0 {
						continue
					}
					age := mc.timeout() + 5*time.Second
					if rng.IntN(2) == 0 {
						age = mc.timeout() - 5*time.Second
					}
					mc.Seen = now - age
					c.ageConn(t, netip.AddrPortFrom(mc.Orig.Addr, mc.Orig.Port), netip.AddrPortFrom(mc.Resp.Addr, mc.Resp.Port), mc.Proto, mc.Seen)
					break
				}
			default:
				compareTables(t, c, m, w, step)
			}
		}
		compareTables(t, c, m, w, steps)
	}
	t.Logf("cases: %v", seen)
	for _, k := range []string{"allowed", "allowed/tracked", "allowed/reply", "allowed_no_policy/reply", "denied_egress", "denied_ingress",
		"denied_egress/tracked", "drop_not_encrypted", "drop_not_encrypted/reply"} {
		if seen[k] < 5 {
			t.Errorf("only %d cases of %s: the random sequences do not exercise it", seen[k], k)
		}
	}
}

// mutateWorld changes one thing of the world in the model and the classifier alike and says
// whether the classifier saw a change.
func mutateWorld(t *testing.T, rng *rand.Rand, c *Classifier, m *model) bool {
	t.Helper()
	ctx := context.Background()
	switch rng.IntN(3) {
	case 0:
		m.strict = !m.strict
		if err := c.SetStrict(m.strict); err != nil {
			t.Fatal(err)
		}
		return true
	case 1:
		// Flip a random ipcache entry's tunnel-ready flag.
		keys := slices.SortedFunc(func(yield func(netip.Prefix) bool) {
			for p := range m.ipcache {
				if !yield(p) {
					return
				}
			}
		}, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr())*2 + cmpInt(a.Bits(), b.Bits()) })
		if len(keys) == 0 {
			return false
		}
		p := keys[rng.IntN(len(keys))]
		e := m.ipcache[p]
		e.Flags ^= IPCacheTunnelReady
		m.ipcache[p] = e
		st, err := c.ApplyIPCache(ctx, m.ipcache)
		if err != nil {
			t.Fatal(err)
		}
		return st.Added+st.Updated+st.Removed > 0
	default:
		// Remove a random allow entry, or toggle an identity's default-deny.
		if len(m.policy) > 0 && rng.IntN(2) == 0 {
			keys := make([]PolicyKey, 0, len(m.policy))
			for k := range m.policy {
				keys = append(keys, k)
			}
			slices.SortFunc(keys, func(a, b PolicyKey) int {
				return cmpInt(int(a.Subject)<<8|int(a.Dir), int(b.Subject)<<8|int(b.Dir))*4 + cmpInt(int(a.Peer), int(b.Peer))*2 + cmpInt(int(a.Port)<<8|int(a.Proto), int(b.Port)<<8|int(b.Proto))
			})
			delete(m.policy, keys[rng.IntN(len(keys))])
		} else {
			k := EnforceKey{[]uint32{1000, 1001, 1002}[rng.IntN(3)], Direction(rng.IntN(2))}
			v := m.enforce[k]
			v.Flags ^= EnforceDeny
			if v.Flags == 0 {
				delete(m.enforce, k)
			} else {
				m.enforce[k] = v
			}
		}
		st, err := c.ApplyPolicy(ctx, m.policy, m.enforce)
		if err != nil {
			t.Fatal(err)
		}
		return st.Added+st.Updated+st.Removed > 0
	}
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// compareTables checks the kernel's connection table against the model's.
func compareTables(t *testing.T, c *Classifier, m *model, w, step int) {
	t.Helper()
	got, err := c.Connections()
	if err != nil {
		t.Fatal(err)
	}
	epoch, err := c.Epoch()
	if err != nil {
		t.Fatal(err)
	}
	type row struct {
		Src, Dst                 netip.AddrPort
		Proto                    uint8
		SrcIdentity, DstIdentity uint32
		Reason                   Reason
		Flags                    ConnFlags
		Current                  bool
	}
	var gotRows, wantRows []row
	for _, cn := range got {
		gotRows = append(gotRows, row{cn.Src, cn.Dst, cn.Proto, cn.SrcIdentity, cn.DstIdentity, cn.Reason, cn.Flags, cn.Epoch == epoch})
	}
	for _, mc := range m.conns {
		var f ConnFlags
		for _, b := range []struct {
			on bool
			f  ConnFlags
		}{{mc.FromPod, ConnFromPod}, {mc.Required, ConnRequired}, {mc.Replied, ConnReplied}, {mc.FinOrig, ConnFinOrig}, {mc.FinReply, ConnFinReply}, {mc.RST, ConnRST}} {
			if b.on {
				f |= b.f
			}
		}
		wantRows = append(wantRows, row{netip.AddrPortFrom(mc.Orig.Addr, mc.Orig.Port), netip.AddrPortFrom(mc.Resp.Addr, mc.Resp.Port), mc.Proto,
			mc.Src.Identity, mc.Dst.Identity, mc.Reason, f, mc.Epoch == m.epoch})
	}
	less := func(a, b row) int {
		if c := a.Src.Compare(b.Src); c != 0 {
			return c
		}
		if c := a.Dst.Compare(b.Dst); c != 0 {
			return c
		}
		return cmpInt(int(a.Proto), int(b.Proto))
	}
	slices.SortFunc(gotRows, less)
	slices.SortFunc(wantRows, less)
	if diff := cmp.Diff(wantRows, gotRows, cmpopts.EquateComparable(netip.AddrPort{})); diff != "" {
		t.Fatalf("world %d step %d: connection table (-model +classifier):\n%s", w, step, diff)
	}
}

// TestConntrackMemory reads what the kernel charges for the connection table (fdinfo's
// memlock) at two sizes and reports the cost per connection, the figure behind
// ConntrackEntryBytes and docs/performance.md. The table is preallocated, so the charge is
// the same empty or full.
func TestConntrackMemory(t *testing.T) {
	sizes := []int{1 << 16, 1 << 20}
	var mem []uint64
	for _, n := range sizes {
		c := newTestClassifier(t, ClassifierOptions{ConntrackSize: n})
		b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", c.objs.Conntrack.FD()))
		if err != nil {
			t.Fatal(err)
		}
		var memlock uint64
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "memlock:"); ok {
				memlock, err = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				if err != nil {
					t.Fatal(err)
				}
			}
		}
		if memlock == 0 {
			t.Fatalf("no memlock in fdinfo:\n%s", b)
		}
		mem = append(mem, memlock)
		c.Close()
	}
	per := float64(mem[1]-mem[0]) / float64(sizes[1]-sizes[0])
	t.Logf("connection table: %d entries %d bytes, %d entries %d bytes: %.0f bytes per connection, %.0f MiB per million",
		sizes[0], mem[0], sizes[1], mem[1], per, per*1e6/(1<<20))
	if per < 64 || per > ConntrackEntryBytes*1.5 {
		t.Errorf("%.0f bytes per connection: ConntrackEntryBytes (%d) and docs/performance.md are out of date", per, ConntrackEntryBytes)
	}
}
