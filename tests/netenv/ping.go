package netenv

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Ping timing: a resend interval (the first echo may wait behind neighbour
// resolution) and the wait used when ctx has no deadline.
const (
	pingInterval       = time.Second
	pingDefaultTimeout = 10 * time.Second
)

// ErrFragNeeded is wrapped by Ping's error when a router answered that the
// packet does not fit its next hop (ICMP fragmentation needed, ICMPv6 packet
// too big), or the kernel refused to send it because it exceeds the known path
// MTU.
var ErrFragNeeded = errors.New("netenv: packet too big for the path")

// Ping sends ICMP echo requests from inside the namespace to dst until a reply
// of the same size arrives or ctx is done (10 s without a deadline). size is the
// whole IP packet, header included, so Ping(ctx, dst, mtu) is a full-size packet
// like `ping -M do -s mtu-28` (IPv4) or `-s mtu-48` (IPv6). Fragmentation is
// forbidden: DF is set on IPv4, and the kernel does not fragment IPv6 locally.
func (ns *NS) Ping(ctx context.Context, dst netip.Addr, size int) error {
	dst = dst.Unmap()
	hdr := 20
	if dst.Is6() {
		hdr = 40
	}
	if size < hdr+8 || size > 65535 {
		return fmt.Errorf("ping %s: size %d: want %d-65535", dst, size, hdr+8)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, pingDefaultTimeout)
		defer cancel()
	}
	fd := -1
	err := ns.Do(func() error {
		var err error
		if dst.Is4() {
			fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
			if err == nil {
				err = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
			}
		} else {
			fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
			if err == nil {
				err = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_DO)
			}
		}
		return err
	})
	if fd >= 0 {
		defer unix.Close(fd)
	}
	if err != nil {
		return fmt.Errorf("ping %s from %s: socket: %w", dst, ns.Name, err)
	}
	var idb [2]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	payload := size - hdr - 8
	var sa unix.Sockaddr
	if dst.Is4() {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	} else {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	}
	buf := make([]byte, 65536)
	for seq := uint16(1); ; seq++ {
		req := echoRequest(dst.Is6(), id, seq, payload)
		if err := unix.Sendto(fd, req, 0, sa); err != nil {
			if errors.Is(err, unix.EMSGSIZE) {
				return fmt.Errorf("ping %s from %s: size %d: %w: %w", dst, ns.Name, size, ErrFragNeeded, err)
			}
			return fmt.Errorf("ping %s from %s: send: %w", dst, ns.Name, err)
		}
		resend := time.Now().Add(pingInterval)
		for time.Now().Before(resend) {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("ping %s from %s: size %d: no reply: %w", dst, ns.Name, size, err)
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, err := unix.Poll(pfd, 50); err != nil || n == 0 {
				continue
			}
			n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
			if err != nil {
				continue
			}
			switch r := parseEchoReply(dst.Is6(), buf[:n], id); {
			case r.mtu > 0:
				return fmt.Errorf("ping %s from %s: size %d: %w (next-hop mtu %d)", dst, ns.Name, size, ErrFragNeeded, r.mtu)
			case r.reply && r.length == size:
				return nil
			}
		}
	}
}

// echoRequest builds an ICMP or ICMPv6 echo request with a payload of n bytes.
// The kernel fills the ICMPv6 checksum; the ICMP one is computed here.
func echoRequest(v6 bool, id, seq uint16, n int) []byte {
	b := make([]byte, 8+n)
	b[0] = 8
	if v6 {
		b[0] = 128
	}
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	for i := range n {
		b[8+i] = byte(i)
	}
	if !v6 {
		binary.BigEndian.PutUint16(b[2:], checksum(b))
	}
	return b
}

// checksum is the Internet checksum (RFC 1071).
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// echoResult is what one received ICMP message says about our echo.
type echoResult struct {
	reply  bool // an echo reply with our id
	length int  // its IP packet length, header included
	mtu    int  // > 0: fragmentation needed / packet too big for our echo
}

// parseEchoReply interprets a message read from a raw ICMP socket: IPv4 ones
// start with the IP header, ICMPv6 ones with the ICMPv6 header.
func parseEchoReply(v6 bool, b []byte, id uint16) echoResult {
	hdr := 40 // IPv6 header, not included in what the socket returns
	if !v6 {
		if len(b) < 20 {
			return echoResult{}
		}
		hdr = int(b[0]&0x0f) * 4
		if len(b) < hdr {
			return echoResult{}
		}
		b = b[hdr:]
	}
	if len(b) < 8 {
		return echoResult{}
	}
	typ, code := b[0], b[1]
	switch {
	case !v6 && typ == 0, v6 && typ == 129:
		if binary.BigEndian.Uint16(b[4:]) == id {
			return echoResult{reply: true, length: hdr + len(b)}
		}
	case !v6 && typ == 3 && code == 4:
		// Quoted: IPv4 header of our request, then its ICMP header.
		q := b[8:]
		if len(q) >= 20 {
			qh := int(q[0]&0x0f) * 4
			if len(q) >= qh+8 && q[9] == unix.IPPROTO_ICMP && q[qh] == 8 && binary.BigEndian.Uint16(q[qh+4:]) == id {
				return echoResult{mtu: int(binary.BigEndian.Uint16(b[6:]))}
			}
		}
	case v6 && typ == 2:
		// Quoted: IPv6 header of our request, then its ICMPv6 header.
		q := b[8:]
		if len(q) >= 48 && q[6] == unix.IPPROTO_ICMPV6 && q[40] == 128 && binary.BigEndian.Uint16(q[44:]) == id {
			return echoResult{mtu: int(binary.BigEndian.Uint32(b[4:]))}
		}
	}
	return echoResult{}
}
