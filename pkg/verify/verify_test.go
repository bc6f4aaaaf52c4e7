package verify_test

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/verify"
)

const marker = "mc-verify-0123456789abcdef"

func TestMessageRoundTrip(t *testing.T) {
	for _, m := range []verify.Message{{Kind: verify.Probe, Seq: 0, Marker: marker}, {Kind: verify.Echo, Seq: 99, Marker: marker}} {
		got, err := verify.Parse(m.Encode())
		if err != nil {
			t.Fatalf("Parse(%q): %v", m.Encode(), err)
		}
		if diff := cmp.Diff(m, got); diff != "" {
			t.Errorf("round trip (-want +got):\n%s", diff)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, in := range []string{
		"", "hello", "meshcrypt-verify P 1", "meshcrypt-verify X 1 " + marker, "meshcrypt-verify P -1 " + marker,
		"meshcrypt-verify P x " + marker, "meshcrypt-verify P 1 short", "meshcrypt-verify P 1 " + marker + " extra",
		"meshcrypt-verify P 1 " + strings.Repeat("a", 65), "meshcrypt-verify P 1 bad_marker_with_underscores",
	} {
		if m, err := verify.Parse([]byte(in)); err == nil {
			t.Errorf("Parse(%q) = %+v, want an error", in, m)
		}
	}
}

// ipv4 builds an IPv4 packet with protocol proto and payload l4.
func ipv4(dst string, proto byte, l4 []byte) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
	h[8], h[9] = 64, proto
	copy(h[12:16], netip.MustParseAddr("10.77.0.11").AsSlice())
	copy(h[16:20], netip.MustParseAddr(dst).AsSlice())
	return append(h, l4...)
}

func ipv6(dst string, proto byte, l4 []byte) []byte {
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(len(l4)))
	h[6], h[7] = proto, 64
	copy(h[8:24], netip.MustParseAddr("fd77::11").AsSlice())
	copy(h[24:40], netip.MustParseAddr(dst).AsSlice())
	return append(h, l4...)
}

func udp(src, dst uint16, payload []byte) []byte {
	h := make([]byte, 8)
	binary.BigEndian.PutUint16(h[0:], src)
	binary.BigEndian.PutUint16(h[2:], dst)
	binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
	return append(h, payload...)
}

func TestInspect(t *testing.T) {
	wg := map[uint16]bool{51871: true}
	probe := verify.Message{Kind: verify.Probe, Seq: 1, Marker: marker}.Encode()
	frag := ipv4("10.77.0.12", 17, udp(51871, 51871, nil))
	binary.BigEndian.PutUint16(frag[6:8], 0x00b9) // fragment offset != 0: no UDP header
	tests := []struct {
		name string
		pkt  []byte
		want verify.Packet
	}{
		{"clear probe v4", ipv4("10.244.2.254", 17, udp(40000, verify.Port, probe)), verify.Packet{Dst: netip.MustParseAddr("10.244.2.254"), Plaintext: true}},
		{"clear probe v6", ipv6("fd44:0:0:2:ffff:ffff:ffff:fffe", 17, udp(40000, verify.Port, probe)), verify.Packet{Dst: netip.MustParseAddr("fd44:0:0:2:ffff:ffff:ffff:fffe"), Plaintext: true}},
		{"wireguard to port", ipv4("10.77.0.12", 17, udp(40000, 51871, []byte{4, 0, 0, 0})), verify.Packet{Dst: netip.MustParseAddr("10.77.0.12"), Encrypted: true}},
		{"wireguard from port", ipv6("fd77::12", 17, udp(51871, 40000, []byte{4})), verify.Packet{Dst: netip.MustParseAddr("fd77::12"), Encrypted: true}},
		{"esp", ipv4("10.77.0.12", 50, []byte{0, 0, 0x10, 1, 0, 0, 0, 1}), verify.Packet{Dst: netip.MustParseAddr("10.77.0.12"), Encrypted: true}},
		{"other udp", ipv4("10.77.0.12", 17, udp(53, 53, nil)), verify.Packet{Dst: netip.MustParseAddr("10.77.0.12")}},
		{"tcp", ipv4("10.77.0.12", 6, make([]byte, 20)), verify.Packet{Dst: netip.MustParseAddr("10.77.0.12")}},
		{"later fragment", frag, verify.Packet{Dst: netip.MustParseAddr("10.77.0.12")}},
		{"truncated v4", ipv4("10.77.0.12", 17, nil)[:12], verify.Packet{}},
		{"bad ihl", append([]byte{0x41}, make([]byte, 30)...), verify.Packet{}},
		{"not ip, marker inside", append([]byte{0x00}, marker...), verify.Packet{Plaintext: true}},
		{"empty", nil, verify.Packet{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := verify.Inspect(tt.pkt, []byte(marker), wg)
			if diff := cmp.Diff(tt.want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); diff != "" {
				t.Errorf("Inspect (-want +got):\n%s", diff)
			}
		})
	}
}

func TestJudge(t *testing.T) {
	ok := verify.Outcome{Mode: v1alpha1.ModeWireGuard, Sent: 10, Echoes: 10, Received: 10, DestinationDone: true,
		Source: verify.Tally{Frames: 12, Encrypted: 12}, Destination: verify.Tally{Frames: 11, Encrypted: 11}}
	with := func(f func(*verify.Outcome)) verify.Outcome { o := ok; f(&o); return o }
	tests := []struct {
		name string
		in   verify.Outcome
		want v1alpha1.VerificationVerdict
		msg  string
	}{
		{"encrypted", ok, v1alpha1.VerdictEncrypted, "10 probes and 10 echoes"},
		{"plaintext at source", with(func(o *verify.Outcome) { o.Source.Plaintext = 3 }), v1alpha1.VerdictPlaintextSeen, "3 sent by the source"},
		{"plaintext at destination only", with(func(o *verify.Outcome) { o.Destination.Plaintext = 1; o.Echoes = 0 }), v1alpha1.VerdictPlaintextSeen, "1 by the destination"},
		{"plaintext even if destination never finished", with(func(o *verify.Outcome) { o.Source.Plaintext = 1; o.DestinationDone = false }), v1alpha1.VerdictPlaintextSeen, "not encrypted"},
		{"nothing sent", with(func(o *verify.Outcome) { o.Sent = 0 }), v1alpha1.VerdictFailed, "no probe"},
		{"destination silent", with(func(o *verify.Outcome) { o.DestinationDone = false }), v1alpha1.VerdictFailed, "did not report"},
		{"nothing arrived", with(func(o *verify.Outcome) { o.Received, o.Echoes = 0, 0 }), v1alpha1.VerdictFailed, "none of 10 probes"},
		{"no echo", with(func(o *verify.Outcome) { o.Echoes = 0 }), v1alpha1.VerdictFailed, "no echo"},
		{"capture blind", with(func(o *verify.Outcome) { o.Source.Frames = 0 }), v1alpha1.VerdictFailed, "saw no frame"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, msg := verify.Judge(tt.in)
			if got != tt.want || !strings.Contains(msg, tt.msg) {
				t.Errorf("Judge = %s, %q; want %s with %q", got, msg, tt.want, tt.msg)
			}
		})
	}
}

func TestHealthAddr(t *testing.T) {
	tests := []struct{ prefix, want string }{
		{"10.244.1.0/24", "10.244.1.254"},
		{"10.244.0.0/16", "10.244.255.254"},
		{"10.244.1.0/30", "10.244.1.2"},
		{"10.244.1.7/24", "10.244.1.254"}, // host bits ignored
		{"fd44:0:0:1::/64", "fd44:0:0:1:ffff:ffff:ffff:fffe"},
		{"fd44::/52", "fd44:0:0:fff:ffff:ffff:ffff:fffe"},
		{"10.244.1.0/31", ""},
		{"10.244.1.1/32", ""},
	}
	for _, tt := range tests {
		got, ok := verify.HealthAddr(netip.MustParsePrefix(tt.prefix))
		if (tt.want == "") != !ok || ok && got != netip.MustParseAddr(tt.want) {
			t.Errorf("HealthAddr(%s) = %v, %v; want %q", tt.prefix, got, ok, tt.want)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(verify.Message{Kind: verify.Probe, Seq: 3, Marker: marker}.Encode()))
	f.Add([]byte("meshcrypt-verify E 1 x"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := verify.Parse(b)
		if err != nil {
			return
		}
		again, err := verify.Parse(m.Encode())
		if err != nil || again != m {
			t.Fatalf("re-parse of %q: %+v, %v", m.Encode(), again, err)
		}
	})
}

func FuzzInspect(f *testing.F) {
	f.Add(ipv4("10.77.0.12", 17, udp(1, 51871, []byte(marker))))
	f.Add(ipv6("fd77::12", 50, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		p := verify.Inspect(b, []byte(marker), map[uint16]bool{51871: true})
		if p.Plaintext != strings.Contains(string(b), marker) {
			t.Fatalf("Plaintext = %v for %x", p.Plaintext, b)
		}
	})
}
