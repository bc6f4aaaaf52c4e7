package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

// attachEnv is a node namespace and a pod namespace joined by a veth pair, the node side
// named hostIf: the shape of a routed-veth CNI.
type attachEnv struct {
	node   Netns
	podNS  netns.NsHandle
	podH   *netlink.Handle
	nodeIP netip.Addr
	podIP  netip.Addr
	socks  *sockets
}

// sockets are the UDP endpoints of checkFiltering, opened once per environment.
type sockets struct {
	pod, pod6000, pod6001, node, node5000, node5001 *net.UDPConn
}

func (e *attachEnv) sockets(t *testing.T) *sockets {
	t.Helper()
	if e.socks == nil {
		e.socks = &sockets{
			pod:      udpConn(t, e.podNS, e.podIP, 0),
			pod6000:  udpConn(t, e.podNS, e.podIP, 6000),
			pod6001:  udpConn(t, e.podNS, e.podIP, 6001),
			node:     udpConn(t, e.node.NS, e.nodeIP, 0),
			node5000: udpConn(t, e.node.NS, e.nodeIP, 5000),
			node5001: udpConn(t, e.node.NS, e.nodeIP, 5001),
		}
	}
	return e.socks
}

const (
	hostIf = "mcpod0"
	podIf  = "eth0"
	idHost = 1
	idPod  = 1000
)

func newAttachEnv(t *testing.T) *attachEnv {
	t.Helper()
	nodeNS, nodeH := testutil.NewNetNS(t)
	podNS, podH := testutil.NewNetNS(t)
	e := &attachEnv{
		node:   Netns{Handle: nodeH, NS: nodeNS},
		podNS:  podNS,
		podH:   podH,
		nodeIP: netip.MustParseAddr("10.200.0.1"),
		podIP:  netip.MustParseAddr("10.200.0.2"),
	}
	e.addVeth(t)
	return e
}

// addVeth creates the veth pair with its addresses: hostIf in the node namespace, podIf in
// the pod's.
func (e *attachEnv) addVeth(t *testing.T) {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostIf}, PeerName: podIf, PeerNamespace: netlink.NsFd(e.podNS)}
	if err := e.node.Handle.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	for _, side := range []struct {
		h    *netlink.Handle
		name string
		addr netip.Addr
	}{{e.node.Handle, hostIf, e.nodeIP}, {e.podH, podIf, e.podIP}} {
		l, err := side.h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		if err := side.h.AddrAdd(l, &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(side.addr, 24))}); err != nil {
			t.Fatal(err)
		}
		if err := side.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
}

// policy: the pod may send UDP to the host on port 5000 only, and receive UDP from it on
// port 6000 only.
func (e *attachEnv) apply(t *testing.T, c *Classifier) {
	t.Helper()
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, map[netip.Prefix]IPCacheEntry{
		netip.PrefixFrom(e.podIP, 32):  {idPod, IPCacheLocalPod},
		netip.PrefixFrom(e.nodeIP, 32): {idHost, 0},
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ApplyPolicy(ctx,
		map[PolicyKey]PolicyValue{
			{idPod, idHost, 5000, protoUDP, Egress}:  {},
			{idPod, idHost, 6000, protoUDP, Ingress}: {},
		},
		map[EnforceKey]EnforceValue{{idPod, Egress}: denyOnly, {idPod, Ingress}: denyOnly},
	); err != nil {
		t.Fatal(err)
	}
}

// udpConn opens a UDP socket bound to addr inside ns (a socket stays in the namespace it was
// created in, whatever thread uses it later).
func udpConn(t *testing.T, ns netns.NsHandle, addr netip.Addr, port int) *net.UDPConn {
	t.Helper()
	var conn *net.UDPConn
	err := inNetns(ns, func() error {
		var err error
		conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: addr.AsSlice(), Port: port})
		return err
	})
	if err != nil {
		t.Fatalf("listen udp in netns: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// delivered sends one datagram from `from` to `to`:port and reports whether it arrived.
// Whether or not it did, the counters move (the caller checks them), so a dropped datagram
// is detected by its counter and the wait for it is short.
func delivered(t *testing.T, from, to *net.UDPConn, wait time.Duration) bool {
	t.Helper()
	msg := fmt.Appendf(nil, "meshcrypt %d", time.Now().UnixNano())
	if _, err := from.WriteToUDP(msg, to.LocalAddr().(*net.UDPAddr)); err != nil {
		t.Fatalf("send: %v", err)
	}
	buf := make([]byte, 64)
	to.SetReadDeadline(time.Now().Add(wait))
	for {
		n, _, err := to.ReadFromUDP(buf)
		if err != nil {
			return false
		}
		if string(buf[:n]) == string(msg) {
			return true
		}
	}
}

// waitCounter waits until the counter of r reaches at least n packets.
func waitCounter(t *testing.T, c *Classifier, r Reason, n uint64) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		cnt, err := c.Counters()
		if err != nil {
			t.Fatal(err)
		}
		if cnt[r].Packets >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("counter %s = %d, want >= %d (all: %v)", r, cnt[r].Packets, n, cnt)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkFiltering proves the classifier on hostIf is the one reading c's maps: allowed
// datagrams arrive in both directions, denied ones are dropped and counted.
func (e *attachEnv) checkFiltering(t *testing.T, c *Classifier) {
	t.Helper()
	s := e.sockets(t)
	podSock, pod6000, pod6001, nodeSock, node5000, node5001 := s.pod, s.pod6000, s.pod6001, s.node, s.node5000, s.node5001

	before, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if !delivered(t, podSock, node5000, 3*time.Second) {
		t.Errorf("pod -> node udp/5000 (allowed) did not arrive")
	}
	if !delivered(t, nodeSock, pod6000, 3*time.Second) {
		t.Errorf("node -> pod udp/6000 (allowed) did not arrive")
	}
	waitCounter(t, c, ReasonAllowed, before[ReasonAllowed].Packets+2)
	if delivered(t, podSock, node5001, 200*time.Millisecond) {
		t.Errorf("pod -> node udp/5001 (denied egress) arrived")
	}
	waitCounter(t, c, ReasonDeniedEgress, before[ReasonDeniedEgress].Packets+1)
	if delivered(t, nodeSock, pod6001, 200*time.Millisecond) {
		t.Errorf("node -> pod udp/6001 (denied ingress) arrived")
	}
	waitCounter(t, c, ReasonDeniedIngress, before[ReasonDeniedIngress].Packets+1)
}

// attachments counts the programs on hostIf's hooks: TCX programs and tc filters.
type attachments struct {
	TCXIngress, TCXEgress []ebpf.ProgramID
	TCIngress, TCEgress   []int // program IDs of the tc filters
}

func (e *attachEnv) attachments(t *testing.T) attachments {
	t.Helper()
	l, err := e.node.Handle.LinkByName(hostIf)
	if err != nil {
		t.Fatal(err)
	}
	var a attachments
	err = inNetns(e.node.NS, func() error {
		for _, q := range []struct {
			typ ebpf.AttachType
			out *[]ebpf.ProgramID
		}{{ebpf.AttachTCXIngress, &a.TCXIngress}, {ebpf.AttachTCXEgress, &a.TCXEgress}} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: q.typ})
			if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
				continue // a kernel without TCX (6.1 answers EINVAL): no TCX programs
			}
			if err != nil {
				return err
			}
			for _, p := range res.Programs {
				*q.out = append(*q.out, p.ID)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs: %v", err)
	}
	for _, q := range []struct {
		parent uint32
		out    *[]int
	}{{netlink.HANDLE_MIN_INGRESS, &a.TCIngress}, {netlink.HANDLE_MIN_EGRESS, &a.TCEgress}} {
		var fs []netlink.Filter
		err := retryDump(func() error {
			var err error
			fs, err = e.node.Handle.FilterList(l, q.parent)
			return err
		})
		if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: no clsact qdisc
			t.Fatalf("list filters: %v", err)
		}
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				*q.out = append(*q.out, bf.Id)
			}
		}
	}
	return a
}

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// wantAttached checks that exactly c's programs are attached, in mode.
func (e *attachEnv) wantAttached(t *testing.T, c *Classifier, mode AttachMode) {
	t.Helper()
	a := e.attachments(t)
	in, eg := progID(t, c.objs.FromPod), progID(t, c.objs.ToPod)
	var want attachments
	switch mode {
	case AttachTCX:
		want = attachments{TCXIngress: []ebpf.ProgramID{in}, TCXEgress: []ebpf.ProgramID{eg}}
	case AttachTC:
		want = attachments{TCIngress: []int{int(in)}, TCEgress: []int{int(eg)}}
	}
	if fmt.Sprint(a) != fmt.Sprint(want) {
		t.Fatalf("attached %+v, want %+v", a, want)
	}
}

// vmAttachEnv names the attach mode the kernel must give when the tests run in tests/vm's VM
// ("tcx" on its 6.12 kernel, "tc" on 6.1): the host knows which kernel it booted.
const vmAttachEnv = "MESHCRYPT_VM_ATTACH"

// haveTCX reports whether the kernel has TCX (Linux 6.6+), trying it on the environment's
// interface. The VM suite's 6.1 kernel has not: there AttachAuto falls back to tc. In the VM
// the answer must match $MESHCRYPT_VM_ATTACH, so TCX missing on 6.12 fails instead of
// skipping, and TCX found on 6.1 fails too.
func haveTCX(t *testing.T, e *attachEnv, c *Classifier) bool {
	t.Helper()
	_, err := c.Attach(e.node, hostIf, AttachTCX)
	have := true
	switch {
	case errors.Is(err, ErrNotSupported):
		have = false
	case err != nil:
		t.Fatalf("probe TCX: %v", err)
	default:
		if err := c.Detach(e.node, hostIf); err != nil {
			t.Fatal(err)
		}
	}
	if want := os.Getenv(vmAttachEnv); want != "" && have != (want == "tcx") {
		t.Fatalf("TCX attach: supported %t (%v), but $%s=%s says this kernel must attach with %s", have, err, vmAttachEnv, want, want)
	}
	return have
}

// skipWithoutTCX skips a TCX-only test on a kernel without TCX; the tc variants cover it.
func skipWithoutTCX(t *testing.T, e *attachEnv, c *Classifier) {
	t.Helper()
	if !haveTCX(t, e, c) {
		t.Skip("TCX needs Linux 6.6+ (the tc variant covers this kernel)")
	}
}

func TestClassifierAttach(t *testing.T) {
	for _, tt := range []struct {
		name string
		mode AttachMode
	}{
		{"auto", AttachAuto},
		{"tcx", AttachTCX},
		{"tc", AttachTC},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newAttachEnv(t)
			c := newTestClassifier(t, ClassifierOptions{})
			e.apply(t, c)
			want := tt.mode
			switch tt.mode {
			case AttachAuto:
				want = AttachTC
				if haveTCX(t, e, c) {
					want = AttachTCX
				}
			case AttachTCX:
				skipWithoutTCX(t, e, c)
			}
			for range 2 { // attaching again replaces, never stacks
				got, err := c.Attach(e.node, hostIf, tt.mode)
				if err != nil {
					t.Fatalf("Attach: %v", err)
				}
				if got != want {
					t.Fatalf("Attach used %s, want %s", got, want)
				}
				e.wantAttached(t, c, want)
			}
			e.checkFiltering(t, c)

			if err := c.Detach(e.node, hostIf); err != nil {
				t.Fatalf("Detach: %v", err)
			}
			if a := e.attachments(t); fmt.Sprint(a) != fmt.Sprint(attachments{}) {
				t.Fatalf("after Detach: %+v", a)
			}
			if s := e.sockets(t); !delivered(t, s.pod, s.node5001, 3*time.Second) {
				t.Errorf("after Detach, pod -> node udp/5001 still dropped")
			}
			if err := c.Detach(e.node, hostIf); err != nil {
				t.Errorf("second Detach: %v", err)
			}
		})
	}
}

// TestClassifierAttachSwitchMode: switching between TCX and tc leaves one attachment.
func TestClassifierAttachSwitchMode(t *testing.T) {
	e := newAttachEnv(t)
	c := newTestClassifier(t, ClassifierOptions{})
	e.apply(t, c)
	skipWithoutTCX(t, e, c)
	for _, mode := range []AttachMode{AttachTC, AttachTCX, AttachTC} {
		if _, err := c.Attach(e.node, hostIf, mode); err != nil {
			t.Fatalf("Attach %s: %v", mode, err)
		}
		e.wantAttached(t, c, mode)
	}
	e.checkFiltering(t, c)
}

// TestClassifierSurvivesRestart: an agent that exits leaves the classifier working (pinned
// TCX links or tc filters, pinned maps); the next agent takes over without stacking.
func TestClassifierSurvivesRestart(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachTC} {
		t.Run(mode.String(), func(t *testing.T) {
			e := newAttachEnv(t)
			pin := bpffsDir(t)
			c1, err := LoadClassifier(ClassifierOptions{PinPath: pin})
			if err != nil {
				t.Fatal(err)
			}
			if mode == AttachTCX && !haveTCX(t, e, c1) {
				c1.Close()
				t.Skip("TCX needs Linux 6.6+ (the tc variant covers this kernel)")
			}
			e.apply(t, c1)
			if _, err := c1.Attach(e.node, hostIf, mode); err != nil {
				t.Fatal(err)
			}
			if err := c1.Close(); err != nil { // the agent exits
				t.Fatal(err)
			}
			if mode == AttachTCX {
				for _, p := range []string{"from_pod", "to_pod"} {
					if _, err := os.Stat(filepath.Join(pin, "links", "tcx_"+hostIf+"_"+p)); err != nil {
						t.Errorf("link not pinned: %v", err)
					}
				}
			}

			// The next agent loads from the same pins: the old programs still filter,
			// counting into the pinned maps it now reads.
			c2 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
			a := e.attachments(t)
			if n := len(a.TCXIngress) + len(a.TCIngress); n != 1 {
				t.Fatalf("after exit: %+v", a)
			}
			e.checkFiltering(t, c2)

			if _, err := c2.Attach(e.node, hostIf, mode); err != nil {
				t.Fatal(err)
			}
			e.wantAttached(t, c2, mode)
			e.checkFiltering(t, c2)

			if err := c2.Detach(e.node, hostIf); err != nil {
				t.Fatal(err)
			}
			if a := e.attachments(t); fmt.Sprint(a) != fmt.Sprint(attachments{}) {
				t.Fatalf("after Detach: %+v", a)
			}
			if ents, _ := os.ReadDir(filepath.Join(pin, "links")); len(ents) != 0 {
				t.Errorf("pins left after Detach: %v", ents)
			}
		})
	}
}

// TestClassifierStaleLinkPin: a pinned link whose interface is gone (the pod was deleted and
// a new one got the same interface name) is replaced, not updated; Prune releases such links.
func TestClassifierStaleLinkPin(t *testing.T) {
	e := newAttachEnv(t)
	pin := bpffsDir(t)
	c := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	e.apply(t, c)
	skipWithoutTCX(t, e, c)
	delVeth := func() {
		t.Helper()
		l, err := e.node.Handle.LinkByName(hostIf)
		if err != nil {
			t.Fatal(err)
		}
		if err := e.node.Handle.LinkDel(l); err != nil {
			t.Fatal(err)
		}
		e.socks = nil
	}
	if _, err := c.Attach(e.node, hostIf, AttachTCX); err != nil {
		t.Fatal(err)
	}
	delVeth()
	e.addVeth(t) // a new pod, the same interface name
	if _, err := c.Attach(e.node, hostIf, AttachTCX); err != nil {
		t.Fatal(err)
	}
	e.wantAttached(t, c, AttachTCX)
	e.checkFiltering(t, c)
	if n, err := c.Prune(); err != nil || n != 0 {
		t.Fatalf("Prune with every link live: %d, %v", n, err)
	}
	e.wantAttached(t, c, AttachTCX)

	// A restarted agent finds the pins of a pod deleted meanwhile.
	c.Close()
	delVeth()
	c2 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if n, err := c2.Prune(); err != nil || n != 2 {
		t.Fatalf("Prune: %d, %v; want 2 links released", n, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(pin, "links")); len(ents) != 0 {
		t.Errorf("pins left after Prune: %v", ents)
	}
}

// TestClassifierPruneUnpinned: without pins, Prune releases the links this process holds for
// vanished interfaces.
func TestClassifierPruneUnpinned(t *testing.T) {
	e := newAttachEnv(t)
	c := newTestClassifier(t, ClassifierOptions{})
	skipWithoutTCX(t, e, c)
	if _, err := c.Attach(e.node, hostIf, AttachTCX); err != nil {
		t.Fatal(err)
	}
	l, err := e.node.Handle.LinkByName(hostIf)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.node.Handle.LinkDel(l); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Prune(); err != nil || n != 2 {
		t.Fatalf("Prune: %d, %v; want 2", n, err)
	}
	if len(c.links) != 0 {
		t.Errorf("links left: %v", c.links)
	}
}

// TestClassifierAttachRawFrames sends frames too short for the headers they claim from the
// pod through the veth: BPF_PROG_TEST_RUN refuses such frames, real interfaces do not.
func TestClassifierAttachRawFrames(t *testing.T) {
	e := newAttachEnv(t)
	c := newTestClassifier(t, ClassifierOptions{})
	e.apply(t, c)
	if _, err := c.Attach(e.node, hostIf, AttachAuto); err != nil {
		t.Fatal(err)
	}
	podLink, err := e.podH.LinkByName(podIf)
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	err = inNetns(e.podNS, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		return err
	})
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	defer unix.Close(fd)

	v4 := testPacket{Src: e.podIP, Dst: e.nodeIP, Proto: protoUDP, Dport: 5000}.bytes()
	v6 := testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Dport: 5000}.bytes()
	frames := map[string][]byte{
		"ethernet-only-v4": v4[:14],
		"truncated-v4":     v4[:14+12],
		"truncated-v6":     v6[:14+30],
		"ethernet-only-v6": v6[:14],
	}
	before, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range frames {
		if !testRunRefuses(f) {
			t.Fatalf("%s: BPF_PROG_TEST_RUN takes it; test it there", name)
		}
		sa := &unix.SockaddrLinklayer{Ifindex: podLink.Attrs().Index, Protocol: htons(binary.BigEndian.Uint16(f[12:]))}
		if err := unix.Sendto(fd, f, 0, sa); err != nil {
			t.Fatalf("%s: send: %v", name, err)
		}
	}
	waitCounter(t, c, ReasonDropMalformed, before[ReasonDropMalformed].Packets+uint64(len(frames)))
}

// TestClassifierChains: an allowed packet goes on to what is attached after the classifier
// (a CNI's programs), it is not passed outright. A program that drops everything, attached
// after the classifier, must see, and drop, the allowed datagram.
func TestClassifierChains(t *testing.T) {
	for _, mode := range []AttachMode{AttachTCX, AttachTC} {
		t.Run(mode.String(), func(t *testing.T) {
			e := newAttachEnv(t)
			c := newTestClassifier(t, ClassifierOptions{})
			e.apply(t, c)
			if mode == AttachTCX {
				skipWithoutTCX(t, e, c)
			}
			if _, err := c.Attach(e.node, hostIf, mode); err != nil {
				t.Fatal(err)
			}
			s := e.sockets(t)
			if !delivered(t, s.pod, s.node5000, 3*time.Second) {
				t.Fatalf("allowed datagram dropped before the drop-all program is attached")
			}

			dropAll, err := ebpf.NewProgram(&ebpf.ProgramSpec{
				Type:         ebpf.SchedCLS,
				License:      "MIT",
				Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, verdictDrop), asm.Return()},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer dropAll.Close()
			l, err := e.node.Handle.LinkByName(hostIf)
			if err != nil {
				t.Fatal(err)
			}
			switch mode {
			case AttachTCX:
				err = inNetns(e.node.NS, func() error {
					tl, err := link.AttachTCX(link.TCXOptions{Interface: l.Attrs().Index, Program: dropAll,
						Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
					if err == nil {
						t.Cleanup(func() { tl.Close() })
					}
					return err
				})
			case AttachTC:
				f := tcFilter(l, hooks[0])
				f.Priority, f.Fd, f.Name, f.DirectAction = tcPriority+1, dropAll.FD(), "drop_all", true
				err = e.node.Handle.FilterAdd(f)
			}
			if err != nil {
				t.Fatalf("attach drop-all after the classifier: %v", err)
			}
			before, err := c.Counters()
			if err != nil {
				t.Fatal(err)
			}
			if delivered(t, s.pod, s.node5000, 300*time.Millisecond) {
				t.Errorf("allowed datagram bypassed the program attached after the classifier")
			}
			waitCounter(t, c, ReasonAllowed, before[ReasonAllowed].Packets+1)
		})
	}
}
