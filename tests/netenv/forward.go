package netenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// forwardDialTimeout bounds each dial of the forwarding target.
const forwardDialTimeout = 10 * time.Second

// ForwardTCP listens on listen (an IP literal and port, e.g. "127.0.0.1:6443")
// inside the namespace and forwards every connection to target, dialled from
// the caller's namespace (e.g. a kube-apiserver on the host's loopback). It
// returns the listening address (useful with port 0). Forwarding, including the
// open connections, stops when ctx is done or the namespace is deleted.
func (ns *NS) ForwardTCP(ctx context.Context, listen, target string) (net.Addr, error) {
	ln, err := ns.ListenTCP(listen)
	if err != nil {
		return nil, fmt.Errorf("forward tcp: %w", err)
	}
	f := &forwarder{ln: ln, target: target, conns: map[net.Conn]struct{}{}, done: make(chan struct{})}
	ns.track(f)
	go func() {
		select {
		case <-ctx.Done():
		case <-f.done:
		}
		f.Close()
		ns.untrack(f)
	}()
	go f.serve(ctx)
	return ln.Addr(), nil
}

// forwarder is one ForwardTCP listener and its open connections.
type forwarder struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	done   chan struct{} // closed by Close
}

// Close stops the listener and closes every forwarded connection. Idempotent.
func (f *forwarder) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	close(f.done)
	conns := f.conns
	f.conns = nil
	f.mu.Unlock()
	err := f.ln.Close()
	for c := range conns {
		c.Close()
	}
	return err
}

// add registers c; it reports false, and closes c, after Close.
func (f *forwarder) add(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		c.Close()
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *forwarder) remove(c net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.conns, c)
	c.Close()
}

func (f *forwarder) serve(ctx context.Context) {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			f.Close()
			return
		}
		if !f.add(c) {
			return
		}
		go f.pipe(ctx, c)
	}
}

// pipe dials the target from the caller's namespace (this goroutine is not
// locked to a namespace thread) and copies both ways until both sides are done.
func (f *forwarder) pipe(ctx context.Context, in net.Conn) {
	defer f.remove(in)
	d := net.Dialer{Timeout: forwardDialTimeout}
	out, err := d.DialContext(ctx, "tcp", f.target)
	if err != nil {
		return
	}
	if !f.add(out) {
		return
	}
	defer f.remove(out)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); copyHalf(out, in) }()
	go func() { defer wg.Done(); copyHalf(in, out) }()
	wg.Wait()
}

// copyHalf copies src to dst, then half-closes dst for writing so the peer
// sees EOF, as a TCP proxy should.
func copyHalf(dst, src net.Conn) {
	_, err := io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok && err == nil {
		cw.CloseWrite()
		return
	}
	dst.Close()
	src.Close()
}
