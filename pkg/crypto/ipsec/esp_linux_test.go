package ipsec_test

// The ESP data path, for real: nodes are network namespaces on a bridge
// (tests/netenv), pods are namespaces routed through their node, and pod
// traffic crosses the underlay in tunnel-mode ESP. These tests need a kernel
// with ESP and GCM; the build hosts have neither, so they run in the kernel
// VM suite (tests/vm), where they must not skip.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
	"github.com/vishvananda/netlink"
)

const espSkip = "ESP (CONFIG_INET_ESP) not available: covered in the VM suite"

// requireESP skips the test when the kernel cannot install ESP states, as
// [ipsec.Supported] finds out in a fresh namespace.
func requireESP(t *testing.T) {
	t.Helper()
	_, h := testutil.NewNetNS(t)
	err := ipsec.Supported(h)
	if errors.Is(err, ipsec.ErrNotSupported) {
		t.Skip(espSkip)
	}
	if err != nil {
		t.Fatalf("Supported: %v", err)
	}
}

// espNode is a netenv node with one pod and its IPsec data plane.
type espNode struct {
	net  *netenv.Node
	pod  *netenv.Pod
	h    *netlink.Handle
	x    *ipsec.XFRM
	node ipsec.Node
	log  *slog.Logger
}

func randomID(t testing.TB) string {
	t.Helper()
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// newESPPair builds two nodes "a" and "b" (dual-stack pods, IPsec over the
// IPv4 or the IPv6 underlay) with one pod each. IPsec is not configured.
func newESPPair(t *testing.T, underlay6 bool) (*netenv.Topology, *espNode, *espNode) {
	t.Helper()
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	topo := netenv.NewT(t, netenv.Options{})
	var nodes []*espNode
	for i, name := range []string{"a", "b"} {
		n, err := topo.AddNode(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		pod, err := topo.AddPod(ctx, n, "p")
		if err != nil {
			t.Fatal(err)
		}
		h, err := n.NS.Handle()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close)
		ul := n.UnderlayV4
		if underlay6 {
			ul = n.UnderlayV6
		}
		nlog := log.With("node", name)
		nodes = append(nodes, &espNode{
			net: n, pod: pod, h: h, log: nlog,
			x: ipsec.NewXFRM(h, ipsec.XFRMOptions{Logger: nlog}),
			// IDs with bits in every part of the wire SPI.
			node: ipsec.Node{Name: name, ID: uint16(0x0a01 + i*0x1101), BootID: randomID(t), Underlay: ul, PodCIDRs: n.PodCIDRs},
		})
	}
	return topo, nodes[0], nodes[1]
}

// apply plans n's XFRM for its peers and applies it.
func (n *espNode) apply(t *testing.T, kr ipsec.Keyring, outSPI uint8, peers ...*espNode) (ipsec.Desired, ipsec.Stats, error) {
	t.Helper()
	var remotes []ipsec.Node
	for _, p := range peers {
		remotes = append(remotes, p.node)
	}
	d, err := ipsec.Plan(n.node, remotes, kr, ipsec.PlanOptions{OutboundSPI: outSPI})
	if err != nil {
		t.Fatalf("plan %s: %v", n.node.Name, err)
	}
	if len(d.Skipped) > 0 {
		t.Fatalf("plan %s skipped %v", n.node.Name, d.Skipped)
	}
	st, err := n.x.Apply(context.Background(), d)
	return d, st, err
}

func (n *espNode) mustApply(t *testing.T, kr ipsec.Keyring, outSPI uint8, peers ...*espNode) ipsec.Stats {
	t.Helper()
	_, st, err := n.apply(t, kr, outSPI, peers...)
	if err != nil {
		t.Fatalf("apply %s: %v", n.node.Name, err)
	}
	return st
}

// xfrmStat reads the XFRM counters of n's namespace, or nil without
// CONFIG_XFRM_STATISTICS.
func (n *espNode) xfrmStat(t *testing.T) map[string]uint64 {
	t.Helper()
	var m map[string]uint64
	err := n.net.NS.Do(func() error {
		var err error
		m, err = ipsec.ReadXfrmStat("/proc/thread-self/net/xfrm_stat")
		return err
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// checkNoXfrmErrors fails on XFRM error counters that a healthy tunnel and
// a lossless rotation never increment.
func (n *espNode) checkNoXfrmErrors(t *testing.T) {
	t.Helper()
	m := n.xfrmStat(t)
	if m == nil {
		t.Logf("%s: no XFRM statistics in this kernel", n.node.Name)
		return
	}
	for _, c := range []string{"XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateSeqError", "XfrmInTmplMismatch", "XfrmInNoPols",
		"XfrmOutNoStates", "XfrmOutStateSeqError", "XfrmOutPolBlock", "XfrmInStateInvalid", "XfrmOutStateInvalid", "XfrmOutPolDead"} {
		if m[c] != 0 {
			t.Errorf("%s: %s = %d", n.node.Name, c, m[c])
		}
	}
}

func marker(t *testing.T, what string) []byte {
	return []byte("MESHCRYPT-IPSEC-" + what + "-" + randomID(t))
}

// exchange sends count datagrams carrying mark from one pod to another and
// returns how many arrived within wait.
func exchange(t *testing.T, from, to *netenv.Pod, dst netip.Addr, mark []byte, count int, wait time.Duration) int {
	t.Helper()
	port := 7000 + int(randomID(t)[0]%100)
	rx, err := to.NS.ListenUDP(netip.AddrPortFrom(dst, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	tx, err := from.NS.DialUDP(netip.AddrPortFrom(dst, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	got := 0
	buf := make([]byte, 2048)
	deadline := time.Now().Add(wait)
	for i := range count {
		if _, err := tx.Write(fmt.Appendf(append([]byte{}, mark...), "-%d", i)); err != nil {
			t.Fatalf("send: %v", err)
		}
		rx.SetReadDeadline(time.Now().Add(wait / time.Duration(count)))
		if n, err := rx.Read(buf); err == nil && strings.HasPrefix(string(buf[:n]), string(mark)) {
			got++
		}
	}
	// Late arrivals.
	rx.SetReadDeadline(deadline)
	for got < count {
		n, err := rx.Read(buf)
		if err != nil {
			break
		}
		if strings.HasPrefix(string(buf[:n]), string(mark)) {
			got++
		}
	}
	return got
}

func innerFamily(ipv6 bool) string {
	if ipv6 {
		return "IPv6-pods"
	}
	return "IPv4-pods"
}

func podAddr(p *netenv.Pod, v6 bool) netip.Addr {
	if v6 {
		return p.IPv6
	}
	return p.IPv4
}

// TestESPTunnel: pod traffic between two nodes, IPv4 and IPv6 pods, over an
// IPv4 and an IPv6 underlay: pings and UDP pass, the underlay carries ESP
// and never the plaintext marker, full-size packets of exactly
// ipsec.TunnelMTU pass with DF and one byte more is refused, and the state
// counters show the traffic.
func TestESPTunnel(t *testing.T) {
	requireESP(t)
	for _, tc := range []struct {
		name      string
		underlay6 bool
	}{{"underlay-ipv4", false}, {"underlay-ipv6", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			topo, a, b := newESPPair(t, tc.underlay6)
			clearMark, mark := marker(t, "CLEAR"), marker(t, "SECRET")
			capt, err := topo.CaptureUnderlay(netenv.CaptureOptions{Markers: [][]byte{clearMark, mark}})
			if err != nil {
				t.Fatal(err)
			}
			defer capt.Stop()

			// Baseline: without IPsec the marker crosses the underlay in
			// clear, so the capture would see a leak.
			if got := exchange(t, a.pod, b.pod, b.pod.IPv4, clearMark, 3, 5*time.Second); got != 3 {
				t.Fatalf("plain UDP: %d of 3 datagrams arrived", got)
			}
			if capt.Count(clearMark) == 0 {
				t.Fatalf("capture did not see the plaintext marker: it could not see a leak either")
			}

			kr := keyring(t, 1)
			if _, _, err := a.apply(t, kr, 1, b); err != nil {
				if tc.underlay6 && errors.Is(err, ipsec.ErrNotSupported) {
					t.Skip("ESP over IPv6 (CONFIG_INET6_ESP) not available: covered in the VM suite")
				}
				t.Fatal(err)
			}
			b.mustApply(t, kr, 1, a)
			espBefore := capt.IPProtoFrames(50)

			for _, v6 := range []bool{false, true} {
				for _, dir := range [][2]*espNode{{a, b}, {b, a}} {
					src, dst := dir[0], dir[1]
					if err := src.pod.NS.Ping(ctx, podAddr(dst.pod, v6), 1000); err != nil {
						t.Errorf("ping %s -> %s: %v", src.pod.NS, podAddr(dst.pod, v6), err)
					}
				}
				if got := exchange(t, a.pod, b.pod, podAddr(b.pod, v6), mark, 5, 5*time.Second); got != 5 {
					t.Errorf("UDP %s: %d of 5 datagrams arrived", podAddr(b.pod, v6), got)
				}
			}
			if n := capt.Count(mark); n != 0 {
				t.Errorf("plaintext marker seen %d times on the underlay", n)
			}
			if st := capt.Stats(); st.KernelDrops != 0 {
				t.Errorf("capture dropped %d frames: cannot conclude", st.KernelDrops)
			}
			esp := capt.IPProtoFrames(50) - espBefore
			if esp < 2*(2*2+5) {
				t.Errorf("%d ESP frames on the underlay, want at least %d", esp, 2*(2*2+5))
			}
			t.Logf("%d ESP frames on the underlay, marker in clear 0 times", esp)

			// Full-size packets: the tunnel MTU, computed as the kernel does.
			k, _ := kr.Key(1)
			mtu := ipsec.TunnelMTU(1500, k, tc.underlay6)
			for _, v6 := range []bool{false, true} {
				dst := podAddr(b.pod, v6)
				if err := a.pod.NS.Ping(ctx, dst, mtu); err != nil {
					t.Errorf("full-size (%d bytes) DF ping %s: %v", mtu, dst, err)
				}
				pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				err := a.pod.NS.Ping(pctx, dst, mtu+1)
				cancel()
				if !errors.Is(err, netenv.ErrFragNeeded) {
					t.Errorf("ping %s with %d bytes = %v, want ErrFragNeeded: TunnelMTU is not the kernel's", dst, mtu+1, err)
				}
			}

			for _, n := range []*espNode{a, b} {
				st, err := n.x.Status(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if len(st) != 4 {
					t.Errorf("%s: %d states, want 4 (in and out, IPv4 and IPv6 pods)", n.node.Name, len(st))
				}
				for _, s := range st {
					t.Logf("%s: %s %s %s->%s spi=%#x %s packets=%d out_seq=%d in_seq=%d", n.node.Name, s.Dir, innerFamily(s.IPv6), s.Src, s.Dst, s.SPI, s.Algorithm, s.Packets, s.OutSeq, s.InSeq)
					if s.Packets == 0 || s.Dir == ipsec.DirOut && s.OutSeq == 0 || s.Dir == ipsec.DirIn && s.InSeq == 0 {
						t.Errorf("%s: state %s %#x carried no traffic", n.node.Name, s.Dir, s.SPI)
					}
				}
				n.checkNoXfrmErrors(t)
			}
		})
	}
}

// udpStream sends numbered datagrams at a fixed rate from one pod to
// another and records which arrive.
type udpStream struct {
	name string
	mark []byte
	tx   *net.UDPConn
	rx   *net.UDPConn
	sent atomic.Uint64
	stop chan struct{}
	// stopped is closed when the sender has returned: sent is final.
	stopped chan struct{}
	done    sync.WaitGroup

	mu   sync.Mutex
	got  map[uint64]int
	last time.Time
}

func startStream(t *testing.T, name string, from, to *netenv.Pod, dst netip.Addr, mark []byte, interval time.Duration) *udpStream {
	t.Helper()
	addr := netip.AddrPortFrom(dst, 9000).String()
	rx, err := to.NS.ListenUDP(addr)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := from.NS.DialUDP(addr)
	if err != nil {
		rx.Close()
		t.Fatal(err)
	}
	s := &udpStream{name: name, mark: mark, tx: tx, rx: rx, stop: make(chan struct{}), stopped: make(chan struct{}), got: map[uint64]int{}}
	t.Cleanup(func() { tx.Close(); rx.Close() })
	s.done.Add(2)
	go func() {
		defer s.done.Done()
		buf := make([]byte, 2048)
		for {
			n, err := rx.Read(buf)
			if err != nil {
				return
			}
			if n != len(mark)+8 || string(buf[:len(mark)]) != string(mark) {
				continue
			}
			seq := binary.BigEndian.Uint64(buf[len(mark):n])
			s.mu.Lock()
			s.got[seq]++
			s.last = time.Now()
			s.mu.Unlock()
		}
	}()
	go func() {
		defer s.done.Done()
		defer close(s.stopped)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		pkt := make([]byte, len(mark)+8)
		copy(pkt, mark)
		for seq := uint64(0); ; seq++ {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			binary.BigEndian.PutUint64(pkt[len(mark):], seq)
			if _, err := tx.Write(pkt); err != nil {
				t.Errorf("%s: send %d: %v", name, seq, err)
				return
			}
			s.sent.Store(seq + 1)
		}
	}()
	return s
}

// finish stops sending, waits for the datagrams in flight, and returns how
// many were sent, how many never arrived (their sequence numbers), and how
// many arrived twice.
func (s *udpStream) finish() (sent uint64, lost []uint64, dups int) {
	close(s.stop)
	// A tick that raced the stop may still send one more datagram: wait for the sender, or
	// that datagram would be counted as sent but stop the wait for it below.
	<-s.stopped
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		complete := uint64(len(s.got)) >= s.sent.Load()
		quiet := time.Since(s.last) > time.Second
		s.mu.Unlock()
		if complete || quiet {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	s.rx.Close()
	s.done.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	sent = s.sent.Load()
	for seq := range sent {
		switch s.got[seq] {
		case 0:
			lost = append(lost, seq)
		case 1:
		default:
			dups++
		}
	}
	return sent, lost, dups
}

// TestESPRotation rotates the key, and the algorithm with it (AES-GCM to
// AES-CBC/HMAC-SHA-256), under two continuous 100 packet/s UDP streams (a->b
// over IPv4 pods, b->a over IPv6 pods), one node at a time as agents would:
// add key 2 everywhere (outbound still 1), switch outbound to 2, remove key
// 1. Not one datagram may be lost, and none may cross the underlay in clear.
func TestESPRotation(t *testing.T) {
	requireESP(t)
	ctx := context.Background()
	topo, a, b := newESPPair(t, false)
	mark := marker(t, "STREAM")
	capt, err := topo.CaptureUnderlay(netenv.CaptureOptions{Markers: [][]byte{mark}})
	if err != nil {
		t.Fatal(err)
	}
	defer capt.Stop()

	gcm, err := ipsec.NewKey(1, ipsec.AESGCM, material(20, 1), 0)
	if err != nil {
		t.Fatal(err)
	}
	cbc, err := ipsec.NewKey(2, ipsec.AESCBCHMACSHA256, material(64, 50), 0)
	if err != nil {
		t.Fatal(err)
	}
	kr1, _ := ipsec.NewKeyring(gcm)
	kr12, _ := ipsec.NewKeyring(gcm, cbc)
	kr2, _ := ipsec.NewKeyring(cbc)

	a.mustApply(t, kr1, 1, b)
	b.mustApply(t, kr1, 1, a)
	for _, v6 := range []bool{false, true} {
		if err := a.pod.NS.Ping(ctx, podAddr(b.pod, v6), 100); err != nil {
			t.Fatalf("ping before the rotation: %v", err)
		}
	}

	const interval = 10 * time.Millisecond // 100 packets/s
	s4 := startStream(t, "a->b IPv4", a.pod, b.pod, b.pod.IPv4, mark, interval)
	s6 := startStream(t, "b->a IPv6", b.pod, a.pod, a.pod.IPv6, mark, interval)
	const phase = 700 * time.Millisecond
	time.Sleep(phase)
	start := time.Now()
	for _, step := range []struct {
		what string
		kr   ipsec.Keyring
		out  uint8
		want ipsec.Stats
	}{
		{"add key 2, outbound 1", kr12, 1, ipsec.Stats{StatesAdded: 4}},
		{"outbound 2", kr12, 2, ipsec.Stats{PoliciesUpdated: 2}},
		{"remove key 1", kr2, 2, ipsec.Stats{StatesRemoved: 4}},
	} {
		for _, n := range []*espNode{a, b} {
			peer := b
			if n == b {
				peer = a
			}
			st := n.mustApply(t, step.kr, step.out, peer)
			if st != step.want {
				t.Errorf("%s on %s: %v, want %v", step.what, n.node.Name, st, step.want)
			}
			t.Logf("%s on %s at %s: %v", step.what, n.node.Name, time.Since(start).Round(time.Millisecond), st)
			time.Sleep(phase)
		}
	}
	for _, s := range []*udpStream{s4, s6} {
		sent, lost, dups := s.finish()
		t.Logf("%s: %d datagrams sent across the rotation, %d lost, %d duplicated", s.name, sent, len(lost), dups)
		if sent < 300 {
			t.Errorf("%s: only %d datagrams sent: the stream did not cover the rotation", s.name, sent)
		}
		if len(lost) > 0 {
			t.Errorf("%s: lost %d datagrams: %v", s.name, len(lost), lost)
		}
		if dups > 0 {
			t.Errorf("%s: %d duplicates", s.name, dups)
		}
	}
	if n := capt.Count(mark); n != 0 {
		t.Errorf("plaintext marker seen %d times on the underlay", n)
	}
	if st := capt.Stats(); st.KernelDrops != 0 {
		t.Errorf("capture dropped %d frames", st.KernelDrops)
	}
	for _, n := range []*espNode{a, b} {
		st, err := n.x.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st {
			t.Logf("%s: %s %s key %d %s spi=%#x packets=%d", n.node.Name, s.Dir, innerFamily(s.IPv6), s.KeyringSPI, s.Algorithm, s.SPI, s.Packets)
			if s.KeyringSPI != 2 || s.Algorithm != "cbc(aes)+hmac(sha256)" {
				t.Errorf("%s: state %#x of key %d (%s) left after the rotation", n.node.Name, s.SPI, s.KeyringSPI, s.Algorithm)
			}
			// The streams: a->b over IPv4 pods, b->a over IPv6 pods.
			streamSA := s.IPv6 == (s.Dir == ipsec.DirOut) == (n == b)
			if streamSA && s.Packets == 0 {
				t.Errorf("%s: %s %s state of the new key carried nothing", n.node.Name, s.Dir, innerFamily(s.IPv6))
			}
		}
		n.checkNoXfrmErrors(t)
	}
}

// TestESPReboot: node b "reboots" (its kernel forgets every state and
// policy, its agent starts afresh, its boot ID changes). Its new keys differ
// from the old ones: until a learns the new boot ID its packets fail b's
// integrity check (dropped, never in clear); once a re-applies, traffic
// recovers.
func TestESPReboot(t *testing.T) {
	requireESP(t)
	ctx := context.Background()
	topo, a, b := newESPPair(t, false)
	mark := marker(t, "REBOOT")
	capt, err := topo.CaptureUnderlay(netenv.CaptureOptions{Markers: [][]byte{mark}})
	if err != nil {
		t.Fatal(err)
	}
	defer capt.Stop()
	kr := keyring(t, 1)
	dBefore, _, err := a.apply(t, kr, 1, b)
	if err != nil {
		t.Fatal(err)
	}
	b.mustApply(t, kr, 1, a)
	if got := exchange(t, a.pod, b.pod, b.pod.IPv4, mark, 3, 5*time.Second); got != 3 {
		t.Fatalf("before the reboot: %d of 3 datagrams arrived", got)
	}

	// The reboot.
	if err := b.h.XfrmPolicyFlush(); err != nil {
		t.Fatal(err)
	}
	if err := b.h.XfrmStateFlush(0); err != nil {
		t.Fatal(err)
	}
	b.node.BootID = randomID(t)
	b.x = ipsec.NewXFRM(b.h, ipsec.XFRMOptions{Logger: b.log})
	if st := b.mustApply(t, kr, 1, a); st != (ipsec.Stats{StatesAdded: 4, PoliciesAdded: 6}) {
		t.Errorf("b after the reboot: %v", st)
	}

	// a still uses the keys of b's previous boot.
	protoErrs := func() uint64 { return b.xfrmStat(t)["XfrmInStateProtoError"] }
	before := protoErrs()
	if got := exchange(t, a.pod, b.pod, b.pod.IPv4, mark, 3, 2*time.Second); got != 0 {
		t.Errorf("%d datagrams arrived with keys of b's previous boot", got)
	}
	if m := b.xfrmStat(t); m != nil && protoErrs() <= before {
		t.Errorf("b counted no integrity failures (XfrmInStateProtoError %d): were the keys unchanged?", protoErrs())
	}

	dAfter, st, err := a.apply(t, kr, 1, b)
	if err != nil {
		t.Fatal(err)
	}
	if st != (ipsec.Stats{StatesReplaced: 4}) {
		t.Errorf("a after b's reboot: %v, want its four states re-keyed", st)
	}
	for i := range dAfter.States {
		if string(dAfter.States[i].Key) == string(dBefore.States[i].Key) {
			t.Errorf("state %s kept its key across b's reboot", dAfter.States[i])
		}
	}
	recovered := time.Now()
	for _, v6 := range []bool{false, true} {
		if err := a.pod.NS.Ping(ctx, podAddr(b.pod, v6), 1000); err != nil {
			t.Errorf("ping after the reboot: %v", err)
		}
		if err := b.pod.NS.Ping(ctx, podAddr(a.pod, v6), 1000); err != nil {
			t.Errorf("ping after the reboot: %v", err)
		}
	}
	t.Logf("traffic recovered %s after a re-applied", time.Since(recovered).Round(time.Millisecond))
	if got := exchange(t, a.pod, b.pod, b.pod.IPv4, mark, 5, 5*time.Second); got != 5 {
		t.Errorf("after the reboot: %d of 5 datagrams arrived", got)
	}
	if n := capt.Count(mark); n != 0 {
		t.Errorf("plaintext marker seen %d times on the underlay", n)
	}
}
