package datapath

import (
	"encoding/binary"
	"net/netip"
)

// This file builds test packets and holds a naive model of the classifier, written from
// docs/datapath.md and not from bpf/classifier.c: a parser over a byte slice and the verdict
// algorithm over plain Go maps. The tests compare the BPF programs against it.

const (
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoICMPv6   = 58
	protoSCTP     = 132
	extHopByHop   = 0
	extRouting    = 43
	extFragment   = 44
	extAH         = 51
	extDestOpts   = 60
	identityWorld = 2
)

// extHdr is an IPv6 extension header for the builder.
type extHdr struct {
	Type uint8
	// Len is the header's length in bytes (multiple of 8; AH: multiple of 4, at least 8).
	// Zero means the minimum. Fragment headers are always 8 bytes.
	Len int
	// FragOffset (in 8-byte units) and More apply to fragment headers.
	FragOffset uint16
	More       bool
}

// testPacket describes an Ethernet frame for the builder.
type testPacket struct {
	Src, Dst netip.Addr
	// Proto is the L4 protocol (IPv6: the next header after the extension headers).
	Proto uint8
	Dport uint16
	// L4 replaces the generated L4 header and payload when non-nil.
	L4 []byte
	// IHL is the IPv4 header length in 32-bit words; 0 means 5 (options are zero).
	IHL uint8
	// FragOffset (8-byte units) and MoreFrags set the IPv4 fragment fields.
	FragOffset uint16
	MoreFrags  bool
	// Ext are IPv6 extension headers, in order.
	Ext []extHdr
	// Cut removes bytes from the end of the frame.
	Cut int
	// Version overrides the IP version nibble when non-zero.
	Version uint8
}

func (p testPacket) l4() []byte {
	if p.L4 != nil {
		return p.L4
	}
	switch p.Proto {
	case protoTCP:
		b := make([]byte, 20+8)
		binary.BigEndian.PutUint16(b[0:], 40000)
		binary.BigEndian.PutUint16(b[2:], p.Dport)
		b[12] = 5 << 4
		b[13] = 0x02 // SYN
		copy(b[20:], "meshcrpt")
		return b
	case protoUDP:
		b := make([]byte, 8+8)
		binary.BigEndian.PutUint16(b[0:], 40000)
		binary.BigEndian.PutUint16(b[2:], p.Dport)
		binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
		copy(b[8:], "meshcrpt")
		return b
	case protoICMP:
		return []byte{8, 0, 0, 0, 0, 1, 0, 1, 'p', 'i', 'n', 'g'}
	case protoICMPv6:
		return []byte{128, 0, 0, 0, 0, 1, 0, 1, 'p', 'i', 'n', 'g'}
	}
	return []byte("payload!")
}

// bytes builds the frame.
func (p testPacket) bytes() []byte {
	eth := make([]byte, 14)
	copy(eth[0:6], []byte{0x02, 0, 0, 0, 0, 2})
	copy(eth[6:12], []byte{0x02, 0, 0, 0, 0, 1})
	l4 := p.l4()
	var b []byte
	if p.Src.Is4() {
		binary.BigEndian.PutUint16(eth[12:], 0x0800)
		ihl := p.IHL
		if ihl == 0 {
			ihl = 5
		}
		hlen := int(ihl) * 4
		if ihl < 5 {
			hlen = 20
		}
		ip := make([]byte, hlen)
		ver := p.Version
		if ver == 0 {
			ver = 4
		}
		ip[0] = ver<<4 | ihl&0xf
		binary.BigEndian.PutUint16(ip[2:], uint16(hlen+len(l4)))
		frag := p.FragOffset & 0x1fff
		if p.MoreFrags {
			frag |= 0x2000
		}
		binary.BigEndian.PutUint16(ip[6:], frag)
		ip[8] = 64
		ip[9] = p.Proto
		s, d := p.Src.As4(), p.Dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		b = append(append(eth, ip...), l4...)
	} else {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		ip := make([]byte, 40)
		ver := p.Version
		if ver == 0 {
			ver = 6
		}
		ip[0] = ver << 4
		ip[7] = 64
		s, d := p.Src.As16(), p.Dst.As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		var ext []byte
		next := func(i int) uint8 {
			if i+1 < len(p.Ext) {
				return p.Ext[i+1].Type
			}
			return p.Proto
		}
		if len(p.Ext) > 0 {
			ip[6] = p.Ext[0].Type
		} else {
			ip[6] = p.Proto
		}
		for i, e := range p.Ext {
			var h []byte
			switch e.Type {
			case extFragment:
				h = make([]byte, 8)
				off := e.FragOffset << 3
				if e.More {
					off |= 1
				}
				binary.BigEndian.PutUint16(h[2:], off)
				binary.BigEndian.PutUint32(h[4:], 0x6d63)
			case extAH:
				n := max(e.Len, 12)
				h = make([]byte, n)
				h[1] = uint8(n/4 - 2)
			default:
				n := max(e.Len, 8)
				h = make([]byte, n)
				h[1] = uint8(n/8 - 1)
				if e.Type != extRouting && n > 2 {
					h[2] = 1 // PadN option covering the rest
					h[3] = uint8(n - 4)
				}
			}
			h[0] = next(i)
			ext = append(ext, h...)
		}
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
		b = append(append(append(eth, ip...), ext...), l4...)
	}
	if p.Cut > 0 {
		b = b[:max(len(b)-p.Cut, 0)]
	}
	return b
}

// arpFrame is an ARP request from 10.0.0.1 for 10.0.0.2.
func arpFrame() []byte {
	b := make([]byte, 14+28)
	copy(b[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(b[6:12], []byte{0x02, 0, 0, 0, 0, 1})
	binary.BigEndian.PutUint16(b[12:], 0x0806)
	a := b[14:]
	binary.BigEndian.PutUint16(a[0:], 1)
	binary.BigEndian.PutUint16(a[2:], 0x0800)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:], 1)
	copy(a[8:14], b[6:12])
	copy(a[14:18], []byte{10, 0, 0, 1})
	copy(a[24:28], []byte{10, 0, 0, 2})
	return b
}

// modelPacket is what the model's parser extracts.
type modelPacket struct {
	Src, Dst     netip.Addr
	Proto        uint8
	Sport, Dport uint16
	TCPFlags     uint8 // flow events only
}

type parseKind int

const (
	parsedIP parseKind = iota
	parsedNonIP
	parsedMalformed
)

// modelParse parses a frame as docs/datapath.md says, with the precisions the classifier
// adds: the IP version nibble must match the EtherType; TCP needs its 20-byte header and
// data offset 5..15 within the frame; UDP 8 bytes; ICMP and ICMPv6 8 bytes; other protocols
// nothing. IPv6 extension headers beyond the 8 walked make the packet malformed.
func modelParse(b []byte) (modelPacket, parseKind) {
	var p modelPacket
	if len(b) < 14 {
		return p, parsedMalformed
	}
	var l4 int
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		ip := b[14:]
		if len(ip) < 20 || ip[0]>>4 != 4 || ip[0]&0xf < 5 {
			return p, parsedMalformed
		}
		hl := int(ip[0]&0xf) * 4
		if len(ip) < hl {
			return p, parsedMalformed
		}
		p.Src = netip.AddrFrom4([4]byte(ip[12:16]))
		p.Dst = netip.AddrFrom4([4]byte(ip[16:20]))
		p.Proto = ip[9]
		if binary.BigEndian.Uint16(ip[6:])&0x1fff != 0 {
			return p, parsedIP // non-first fragment: no L4 header
		}
		l4 = 14 + hl
	case 0x86dd:
		ip := b[14:]
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return p, parsedMalformed
		}
		p.Src = netip.AddrFrom16([16]byte(ip[8:24]))
		p.Dst = netip.AddrFrom16([16]byte(ip[24:40]))
		nh := ip[6]
		off := 14 + 40
		isExt := func(n uint8) bool {
			switch n {
			case extHopByHop, extRouting, extDestOpts, extFragment, extAH:
				return true
			}
			return false
		}
		for range 8 {
			if !isExt(nh) {
				break
			}
			if nh == extFragment {
				if len(b) < off+8 {
					return p, parsedMalformed
				}
				fo := binary.BigEndian.Uint16(b[off+2:]) >> 3
				nh = b[off]
				off += 8
				if fo != 0 {
					p.Proto = nh
					return p, parsedIP
				}
				continue
			}
			if len(b) < off+2 {
				return p, parsedMalformed
			}
			n := (int(b[off+1]) + 1) * 8
			if nh == extAH {
				n = (int(b[off+1]) + 2) * 4
			}
			nh = b[off]
			off += n
			if len(b) < off {
				return p, parsedMalformed
			}
		}
		if isExt(nh) {
			return p, parsedMalformed
		}
		p.Proto = nh
		l4 = off
	default:
		return p, parsedNonIP
	}
	rest := b[l4:]
	switch p.Proto {
	case protoTCP:
		if len(rest) < 20 {
			return p, parsedMalformed
		}
		doff := int(rest[12] >> 4)
		if doff < 5 || len(rest) < doff*4 {
			return p, parsedMalformed
		}
		p.Sport = binary.BigEndian.Uint16(rest[0:])
		p.Dport = binary.BigEndian.Uint16(rest[2:])
		p.TCPFlags = rest[13]
	case protoUDP:
		if len(rest) < 8 {
			return p, parsedMalformed
		}
		p.Sport = binary.BigEndian.Uint16(rest[0:])
		p.Dport = binary.BigEndian.Uint16(rest[2:])
	case protoICMP:
		if len(rest) < 8 {
			return p, parsedMalformed
		}
	case protoICMPv6:
		if len(rest) < 8 {
			return p, parsedMalformed
		}
		if rest[0] >= 133 && rest[0] <= 137 {
			return p, parsedNonIP // neighbour discovery passes like ARP
		}
	}
	return p, parsedIP
}

// model is the classifier's state as plain Go maps, decided naively.
type model struct {
	ipcache map[netip.Prefix]IPCacheEntry
	policy  map[PolicyKey]PolicyValue
	enforce map[EnforceKey]EnforceValue
	strict  bool // every packet to a remote pod needs a ready tunnel
}

// lookup is a longest-prefix match by brute force; a miss is world.
func (m *model) lookup(a netip.Addr) IPCacheEntry {
	best, bits := IPCacheEntry{Identity: identityWorld}, -1
	for p, e := range m.ipcache {
		pa := p.Addr()
		pb := p.Bits()
		// IPv4 lives at ::ffff:0:0/96 in the trie: compare in the 128-bit space.
		if pa.Is4() {
			pa = netip.AddrFrom16(pa.As16())
			pb += 96
		}
		if netip.PrefixFrom(pa, pb).Masked().Contains(netip.AddrFrom16(a.As16())) && pb > bits {
			best, bits = e, pb
		}
	}
	return best
}

// check is a direction check of docs/datapath.md.
func (m *model) check(s, p uint32, proto uint8, dport uint16, dir Direction) (allowed bool, flags PolicyFlags) {
	if m.enforce[EnforceKey{s, dir}].Flags&EnforceDeny == 0 {
		return true, 0
	}
	for _, k := range []PolicyKey{
		{s, p, dport, proto, dir}, {s, p, 0, proto, dir}, {s, p, 0, 0, dir},
		{s, 0, dport, proto, dir}, {s, 0, 0, proto, dir}, {s, 0, 0, 0, dir},
	} {
		if v, ok := m.policy[k]; ok {
			return true, v.Flags
		}
	}
	return false, 0
}

// decide returns the reason the classifier must count for a parsed packet.
func (m *model) decide(fromPod bool, pkt modelPacket) Reason {
	src, dst := m.lookup(pkt.Src), m.lookup(pkt.Dst)
	if !fromPod {
		ok, _ := m.check(dst.Identity, src.Identity, pkt.Proto, pkt.Dport, Ingress)
		if !ok {
			return ReasonDeniedIngress
		}
		if m.enforce[EnforceKey{dst.Identity, Ingress}].Flags&EnforceDeny != 0 {
			return ReasonAllowed
		}
		return ReasonAllowedNoPolicy
	}
	okE, fe := m.check(src.Identity, dst.Identity, pkt.Proto, pkt.Dport, Egress)
	if !okE {
		return ReasonDeniedEgress
	}
	okI, fi := m.check(dst.Identity, src.Identity, pkt.Proto, pkt.Dport, Ingress)
	if !okI {
		return ReasonDeniedIngress
	}
	es := m.enforce[EnforceKey{src.Identity, Egress}].Flags
	ed := m.enforce[EnforceKey{dst.Identity, Ingress}].Flags
	mustEncrypt := m.strict || (fe|fi)&PolicyEncrypt != 0 || (es|ed)&EnforceEncrypt != 0
	if dst.Flags&IPCacheLocalPod == 0 && dst.Flags&IPCacheRemotePod != 0 && mustEncrypt &&
		dst.Flags&IPCacheTunnelReady == 0 {
		return ReasonDropNotEncrypted
	}
	if (es|ed)&EnforceDeny != 0 {
		return ReasonAllowed
	}
	return ReasonAllowedNoPolicy
}

// classify runs the whole model on a frame.
func (m *model) classify(fromPod bool, frame []byte) Reason {
	pkt, kind := modelParse(frame)
	switch kind {
	case parsedNonIP:
		return ReasonPassNonIP
	case parsedMalformed:
		return ReasonDropMalformed
	}
	return m.decide(fromPod, pkt)
}
