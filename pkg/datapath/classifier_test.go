package datapath

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
)

// The programs' verdicts: TC_ACT_UNSPEC (TCX_NEXT: on to whatever else is attached, else
// pass) and TC_ACT_SHOT.
const (
	verdictPass = ^uint32(0)
	verdictDrop = 2
)

func newTestClassifier(t testing.TB, opts ClassifierOptions) *Classifier {
	t.Helper()
	testutil.RequireRoot(t)
	c, err := LoadClassifier(opts)
	if err != nil {
		t.Fatalf("LoadClassifier: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// clearConntrack empties the connection table, so that the next packet of every
// connection is a first packet.
func (c *Classifier) clearConntrack(t testing.TB) {
	t.Helper()
	var k classifierCtKey
	var keys []classifierCtKey
	it := c.objs.Conntrack.Iterate()
	var v classifierCtEntry
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		t.Fatalf("read connection table: %v", err)
	}
	for _, k := range keys {
		if err := c.objs.Conntrack.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatalf("empty connection table: %v", err)
		}
	}
}

// bpffsDir mounts a private bpffs for the test and returns a directory on it.
func bpffsDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return filepath.Join(dir, "node")
}

// testRunRefuses reports whether BPF_PROG_TEST_RUN refuses frame before running the program:
// it wants an Ethernet header, and (Linux 6.1 and 6.18 alike) a complete IPv4 or IPv6 header
// when the EtherType names one. Real interfaces deliver such frames, so the attach
// test sends them through a veth instead.
func testRunRefuses(frame []byte) bool {
	if len(frame) < 14 {
		return true
	}
	switch binary.BigEndian.Uint16(frame[12:]) {
	case 0x0800:
		return len(frame) < 14+20
	case 0x86dd:
		return len(frame) < 14+40
	}
	return false
}

// errRefused is returned by tryRun for frames BPF_PROG_TEST_RUN refuses.
var errRefused = errors.New("BPF_PROG_TEST_RUN refuses the frame")

// run runs prog once on frame and returns its verdict and the reason it counted.
func (c *Classifier) run(t testing.TB, prog *ebpf.Program, frame []byte) (uint32, Reason) {
	t.Helper()
	verdict, reason, err := c.tryRun(prog, frame)
	if err != nil {
		t.Fatal(err)
	}
	return verdict, reason
}

// tryRun runs prog once on frame and returns its verdict and the reason it counted.
func (c *Classifier) tryRun(prog *ebpf.Program, frame []byte) (uint32, Reason, error) {
	before, err := c.Counters()
	if err != nil {
		return 0, 0, err
	}
	verdict, err := prog.Run(&ebpf.RunOptions{Data: frame})
	if err != nil {
		if errors.Is(err, unix.EINVAL) && testRunRefuses(frame) {
			return 0, 0, errRefused
		}
		return 0, 0, fmt.Errorf("run %s on % x: %w", prog, frame, err)
	}
	after, err := c.Counters()
	if err != nil {
		return 0, 0, err
	}
	reason, n := Reason(0), 0
	for r, v := range after {
		if d := v.Packets - before[r].Packets; d != 0 {
			reason, n = r, n+int(d)
			if got := v.Bytes - before[r].Bytes; got != uint64(len(frame)) {
				return 0, 0, fmt.Errorf("counter %s: %d bytes for a %d-byte frame", r, got, len(frame))
			}
		}
	}
	if n != 1 {
		return 0, 0, fmt.Errorf("run %s: %d counter increments, want 1", prog, n)
	}
	return verdict, reason, nil
}

var (
	podA4, podA6   = netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("fd00::1")
	podB4, podB6   = netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")
	remC4, remC6   = netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("fd01::5")
	remD4, remD6   = netip.MustParseAddr("10.2.0.5"), netip.MustParseAddr("fd02::5")
	world4, world6 = netip.MustParseAddr("192.0.2.8"), netip.MustParseAddr("2001:db8::8")
)

const (
	idA, idB, idC, idD = 1000, 1001, 0x12000, 0x12001
)

// fixtureIPCache: two local pods, a remote pod CIDR without and one with a ready tunnel.
func fixtureIPCache() map[netip.Prefix]IPCacheEntry {
	return map[netip.Prefix]IPCacheEntry{
		netip.MustParsePrefix("10.0.0.1/32"): {idA, IPCacheLocalPod},
		netip.MustParsePrefix("fd00::1/128"): {idA, IPCacheLocalPod},
		netip.MustParsePrefix("10.0.0.2/32"): {idB, IPCacheLocalPod},
		netip.MustParsePrefix("fd00::2/128"): {idB, IPCacheLocalPod},
		netip.MustParsePrefix("10.1.0.0/24"): {idC, IPCacheRemotePod},
		netip.MustParsePrefix("fd01::/64"):   {idC, IPCacheRemotePod},
		netip.MustParsePrefix("10.2.0.0/24"): {idD, IPCacheRemotePod | IPCacheTunnelReady},
		netip.MustParsePrefix("fd02::/64"):   {idD, IPCacheRemotePod | IPCacheTunnelReady},
	}
}

type pk = PolicyKey
type pv = PolicyValue
type ek = EnforceKey

var denyOnly = EnforceValue{EnforceDeny}

// verdictCase is a packet, the policy state, and the reason the classifier must count.
type verdictCase struct {
	name    string
	toPod   bool // run to_pod instead of from_pod
	policy  map[pk]pv
	enforce map[ek]EnforceValue
	pkt     testPacket
	frame   []byte // instead of pkt
	want    Reason
}

func (vc verdictCase) bytes() []byte {
	if vc.frame != nil {
		return vc.frame
	}
	return vc.pkt.bytes()
}

// verdictCases is the unit table; the fuzz test starts from its frames. The ipcache is
// fixtureIPCache.
func verdictCases() []verdictCase {
	tcp4 := func(src, dst netip.Addr, port uint16) testPacket {
		return testPacket{Src: src, Dst: dst, Proto: protoTCP, Dport: port}
	}
	udp := func(src, dst netip.Addr, port uint16) testPacket {
		return testPacket{Src: src, Dst: dst, Proto: protoUDP, Dport: port}
	}
	aEgressDeny := map[ek]EnforceValue{{idA, Egress}: denyOnly}
	bIngressDeny := map[ek]EnforceValue{{idB, Ingress}: denyOnly}
	hbhDestFrag := func(frag uint16, more bool) []extHdr {
		return []extHdr{{Type: extHopByHop}, {Type: extDestOpts, Len: 16}, {Type: extFragment, FragOffset: frag, More: more}}
	}

	return []verdictCase{
		{name: "no-policy-v4", pkt: tcp4(podA4, podB4, 80), want: ReasonAllowedNoPolicy},
		{name: "no-policy-v6", pkt: tcp4(podA6, podB6, 80), want: ReasonAllowedNoPolicy},
		{name: "policy-entries-without-enforce-allow-all", policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: udp(podA4, podB4, 53), want: ReasonAllowedNoPolicy},
		{name: "default-deny-egress", enforce: aEgressDeny, pkt: tcp4(podA4, podB4, 80), want: ReasonDeniedEgress},
		{name: "port-allowed", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: tcp4(podA4, podB4, 80), want: ReasonAllowed},
		{name: "port-other-denied", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: tcp4(podA4, podB4, 81), want: ReasonDeniedEgress},
		{name: "port-other-proto-denied", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: udp(podA4, podB4, 80), want: ReasonDeniedEgress},
		{name: "port-other-peer-denied", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: tcp4(podA4, remD4, 80), want: ReasonDeniedEgress},
		{name: "ingress-entry-does-not-allow-egress", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Ingress}: {}},
			pkt: tcp4(podA4, podB4, 80), want: ReasonDeniedEgress},
		{name: "any-port", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, protoTCP, Egress}: {}},
			pkt: tcp4(podA4, podB4, 8443), want: ReasonAllowed},
		{name: "any-proto-udp", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, 0, Egress}: {}},
			pkt: udp(podA6, podB6, 53), want: ReasonAllowed},
		{name: "any-proto-icmp", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, 0, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoICMP}, want: ReasonAllowed},
		{name: "any-peer-port", enforce: aEgressDeny, policy: map[pk]pv{{idA, 0, 53, protoUDP, Egress}: {}},
			pkt: udp(podA4, world4, 53), want: ReasonAllowed},
		{name: "any-peer-port-other", enforce: aEgressDeny, policy: map[pk]pv{{idA, 0, 53, protoUDP, Egress}: {}},
			pkt: udp(podA4, world4, 54), want: ReasonDeniedEgress},
		{name: "any-peer-proto", enforce: aEgressDeny, policy: map[pk]pv{{idA, 0, 0, protoSCTP, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: remD6, Proto: protoSCTP}, want: ReasonAllowed},
		{name: "any-peer-any", enforce: aEgressDeny, policy: map[pk]pv{{idA, 0, 0, 0, Egress}: {}},
			pkt: udp(podA6, world6, 1), want: ReasonAllowed},
		{name: "world-peer-by-identity", enforce: aEgressDeny, policy: map[pk]pv{{idA, identityWorld, 443, protoTCP, Egress}: {}},
			pkt: tcp4(podA6, world6, 443), want: ReasonAllowed},
		{name: "world-source-ingress", enforce: bIngressDeny, policy: map[pk]pv{{idB, identityWorld, 0, protoTCP, Ingress}: {}},
			pkt: tcp4(world4, podB4, 22), want: ReasonAllowed},
		{name: "icmpv6-by-proto", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, protoICMPv6, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoICMPv6}, want: ReasonAllowed},
		{name: "icmp-v4-not-by-icmpv6", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, protoICMPv6, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoICMP}, want: ReasonDeniedEgress},

		// The sender enforces the receiver's ingress; to_pod enforces it again.
		{name: "dst-ingress-denied", enforce: bIngressDeny, pkt: tcp4(podA4, podB4, 80), want: ReasonDeniedIngress},
		{name: "dst-ingress-allowed", enforce: bIngressDeny, policy: map[pk]pv{{idB, idA, 80, protoTCP, Ingress}: {}},
			pkt: tcp4(podA4, podB4, 80), want: ReasonAllowed},
		{name: "both-sides", enforce: map[ek]EnforceValue{{idA, Egress}: denyOnly, {idB, Ingress}: denyOnly},
			policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt:    tcp4(podA4, podB4, 80), want: ReasonDeniedIngress},
		{name: "to-pod-ingress-denied", toPod: true, enforce: bIngressDeny, pkt: tcp4(remC4, podB4, 80), want: ReasonDeniedIngress},
		{name: "to-pod-ingress-allowed", toPod: true, enforce: bIngressDeny, policy: map[pk]pv{{idB, idC, 80, protoTCP, Ingress}: {}},
			pkt: tcp4(remC6, podB6, 80), want: ReasonAllowed},
		{name: "to-pod-ignores-source-egress", toPod: true, enforce: map[ek]EnforceValue{{idC, Egress}: denyOnly},
			pkt: tcp4(remC4, podB4, 80), want: ReasonAllowedNoPolicy},

		// Fragments: a non-first fragment is checked with port 0.
		{name: "v4-first-fragment-port-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, Dport: 80, MoreFrags: true}, want: ReasonAllowed},
		{name: "v4-later-fragment-port-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, Dport: 80, FragOffset: 185, L4: []byte("data")}, want: ReasonDeniedEgress},
		{name: "v4-later-fragment-portless-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, FragOffset: 185, L4: []byte("data")}, want: ReasonAllowed},
		{name: "v4-options", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, Dport: 80, IHL: 15}, want: ReasonAllowed},
		{name: "v6-ext-first-fragment-port-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoTCP, Dport: 80, Ext: hbhDestFrag(0, true)}, want: ReasonAllowed},
		{name: "v6-ext-later-fragment-port-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 80, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoTCP, Dport: 80, Ext: hbhDestFrag(100, true), L4: []byte("data")}, want: ReasonDeniedEgress},
		{name: "v6-ext-later-fragment-portless-rule", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 0, protoTCP, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoTCP, Ext: hbhDestFrag(100, false), L4: []byte("data")}, want: ReasonAllowed},
		{name: "v6-routing-and-ah", enforce: aEgressDeny, policy: map[pk]pv{{idA, idB, 53, protoUDP, Egress}: {}},
			pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Dport: 53, Ext: []extHdr{{Type: extRouting, Len: 24}, {Type: extAH, Len: 24}}}, want: ReasonAllowed},
		{name: "v6-eight-ext", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Dport: 53, Ext: []extHdr{
			{Type: extHopByHop}, {Type: extDestOpts}, {Type: extRouting}, {Type: extDestOpts},
			{Type: extDestOpts}, {Type: extDestOpts}, {Type: extAH}, {Type: extDestOpts}}}, want: ReasonAllowedNoPolicy},

		// Encryption.
		{name: "encrypt-entry-tunnel-not-ready", enforce: aEgressDeny, policy: map[pk]pv{{idA, idC, 0, 0, Egress}: {Flags: PolicyEncrypt}},
			pkt: tcp4(podA4, remC4, 80), want: ReasonDropNotEncrypted},
		{name: "encrypt-entry-tunnel-ready", enforce: aEgressDeny, policy: map[pk]pv{{idA, idD, 0, 0, Egress}: {Flags: PolicyEncrypt}},
			pkt: tcp4(podA4, remD4, 80), want: ReasonAllowed},
		{name: "encrypt-ingress-entry", enforce: map[ek]EnforceValue{{idC, Ingress}: denyOnly},
			policy: map[pk]pv{{idC, idA, 0, 0, Ingress}: {Flags: PolicyEncrypt}},
			pkt:    tcp4(podA6, remC6, 80), want: ReasonDropNotEncrypted},
		{name: "enforce-encrypt-src", enforce: map[ek]EnforceValue{{idA, Egress}: {EnforceEncrypt}},
			pkt: udp(podA4, remC4, 53), want: ReasonDropNotEncrypted},
		{name: "enforce-encrypt-src-ready", enforce: map[ek]EnforceValue{{idA, Egress}: {EnforceEncrypt}},
			pkt: udp(podA4, remD4, 53), want: ReasonAllowedNoPolicy},
		{name: "enforce-encrypt-dst", enforce: map[ek]EnforceValue{{idC, Ingress}: {EnforceEncrypt}},
			pkt: udp(podA6, remC6, 53), want: ReasonDropNotEncrypted},
		{name: "enforce-encrypt-local-dst", enforce: map[ek]EnforceValue{{idA, Egress}: {EnforceEncrypt}},
			pkt: udp(podA4, podB4, 53), want: ReasonAllowedNoPolicy},
		{name: "enforce-encrypt-world-dst", enforce: map[ek]EnforceValue{{idA, Egress}: {EnforceEncrypt | EnforceDeny}},
			policy: map[pk]pv{{idA, 0, 0, 0, Egress}: {}},
			pkt:    udp(podA4, world4, 53), want: ReasonAllowed},
		{name: "no-encrypt-requirement", pkt: udp(podA4, remC4, 53), want: ReasonAllowedNoPolicy},
		{name: "to-pod-never-drops-for-encryption", toPod: true, enforce: map[ek]EnforceValue{{idB, Ingress}: {EnforceEncrypt}},
			pkt: udp(remC4, podB4, 53), want: ReasonAllowedNoPolicy},

		// Parsing.
		{name: "arp-passes", enforce: aEgressDeny, frame: arpFrame(), want: ReasonPassNonIP},
		{name: "arp-passes-to-pod", toPod: true, enforce: bIngressDeny, frame: arpFrame(), want: ReasonPassNonIP},
		// IPv6 neighbour discovery to the gateway's multicast group (world) passes under
		// default-deny egress, like ARP; an echo request to the same address does not.
		{name: "ndp-neighbour-solicitation-passes", enforce: aEgressDeny,
			pkt: testPacket{Src: podA6, Dst: netip.MustParseAddr("ff02::1:ff00:1"), Proto: protoICMPv6, L4: []byte{135, 0, 0, 0, 0, 0, 0, 0, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}}, want: ReasonPassNonIP},
		{name: "ndp-router-solicitation-passes", enforce: aEgressDeny,
			pkt: testPacket{Src: podA6, Dst: netip.MustParseAddr("ff02::2"), Proto: protoICMPv6, L4: []byte{133, 0, 0, 0, 0, 0, 0, 0}}, want: ReasonPassNonIP},
		{name: "icmpv6-echo-to-world-denied", enforce: aEgressDeny,
			pkt: testPacket{Src: podA6, Dst: netip.MustParseAddr("ff02::1:ff00:1"), Proto: protoICMPv6}, want: ReasonDeniedEgress},
		{name: "ethernet-only-v4", frame: testPacket{Src: podA4, Dst: podB4, Proto: protoUDP}.bytes()[:14], want: ReasonDropMalformed},
		{name: "truncated-v4-header", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, L4: []byte{}, Cut: 5}, want: ReasonDropMalformed},
		{name: "ihl-below-5", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, IHL: 4}, want: ReasonDropMalformed},
		{name: "ihl-beyond-frame", pkt: testPacket{Src: podA4, Dst: podB4, Proto: 200, IHL: 15, L4: []byte{}, Cut: 4}, want: ReasonDropMalformed},
		{name: "v4-version-6", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Version: 6}, want: ReasonDropMalformed},
		{name: "v6-version-4", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Version: 4}, want: ReasonDropMalformed},
		{name: "tcp-truncated", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, L4: make([]byte, 19)}, want: ReasonDropMalformed},
		{name: "tcp-doff-below-5", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, L4: append([]byte{0, 1, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 4 << 4}, make([]byte, 11)...)}, want: ReasonDropMalformed},
		{name: "tcp-doff-beyond-frame", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, L4: append([]byte{0, 1, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 8 << 4}, make([]byte, 11)...)}, want: ReasonDropMalformed},
		{name: "udp-truncated", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, L4: []byte{0, 1, 0, 53}}, want: ReasonDropMalformed},
		{name: "icmp-truncated", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoICMP, L4: []byte{8, 0, 0, 0}}, want: ReasonDropMalformed},
		{name: "icmpv6-truncated", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoICMPv6, L4: []byte{128, 0, 0, 0, 0, 1}}, want: ReasonDropMalformed},
		{name: "other-proto-empty", pkt: testPacket{Src: podA4, Dst: podB4, Proto: protoSCTP, L4: []byte{}}, want: ReasonAllowedNoPolicy},
		{name: "truncated-v6-header", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, L4: []byte{}, Cut: 1}, want: ReasonDropMalformed},
		{name: "v6-ext-truncated", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Ext: []extHdr{{Type: extDestOpts, Len: 64}}, L4: []byte{}, Cut: 8}, want: ReasonDropMalformed},
		{name: "v6-frag-truncated", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Ext: []extHdr{{Type: extFragment, FragOffset: 9}}, L4: []byte{}, Cut: 1}, want: ReasonDropMalformed},
		{name: "v6-nine-ext", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Dport: 53, Ext: []extHdr{
			{Type: extHopByHop}, {Type: extDestOpts}, {Type: extDestOpts}, {Type: extDestOpts}, {Type: extDestOpts},
			{Type: extDestOpts}, {Type: extDestOpts}, {Type: extDestOpts}, {Type: extDestOpts}}}, want: ReasonDropMalformed},
		{name: "v6-ext-then-truncated-udp", pkt: testPacket{Src: podA6, Dst: podB6, Proto: protoUDP, Ext: []extHdr{{Type: extHopByHop}}, L4: []byte{1, 2, 3}}, want: ReasonDropMalformed},
	}
}

func TestClassifierVerdicts(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	if _, err := c.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	for _, tt := range verdictCases() {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := c.ApplyPolicy(ctx, tt.policy, tt.enforce); err != nil {
				t.Fatal(err)
			}
			// Every case is a first packet.
			c.clearConntrack(t)
			m := &model{ipcache: fixtureIPCache()}
			frame := tt.bytes()
			prog := c.objs.FromPod
			if tt.toPod {
				prog = c.objs.ToPod
			}
			// The table also pins the model down, so that the random tests compare the
			// programs with something checked.
			m.policy, m.enforce = tt.policy, tt.enforce
			if mr := m.classify(!tt.toPod, frame); mr != tt.want {
				t.Errorf("model says %s, want %s", mr, tt.want)
			}
			verdict, got, err := c.tryRun(prog, frame)
			if errors.Is(err, errRefused) {
				t.Logf("%v: TestClassifierAttachRawFrames sends it for real", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("reason = %s, want %s", got, tt.want)
			}
			wantVerdict := uint32(verdictPass)
			if tt.want.Dropped() {
				wantVerdict = verdictDrop
			}
			if verdict != wantVerdict {
				t.Errorf("verdict = %d, want %d", verdict, wantVerdict)
			}
		})
	}
}

func TestClassifierPassthrough(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	got, err := c.objs.Passthrough.Run(&ebpf.RunOptions{Data: arpFrame()})
	if err != nil || got != verdictPass {
		t.Fatalf("passthrough = %d, %v", got, err)
	}
}

func TestClassifierCounters(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	frames := map[Reason][][]byte{
		ReasonPassNonIP:       {arpFrame(), arpFrame()},
		ReasonDropMalformed:   {testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, IHL: 3}.bytes()},
		ReasonAllowedNoPolicy: {testPacket{Src: podA4, Dst: podB4, Proto: protoUDP, Dport: 1}.bytes()},
	}
	want := Counters{}
	for r := range Reason(NumReasons) {
		want[r] = Counter{}
	}
	for r, fs := range frames {
		for _, f := range fs {
			if _, err := c.objs.FromPod.Run(&ebpf.RunOptions{Data: f}); err != nil {
				t.Fatal(err)
			}
			want[r] = Counter{want[r].Packets + 1, want[r].Bytes + uint64(len(f))}
		}
	}
	got, err := c.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("counters (-want +got):\n%s", diff)
	}
}

// readIPCache returns what the kernel map holds.
func readIPCache(t testing.TB, c *Classifier) map[netip.Prefix]IPCacheEntry {
	t.Helper()
	out := map[netip.Prefix]IPCacheEntry{}
	var k classifierIpcacheKey
	var v classifierIpcacheVal
	it := c.objs.Ipcache.Iterate()
	for it.Next(&k, &v) {
		out[ipcachePrefix(k)] = IPCacheEntry{v.Identity, IPCacheFlags(v.Flags)}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func readPolicy(t testing.TB, c *Classifier) (map[PolicyKey]PolicyValue, map[EnforceKey]EnforceValue) {
	t.Helper()
	pol := map[PolicyKey]PolicyValue{}
	var k classifierPolicyKey
	var v classifierPolicyVal
	it := c.objs.Policy.Iterate()
	for it.Next(&k, &v) {
		pol[PolicyKey{k.Subject, k.Peer, k.Dport, k.Proto, Direction(k.Dir)}] = PolicyValue{PolicyFlags(v.Flags), v.Rule}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	enf := map[EnforceKey]EnforceValue{}
	var ekk classifierEnforceKey
	var ev classifierEnforceVal
	it = c.objs.Enforce.Iterate()
	for it.Next(&ekk, &ev) {
		enf[EnforceKey{ekk.Identity, Direction(ekk.Dir)}] = EnforceValue{EnforceFlags(ev.Flags)}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return pol, enf
}

func TestClassifierApplyIPCache(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	want := fixtureIPCache()
	want[netip.MustParsePrefix("0.0.0.0/0")] = IPCacheEntry{Identity: identityWorld}
	want[netip.MustParsePrefix("::/0")] = IPCacheEntry{Identity: identityWorld}
	steps := []struct {
		name   string
		change func(map[netip.Prefix]IPCacheEntry)
		stats  MapStats
	}{
		{"initial", func(map[netip.Prefix]IPCacheEntry) {}, MapStats{Added: 10}},
		{"again", func(map[netip.Prefix]IPCacheEntry) {}, MapStats{Unchanged: 10}},
		{"one-changed", func(m map[netip.Prefix]IPCacheEntry) {
			m[netip.MustParsePrefix("10.1.0.0/24")] = IPCacheEntry{idC, IPCacheRemotePod | IPCacheTunnelReady}
		}, MapStats{Updated: 1, Unchanged: 9}},
		{"one-added-one-removed", func(m map[netip.Prefix]IPCacheEntry) {
			delete(m, netip.MustParsePrefix("fd00::2/128"))
			m[netip.MustParsePrefix("10.0.0.3/32")] = IPCacheEntry{1002, IPCacheLocalPod}
		}, MapStats{Added: 1, Removed: 1, Unchanged: 9}},
		{"emptied", func(m map[netip.Prefix]IPCacheEntry) { clear(m) }, MapStats{Removed: 10}},
	}
	for _, s := range steps {
		s.change(want)
		st, err := c.ApplyIPCache(ctx, want)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if diff := cmp.Diff(s.stats, st); diff != "" {
			t.Errorf("%s: stats (-want +got):\n%s", s.name, diff)
		}
		if diff := cmp.Diff(want, readIPCache(t, c)); diff != "" {
			t.Errorf("%s: map (-want +got):\n%s", s.name, diff)
		}
	}

	// Host bits are ignored; a prefix given twice (after masking) must agree.
	st, err := c.ApplyIPCache(ctx, map[netip.Prefix]IPCacheEntry{netip.MustParsePrefix("10.9.9.9/16"): {7, 0}})
	if err != nil || st.Added != 1 {
		t.Fatalf("apply with host bits: %+v, %v", st, err)
	}
	if diff := cmp.Diff(map[netip.Prefix]IPCacheEntry{netip.MustParsePrefix("10.9.0.0/16"): {7, 0}}, readIPCache(t, c)); diff != "" {
		t.Errorf("host bits (-want +got):\n%s", diff)
	}
	// IPv4-mapped IPv6 prefixes are IPv4 prefixes to the trie.
	st, err = c.ApplyIPCache(ctx, map[netip.Prefix]IPCacheEntry{
		netip.MustParsePrefix("::ffff:10.9.0.0/112"): {7, 0},
		netip.MustParsePrefix("::ffff:0:0/95"):       {8, 0},
	})
	if err != nil || st != (MapStats{Added: 1, Unchanged: 1}) {
		t.Fatalf("apply mapped: %+v, %v", st, err)
	}
	if diff := cmp.Diff(map[netip.Prefix]IPCacheEntry{
		netip.MustParsePrefix("10.9.0.0/16"):   {7, 0},
		netip.MustParsePrefix("::fffe:0:0/95"): {8, 0},
	}, readIPCache(t, c)); diff != "" {
		t.Errorf("mapped (-want +got):\n%s", diff)
	}
	for name, bad := range map[string]map[netip.Prefix]IPCacheEntry{
		"conflicting-duplicate": {netip.MustParsePrefix("10.9.9.9/16"): {7, 0}, netip.MustParsePrefix("10.9.0.0/16"): {8, 0}},
		"invalid-prefix":        {{}: {7, 0}},
	} {
		if _, err := c.ApplyIPCache(ctx, bad); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestClassifierApplyPolicy(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	pol := map[PolicyKey]PolicyValue{
		{idA, idB, 80, protoTCP, Egress}:   {0, 1},
		{idA, 0, 53, protoUDP, Egress}:     {0, 2},
		{idB, idA, 0, 0, Ingress}:          {PolicyEncrypt, 3},
		{idC, identityWorld, 0, 1, Egress}: {0, 4},
	}
	enf := map[EnforceKey]EnforceValue{{idA, Egress}: denyOnly, {idB, Ingress}: {EnforceDeny | EnforceEncrypt}}
	steps := []struct {
		name   string
		change func()
		stats  MapStats
	}{
		{"initial", func() {}, MapStats{Added: 6}},
		{"again", func() {}, MapStats{Unchanged: 6}},
		{"one-rule-changed", func() { pol[PolicyKey{idA, idB, 80, protoTCP, Egress}] = PolicyValue{0, 9} }, MapStats{Updated: 1, Unchanged: 5}},
		{"one-enforce-changed", func() { enf[EnforceKey{idA, Egress}] = EnforceValue{EnforceDeny | EnforceEncrypt} }, MapStats{Updated: 1, Unchanged: 5}},
		{"swap", func() {
			delete(pol, PolicyKey{idA, 0, 53, protoUDP, Egress})
			pol[PolicyKey{idA, 0, 53, protoUDP, Ingress}] = PolicyValue{0, 2}
			delete(enf, EnforceKey{idB, Ingress})
		}, MapStats{Added: 1, Removed: 2, Unchanged: 4}},
		{"emptied", func() { clear(pol); clear(enf) }, MapStats{Removed: 5}},
	}
	for _, s := range steps {
		s.change()
		st, err := c.ApplyPolicy(ctx, pol, enf)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if diff := cmp.Diff(s.stats, st); diff != "" {
			t.Errorf("%s: stats (-want +got):\n%s", s.name, diff)
		}
		gotPol, gotEnf := readPolicy(t, c)
		if diff := cmp.Diff(pol, gotPol); diff != "" {
			t.Errorf("%s: policy map (-want +got):\n%s", s.name, diff)
		}
		if diff := cmp.Diff(enf, gotEnf); diff != "" {
			t.Errorf("%s: enforce map (-want +got):\n%s", s.name, diff)
		}
	}
	for name, bad := range map[string]map[PolicyKey]PolicyValue{
		"port-without-proto": {{idA, idB, 80, 0, Egress}: {}},
		"bad-direction":      {{idA, idB, 80, protoTCP, 2}: {}},
	} {
		if _, err := c.ApplyPolicy(ctx, bad, nil); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := c.ApplyPolicy(ctx, nil, map[EnforceKey]EnforceValue{{idA, 7}: {}}); err == nil {
		t.Errorf("bad enforce direction: no error")
	}
}

// TestClassifierApplyLarge checks that a one-entry change to a large state is one map
// operation, and that batch operations cope with more than one chunk.
func TestClassifierApplyLarge(t *testing.T) {
	c := newTestClassifier(t, ClassifierOptions{})
	ctx := context.Background()
	pol := map[PolicyKey]PolicyValue{}
	for i := range uint32(3*batchChunk + 17) {
		pol[PolicyKey{1000 + i%5000, 1000 + i/5000, uint16(i), protoTCP, Egress}] = PolicyValue{Rule: i}
	}
	if st, err := c.ApplyPolicy(ctx, pol, nil); err != nil || st.Added != len(pol) {
		t.Fatalf("initial: %+v, %v", st, err)
	}
	pol[PolicyKey{1000, 1000, 0, protoTCP, Egress}] = PolicyValue{Rule: 77}
	if st, err := c.ApplyPolicy(ctx, pol, nil); err != nil || st != (MapStats{Updated: 1, Unchanged: len(pol) - 1}) {
		t.Fatalf("one change: %+v, %v", st, err)
	}
	got, _ := readPolicy(t, c)
	if diff := cmp.Diff(pol, got); diff != "" {
		t.Errorf("policy map (-want +got):\n%s", diff)
	}
	// A fresh reader of the same map (as after an agent restart) reads it with batch
	// lookups across chunks and finds nothing to do.
	c.policy.shadow = nil
	if st, err := c.ApplyPolicy(ctx, pol, nil); err != nil || st != (MapStats{Unchanged: len(pol)}) {
		t.Fatalf("after re-read: %+v, %v", st, err)
	}
	if st, err := c.ApplyPolicy(ctx, nil, nil); err != nil || st.Removed != len(pol) {
		t.Fatalf("remove all: %+v, %v", st, err)
	}
	if got, _ := readPolicy(t, c); len(got) != 0 {
		t.Fatalf("%d entries left", len(got))
	}
}

// TestClassifierPinnedMapsSurviveReload: a new Classifier on the same PinPath (an agent
// restart) finds the maps with their content and counters.
func TestClassifierPinnedMapsSurviveReload(t *testing.T) {
	testutil.RequireRoot(t)
	pin := bpffsDir(t)
	ctx := context.Background()
	c1 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if _, err := c1.ApplyIPCache(ctx, fixtureIPCache()); err != nil {
		t.Fatal(err)
	}
	pol := map[PolicyKey]PolicyValue{{idA, idB, 80, protoTCP, Egress}: {}}
	enf := map[EnforceKey]EnforceValue{{idA, Egress}: denyOnly}
	if _, err := c1.ApplyPolicy(ctx, pol, enf); err != nil {
		t.Fatal(err)
	}
	c1.run(t, c1.objs.FromPod, testPacket{Src: podA4, Dst: podB4, Proto: protoTCP, Dport: 81}.bytes())
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ipcache", "policy", "enforce", "metrics"} {
		if _, err := os.Stat(filepath.Join(pin, name)); err != nil {
			t.Errorf("map %s not pinned: %v", name, err)
		}
	}

	c2 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if st, err := c2.ApplyIPCache(ctx, fixtureIPCache()); err != nil || st != (MapStats{Unchanged: len(fixtureIPCache())}) {
		t.Errorf("ipcache after reload: %+v, %v", st, err)
	}
	if st, err := c2.ApplyPolicy(ctx, pol, enf); err != nil || st != (MapStats{Unchanged: 2}) {
		t.Errorf("policy after reload: %+v, %v", st, err)
	}
	cnt, err := c2.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if cnt[ReasonDeniedEgress].Packets != 1 {
		t.Errorf("counters after reload: %v", cnt)
	}
}

// TestClassifierIncompatiblePin: a pinned map the program cannot use (a new version changed
// it) is replaced; the compatible ones are kept.
func TestClassifierIncompatiblePin(t *testing.T) {
	testutil.RequireRoot(t)
	pin := bpffsDir(t)
	c0 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	c0.run(t, c0.objs.FromPod, arpFrame())
	c0.Close()

	if err := os.Remove(filepath.Join(pin, "policy")); err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "policy", Type: ebpf.Hash, KeySize: 12, ValueSize: 4, MaxEntries: 16})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(pin, "policy")); err != nil {
		t.Fatal(err)
	}

	c1 := newTestClassifier(t, ClassifierOptions{PinPath: pin})
	if got := c1.objs.Policy.ValueSize(); got != 8 {
		t.Errorf("policy value size %d, want 8", got)
	}
	if cnt, err := c1.Counters(); err != nil || cnt[ReasonPassNonIP].Packets != 1 {
		t.Errorf("counters not kept: %v, %v", cnt, err)
	}
}

func TestReasonString(t *testing.T) {
	var got []string
	for r := range Reason(NumReasons + 1) {
		got = append(got, fmt.Sprintf("%s/%v", r, r.Dropped()))
	}
	want := []string{"allowed/false", "denied_egress/true", "denied_ingress/true", "drop_not_encrypted/true",
		"drop_malformed/true", "pass_non_ip/false", "allowed_no_policy/false", "Reason(7)/false"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if s := (IPCacheLocalPod | IPCacheTunnelReady | 1<<9).String(); s != "local-pod|tunnel-ready|0x200" {
		t.Errorf("flags: %s", s)
	}
}
