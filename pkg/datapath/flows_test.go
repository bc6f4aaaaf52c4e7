package datapath

import (
	"context"
	"errors"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"golang.org/x/sys/unix"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

// allEvents turns flow events on for every candidate: no rate limit to speak of, every
// allowed packet sampled.
var allEvents = FlowConfig{Rate: math.MaxUint32, Sample: 1}

// hangGuard bounds a read that should return at once, so that a bug fails the test rather
// than hanging it. It is not a timing assertion: the event is in the ring before Read starts.
const hangGuard = time.Minute

func newFlowReader(t testing.TB, c *Classifier) *FlowReader {
	t.Helper()
	r, err := c.NewFlowReader()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// readFlow reads the event a run just wrote.
func readFlow(t testing.TB, r *FlowReader) Flow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	f, err := r.Read(ctx)
	if err != nil {
		t.Fatalf("read flow event: %v", err)
	}
	return f
}

// ringEmpty reports whether the ring holds no event.
func ringEmpty(r *FlowReader) bool { return r.rd.AvailableBytes() == 0 }

func flowStats(t testing.TB, c *Classifier) FlowStats {
	t.Helper()
	st, err := c.FlowStats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// ignoreFlowNoise ignores what the kernel chooses (time, test-run interface).
var ignoreFlowNoise = cmp.Options{
	cmpopts.IgnoreFields(Flow{}, "Time", "Ifindex"),
	cmpopts.EquateComparable(netip.AddrPort{}),
}

// TestFlowEvents runs crafted packets and checks the event each one yields, field by field,
// and that the verdict is the one the verdict table gives without events.
func TestFlowEvents(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if err := c.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
	r := newFlowReader(t, c)
	ap := func(a netip.Addr, p uint16) netip.AddrPort { return netip.AddrPortFrom(a, p) }
	aEgressDeny := map[ek]EnforceValue{{idA, Egress}: denyOnly}
	tests := []struct {
		name    string
		toPod   bool
		policy  map[pk]pv
		enforce map[ek]EnforceValue
		pkt     testPacket
		want    Flow
	}{
		{
			name: "denied-egress", enforce: aEgressDeny,
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, Dport: 80},
			want: Flow{Direction: FromPod, Reason: ReasonDeniedEgress, SrcIdentity: idA, DstIdentity: idB,
				Src: ap(podA4, 40000), Dst: ap(podB4, 80), Proto: protoTCP, TCPFlags: 0x02},
		},
		{
			name:    "denied-ingress-remote-v6",
			enforce: map[ek]EnforceValue{{idD, Ingress}: denyOnly},
			pkt:     testPacket{Src: podA6, Dst: remD6, Proto: protoUDP, Dport: 7100},
			// The tunnel is ready, but a dropped packet goes nowhere: not encrypted.
			want: Flow{Direction: FromPod, Reason: ReasonDeniedIngress, SrcIdentity: idA, DstIdentity: idD,
				Src: ap(podA6, 40000), Dst: ap(remD6, 7100), Proto: protoUDP, Remote: true},
		},
		{
			name: "allowed-encrypted", enforce: aEgressDeny,
			policy: map[pk]pv{{idA, idD, 443, protoTCP, Egress}: {Flags: PolicyEncrypt}},
			pkt:    testPacket{Src: podA4, Dst: remD4, Proto: protoTCP, Dport: 443},
			want: Flow{Direction: FromPod, Reason: ReasonAllowed, SrcIdentity: idA, DstIdentity: idD,
				Src: ap(podA4, 40000), Dst: ap(remD4, 443), Proto: protoTCP, TCPFlags: 0x02, Remote: true, Encrypted: true},
		},
		{
			name: "allowed-remote-in-clear",
			pkt:  testPacket{Src: podA4, Dst: remC4, Proto: protoUDP, Dport: 53},
			want: Flow{Direction: FromPod, Reason: ReasonAllowedNoPolicy, SrcIdentity: idA, DstIdentity: idC,
				Src: ap(podA4, 40000), Dst: ap(remC4, 53), Proto: protoUDP, Remote: true, Sampled: true},
		},
		{
			name: "dropped-not-encrypted", enforce: aEgressDeny,
			policy: map[pk]pv{{idA, idC, 0, 0, Egress}: {Flags: PolicyEncrypt}},
			pkt:    testPacket{Src: podA4, Dst: remC4, Proto: protoUDP, Dport: 53},
			want: Flow{Direction: FromPod, Reason: ReasonDropNotEncrypted, SrcIdentity: idA, DstIdentity: idC,
				Src: ap(podA4, 40000), Dst: ap(remC4, 53), Proto: protoUDP, Remote: true},
		},
		{
			name: "allowed-local", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoICMPv6},
			want: Flow{Direction: FromPod, Reason: ReasonAllowedNoPolicy, SrcIdentity: idA, DstIdentity: idB,
				Src: ap(podA6, 0), Dst: ap(podB6, 0), Proto: protoICMPv6, Sampled: true},
		},
		{
			// to_pod without default-deny skips the source lookup for the verdict; the
			// event still names the source, which came out of the tunnel.
			name: "to-pod-decrypted", toPod: true,
			pkt: testPacket{Src: remD4, Dst: podB4, Proto: protoUDP, Dport: 7100},
			want: Flow{Direction: ToPod, Reason: ReasonAllowedNoPolicy, SrcIdentity: idD, DstIdentity: idB,
				Src: ap(remD4, 40000), Dst: ap(podB4, 7100), Proto: protoUDP, Remote: true, Encrypted: true, Sampled: true},
		},
		{
			name: "to-pod-denied", toPod: true, enforce: map[ek]EnforceValue{{idB, Ingress}: denyOnly},
			pkt: testPacket{Src: remC6, Dst: podB6, Proto: protoTCP, Dport: 22},
			want: Flow{Direction: ToPod, Reason: ReasonDeniedIngress, SrcIdentity: idC, DstIdentity: idB,
				Src: ap(remC6, 40000), Dst: ap(podB6, 22), Proto: protoTCP, TCPFlags: 0x02, Remote: true},
		},
		{
			name: "world", enforce: aEgressDeny,
			pkt: testPacket{Src: podA4, Dst: world4, Proto: protoUDP, Dport: 53},
			want: Flow{Direction: FromPod, Reason: ReasonDeniedEgress, SrcIdentity: idA, DstIdentity: identityWorld,
				Src: ap(podA4, 40000), Dst: ap(world4, 53), Proto: protoUDP},
		},
		{
			// Malformed: the addresses were parsed, the identities were never looked up.
			name: "malformed-tcp", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, L4: make([]byte, 19)},
			want: Flow{Direction: FromPod, Reason: ReasonDropMalformed, Src: ap(podA4, 0), Dst: ap(podB4, 0), Proto: protoTCP},
		},
		{
			name: "malformed-ihl", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, IHL: 4},
			want: Flow{Direction: FromPod, Reason: ReasonDropMalformed},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := c.ApplyPolicy(ctx, tt.policy, tt.enforce); err != nil {
				t.Fatal(err)
			}
			c.clearConntrack(t) // every case is a first packet
			prog := c.objs.FromPod
			if tt.toPod {
				prog = c.objs.ToPod
			}
			frame := tt.pkt.bytes()
			before := time.Now()
			verdict, reason := c.run(t, prog, frame)
			if reason != tt.want.Reason {
				t.Fatalf("reason %s, want %s", reason, tt.want.Reason)
			}
			if want := map[bool]uint32{false: verdictPass, true: verdictDrop}[reason.Dropped()]; verdict != want {
				t.Errorf("verdict %d, want %d", verdict, want)
			}
			got := readFlow(t, r)
			tt.want.Length = uint32(len(frame))
			if diff := cmp.Diff(tt.want, got, ignoreFlowNoise); diff != "" {
				t.Errorf("flow (-want +got):\n%s", diff)
			}
			// The clock conversion lands between the run and now (give or take the clocks'
			// rounding): not a measure of speed, a check of the conversion's sign and origin.
			if got.Time.Before(before.Add(-time.Second)) || got.Time.After(time.Now().Add(time.Second)) {
				t.Errorf("event time %s outside [%s, now]", got.Time, before)
			}
			if got.Dropped() != reason.Dropped() {
				t.Errorf("Dropped() = %v for %s", got.Dropped(), reason)
			}
			if !ringEmpty(r) {
				t.Errorf("more than one event for one packet")
			}
		})
	}

	t.Run("non-ip-no-event", func(t *testing.T) {
		c.run(t, c.objs.FromPod, arpFrame())
		if !ringEmpty(r) {
			t.Errorf("an ARP frame made an event")
		}
	})
	t.Run("events-off", func(t *testing.T) {
		if err := c.SetFlowEvents(FlowConfig{}); err != nil {
			t.Fatal(err)
		}
		defer c.SetFlowEvents(allEvents)
		c.run(t, c.objs.FromPod, testPacket{Src: podA4, Dst: world4, Proto: protoUDP, Dport: 53}.bytes())
		if !ringEmpty(r) {
			t.Errorf("an event with flow events off")
		}
	})
}

// pinToOneCPU keeps the calling goroutine on one OS thread bound to one CPU, so that the
// per-CPU sampler sees every run. The thread is discarded when the goroutine ends. A subtest
// runs on a goroutine of its own and must pin itself; every pin picks the same CPU (the first
// the process may use).
func pinToOneCPU(t *testing.T) {
	t.Helper()
	runtime.LockOSThread()
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	for cpu := range 1024 {
		if set.IsSet(cpu) {
			set.Zero()
			set.Set(cpu)
			break
		}
	}
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
}

// TestFlowSampling: drops are always candidates; allowed packets 1 in N per CPU, starting with
// the first after events are turned on; a TCP SYN always; Sample 0 reports drops only.
func TestFlowSampling(t *testing.T) {
	pinToOneCPU(t)
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, nil, map[ek]EnforceValue{{idA, Egress}: denyOnly}); err != nil {
		t.Fatal(err)
	}
	r := newFlowReader(t, c)
	allowed := testPacket{Src: podB4, Dst: podA4, Proto: protoUDP, Dport: 53}.bytes()
	ack := testPacket{Src: podB4, Dst: podA4, Proto: protoTCP, Dport: 80}.bytes()
	ack[14+20+13] = 0x10 // ACK: not a connection's first packet
	syn := testPacket{Src: podB4, Dst: podA4, Proto: protoTCP, Dport: 80}.bytes()
	denied := testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Dport: 53}.bytes()

	// events runs frames in order and returns the indexes of those that made an event.
	events := func(t *testing.T, frames ...[]byte) []int {
		t.Helper()
		var out []int
		for i, f := range frames {
			c.run(t, c.objs.FromPod, f)
			if !ringEmpty(r) {
				readFlow(t, r)
				out = append(out, i)
			}
		}
		if !ringEmpty(r) {
			t.Fatal("events left over")
		}
		return out
	}
	repeat := func(f []byte, n int) [][]byte {
		out := make([][]byte, n)
		for i := range out {
			out[i] = f
		}
		return out
	}
	for _, tt := range []struct {
		name   string
		cfg    FlowConfig
		frames [][]byte
		want   []int
	}{
		{"one-in-three", FlowConfig{Rate: 1000, Sample: 3}, repeat(allowed, 8), []int{0, 3, 6}},
		{"drops-always", FlowConfig{Rate: 1000, Sample: 3}, repeat(denied, 4), []int{0, 1, 2, 3}},
		{"syn-always", FlowConfig{Rate: 1000, Sample: 100}, [][]byte{syn, ack, ack, syn, ack, syn}, []int{0, 1, 3, 5}},
		{"drops-only", FlowConfig{Rate: 1000}, [][]byte{allowed, syn, denied, allowed, denied}, []int{2, 4}},
		{"off", FlowConfig{Sample: 1}, [][]byte{allowed, denied}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pinToOneCPU(t) // a subtest runs on a goroutine of its own: the parent's pin does not hold here
			// Off, then on: the sampler starts afresh.
			if err := c.SetFlowEvents(FlowConfig{}); err != nil {
				t.Fatal(err)
			}
			if err := c.SetFlowEvents(tt.cfg); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, events(t, tt.frames...)); diff != "" {
				t.Errorf("frames with events (-want +got):\n%s", diff)
			}
		})
	}

	t.Run("sampled-flag", func(t *testing.T) {
		if err := c.SetFlowEvents(FlowConfig{Rate: 1000, Sample: 2}); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			frame   []byte
			sampled bool
		}{{syn, false}, {allowed, true}, {denied, false}} {
			if err := c.SetFlowEvents(FlowConfig{}); err != nil {
				t.Fatal(err)
			}
			if err := c.SetFlowEvents(FlowConfig{Rate: 1000, Sample: 2}); err != nil {
				t.Fatal(err)
			}
			c.run(t, c.objs.FromPod, tc.frame)
			if f := readFlow(t, r); f.Sampled != tc.sampled {
				t.Errorf("%s: Sampled = %v, want %v", f.Reason, f.Sampled, tc.sampled)
			}
		}
	})
}

// TestFlowRateLimit: past its burst, a CPU writes no more events of a class until its bucket
// refills, and counts the suppressed candidates; the verdicts do not change.
func TestFlowRateLimit(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, nil, map[ek]EnforceValue{{idA, Egress}: denyOnly}); err != nil {
		t.Fatal(err)
	}
	// One event per second and CPU: the bucket holds one token.
	if err := c.SetFlowEvents(FlowConfig{Rate: 1, Sample: 1}); err != nil {
		t.Fatal(err)
	}
	const runs = 50
	denied := testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Dport: 53}.bytes()
	restarts := 0
	verdict, _, err := c.objs.FromPod.Benchmark(denied, runs, func() { restarts++ })
	if err != nil {
		t.Fatal(err)
	}
	if verdict != verdictDrop {
		t.Errorf("verdict %d, want drop", verdict)
	}
	cnt, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	ran := cnt[ReasonDeniedEgress].Packets
	if ran < runs || ran > maxTestRuns(runs, restarts) {
		t.Errorf("%d packets counted as denied, want %d (the batch restarted %d times)", ran, runs, restarts)
	}
	st := flowStats(t, c)
	if st.Submitted+st.RateLimited+st.Lost != ran {
		t.Errorf("stats %+v: %d candidates accounted for, want %d (the packets counted)", st, st.Submitted+st.RateLimited+st.Lost, ran)
	}
	// 50 runs in one kernel loop: the bucket cannot have refilled for each of them.
	if st.RateLimited == 0 || st.Submitted == 0 {
		t.Errorf("stats %+v: want some events and some suppressed", st)
	}
}

// maxTestRuns bounds how often BPF_PROG_TEST_RUN ran a program asked to run runs times in a
// batch that restarted restarts times. A signal (the Go runtime preempts with SIGURG) ends a
// batch with EINTR after some of its runs, and cilium/ebpf then starts the whole batch again
// (calling RunOptions.Reset), so each restart may add up to runs; seen on Linux 6.12 in the VM,
// where a batch of 7280 runs takes long enough under TCG. Linux 6.1's BPF_PROG_TEST_RUN may run
// a program once more than asked (also seen in the VM).
func maxTestRuns(runs, restarts int) uint64 {
	return uint64(runs*(1+restarts) + 1)
}

// TestFlowRingFull: with nobody reading, the ring fills; later candidates are counted as lost
// and every packet still gets its verdict and its count. Once read, the ring takes events
// again.
func TestFlowRingFull(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx, nil, map[ek]EnforceValue{{idA, Egress}: denyOnly}); err != nil {
		t.Fatal(err)
	}
	if err := c.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
	// More events than the ring holds (each takes its size plus an 8-byte header).
	capacity := flowRingSize / (flowEventSize + 8)
	runs := 2 * capacity
	denied := testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Dport: 53}.bytes()
	allowed := testPacket{Src: podB4, Dst: podA4, Proto: protoUDP, Dport: 53}.bytes()
	restarts := map[Reason]int{}
	for _, tc := range []struct {
		frame   []byte
		verdict uint32
		reason  Reason
	}{{denied, verdictDrop, ReasonDeniedEgress}, {allowed, verdictPass, ReasonAllowedNoPolicy}} {
		verdict, _, err := c.objs.FromPod.Benchmark(tc.frame, runs, func() { restarts[tc.reason]++ })
		if err != nil {
			t.Fatal(err)
		}
		if verdict != tc.verdict {
			t.Errorf("%s with the ring full: verdict %d, want %d", tc.reason, verdict, tc.verdict)
		}
	}
	cnt, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	// Every run must be counted (a batch may run more than asked: see maxTestRuns), and every
	// counted packet is an event candidate.
	ran := cnt[ReasonDeniedEgress].Packets + cnt[ReasonAllowedNoPolicy].Packets
	for _, r := range []Reason{ReasonDeniedEgress, ReasonAllowedNoPolicy} {
		if n := cnt[r].Packets; n < uint64(runs) || n > maxTestRuns(runs, restarts[r]) {
			t.Errorf("counters %v: %d of %s, want %d (the batch restarted %d times)", cnt, n, r, runs, restarts[r])
		}
	}
	st := flowStats(t, c)
	t.Logf("ring of %d bytes: %+v; counters %v, batches restarted %v", flowRingSize, st, cnt, restarts)
	if st.Submitted+st.Lost+st.RateLimited != ran {
		t.Errorf("stats %+v: want %d candidates (the packets counted)", st, ran)
	}
	if st.Lost < uint64(runs) || st.Submitted > uint64(capacity) {
		t.Errorf("stats %+v: the ring of %d events did not fill", st, capacity)
	}

	// Every event written is there to read, then the ring has room again.
	r := newFlowReader(t, c)
	var read uint64
	for !ringEmpty(r) {
		if f := readFlow(t, r); f.Reason != ReasonDeniedEgress {
			t.Fatalf("event %d: reason %s, want the denied packets' (first in, first out)", read, f.Reason)
		}
		read++
	}
	if read != st.Submitted {
		t.Errorf("read %d events, %d were submitted", read, st.Submitted)
	}
	c.run(t, c.objs.FromPod, allowed)
	if f := readFlow(t, r); f.Reason != ReasonAllowedNoPolicy {
		t.Errorf("after draining: reason %s", f.Reason)
	}
}

// TestFlowEventsMatchModel runs the random-packet comparison with flow events on: first
// reading every event and checking it against the model, then leaving the ring to fill. The
// event path never changes a reason or a verdict (matchModel checks both on every packet).
func TestFlowEventsMatchModel(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	if err := c.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
	r := newFlowReader(t, c)
	const worlds, packets = 40, 150
	checked := 0
	matchModel(t, c, worlds, packets, func(w int, m *model, fromPod bool, frame []byte, res modelResult) {
		got := res.Reason
		if w >= worlds/2 || got == ReasonPassNonIP {
			return // the second half fills the ring
		}
		want := m.flow(fromPod, frame, res)
		f := readFlow(t, r)
		if got == ReasonDropMalformed {
			// What the parser got to before giving up is not part of the contract.
			f.Src, f.Dst, f.Proto = netip.AddrPort{}, netip.AddrPort{}, 0
		}
		if diff := cmp.Diff(want, f, ignoreFlowNoise); diff != "" {
			t.Fatalf("world %d, from_pod=%v, frame % x: flow (-want +got):\n%s", w, fromPod, frame, diff)
		}
		checked++
	})
	st := flowStats(t, c)
	t.Logf("%d events checked against the model; %+v", checked, st)
	if st.Lost == 0 {
		t.Errorf("the ring never filled: %+v", st)
	}
}

// flow is the event the model expects for a frame it classified as res.
func (m *model) flow(fromPod bool, frame []byte, res modelResult) Flow {
	reason := res.Reason
	pkt, kind := modelParse(frame)
	f := Flow{Direction: FromPod, Reason: reason, Proto: pkt.Proto, Length: uint32(len(frame)),
		Tracked: res.Tracked, Reply: res.Reply}
	if !fromPod {
		f.Direction = ToPod
	}
	if kind == parsedMalformed {
		f.Proto = 0 // with the addresses, not compared (see TestFlowEventsMatchModel)
		return f
	}
	f.Src = netip.AddrPortFrom(pkt.Src, pkt.Sport)
	f.Dst = netip.AddrPortFrom(pkt.Dst, pkt.Dport)
	f.TCPFlags = pkt.TCPFlags
	src, dst := m.lookup(pkt.Src), m.lookup(pkt.Dst)
	f.SrcIdentity, f.DstIdentity = src.Identity, dst.Identity
	peer := dst
	if !fromPod {
		peer = src
	}
	if peer.Flags&IPCacheRemotePod != 0 && peer.Flags&IPCacheLocalPod == 0 {
		f.Remote = true
		f.Encrypted = peer.Flags&IPCacheTunnelReady != 0 && !reason.Dropped()
	}
	synOnly := pkt.Proto == protoTCP && pkt.TCPFlags&0x12 == 0x02
	f.Sampled = !reason.Dropped() && !synOnly
	return f
}

// TestFlowReaderPinned: events left in the pinned ring by one Classifier (an agent that
// exited) are read by the next one on the same PinPath.
func TestFlowReaderPinned(t *testing.T) {
	testutil.RequireRoot(t)
	pin := bpffsDir(t)
	c1 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if err := c1.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
	c1.run(t, c1.objs.FromPod, testPacket{Src: podA4, Dst: world4, Proto: protoUDP, Dport: 1234}.bytes())
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	c2 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	r := newFlowReader(t, c2)
	if f := readFlow(t, r); f.Dst.Port() != 1234 {
		t.Errorf("read %+v, want the event the first classifier wrote", f)
	}
	if st := flowStats(t, c2); st.Submitted != 1 {
		t.Errorf("stats after reload: %+v", st)
	}
}

// TestFlowReaderStops: Read returns ctx's error when ctx ends and ErrFlowReaderClosed after
// Close, also when it is waiting.
func TestFlowReaderStops(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	r := newFlowReader(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := r.Read(ctx)
		errc <- err
	}()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("Read after cancel: %v", err)
	}
	// A waiting Read (nothing is written) ends with Close.
	go func() {
		_, err := r.Read(context.Background())
		errc <- err
	}()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrFlowReaderClosed) {
		t.Errorf("Read after Close: %v", err)
	}
	if _, err := r.Read(context.Background()); !errors.Is(err, ErrFlowReaderClosed) {
		t.Errorf("Read on a closed reader: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestFlowConfigSurvivesStrict: the flags and the flow knobs share the config map without
// overwriting each other.
func TestFlowConfigSurvivesStrict(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	if err := c.SetFlowEvents(FlowConfig{Rate: 7, Sample: 9}); err != nil {
		t.Fatal(err)
	}
	if err := c.SetStrict(true); err != nil {
		t.Fatal(err)
	}
	var got [3]uint32
	for i := range got {
		if err := c.objs.Config.Lookup(uint32(i), &got[i]); err != nil {
			t.Fatal(err)
		}
	}
	if got != [3]uint32{configStrict, 7, 9} {
		t.Errorf("config = %v", got)
	}
	if c.objs.Config.MaxEntries() != 4 || c.objs.FlowEvents.Type() != ebpf.RingBuf || c.objs.FlowEvents.MaxEntries() != flowRingSize {
		t.Errorf("maps differ from docs/datapath.md")
	}
}

// TestFlowConfigUpgrade: the one-entry config map an agent without flow events pinned is
// replaced by the four-entry one (zeroed; the agent's reconcile sets strict mode again).
func TestFlowConfigUpgrade(t *testing.T) {
	testutil.RequireRoot(t)
	pin := bpffsDir(t)
	if err := os.MkdirAll(pin, 0o700); err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "config", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Update(uint32(0), configStrict, ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if err := old.Pin(filepath.Join(pin, "config")); err != nil {
		t.Fatal(err)
	}
	c := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if n := c.objs.Config.MaxEntries(); n != 4 {
		t.Fatalf("config has %d entries, want 4", n)
	}
	if err := c.SetFlowEvents(allEvents); err != nil {
		t.Fatal(err)
	}
}
