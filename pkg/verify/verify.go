package verify

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// Port is the UDP port of every node's health endpoint where probes are echoed.
const Port = 51872

// prefix starts every probe and echo.
const prefix = "meshcrypt-verify"

// Kind tells a probe from its echo.
type Kind byte

// The message kinds.
const (
	// Probe is sent by the source to the destination's health endpoint.
	Probe Kind = 'P'
	// Echo is the destination's answer, sent back to the probe's source.
	Echo Kind = 'E'
)

// Message is a probe or an echo: "meshcrypt-verify P 3 MARKER".
type Message struct {
	Kind   Kind
	Seq    int
	Marker string
}

// Encode returns the message's wire form.
func (m Message) Encode() []byte {
	return fmt.Appendf(nil, "%s %c %d %s", prefix, m.Kind, m.Seq, m.Marker)
}

// Parse reads a probe or echo; anything else is an error.
func Parse(b []byte) (Message, error) {
	f := strings.Fields(string(b))
	if len(f) != 4 || f[0] != prefix {
		return Message{}, errors.New("not a meshcrypt-verify message")
	}
	if len(f[1]) != 1 || (Kind(f[1][0]) != Probe && Kind(f[1][0]) != Echo) {
		return Message{}, fmt.Errorf("unknown message kind %q", f[1])
	}
	seq, err := strconv.Atoi(f[2])
	if err != nil || seq < 0 {
		return Message{}, fmt.Errorf("bad sequence number %q", f[2])
	}
	if !ValidMarker(f[3]) {
		return Message{}, fmt.Errorf("bad marker %q", f[3])
	}
	return Message{Kind: Kind(f[1][0]), Seq: seq, Marker: f[3]}, nil
}

// ValidMarker reports whether s is a marker MeshVerification accepts: 16-64 letters, digits
// or '-'.
func ValidMarker(s string) bool {
	if len(s) < 16 || len(s) > 64 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Packet is what Inspect found in one IP packet a node sent.
type Packet struct {
	// Dst is the packet's destination address; invalid if the packet is not IP.
	Dst netip.Addr
	// Encrypted is true for ESP and for UDP from or to a WireGuard port.
	Encrypted bool
	// Plaintext is true when the packet contains the marker anywhere.
	Plaintext bool
}

// The IP protocol numbers Inspect reads.
const (
	protoUDP = 17
	protoESP = 50
)

// Inspect reads an IPv4 or IPv6 packet (network header first, as an AF_PACKET datagram
// socket returns it). wgPorts are the WireGuard listen ports of the mesh. A packet too short
// for its header still gets its Plaintext judged.
func Inspect(pkt, marker []byte, wgPorts map[uint16]bool) Packet {
	p := Packet{Plaintext: len(marker) > 0 && bytes.Contains(pkt, marker)}
	if len(pkt) < 1 {
		return p
	}
	var proto byte
	var l4 []byte
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < 20 {
			return p
		}
		ihl := int(pkt[0]&0x0f) * 4
		if ihl < 20 || len(pkt) < ihl {
			return p
		}
		p.Dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		proto, l4 = pkt[9], pkt[ihl:]
		if binary.BigEndian.Uint16(pkt[6:8])&0x1fff != 0 { // a later fragment: no L4 header
			l4 = nil
		}
	case 6:
		if len(pkt) < 40 {
			return p
		}
		p.Dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		proto, l4 = pkt[6], pkt[40:] // extension headers are not followed: ESP and UDP come first here
	default:
		return p
	}
	switch proto {
	case protoESP:
		p.Encrypted = true
	case protoUDP:
		if len(l4) >= 4 {
			src, dst := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
			p.Encrypted = wgPorts[src] || wgPorts[dst]
		}
	}
	return p
}

// Tally counts the packets one node sent to the other node of a pair.
type Tally struct {
	Frames, Encrypted, Plaintext int32
}

// Add counts p.
func (t *Tally) Add(p Packet) {
	t.Frames++
	if p.Encrypted {
		t.Encrypted++
	}
	if p.Plaintext {
		t.Plaintext++
	}
}

// Outcome is what the two agents of a pair measured.
type Outcome struct {
	// Mode is the source's applied encryption mode.
	Mode v1alpha1.EncryptionMode
	// Sent, Echoes: probes sent and echoes received by the source; Received: probes that
	// reached the destination (-1 if the destination never reported).
	Sent, Echoes, Received int32
	// Source and Destination are the captures of what each node sent to the other;
	// DestinationDone is false if the destination's capture never finished.
	Source, Destination Tally
	DestinationDone     bool
}

// Judge returns a pair's verdict and why. Plaintext anywhere wins: a frame with the marker
// on an underlay is proof of clear traffic whatever else happened. Encrypted needs probes
// both ways (so the captures saw real traffic) and both captures complete.
func Judge(o Outcome) (v1alpha1.VerificationVerdict, string) {
	if n := o.Source.Plaintext + o.Destination.Plaintext; n > 0 {
		return v1alpha1.VerdictPlaintextSeen, fmt.Sprintf("the marker was in %d frame(s) on the underlay (%d sent by the source, %d by the destination): traffic between the nodes is not encrypted (mode %s)",
			n, o.Source.Plaintext, o.Destination.Plaintext, o.Mode)
	}
	switch {
	case o.Sent == 0:
		return v1alpha1.VerdictFailed, "no probe was sent"
	case !o.DestinationDone || o.Received < 0:
		return v1alpha1.VerdictFailed, "the destination's agent did not report its capture"
	case o.Received == 0:
		return v1alpha1.VerdictFailed, fmt.Sprintf("none of %d probes reached the destination's health endpoint", o.Sent)
	case o.Echoes == 0:
		return v1alpha1.VerdictFailed, fmt.Sprintf("%d of %d probes arrived but no echo came back", o.Received, o.Sent)
	case o.Source.Frames == 0 || o.Destination.Frames == 0:
		return v1alpha1.VerdictFailed, "a capture saw no frame between the nodes: it did not watch the interface the traffic took"
	}
	return v1alpha1.VerdictEncrypted, fmt.Sprintf("%d probes and %d echoes crossed; %d+%d frames between the nodes, %d+%d of them encrypted, none with the marker",
		o.Received, o.Echoes, o.Source.Frames, o.Destination.Frames, o.Source.Encrypted, o.Destination.Encrypted)
}

// HealthAddr is the address of a node's health endpoint in its pod CIDR p: the highest
// address but one (10.244.1.254 in 10.244.1.0/24, fd44:0:0:1:ffff:ffff:ffff:fffe in a /64),
// which sequential pod IPAM reaches last. Prefixes with fewer than 4 addresses have none.
func HealthAddr(p netip.Prefix) (netip.Addr, bool) {
	p = p.Masked()
	if !p.IsValid() || p.Addr().BitLen()-p.Bits() < 2 {
		return netip.Addr{}, false
	}
	b := p.Addr().AsSlice()
	host := p.Addr().BitLen() - p.Bits()
	for i := len(b) - 1; i >= 0 && host > 0; i-- { // set every host bit
		n := min(host, 8)
		b[i] |= byte(1<<n - 1)
		host -= n
	}
	b[len(b)-1] &^= 1
	a, _ := netip.AddrFromSlice(b)
	return a, true
}
