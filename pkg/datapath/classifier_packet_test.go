package datapath

import (
	"encoding/binary"
	"net/netip"
	"time"
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
	// Sport is the TCP or UDP source port; 0 means 40000.
	Sport uint16
	// TCPFlags are the TCP flags; 0 means SYN.
	TCPFlags uint8
	// ICMPType is the ICMP or ICMPv6 type; 0 means an echo request (ICMP 8, ICMPv6 128), so
	// an ICMP echo reply (type 0) is asked for with ICMPEchoReply.
	ICMPType      uint8
	ICMPEchoReply bool
	// ICMPID is the echo identifier (also the 4 bytes after the checksum of other types).
	ICMPID uint16
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
	sport := p.Sport
	if sport == 0 {
		sport = 40000
	}
	switch p.Proto {
	case protoTCP:
		b := make([]byte, 20+8)
		binary.BigEndian.PutUint16(b[0:], sport)
		binary.BigEndian.PutUint16(b[2:], p.Dport)
		b[12] = 5 << 4
		b[13] = 0x02 // SYN
		if p.TCPFlags != 0 {
			b[13] = p.TCPFlags
		}
		copy(b[20:], "meshcrpt")
		return b
	case protoUDP:
		b := make([]byte, 8+8)
		binary.BigEndian.PutUint16(b[0:], sport)
		binary.BigEndian.PutUint16(b[2:], p.Dport)
		binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
		copy(b[8:], "meshcrpt")
		return b
	case protoICMP, protoICMPv6:
		typ := p.ICMPType
		switch {
		case p.ICMPEchoReply && p.Proto == protoICMP:
			typ = 0
		case p.ICMPEchoReply:
			typ = 129
		case typ == 0 && p.Proto == protoICMP:
			typ = 8
		case typ == 0:
			typ = 128
		}
		id := p.ICMPID
		if id == 0 && p.ICMPType == 0 {
			id = 1
		}
		b := []byte{typ, 0, 0, 0, 0, 0, 0, 1, 'p', 'i', 'n', 'g'}
		binary.BigEndian.PutUint16(b[4:], id)
		return b
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
	TCPFlags     uint8
	Frag         bool // a non-first fragment: no L4 header
	// ICMP and ICMPv6: the type, the echo identifier, and for errors the packet quoted
	// (nil when it could not be parsed).
	ICMPType uint8
	ICMPID   uint16
	Quoted   *modelPacket
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
			p.Frag = true
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
					p.Frag = true
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
		p.ICMPType, p.ICMPID = rest[0], binary.BigEndian.Uint16(rest[4:])
		p.Quoted = quotedPacket(rest[8:], 4)
	case protoICMPv6:
		if len(rest) < 8 {
			return p, parsedMalformed
		}
		if rest[0] >= 133 && rest[0] <= 137 {
			return p, parsedNonIP // neighbour discovery passes like ARP
		}
		p.ICMPType, p.ICMPID = rest[0], binary.BigEndian.Uint16(rest[4:])
		p.Quoted = quotedPacket(rest[8:], 6)
	}
	return p, parsedIP
}

// quotedPacket parses the packet an ICMP error quotes (of the error's own IP version): its
// IP header (IPv6: no extension headers) and the first 8 bytes of its TCP, UDP, ICMP or
// ICMPv6 header; other protocols need no more than the IP header. nil when b is too short.
func quotedPacket(b []byte, version int) *modelPacket {
	var q modelPacket
	var l4 []byte
	if version == 4 {
		if len(b) < 20 || b[0]>>4 != 4 || b[0]&0xf < 5 {
			return nil
		}
		q.Src = netip.AddrFrom4([4]byte(b[12:16]))
		q.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		q.Proto = b[9]
		hl := int(b[0]&0xf) * 4
		if len(b) >= hl {
			l4 = b[hl:]
		}
	} else {
		if len(b) < 40 || b[0]>>4 != 6 {
			return nil
		}
		q.Src = netip.AddrFrom16([16]byte(b[8:24]))
		q.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		q.Proto = b[6]
		l4 = b[40:]
	}
	switch q.Proto {
	case protoTCP, protoUDP:
		if len(l4) < 4 {
			return nil
		}
		q.Sport, q.Dport = binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
	case protoICMP, protoICMPv6:
		if len(l4) < 8 {
			return nil
		}
		q.ICMPType, q.ICMPID = l4[0], binary.BigEndian.Uint16(l4[4:])
	}
	return &q
}

// model is the classifier's state as plain Go maps, decided naively, with the connection
// table of docs/datapath.md ("Connections") as a Go map of connections by their unordered
// endpoints.
type model struct {
	ipcache map[netip.Prefix]IPCacheEntry
	policy  map[PolicyKey]PolicyValue
	enforce map[EnforceKey]EnforceValue
	strict  bool // every packet to a remote pod needs a ready tunnel

	conns map[modelEndpoints]*modelConn // nil until the first connection
	epoch uint32                        // bumped by changed
	now   time.Duration                 // CLOCK_BOOTTIME of the packet being classified
}

// modelEndpoint is one end of a connection.
type modelEndpoint struct {
	Addr netip.Addr
	Port uint16
}

// modelEndpoints are a connection's two ends, in an order of the model's own.
type modelEndpoints struct {
	X, Y  modelEndpoint
	Proto uint8
}

func endpointsOf(a, b modelEndpoint, proto uint8) modelEndpoints {
	if c := a.Addr.Compare(b.Addr); c > 0 || c == 0 && a.Port > b.Port {
		a, b = b, a
	}
	return modelEndpoints{a, b, proto}
}

// modelConn is a tracked connection.
type modelConn struct {
	Orig, Resp modelEndpoint // originator, responder
	Src, Dst   IPCacheEntry  // their ipcache entries at the last judgement
	Reason     Reason
	FromPod    bool // judged as from_pod judges
	Required   bool
	Replied    bool
	FinOrig    bool
	FinReply   bool
	RST        bool
	Epoch      uint32
	Seen       time.Duration
	Proto      uint8
}

// Timeouts of docs/datapath.md.
const (
	ctTimeoutTCPSyn   = 60 * time.Second
	ctTimeoutTCP      = 6 * time.Hour
	ctTimeoutTCPClose = 10 * time.Second
	ctTimeoutOther    = 60 * time.Second
	ctRefresh         = time.Second
)

func (c *modelConn) closing() bool { return c.RST || c.FinOrig && c.FinReply }

func (c *modelConn) timeout() time.Duration {
	switch {
	case c.Proto != protoTCP:
		return ctTimeoutOther
	case c.closing():
		return ctTimeoutTCPClose
	case !c.Replied:
		return ctTimeoutTCPSyn
	}
	return ctTimeoutTCP
}

// changed is what the agent's writes do to the classifier: the epoch moves on.
func (m *model) changed() { m.epoch++ }

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

// judge decides a connection src -> dst by policy: from_pod checks src's egress and dst's
// ingress, to_pod dst's ingress. It says whether the connection must be encrypted.
func (m *model) judge(fromPod bool, src, dst netip.Addr, proto uint8, dport uint16) (reason Reason, s, d IPCacheEntry, required bool) {
	s, d = m.lookup(src), m.lookup(dst)
	var fe, fi PolicyFlags
	if fromPod {
		ok, f := m.check(s.Identity, d.Identity, proto, dport, Egress)
		if !ok {
			return ReasonDeniedEgress, s, d, false
		}
		fe = f
	}
	ok, fi := m.check(d.Identity, s.Identity, proto, dport, Ingress)
	if !ok {
		return ReasonDeniedIngress, s, d, false
	}
	es := m.enforce[EnforceKey{s.Identity, Egress}].Flags
	ed := m.enforce[EnforceKey{d.Identity, Ingress}].Flags
	required = m.strict || (fe|fi)&PolicyEncrypt != 0 || (es|ed)&EnforceEncrypt != 0
	deny := ed & EnforceDeny
	if fromPod {
		deny |= es & EnforceDeny
	}
	if deny != 0 {
		return ReasonAllowed, s, d, required
	}
	return ReasonAllowedNoPolicy, s, d, required
}

// unencrypted: a packet of a connection that must be encrypted, going to an endpoint with
// ipcache entry to, would leave in clear.
func unencrypted(required bool, to IPCacheEntry) bool {
	return required && to.Flags&IPCacheLocalPod == 0 && to.Flags&IPCacheRemotePod != 0 &&
		to.Flags&IPCacheTunnelReady == 0
}

// current judges c again when its epoch is old, as the program that entered it did. It
// returns the reason; a denial leaves c as it was.
func (m *model) current(c *modelConn) Reason {
	if c.Epoch == m.epoch {
		return c.Reason
	}
	dport := c.Resp.Port
	if c.Proto != protoTCP && c.Proto != protoUDP {
		dport = 0
	}
	r, s, d, req := m.judge(c.FromPod, c.Orig.Addr, c.Resp.Addr, c.Proto, dport)
	if r.Dropped() {
		return r
	}
	c.Reason, c.Src, c.Dst, c.Required = r, s, d, req
	c.Epoch = m.epoch
	return r
}

// ctClass is what the connection table does with a packet.
type ctClass int

const (
	ctNone ctClass = iota
	ctTrack
	ctLookup
	ctICMPError
)

// connOf returns the packet's connection ends and class.
func connOf(pkt modelPacket, frag bool) (src, dst modelEndpoint, class ctClass) {
	src, dst = modelEndpoint{Addr: pkt.Src}, modelEndpoint{Addr: pkt.Dst}
	if frag {
		return src, dst, ctNone
	}
	switch pkt.Proto {
	case protoTCP, protoUDP:
		src.Port, dst.Port = pkt.Sport, pkt.Dport
		return src, dst, ctTrack
	case protoICMP, protoICMPv6:
		echo, reply, isErr := uint8(8), uint8(0), pkt.ICMPType == 3 || pkt.ICMPType == 11 || pkt.ICMPType == 12
		if pkt.Proto == protoICMPv6 {
			echo, reply, isErr = 128, 129, pkt.ICMPType >= 1 && pkt.ICMPType <= 4
		}
		switch {
		case pkt.ICMPType == echo:
			src.Port = pkt.ICMPID
			return src, dst, ctTrack
		case pkt.ICMPType == reply:
			dst.Port = pkt.ICMPID
			return src, dst, ctLookup
		case isErr:
			return src, dst, ctICMPError
		}
		return src, dst, ctNone
	}
	return src, dst, ctTrack
}

// modelResult is what the model says of a packet.
type modelResult struct {
	Reason  Reason
	Tracked bool // passed (or denied) as part of a known connection
	Reply   bool // from the responder, or an ICMP error about the connection
}

// step classifies one parsed packet and updates the connection table.
func (m *model) step(fromPod bool, pkt modelPacket, frag bool) modelResult {
	src, dst, class := connOf(pkt, frag)
	if class == ctICMPError {
		if r, ok := m.related(fromPod, pkt); ok {
			return r
		}
	} else if class != ctNone {
		if c := m.conns[endpointsOf(src, dst, pkt.Proto)]; c != nil && m.now-c.Seen <= c.timeout() &&
			!(pkt.Proto == protoTCP && pkt.TCPFlags&0x12 == 0x02 && c.closing()) {
			fwd := src == c.Orig
			r := m.current(c)
			if r.Dropped() {
				return modelResult{Reason: r, Tracked: true}
			}
			if !fwd {
				c.Replied = true
			}
			if pkt.Proto == protoTCP {
				if pkt.TCPFlags&0x01 != 0 {
					if fwd {
						c.FinOrig = true
					} else {
						c.FinReply = true
					}
				}
				if pkt.TCPFlags&0x04 != 0 {
					c.RST = true
				}
			}
			if m.now-c.Seen > ctRefresh {
				c.Seen = m.now
			}
			to := c.Dst
			if !fwd {
				to = c.Src
			}
			if fromPod && unencrypted(c.Required, to) {
				r = ReasonDropNotEncrypted
			}
			return modelResult{Reason: r, Tracked: true, Reply: !fwd}
		}
	}
	dport := pkt.Dport
	if pkt.Proto != protoTCP && pkt.Proto != protoUDP {
		dport = 0
	}
	r, s, d, req := m.judge(fromPod, pkt.Src, pkt.Dst, pkt.Proto, dport)
	if !r.Dropped() && fromPod && unencrypted(req, d) {
		r = ReasonDropNotEncrypted
	}
	if !r.Dropped() && class == ctTrack {
		if m.conns == nil {
			m.conns = map[modelEndpoints]*modelConn{}
		}
		c := &modelConn{Orig: src, Resp: dst, Src: s, Dst: d, Reason: r, FromPod: fromPod,
			Required: req, Epoch: m.epoch, Seen: m.now, Proto: pkt.Proto}
		if pkt.Proto == protoTCP {
			c.FinOrig = pkt.TCPFlags&0x01 != 0
			c.RST = pkt.TCPFlags&0x04 != 0
		}
		m.conns[endpointsOf(src, dst, pkt.Proto)] = c
	}
	return modelResult{Reason: r}
}

// related passes an ICMP error that quotes a packet of a live connection policy still
// allows, sent by the error's destination.
func (m *model) related(fromPod bool, pkt modelPacket) (modelResult, bool) {
	q := pkt.Quoted
	if q == nil || q.Src != pkt.Dst {
		return modelResult{}, false
	}
	src, dst := modelEndpoint{Addr: q.Src}, modelEndpoint{Addr: q.Dst}
	switch q.Proto {
	case protoTCP, protoUDP:
		src.Port, dst.Port = q.Sport, q.Dport
	case protoICMP, protoICMPv6:
		echo, reply := uint8(8), uint8(0)
		if q.Proto == protoICMPv6 {
			echo, reply = 128, 129
		}
		switch q.ICMPType {
		case echo:
			src.Port = q.ICMPID
		case reply:
			dst.Port = q.ICMPID
		default:
			return modelResult{}, false
		}
	}
	c := m.conns[endpointsOf(src, dst, q.Proto)]
	if c == nil || m.now-c.Seen > c.timeout() {
		return modelResult{}, false
	}
	r := m.current(c)
	if r.Dropped() {
		return modelResult{}, false
	}
	to := c.Src // the error goes to the quoted packet's sender
	if src != c.Orig {
		to = c.Dst
	}
	if fromPod && unencrypted(c.Required, to) {
		r = ReasonDropNotEncrypted
	}
	return modelResult{Reason: r, Tracked: true, Reply: true}, true
}

// classify runs the whole model on a frame.
func (m *model) classify(fromPod bool, frame []byte) Reason {
	return m.classifyFull(fromPod, frame).Reason
}

// classifyFull runs the whole model on a frame and says how the connection table placed it.
func (m *model) classifyFull(fromPod bool, frame []byte) modelResult {
	pkt, kind := modelParse(frame)
	switch kind {
	case parsedNonIP:
		return modelResult{Reason: ReasonPassNonIP}
	case parsedMalformed:
		return modelResult{Reason: ReasonDropMalformed}
	}
	return m.step(fromPod, pkt, pkt.Frag)
}
