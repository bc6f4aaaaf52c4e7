package netenv

import (
	"encoding/binary"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// frame builds an Ethernet frame: ethertype, then the given bytes.
func frame(etherType uint16, payload ...[]byte) []byte {
	f := make([]byte, 14)
	binary.BigEndian.PutUint16(f[12:], etherType)
	for _, p := range payload {
		f = append(f, p...)
	}
	return f
}

func ipv4Header(proto byte, fragOff uint16) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[6:], fragOff)
	h[9] = proto
	return h
}

func ipv6Header(next byte) []byte {
	h := make([]byte, 40)
	h[0] = 0x60
	h[6] = next
	return h
}

func ports(src, dst uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:], src)
	binary.BigEndian.PutUint16(b[2:], dst)
	return b
}

func vlan(inner uint16) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint16(b[2:], inner)
	return b
}

var parseFrameTests = []struct {
	name  string
	frame []byte
	want  l4Info
	ok    bool
}{
	{"ipv4 udp", frame(etherTypeIPv4, ipv4Header(17, 0), ports(1234, 51820)), l4Info{17, true, 1234, 51820}, true},
	{"ipv4 tcp", frame(etherTypeIPv4, ipv4Header(6, 0x4000), ports(40000, 443)), l4Info{6, true, 40000, 443}, true},
	{"ipv4 esp", frame(etherTypeIPv4, ipv4Header(50, 0), ports(0, 1)), l4Info{proto: 50}, true},
	{"ipv4 later fragment", frame(etherTypeIPv4, ipv4Header(17, 0x00b9), ports(1, 2)), l4Info{proto: 17}, true},
	{"ipv4 short udp", frame(etherTypeIPv4, ipv4Header(17, 0), []byte{1, 2}), l4Info{proto: 17}, true},
	{"ipv4 bad ihl", frame(etherTypeIPv4, append([]byte{0x44}, make([]byte, 19)...)), l4Info{}, false},
	{"ipv4 truncated", frame(etherTypeIPv4, []byte{0x45, 0}), l4Info{}, false},
	{"vlan ipv4 udp", frame(etherTypeVLAN, vlan(etherTypeIPv4), ipv4Header(17, 0), ports(5, 6)), l4Info{17, true, 5, 6}, true},
	{"qinq ipv6 udp", frame(etherTypeQinQ, vlan(etherTypeVLAN), vlan(etherTypeIPv6), ipv6Header(17), ports(7, 8)), l4Info{17, true, 7, 8}, true},
	{"ipv6 udp", frame(etherTypeIPv6, ipv6Header(17), ports(1, 51820)), l4Info{17, true, 1, 51820}, true},
	{"ipv6 hop-by-hop then udp", frame(etherTypeIPv6, ipv6Header(0), []byte{17, 0, 0, 0, 0, 0, 0, 0}, ports(3, 4)), l4Info{17, true, 3, 4}, true},
	{"ipv6 first fragment", frame(etherTypeIPv6, ipv6Header(44), []byte{17, 0, 0, 1, 0, 0, 0, 1}, ports(3, 4)), l4Info{17, true, 3, 4}, true},
	{"ipv6 later fragment", frame(etherTypeIPv6, ipv6Header(44), []byte{17, 0, 0x05, 0x08, 0, 0, 0, 1}, ports(3, 4)), l4Info{proto: 17}, true},
	{"ipv6 esp", frame(etherTypeIPv6, ipv6Header(50), ports(0, 0)), l4Info{proto: 50}, true},
	{"ipv6 truncated ext", frame(etherTypeIPv6, ipv6Header(60), []byte{17, 4}), l4Info{}, false},
	{"arp", frame(0x0806, make([]byte, 28)), l4Info{}, false},
	{"runt", []byte{1, 2, 3}, l4Info{}, false},
}

func TestParseFrame(t *testing.T) {
	for _, tt := range parseFrameTests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseFrame(tt.frame)
			if ok != tt.ok {
				t.Fatalf("ok = %v, want %v", ok, tt.ok)
			}
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(l4Info{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzParseFrame(f *testing.F) {
	for _, tt := range parseFrameTests {
		f.Add(tt.frame)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		info, ok := parseFrame(b)
		if !ok && info != (l4Info{}) {
			t.Errorf("not ok but %+v", info)
		}
	})
}

func TestChecksum(t *testing.T) {
	// RFC 1071's example: 0001 f203 f4f5 f6f7 sums to 0xddf2.
	if got := checksum([]byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}); got != ^uint16(0xddf2) {
		t.Errorf("checksum = %#x, want %#x", got, ^uint16(0xddf2))
	}
	req := echoRequest(false, 0x1234, 7, 33)
	if checksum(req) != 0 {
		t.Errorf("echo request does not verify: %#x", checksum(req))
	}
}

var echoReplyTests = []struct {
	name string
	v6   bool
	msg  []byte
	want echoResult
}{
	{"v4 reply", false, append(ipv4Header(1, 0), 0, 0, 0, 0, 0x12, 0x34, 0, 1, 9, 9), echoResult{reply: true, length: 30}},
	{"v4 reply other id", false, append(ipv4Header(1, 0), 0, 0, 0, 0, 0x43, 0x21, 0, 1), echoResult{}},
	{"v4 frag needed", false, append(append(ipv4Header(1, 0), 3, 4, 0, 0, 0, 0, 0x05, 0x78), append(ipv4Header(1, 0), 8, 0, 0, 0, 0x12, 0x34, 0, 1)...), echoResult{mtu: 1400}},
	{"v4 frag needed for another id", false, append(append(ipv4Header(1, 0), 3, 4, 0, 0, 0, 0, 0x05, 0x78), append(ipv4Header(1, 0), 8, 0, 0, 0, 0x99, 0x99, 0, 1)...), echoResult{}},
	{"v4 request (own, looped)", false, append(ipv4Header(1, 0), 8, 0, 0, 0, 0x12, 0x34, 0, 1), echoResult{}},
	{"v6 reply", true, []byte{129, 0, 0, 0, 0x12, 0x34, 0, 1, 1, 2}, echoResult{reply: true, length: 50}},
	{"v6 packet too big", true, append([]byte{2, 0, 0, 0, 0, 0, 0x05, 0x78}, append(ipv6Header(58), 128, 0, 0, 0, 0x12, 0x34, 0, 1)...), echoResult{mtu: 1400}},
	{"v6 neighbour solicitation", true, []byte{135, 0, 0, 0, 0, 0, 0, 0}, echoResult{}},
	{"short", true, []byte{129}, echoResult{}},
}

func TestParseEchoReply(t *testing.T) {
	for _, tt := range echoReplyTests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseEchoReply(tt.v6, tt.msg, 0x1234)
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(echoResult{})); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzParseEchoReply(f *testing.F) {
	for _, tt := range echoReplyTests {
		f.Add(tt.v6, tt.msg)
	}
	f.Fuzz(func(t *testing.T, v6 bool, b []byte) {
		parseEchoReply(v6, b, 0x1234)
	})
}
