package netenv

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// Capture defaults.
const (
	// DefaultCaptureMaxBytes caps the bytes of frames a Capture retains.
	DefaultCaptureMaxBytes = 64 << 20
	captureRcvBuf          = 32 << 20  // socket receive buffer, so bursts are not dropped
	captureFrameMax        = 256 << 10 // larger than any GSO frame on veth
	capturePollMillis      = 100       // how promptly the reader notices Stop
)

// CaptureOptions selects what a Capture counts and keeps.
type CaptureOptions struct {
	// Filter, if set, is called on the reader goroutine with every frame
	// (Ethernet header first; valid only during the call); frames for which it
	// returns false are ignored entirely. It must not call the Capture's
	// methods.
	Filter func(frame []byte) bool
	// Markers are searched in every frame the filter keeps, whatever the
	// memory cap: Count and Contains are exact for them. Other markers are
	// searched in the retained frames only (see Stats.Dropped).
	Markers [][]byte
	// IncomingOnly ignores the copies of frames sent by an interface of the
	// namespace (PACKET_OUTGOING). On the switch each frame crossing it then
	// counts once, on the port it entered by, instead of once more on the port
	// it left by.
	IncomingOnly bool
	// MaxBytes caps the bytes of frames retained for unregistered markers.
	// Default DefaultCaptureMaxBytes; negative retains nothing.
	MaxBytes int

	skipIfindex int // frames on this interface are ignored (the switch's br0)
}

// CaptureStats are a Capture's counters.
type CaptureStats struct {
	// Frames and Bytes count the frames the filter kept (Bytes counts their
	// full length, also when truncated).
	Frames int
	Bytes  int64
	// Retained frames are kept in memory; Dropped ones were not, because of
	// MaxBytes. Only unregistered markers can be missed because of drops.
	Retained, Dropped int
	// Truncated frames were longer than the 256 KiB read buffer; only their
	// start was searched.
	Truncated int
	// KernelDrops counts frames the kernel dropped because the socket buffer
	// was full: those were never seen. Assert it is zero before concluding a
	// marker was not on the wire.
	KernelDrops uint64
}

// Capture counts the frames seen by an AF_PACKET socket in a namespace. Its
// methods are safe for concurrent use; every query first reads the frames
// already queued on the socket, so a frame that reached any socket of the
// namespaces before the query is counted.
//
// A marker is found only inside one frame: send it in a message shorter than
// a segment (a few hundred bytes), so no segmentation can split it. Frames on
// veth are often GSO super-frames of up to 64 KiB; they are searched whole.
type Capture struct {
	opts CaptureOptions
	stop chan struct{}
	done chan struct{}
	once sync.Once

	mu           sync.Mutex
	fd           int // -1 once stopped
	buf          []byte
	stats        CaptureStats
	kept         [][]byte
	keptBytes    int
	markerFrames []int
	udpDst       map[uint16]int
	ipProto      map[uint8]int
	err          error
}

// StartCapture opens an AF_PACKET socket for every protocol inside ns, not
// bound to an interface, so it sees every interface of the namespace (on the
// switch: every port), and reads it on a goroutine until Stop.
func StartCapture(ns *NS, opts CaptureOptions) (*Capture, error) {
	if opts.MaxBytes == 0 {
		opts.MaxBytes = DefaultCaptureMaxBytes
	}
	opts.Markers = slices.Clone(opts.Markers)
	for _, m := range opts.Markers {
		if len(m) == 0 {
			return nil, errors.New("start capture: empty marker")
		}
	}
	fd := -1
	err := ns.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("start capture in %s: %w", ns.Name, err)
	}
	// Best effort: the default buffer also works, it just drops sooner.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, captureRcvBuf) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, captureRcvBuf)
	}
	c := &Capture{
		opts:         opts,
		stop:         make(chan struct{}),
		done:         make(chan struct{}),
		fd:           fd,
		buf:          make([]byte, captureFrameMax),
		markerFrames: make([]int, len(opts.Markers)),
		udpDst:       map[uint16]int{},
		ipProto:      map[uint8]int{},
	}
	go c.run()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// run waits for frames with a short poll timeout, so that Stop returns
// promptly, and reads them under the lock.
func (c *Capture) run() {
	defer close(c.done)
	pfd := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		if _, err := unix.Poll(pfd, capturePollMillis); err != nil && !errors.Is(err, unix.EINTR) {
			c.mu.Lock()
			c.err = fmt.Errorf("capture poll: %w", err)
			c.mu.Unlock()
			return
		}
		c.mu.Lock()
		c.drainLocked()
		c.mu.Unlock()
	}
}

// drainLocked reads every frame queued on the socket.
func (c *Capture) drainLocked() {
	if c.fd < 0 {
		return
	}
	for {
		n, from, err := unix.Recvfrom(c.fd, c.buf, unix.MSG_DONTWAIT|unix.MSG_TRUNC)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if !errors.Is(err, unix.EAGAIN) && c.err == nil {
				c.err = fmt.Errorf("capture read: %w", err)
			}
			break
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok {
			if c.opts.IncomingOnly && ll.Pkttype == unix.PACKET_OUTGOING {
				continue
			}
			if c.opts.skipIfindex != 0 && ll.Ifindex == c.opts.skipIfindex {
				continue
			}
		}
		c.handleLocked(c.buf[:min(n, len(c.buf))], n)
	}
	if st, err := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
		c.stats.KernelDrops += uint64(st.Drops) // reading resets the kernel's counters
	}
}

func (c *Capture) handleLocked(frame []byte, length int) {
	if c.opts.Filter != nil && !c.opts.Filter(frame) {
		return
	}
	c.stats.Frames++
	c.stats.Bytes += int64(length)
	if length > len(frame) {
		c.stats.Truncated++
	}
	for i, m := range c.opts.Markers {
		if bytes.Contains(frame, m) {
			c.markerFrames[i]++
		}
	}
	if l4, ok := parseFrame(frame); ok {
		c.ipProto[l4.proto]++
		if l4.proto == unix.IPPROTO_UDP && l4.hasPorts {
			c.udpDst[l4.dstPort]++
		}
	}
	if c.opts.MaxBytes >= 0 && c.keptBytes+len(frame) <= c.opts.MaxBytes {
		c.kept = append(c.kept, bytes.Clone(frame))
		c.keptBytes += len(frame)
		c.stats.Retained++
	} else {
		c.stats.Dropped++
	}
}

// Stop reads the frames still queued, closes the socket and returns the first
// read error, if any. Queries keep working on what was counted. Idempotent.
func (c *Capture) Stop() error {
	c.once.Do(func() {
		close(c.stop)
		<-c.done
		c.mu.Lock()
		defer c.mu.Unlock()
		c.drainLocked()
		unix.Close(c.fd)
		c.fd = -1
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// sync reads the queued frames and returns with the lock held.
func (c *Capture) sync() {
	c.mu.Lock()
	c.drainLocked()
}

// Stats returns the counters.
func (c *Capture) Stats() CaptureStats {
	c.sync()
	defer c.mu.Unlock()
	return c.stats
}

// Frames returns how many frames the filter kept.
func (c *Capture) Frames() int { return c.Stats().Frames }

// Count returns how many frames contain marker: exact for a marker registered
// in CaptureOptions.Markers, else counted over the retained frames only (check
// Stats().Dropped).
func (c *Capture) Count(marker []byte) int {
	c.sync()
	defer c.mu.Unlock()
	for i, m := range c.opts.Markers {
		if bytes.Equal(m, marker) {
			return c.markerFrames[i]
		}
	}
	n := 0
	for _, f := range c.kept {
		if bytes.Contains(f, marker) {
			n++
		}
	}
	return n
}

// Contains reports whether any frame contains marker (see Count).
func (c *Capture) Contains(marker []byte) bool { return c.Count(marker) > 0 }

// UDPFrames returns how many frames carried UDP to dstPort (IPv4 or IPv6, first
// fragments only), e.g. WireGuard's listen port. Exact whatever the cap.
func (c *Capture) UDPFrames(dstPort uint16) int {
	c.sync()
	defer c.mu.Unlock()
	return c.udpDst[dstPort]
}

// IPProtoFrames returns how many IPv4 or IPv6 frames carried protocol proto
// (e.g. 50 for ESP, 17 for UDP). Exact whatever the cap.
func (c *Capture) IPProtoFrames(proto uint8) int {
	c.sync()
	defer c.mu.Unlock()
	return c.ipProto[proto]
}

// Err returns the first read error, if any.
func (c *Capture) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// l4Info is what parseFrame extracts from a frame.
type l4Info struct {
	proto    uint8
	hasPorts bool // the transport header follows (first fragment, TCP/UDP/SCTP)
	srcPort  uint16
	dstPort  uint16
}

// Ethernet and IP constants of parseFrame.
const (
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
	etherTypeVLAN = 0x8100
	etherTypeQinQ = 0x88a8
)

// parseFrame finds the IP protocol and ports of an Ethernet frame carrying IPv4
// or IPv6 (behind up to two VLAN tags and any IPv6 extension headers).
func parseFrame(f []byte) (l4Info, bool) {
	if len(f) < 14 {
		return l4Info{}, false
	}
	et := binary.BigEndian.Uint16(f[12:14])
	p := f[14:]
	for i := 0; i < 2 && (et == etherTypeVLAN || et == etherTypeQinQ); i++ {
		if len(p) < 4 {
			return l4Info{}, false
		}
		et = binary.BigEndian.Uint16(p[2:4])
		p = p[4:]
	}
	var info l4Info
	var rest []byte
	switch et {
	case etherTypeIPv4:
		if len(p) < 20 || p[0]>>4 != 4 {
			return l4Info{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		if ihl < 20 || len(p) < ihl {
			return l4Info{}, false
		}
		info.proto = p[9]
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return info, true // not the first fragment: no ports
		}
		rest = p[ihl:]
	case etherTypeIPv6:
		if len(p) < 40 || p[0]>>4 != 6 {
			return l4Info{}, false
		}
		next := p[6]
		rest = p[40:]
	ext:
		for range 8 {
			switch next {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if len(rest) < 8 {
					return l4Info{}, false
				}
				n := (int(rest[1]) + 1) * 8
				if len(rest) < n {
					return l4Info{}, false
				}
				next, rest = rest[0], rest[n:]
			case 44: // fragment
				if len(rest) < 8 {
					return l4Info{}, false
				}
				if binary.BigEndian.Uint16(rest[2:4])&0xfff8 != 0 {
					info.proto = rest[0]
					return info, true
				}
				next, rest = rest[0], rest[8:]
			default:
				break ext
			}
		}
		info.proto = next
	default:
		return l4Info{}, false
	}
	switch info.proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_SCTP, unix.IPPROTO_UDPLITE:
		if len(rest) >= 4 {
			info.hasPorts = true
			info.srcPort = binary.BigEndian.Uint16(rest[0:2])
			info.dstPort = binary.BigEndian.Uint16(rest[2:4])
		}
	}
	return info, true
}

// CaptureUnderlay captures on the switch, counting each frame that crosses it
// once: on the port it entered by (IncomingOnly), and never the copies the
// bridge hands to br0 itself.
func (t *Topology) CaptureUnderlay(opts CaptureOptions) (*Capture, error) {
	h, err := t.sw.Handle()
	if err != nil {
		return nil, fmt.Errorf("capture underlay: %w", err)
	}
	defer h.Close()
	br, err := h.LinkByName(BridgeName)
	if err != nil {
		return nil, fmt.Errorf("capture underlay: find %s: %w", BridgeName, err)
	}
	opts.IncomingOnly = true
	opts.skipIfindex = br.Attrs().Index
	return StartCapture(t.sw, opts)
}
