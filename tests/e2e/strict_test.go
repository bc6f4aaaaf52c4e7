package e2e

import (
	"bufio"
	"context"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// tcpSession is one long-lived TCP connection between two pods exchanging a line every
// interval; any error (a reset above all) ends it and is kept.
type tcpSession struct {
	rounds atomic.Int64
	err    atomic.Value
	stop   chan struct{}
	done   chan struct{}
}

func startTCPSession(t *testing.T, from, to *netenv.Pod, port int) *tcpSession {
	t.Helper()
	addr := net.JoinHostPort(to.IPv4.String(), strconv.Itoa(port))
	ln, err := to.NS.ListenTCP(addr)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := c.Write([]byte(line)); err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := from.NS.DialTCP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &tcpSession{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer conn.Close()
		r := bufio.NewReader(conn)
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			// Generous deadlines: a tunnel change may delay a round, never break it.
			_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write([]byte(strconv.Itoa(i) + "\n")); err != nil {
				s.err.Store(err)
				return
			}
			line, err := r.ReadString('\n')
			if err != nil {
				s.err.Store(err)
				return
			}
			if strings.TrimSpace(line) != strconv.Itoa(i) {
				s.err.Store(net.ErrClosed)
				return
			}
			s.rounds.Add(1)
		}
	}()
	return s
}

func (s *tcpSession) Stop() (rounds int64, err error) {
	close(s.stop)
	<-s.done
	if e, ok := s.err.Load().(error); ok {
		return s.rounds.Load(), e
	}
	return s.rounds.Load(), nil
}

// TestStrict: switching Disabled -> WireGuard -> strict -> Disabled drops no established
// connection; in strict mode a node whose tunnel is not ready yet is unreachable (dropped and
// counted, never in clear) until it is, and an agent restart changes nothing.
func TestStrict(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	var pods []*netenv.Pod
	for i := 1; i <= 2; i++ {
		n, err := c.AddNode(ctx, "n"+strconv.Itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.AddPod(ctx, n, "n"+strconv.Itoa(i)+"-p1")
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}

	t.Run("mode switches drop no established connection", func(t *testing.T) {
		tcp := startTCPSession(t, pods[0], pods[1], 7300)
		udp, err := cluster.StartStream(pods[0], pods[1], pods[1].IPv4, 7301, []byte("switch"), 10*time.Millisecond, 10000)
		if err != nil {
			t.Fatal(err)
		}
		for _, step := range [][]string{
			{"encryption", "enable", "--mode", "wireguard", "--wait"},
			{"encryption", "enable", "--mode", "wireguard", "--strict", "--wait"},
			{"encryption", "enable", "--mode", "wireguard", "--wait"},
			{"encryption", "disable", "--wait"},
			{"encryption", "enable", "--mode", "wireguard", "--strict", "--wait"},
		} {
			time.Sleep(time.Second)
			if out, err := c.Run(ctx, "meshcrypt", append(step, "--timeout", "1m")...); err != nil {
				t.Fatalf("%v: %v\n%s", step, err, out)
			}
		}
		time.Sleep(time.Second)
		rounds, err := tcp.Stop()
		sent, received, lost := udp.Stop(300 * time.Millisecond)
		t.Logf("Disabled -> WireGuard -> strict -> WireGuard -> Disabled -> strict: TCP %d round trips, error %v; UDP sent %d, received %d, lost %d",
			rounds, err, sent, received, len(lost))
		if err != nil {
			t.Errorf("the long-lived TCP connection broke: %v", err)
		}
		if rounds == 0 {
			t.Error("no TCP round trip at all")
		}
		out, err := c.Run(ctx, "meshcrypt", "status")
		if err != nil || !strings.HasPrefix(out, "compliant: all 1 node pairs encrypted (WireGuard, strict)") {
			t.Errorf("status after enabling strict: %v\n%s", err, out)
		}
	})

	t.Run("strict: a joining node is unreachable, not in clear, until its tunnel is ready", func(t *testing.T) {
		n3, err := c.AddNodeWithoutAgent(ctx, "n3")
		if err != nil {
			t.Fatal(err)
		}
		p3, err := c.AddPod(ctx, n3, "n3-p1")
		if err != nil {
			t.Fatal(err)
		}
		m := newMarker(t)
		cp := capture(t, c, m)
		before := reasonCount(t, c, "n1", 3) // DROP_NOT_ENCRYPTED
		// Give n1's agent time to see the Node and block its CIDRs (it has no MeshNode).
		time.Sleep(time.Second)
		if reaches(pods[0], p3, 7310, m, 2*time.Second) {
			t.Fatal("a pod on a node without a tunnel was reached in strict mode")
		}
		if got := cp.Count(m); got != 0 {
			t.Fatalf("traffic to the joining node left in clear %d times", got)
		}
		drops := reasonCount(t, c, "n1", 3) - before
		if drops == 0 {
			t.Error("no drop_not_encrypted counted on n1")
		}
		if err := n3.StartAgent(); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the joined node's tunnel is ready: reachable", func() bool { return reaches(pods[0], p3, 7311, m, time.Second) })
		if got := cp.Count(m); got != 0 {
			t.Fatalf("traffic to the joining node left in clear %d times", got)
		}
		t.Logf("before n3's agent ran: %d packets to it dropped and counted on n1, 0 in clear", drops)
	})

	t.Run("strict: an agent restart loses nothing and leaks nothing", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, c, m)
		s, err := cluster.StartStream(pods[0], pods[1], pods[1].IPv4, 7320, m, 5*time.Millisecond, 3000)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		if err := c.Node("n1").RestartAgent(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		sent, received, lost := s.Stop(300 * time.Millisecond)
		t.Logf("strict, agent restart under a stream: sent %d, received %d, lost %d, in clear %d", sent, received, len(lost), cp.Count(m))
		if len(lost) != 0 || cp.Count(m) != 0 {
			t.Errorf("lost %d, %d in clear", len(lost), cp.Count(m))
		}
	})
}
