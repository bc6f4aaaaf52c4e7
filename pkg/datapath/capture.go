package datapath

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// captureBuf is larger than any GSO packet a veth or NIC hands to a packet socket.
const captureBuf = 256 << 10

// Capture reads copies of the packets this namespace sends on some interfaces (an AF_PACKET
// datagram socket per interface: network header first, outgoing packets only). It is what
// `meshcrypt verify` looks at: each node judges the packets it puts on its own underlay,
// where its encryption must already have happened. (Arriving packets are not read: the
// kernel hands IPsec tunnel-mode packets to packet sockets again after decryption, on the
// same interface, so a capture of arriving packets would see the decrypted inner packet.)
type Capture struct {
	fds  []int
	fn   func(pkt []byte)
	stop chan struct{}
	done chan struct{}
	once sync.Once
	err  error
}

// StartCapture opens the sockets in the calling thread's network namespace and calls fn,
// on one goroutine, with every outgoing packet on the interfaces (pkt is valid only during
// the call; a packet longer than 256 KiB is cut). Stop ends it.
func StartCapture(ifindexes []int, fn func(pkt []byte)) (*Capture, error) {
	if len(ifindexes) == 0 {
		return nil, errors.New("capture: no interface")
	}
	c := &Capture{fn: fn, stop: make(chan struct{}), done: make(chan struct{})}
	for _, idx := range ifindexes {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			c.close()
			return nil, fmt.Errorf("capture: open packet socket: %w", err)
		}
		c.fds = append(c.fds, fd)
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: idx}); err != nil {
			c.close()
			return nil, fmt.Errorf("capture: bind packet socket to interface %d: %w", idx, err)
		}
		// Best effort: a larger buffer only drops later.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	}
	go c.run()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *Capture) run() {
	defer close(c.done)
	buf := make([]byte, captureBuf)
	pfds := make([]unix.PollFd, len(c.fds))
	for i, fd := range c.fds {
		pfds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	for {
		stopping := false
		select {
		case <-c.stop:
			stopping = true // read what is queued once more, then end
		default:
			if _, err := unix.Poll(pfds, 100); err != nil && !errors.Is(err, unix.EINTR) {
				c.err = fmt.Errorf("capture: poll: %w", err)
				return
			}
		}
		for _, fd := range c.fds {
			if err := c.drain(fd, buf); err != nil {
				c.err = err
				return
			}
		}
		if stopping {
			return
		}
	}
}

func (c *Capture) drain(fd int, buf []byte) error {
	for {
		n, from, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT|unix.MSG_TRUNC)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return nil
		case err != nil:
			return fmt.Errorf("capture: read: %w", err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Pkttype != unix.PACKET_OUTGOING {
			continue
		}
		c.fn(buf[:min(n, len(buf))])
	}
}

// Stop reads the packets still queued, closes the sockets and returns how many packets the
// kernel dropped because the sockets' buffers were full (packets never judged), and the
// first read error. It is idempotent.
func (c *Capture) Stop() (drops uint64, err error) {
	c.once.Do(func() { close(c.stop) })
	<-c.done
	for _, fd := range c.fds {
		if st, err := unix.GetsockoptTpacketStats(fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
			drops += uint64(st.Drops)
		}
	}
	c.close()
	return drops, c.err
}

func (c *Capture) close() {
	for _, fd := range c.fds {
		unix.Close(fd)
	}
	c.fds = nil
}
