package cluster

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// Exchange sends payload from one pod to another over proto ("tcp", "udp" or "udp-echo")
// and the address family of dst, and waits until the receiver got it (TCP and "udp-echo":
// and echoed it back, so the reply crossed too: a request and its response, as applications
// make them). UDP is resent every 200 ms until it arrives (or its echo does), since the first
// packets may be spent on a handshake. It fails when nothing arrives within timeout.
func Exchange(ctx context.Context, proto string, from *netenv.Pod, dst netip.Addr, to *netenv.Pod, port int, payload []byte, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	addr := net.JoinHostPort(dst.String(), strconv.Itoa(port))
	switch proto {
	case "udp":
		return exchangeUDP(ctx, from, to, addr, payload)
	case "udp-echo":
		return exchangeUDPEcho(ctx, from, to, addr, payload)
	case "tcp":
		return exchangeTCP(ctx, from, to, addr, payload)
	}
	return fmt.Errorf("unknown protocol %q", proto)
}

func exchangeUDP(ctx context.Context, from, to *netenv.Pod, addr string, payload []byte) error {
	ln, err := to.NS.ListenUDP(addr)
	if err != nil {
		return fmt.Errorf("listen udp %s in %s: %w", addr, to.Name, err)
	}
	defer ln.Close()
	conn, err := from.NS.DialUDP(addr)
	if err != nil {
		return fmt.Errorf("dial udp %s from %s: %w", addr, from.Name, err)
	}
	defer conn.Close()
	got := make(chan error, 1)
	go func() {
		buf := make([]byte, 65536)
		for {
			_ = ln.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, _, err := ln.ReadFromUDP(buf)
			if err == nil && bytes.Equal(buf[:n], payload) {
				got <- nil
				return
			}
			if ctx.Err() != nil {
				got <- ctx.Err()
				return
			}
		}
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		_, _ = conn.Write(payload)
		select {
		case err := <-got:
			if err != nil {
				return fmt.Errorf("udp %s -> %s (%s): nothing arrived: %w", from.Name, to.Name, addr, err)
			}
			return nil
		case <-tick.C:
		}
	}
}

// exchangeUDPEcho is a UDP request/response: the receiver answers every datagram with the
// same bytes, and the exchange is done when the sender reads the answer.
func exchangeUDPEcho(ctx context.Context, from, to *netenv.Pod, addr string, payload []byte) error {
	ln, err := to.NS.ListenUDP(addr)
	if err != nil {
		return fmt.Errorf("listen udp %s in %s: %w", addr, to.Name, err)
	}
	defer ln.Close()
	go func() {
		buf := make([]byte, 65536)
		for ctx.Err() == nil {
			_ = ln.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, src, err := ln.ReadFromUDP(buf)
			if err == nil && bytes.Equal(buf[:n], payload) {
				_, _ = ln.WriteToUDP(buf[:n], src)
			}
		}
	}()
	conn, err := from.NS.DialUDP(addr)
	if err != nil {
		return fmt.Errorf("dial udp %s from %s: %w", addr, from.Name, err)
	}
	defer conn.Close()
	buf := make([]byte, 65536)
	for {
		_, _ = conn.Write(payload)
		_ = conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := conn.Read(buf)
		if err == nil && bytes.Equal(buf[:n], payload) {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("udp %s -> %s (%s): no answer: %w", from.Name, to.Name, addr, ctx.Err())
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			// ECONNREFUSED from an ICMP port unreachable before the listener is up, or an
			// answer dropped: ask again.
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func exchangeTCP(ctx context.Context, from, to *netenv.Pod, addr string, payload []byte) error {
	ln, err := to.NS.ListenTCP(addr)
	if err != nil {
		return fmt.Errorf("listen tcp %s in %s: %w", addr, to.Name, err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, len(payload))
		if _, err := io.ReadFull(c, buf); err == nil {
			_, _ = c.Write(buf)
		}
	}()
	var lastErr error
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		c, err := from.NS.DialTCP(dctx, addr)
		cancel()
		if err != nil {
			lastErr = err
			time.Sleep(100 * time.Millisecond)
			continue
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(payload); err != nil {
			c.Close()
			return fmt.Errorf("tcp %s -> %s: write: %w", from.Name, addr, err)
		}
		buf := make([]byte, len(payload))
		_, err = io.ReadFull(c, buf)
		c.Close()
		if err != nil {
			return fmt.Errorf("tcp %s -> %s: read echo: %w", from.Name, addr, err)
		}
		if !bytes.Equal(buf, payload) {
			return fmt.Errorf("tcp %s -> %s: echo differs", from.Name, addr)
		}
		return nil
	}
	return fmt.Errorf("tcp %s -> %s: %w (last dial error: %v)", from.Name, addr, ctx.Err(), lastErr)
}

// Stream is a continuous, numbered UDP stream between two pods, for counting loss across an
// event (an agent restart, a key rotation). It sends at a fixed rate until Stop, bounded by
// a maximum count.
type Stream struct {
	conn, ln *net.UDPConn
	sent     atomic.Uint64
	mu       sync.Mutex
	seen     map[uint64]bool
	marker   []byte
	stop     chan struct{}
	wg       sync.WaitGroup
}

// StartStream starts sending from one pod to dst:port in another every interval, each packet
// carrying marker and a sequence number, at most max packets.
func StartStream(from, to *netenv.Pod, dst netip.Addr, port int, marker []byte, interval time.Duration, max uint64) (*Stream, error) {
	addr := net.JoinHostPort(dst.String(), strconv.Itoa(port))
	ln, err := to.NS.ListenUDP(addr)
	if err != nil {
		return nil, err
	}
	conn, err := from.NS.DialUDP(addr)
	if err != nil {
		ln.Close()
		return nil, err
	}
	s := &Stream{conn: conn, ln: ln, seen: map[uint64]bool{}, marker: marker, stop: make(chan struct{})}
	s.wg.Add(2)
	go func() {
		defer s.wg.Done()
		buf := make([]byte, 2048)
		for {
			n, _, err := ln.ReadFromUDP(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			if n >= 8+len(marker) && bytes.Equal(buf[8:8+len(marker)], marker) {
				s.mu.Lock()
				s.seen[binary.BigEndian.Uint64(buf[:8])] = true
				s.mu.Unlock()
			}
		}
	}()
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		pkt := make([]byte, 8+len(marker))
		copy(pkt[8:], marker)
		for seq := uint64(0); seq < max; seq++ {
			binary.BigEndian.PutUint64(pkt, seq)
			_, _ = conn.Write(pkt)
			s.sent.Store(seq + 1)
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s, nil
}

// Received returns how many distinct packets arrived so far.
func (s *Stream) Received() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.seen)
}

// Stop stops sending, waits grace for packets in flight, and returns packets sent, received,
// and the sequence numbers lost.
func (s *Stream) Stop(grace time.Duration) (sent, received int, lost []uint64) {
	close(s.stop)
	time.Sleep(grace)
	s.conn.Close()
	s.ln.Close()
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.sent.Load()
	for i := uint64(0); i < n; i++ {
		if !s.seen[i] {
			lost = append(lost, i)
		}
	}
	return int(n), len(s.seen), lost
}
