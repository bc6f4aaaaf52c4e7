package datapath

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
)

// benchRepeat is how many times the kernel runs a program per measurement
// (BPF_PROG_TEST_RUN's repeat): enough for a stable per-packet time even with -benchtime 1x.
const benchRepeat = 300_000

// benchAddr returns the IPv4 and IPv6 address of the i-th benchmark pod.
func benchAddr(i int) (netip.Addr, netip.Addr) {
	v4 := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
	var b [16]byte
	b[0], b[1] = 0xfd, 0x00
	b[12], b[13], b[14], b[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
	return v4, netip.AddrFrom16(b)
}

// benchState is an ipcache of n identities (one IPv4 and one IPv6 pod each) and 100k policy
// entries among them, every identity default-deny both ways. Pods 0 and 1 are the packet's
// endpoints; their entries are placed so a packet needs the first or the last lookup.
func benchState(n int) (map[netip.Prefix]IPCacheEntry, map[PolicyKey]PolicyValue, map[EnforceKey]EnforceValue) {
	const policyEntries = 100_000
	rng := rand.New(rand.NewPCG(uint64(n), 7))
	ipc := make(map[netip.Prefix]IPCacheEntry, 2*n)
	enf := make(map[EnforceKey]EnforceValue, 2*n)
	id := func(i int) uint32 { return uint32(1000 + i) }
	for i := range n {
		v4, v6 := benchAddr(i)
		ipc[netip.PrefixFrom(v4, 32)] = IPCacheEntry{id(i), IPCacheLocalPod}
		ipc[netip.PrefixFrom(v6, 128)] = IPCacheEntry{id(i), IPCacheLocalPod}
		enf[EnforceKey{id(i), Egress}] = EnforceValue{EnforceDeny}
		enf[EnforceKey{id(i), Ingress}] = EnforceValue{EnforceDeny}
	}
	pol := make(map[PolicyKey]PolicyValue, policyEntries)
	// Endpoints: 0 may send TCP/80 to 1 (first lookup); 1 accepts TCP/80 from 0 (first
	// lookup); 0 may send anything anywhere and 1 accept anything (last lookups), used by
	// packets to other ports.
	pol[PolicyKey{id(0), id(1), 80, protoTCP, Egress}] = PolicyValue{}
	pol[PolicyKey{id(1), id(0), 80, protoTCP, Ingress}] = PolicyValue{}
	pol[PolicyKey{id(0), 0, 0, 0, Egress}] = PolicyValue{}
	pol[PolicyKey{id(1), 0, 0, 0, Ingress}] = PolicyValue{}
	for len(pol) < policyEntries {
		s, p := 2+rng.IntN(n-2), rng.IntN(n)
		pol[PolicyKey{id(s), id(p), uint16(1 + rng.IntN(1024)), protoTCP, Direction(rng.IntN(2))}] = PolicyValue{Rule: uint32(len(pol))}
	}
	return ipc, pol, enf
}

// measure returns the kernel's mean time per run of prog on frame.
func measure(b *testing.B, prog *ebpf.Program, frame []byte) time.Duration {
	b.Helper()
	_, d, err := prog.Benchmark(frame, benchRepeat, nil)
	if err != nil {
		b.Fatalf("benchmark %s: %v", prog, err)
	}
	return d
}

// measureEach runs prog once on each frame and returns the kernel's summed run time: the
// cost of packets that each open a connection of their own (every frame differs), which one
// frame repeated cannot show.
func measureEach(b *testing.B, prog *ebpf.Program, frames [][]byte) time.Duration {
	b.Helper()
	var sum time.Duration
	for _, f := range frames {
		_, d, err := prog.Benchmark(f, 1, nil)
		if err != nil {
			b.Fatalf("benchmark %s: %v", prog, err)
		}
		sum += d
	}
	return sum
}

// BenchmarkClassifier measures from_pod (and to_pod for replies) per packet against the
// passthrough program (the cost of BPF_PROG_TEST_RUN itself), with 1k, 10k and 65k identities
// in the ipcache and 100k policy entries, for the packets a connection is made of: its first
// packet (judged by policy and entered in the connection table; every run a new connection),
// a later packet from its originator (established), a packet of its responder (reply), and a
// denied packet (judged every time). Metrics: ns/pkt, base-ns/pkt (passthrough, measured the
// same way), ratio.
func BenchmarkClassifier(b *testing.B) {
	c := newTestClassifier(b, ClassifierOptions{})
	ctx := context.Background()
	a4, a6 := benchAddr(0)
	b4, b6 := benchAddr(1)
	w4 := netip.MustParseAddr("192.0.2.1")
	const fresh = 20_000 // first packets per measurement, each of a connection of its own
	cases := []struct {
		name  string
		pkt   testPacket
		first bool // every run a new connection (a new source port)
		reply bool // run the reverse frame on to_pod after one forward packet
		want  Reason
	}{
		// 2 ipcache + 2 enforce + 2 policy lookups, then a connection entered.
		{name: "v4-tcp-first-packet", pkt: testPacket{Src: a4, Dst: b4, Proto: protoTCP, Dport: 80}, first: true, want: ReasonAllowed},
		// 2 ipcache + 2 enforce + 12 policy lookups: the worst case, then a connection entered.
		{name: "v4-tcp-first-packet-last-lookup", pkt: testPacket{Src: a4, Dst: b4, Proto: protoTCP, Dport: 81}, first: true, want: ReasonAllowed},
		{name: "v6-tcp-first-packet-last-lookup", pkt: testPacket{Src: a6, Dst: b6, Proto: protoTCP, Dport: 81}, first: true, want: ReasonAllowed},
		// One connection table lookup.
		{name: "v4-tcp-established", pkt: testPacket{Src: a4, Dst: b4, Proto: protoTCP, Dport: 81, TCPFlags: tcpACK}, want: ReasonAllowed},
		{name: "v6-tcp-established", pkt: testPacket{Src: a6, Dst: b6, Proto: protoTCP, Dport: 81, TCPFlags: tcpACK}, want: ReasonAllowed},
		{name: "v4-tcp-reply", pkt: testPacket{Src: a4, Dst: b4, Proto: protoTCP, Dport: 81, TCPFlags: tcpACK}, reply: true, want: ReasonAllowed},
		// 1 ipcache miss (world), 6 policy lookups in vain, every time.
		{name: "v4-udp-denied", pkt: testPacket{Src: b4, Dst: w4, Proto: protoUDP, Dport: 53}, want: ReasonDeniedEgress},
	}
	for _, n := range []int{1000, 10_000, 65_000} {
		ipc, pol, enf := benchState(n)
		if _, err := c.ApplyIPCache(ctx, ipc); err != nil {
			b.Fatal(err)
		}
		if _, err := c.ApplyPolicy(ctx, pol, enf); err != nil {
			b.Fatal(err)
		}
		for _, tc := range cases {
			frame := tc.pkt.bytes()
			prog := c.objs.FromPod
			if _, got := c.run(b, prog, frame); got != tc.want {
				b.Fatalf("%s: reason %s, want %s", tc.name, got, tc.want)
			}
			if tc.reply {
				r := tc.pkt
				r.Src, r.Dst, r.Sport, r.Dport = tc.pkt.Dst, tc.pkt.Src, tc.pkt.Dport, 40000
				frame, prog = r.bytes(), c.objs.ToPod
				if _, got := c.run(b, prog, frame); got != tc.want {
					b.Fatalf("%s: reply's reason %s, want %s", tc.name, got, tc.want)
				}
			}
			var frames [][]byte
			if tc.first {
				for i := range fresh {
					p := tc.pkt
					p.Sport = uint16(1024 + i)
					frames = append(frames, p.bytes())
				}
			}
			b.Run(fmt.Sprintf("ids=%d/%s", n, tc.name), func(b *testing.B) {
				var d, base time.Duration
				var pkts int
				for b.Loop() {
					// Interleaved, so both see the same machine.
					if tc.first {
						c.clearConntrack(b)
						base += measureEach(b, c.objs.Passthrough, frames)
						d += measureEach(b, prog, frames)
						pkts += len(frames)
						continue
					}
					// measure returns the time per run of benchRepeat runs.
					base += measure(b, c.objs.Passthrough, frame)
					d += measure(b, prog, frame)
					pkts++
				}
				b.ReportMetric(float64(d.Nanoseconds())/float64(pkts), "ns/pkt")
				b.ReportMetric(float64(base.Nanoseconds())/float64(pkts), "base-ns/pkt")
				b.ReportMetric(float64(d)/float64(base), "ratio")
			})
		}
	}
}

// BenchmarkClassifierApply measures one Apply of the full desired state when one entry
// changed, at the benchmark's largest size (65k identities: 130k ipcache entries; 100k policy
// entries): the diff is in memory, the kernel sees one update.
func BenchmarkClassifierApply(b *testing.B) {
	c := newTestClassifier(b, ClassifierOptions{})
	ctx := context.Background()
	ipc, pol, enf := benchState(65_000)
	start := time.Now()
	if _, err := c.ApplyIPCache(ctx, ipc); err != nil {
		b.Fatal(err)
	}
	fillIPCache := time.Since(start)
	start = time.Now()
	if _, err := c.ApplyPolicy(ctx, pol, enf); err != nil {
		b.Fatal(err)
	}
	fillPolicy := time.Since(start)
	b.Logf("initial fill: ipcache %d entries in %s, policy+enforce %d entries in %s",
		len(ipc), fillIPCache.Round(time.Millisecond), len(pol)+len(enf), fillPolicy.Round(time.Millisecond))

	v4, _ := benchAddr(7)
	key := netip.PrefixFrom(v4, 32)
	n := 0 // survives the benchmark's reruns: every Apply changes one entry
	b.Run("ipcache-one-change", func(b *testing.B) {
		for b.Loop() {
			n++
			ipc[key] = IPCacheEntry{Identity: uint32(5000 + n%2), Flags: IPCacheLocalPod}
			st, err := c.ApplyIPCache(ctx, ipc)
			if err != nil || st.Updated != 1 || st.Added+st.Removed != 0 {
				b.Fatalf("%+v, %v", st, err)
			}
		}
	})
	pk := PolicyKey{Subject: 1000, Peer: 1001, Port: 80, Proto: protoTCP, Dir: Egress}
	b.Run("policy-one-change", func(b *testing.B) {
		for b.Loop() {
			n++
			pol[pk] = PolicyValue{Rule: uint32(1 + n%2)}
			st, err := c.ApplyPolicy(ctx, pol, enf)
			if err != nil || st.Updated != 1 || st.Added+st.Removed != 0 {
				b.Fatalf("%+v, %v", st, err)
			}
		}
	})
}

// BenchmarkClassifierFlowEvents measures what flow events add to from_pod, at 10k identities
// and 100k policy entries, for an allowed and a denied packet: events off (one array lookup),
// on but the allowed packet not sampled (the per-CPU countdown; drops are always candidates),
// on but rate-limited (the
// clock and the token bucket), and on with every packet written to the ring (drained between
// measurements, which therefore run fewer packets). Metrics: ns/pkt and, against events off,
// extra-ns/pkt.
func BenchmarkClassifierFlowEvents(b *testing.B) {
	c := newTestClassifier(b, ClassifierOptions{})
	ctx := context.Background()
	ipc, pol, enf := benchState(10_000)
	if _, err := c.ApplyIPCache(ctx, ipc); err != nil {
		b.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, pol, enf); err != nil {
		b.Fatal(err)
	}
	r, err := c.NewFlowReader()
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	drain := func() {
		for r.rd.AvailableBytes() > 0 {
			if _, err := r.Read(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	a4, _ := benchAddr(0)
	b4, _ := benchAddr(1)
	packets := []struct {
		name string
		pkt  testPacket
	}{
		{"allowed", testPacket{Src: a4, Dst: b4, Proto: protoUDP, Dport: 81}},
		{"denied", testPacket{Src: b4, Dst: netip.MustParseAddr("192.0.2.1"), Proto: protoUDP, Dport: 53}},
	}
	modes := []struct {
		name   string
		cfg    FlowConfig
		repeat int
	}{
		{"off", FlowConfig{}, benchRepeat},
		{"not-sampled", FlowConfig{Rate: 1000, Sample: 1 << 30}, benchRepeat},
		{"rate-limited", FlowConfig{Rate: 1, Sample: 1}, benchRepeat},
		{"written", FlowConfig{Rate: 1 << 30, Sample: 1}, 3000},
	}
	for _, p := range packets {
		frame := p.pkt.bytes()
		var off float64
		for _, m := range modes {
			if p.name == "denied" && m.name == "not-sampled" {
				continue // every drop is a candidate
			}
			b.Run(p.name+"/"+m.name, func(b *testing.B) {
				var total time.Duration
				for b.Loop() {
					b.StopTimer()
					if err := c.SetFlowEvents(FlowConfig{}); err != nil {
						b.Fatal(err)
					}
					if err := c.SetFlowEvents(m.cfg); err != nil {
						b.Fatal(err)
					}
					// Spend the rate-limited bucket's one token first.
					if _, _, err := c.objs.FromPod.Benchmark(frame, 1, nil); err != nil {
						b.Fatal(err)
					}
					drain()
					b.StartTimer()
					_, d, err := c.objs.FromPod.Benchmark(frame, m.repeat, nil)
					if err != nil {
						b.Fatal(err)
					}
					total += d
				}
				drain()
				ns := float64(total.Nanoseconds()) / float64(b.N)
				if m.name == "off" {
					off = ns
				}
				b.ReportMetric(ns, "ns/pkt")
				b.ReportMetric(ns-off, "extra-ns/pkt")
			})
		}
	}
	if err := c.SetFlowEvents(FlowConfig{}); err != nil {
		b.Fatal(err)
	}
}
