package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// TestPolicyConnections: policy allows connections, and their replies follow (#15). Both a
// client and its servers are default-deny in both directions; only the client's egress to the
// servers and the servers' ingress from the client are allowed, on TCP 8080 and UDP 5353. TCP
// connections and UDP requests with their responses work, IPv4 and IPv6, to a server on
// another node (through the tunnel, never in clear) and on the same node; a connection the
// other way is refused, and counted; with the servers' ingress rule gone the same traffic is
// dropped (positive control); a policy change cuts an established connection. With WireGuard
// here and in the VM, with IPsec in the VM.
func TestPolicyConnections(t *testing.T) {
	t.Run("wireguard", func(t *testing.T) { testPolicyConnections(t, v1alpha1.ModeWireGuard) })
	t.Run("ipsec", func(t *testing.T) {
		if !espSupported(t) {
			t.Skip("needs ESP with AES-GCM in the kernel (CONFIG_INET_ESP): runs in the kernel VM suite (tests/vm)")
		}
		testPolicyConnections(t, v1alpha1.ModeIPsec)
	})
}

// clientServer is the cluster of the connection tests: a client pod on n1, a server on n2
// and (with a local server) another on n1, encryption on in mode, then the MeshPolicies
// "client" (default-deny both ways; egress to app=server on ports) and "server" (default-deny
// both ways; ingress from app=client on ports), in force once the server can no longer reach
// the client (which it could before them).
type clientServer struct {
	c                     *cluster.Cluster
	n1, n2                *cluster.Node
	client, remote, local *netenv.Pod
	clientPol, serverPol  *v1alpha1.MeshPolicy
}

func startClientServer(t *testing.T, opts cluster.Options, mode v1alpha1.EncryptionMode, withLocal bool, ports []v1alpha1.PolicyPort) *clientServer {
	t.Helper()
	ctx := context.Background()
	cs := &clientServer{c: cluster.StartT(t, opts)}
	c := cs.c
	var err error
	if cs.n1, err = c.AddNode(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if cs.n2, err = c.AddNode(ctx, "n2"); err != nil {
		t.Fatal(err)
	}
	if cs.client, err = c.AddPodLabels(ctx, cs.n1, "client", map[string]string{"app": "client"}); err != nil {
		t.Fatal(err)
	}
	if cs.remote, err = c.AddPodLabels(ctx, cs.n2, "server", map[string]string{"app": "server"}); err != nil {
		t.Fatal(err)
	}
	if withLocal {
		if cs.local, err = c.AddPodLabels(ctx, cs.n1, "server-local", map[string]string{"app": "server"}); err != nil {
			t.Fatal(err)
		}
	}
	switch mode {
	case v1alpha1.ModeWireGuard:
		if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m"); err != nil {
			t.Fatal(err, out)
		}
	case v1alpha1.ModeIPsec:
		setKeyring(ctx, t, c, keyLine(t, 1))
		setIPsec(ctx, t, c, false, 3*time.Second)
		waitMeshNodes(ctx, t, c, "IPsec converged", 2*time.Minute, ipsecConverged(2, 1, 1))
	}
	both := []v1alpha1.PolicyType{v1alpha1.PolicyTypeIngress, v1alpha1.PolicyTypeEgress}
	cs.clientPol = &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "client"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: *appSelector("client"), PolicyTypes: both,
			Egress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{PodSelector: appSelector("server")}}, Ports: ports}},
		},
	}
	cs.serverPol = &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "server"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: *appSelector("server"), PolicyTypes: both,
			Ingress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{PodSelector: appSelector("client")}}, Ports: ports}},
		},
	}
	// Before the policies the server reaches the client: the refusal below is theirs.
	if err := cluster.Exchange(ctx, "udp", cs.remote, cs.client.IPv4, cs.client, 5353, []byte("x"), 20*time.Second); err != nil {
		t.Fatalf("no policy yet, but server -> client: %v", err)
	}
	for _, p := range []*v1alpha1.MeshPolicy{cs.clientPol, cs.serverPol} {
		if err := c.Client.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "policies applied: server -> client refused", func() bool {
		return cluster.Exchange(ctx, "udp", cs.remote, cs.client.IPv4, cs.client, 5353, []byte("x"), 500*time.Millisecond) != nil
	})
	return cs
}

func appSelector(app string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: map[string]string{"app": app}}
}

func testPolicyConnections(t *testing.T, mode v1alpha1.EncryptionMode) {
	ctx := context.Background()
	ports := []v1alpha1.PolicyPort{
		{Protocol: v1alpha1.ProtocolTCP, Port: ptr(int32(8080))},
		{Protocol: v1alpha1.ProtocolUDP, Port: ptr(int32(5353))},
	}
	cs := startClientServer(t, cluster.Options{Backend: string(wgBackend)}, mode, true, ports)
	c, n1, n2, clientPod, remote, local := cs.c, cs.n1, cs.n2, cs.client, cs.remote, cs.local
	clientPol, serverPol, sel := cs.clientPol, cs.serverPol, appSelector
	m := newMarker(t)
	exchange := func(proto string, from, to *netenv.Pod, dst netip.Addr, port int, d time.Duration) error {
		return cluster.Exchange(ctx, proto, from, dst, to, port, m, d)
	}

	t.Run("connections and their replies pass", func(t *testing.T) {
		cp := capture(t, c, m)
		n := 0
		for _, srv := range []*netenv.Pod{remote, local} {
			for _, dst := range srv.Addrs() {
				for _, tc := range []struct {
					proto string
					port  int
				}{{"tcp", 8080}, {"udp-echo", 5353}} {
					if err := exchange(tc.proto, clientPod, srv, dst, tc.port, 20*time.Second); err != nil {
						t.Errorf("%s %s -> %s (%s): %v", tc.proto, clientPod.Name, srv.Name, dst, err)
					}
					n++
				}
			}
		}
		if st := cp.Stats(); st.KernelDrops != 0 {
			t.Fatalf("capture lost %d frames: cannot conclude", st.KernelDrops)
		}
		if got := cp.Count(m); got != 0 {
			t.Errorf("marker in clear in %d underlay frames", got)
		}
		t.Logf("%d request/response exchanges (TCP and UDP, IPv4 and IPv6, remote and local server) under default-deny both ways; marker in clear in 0 frames", n)
	})

	t.Run("a connection the other way is refused and counted", func(t *testing.T) {
		before := reasonCount(t, c, "n2", reasonDeniedEgress)
		for _, dst := range clientPod.Addrs() {
			if err := exchange("tcp", remote, clientPod, dst, 8080, 1500*time.Millisecond); err == nil {
				t.Errorf("server -> client (%s) TCP 8080 connected", dst)
			}
			if err := exchange("udp-echo", remote, clientPod, dst, 5353, time.Second); err == nil {
				t.Errorf("server -> client (%s) UDP 5353 answered", dst)
			}
		}
		if d := reasonCount(t, c, "n2", reasonDeniedEgress) - before; d == 0 {
			t.Error("n2 counted no denied_egress for the server's attempts")
		}
	})

	t.Run("without the servers' ingress rule the same traffic is dropped (positive control)", func(t *testing.T) {
		setIngress(ctx, t, c, serverPol, nil)
		before := reasonCount(t, c, "n1", reasonDeniedIngress)
		eventually(t, "ingress rule removed: client -> server refused", func() bool {
			return exchange("tcp", clientPod, remote, remote.IPv4, 8080, time.Second) != nil
		})
		if err := exchange("udp-echo", clientPod, remote, remote.IPv4, 5353, 2*time.Second); err == nil {
			t.Error("client -> server UDP answered without the ingress rule")
		}
		// The sender enforces the receiver's ingress: n1 drops, nothing crosses.
		if d := reasonCount(t, c, "n1", reasonDeniedIngress) - before; d == 0 {
			t.Error("n1 counted no denied_ingress")
		}
		setIngress(ctx, t, c, serverPol, []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{PodSelector: sel("client")}}, Ports: ports}})
		eventually(t, "ingress rule back: client -> server connects", func() bool {
			return exchange("tcp", clientPod, remote, remote.IPv4, 8080, time.Second) == nil
		})
	})

	t.Run("agent restarts keep established connections", func(t *testing.T) {
		// The connection table is pinned and the programs stay attached: agents stopped or
		// killed and started again (both ends) never interrupt an allowed connection, nor let
		// its replies be judged as new connections (which the policies would deny).
		conn, stop := pingPong(t, clientPod, remote, net.JoinHostPort(remote.IPv4.String(), "8080"))
		defer stop()
		// A round trip fails only when the connection broke: TCP resends what a moment's loss
		// took, so a wait of 10 s is no timing assertion. What proves that no packet of the
		// connection was judged as a new one (and denied) is the nodes' policy drop counters,
		// which must not move.
		dropsBefore := droppedByPolicy(t, c, "n1") + droppedByPolicy(t, c, "n2")
		trips := 0
		var slowest time.Duration
		roundTrips := func(when string, n int) {
			t.Helper()
			for range n {
				start := time.Now()
				if err := conn.roundTrip(10 * time.Second); err != nil {
					t.Fatalf("%s: round trip %d: %v", when, trips, err)
				}
				slowest = max(slowest, time.Since(start))
				trips++
				time.Sleep(20 * time.Millisecond)
			}
		}
		roundTrips("before", 10)
		for _, n := range []*cluster.Node{n1, n2} {
			for _, kill := range []bool{true, false} {
				stopAgent, what := n.StopAgent, "stopped"
				if kill {
					stopAgent, what = n.KillAgent, "killed -9"
				}
				if err := stopAgent(); err != nil {
					t.Fatal(err)
				}
				roundTrips(n.Name+"'s agent "+what, 15)
				if err := n.StartAgent(); err != nil {
					t.Fatal(err)
				}
				// The new agent loads its programs and applies its maps while traffic flows
				// (about 3 s of round trips: an agent is up in 1-2 s here).
				roundTrips(n.Name+"'s agent starting after "+what, 100)
			}
		}
		if _, err := c.WaitConverged(ctx, mode, time.Minute); err != nil {
			t.Fatal(err)
		}
		roundTrips("after", 10)
		if d := droppedByPolicy(t, c, "n1") + droppedByPolicy(t, c, "n2") - dropsBefore; d != 0 {
			t.Errorf("%d packets dropped by policy across the restarts: the connection's packets were judged as new ones", d)
		}
		t.Logf("%d round trips on one TCP connection across 4 agent restarts (2 of them kill -9): none failed, 0 policy drops; slowest round trip %s",
			trips, slowest.Round(time.Millisecond))
	})

	t.Run("a policy change cuts an established connection", func(t *testing.T) {
		conn, stop := pingPong(t, clientPod, remote, net.JoinHostPort(remote.IPv4.String(), "8080"))
		defer stop()
		for i := range 20 {
			if err := conn.roundTrip(10 * time.Second); err != nil {
				t.Fatalf("round trip %d before the change: %v", i, err)
			}
		}
		// The client may no longer talk to the server: its egress rule goes.
		var pol v1alpha1.MeshPolicy
		if err := c.Client.Get(ctx, client.ObjectKeyFromObject(clientPol), &pol); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(pol.DeepCopy())
		pol.Spec.Egress = nil
		before := reasonCount(t, c, "n1", reasonDeniedEgress)
		if err := c.Client.Patch(ctx, &pol, patch); err != nil {
			t.Fatal(err)
		}
		changed := time.Now()
		var lastOK, cut time.Duration
		for {
			start := time.Now()
			// A second is long for a round trip here and short for the measurement; a slow
			// machine that misses it only makes the cut look earlier than it was.
			if err := conn.roundTrip(time.Second); err != nil {
				cut = start.Sub(changed) // its request never came back
				break
			}
			lastOK = time.Since(changed)
			if lastOK > 45*time.Second {
				t.Fatal("the connection still works 45s after its allow rule went")
			}
			time.Sleep(10 * time.Millisecond)
		}
		// Measured from the API write: the agent's watch, compile and map update, then the
		// connection's next packet. Reported, not asserted (docs/performance.md).
		// Each request waits a second for its echo: the cut happened before the failed
		// request's deadline.
		t.Logf("established connection cut after the policy change: last echo at +%s, the request sent at +%s never came back (cut within +%s)",
			lastOK.Round(time.Millisecond), cut.Round(time.Millisecond), (cut + time.Second).Round(time.Millisecond))
		eventually(t, "the cut connection's packets are counted as denied_egress on n1", func() bool {
			return reasonCount(t, c, "n1", reasonDeniedEgress) > before
		})
	})
}

// setIngress replaces a policy's ingress rules.
func setIngress(ctx context.Context, t *testing.T, c *cluster.Cluster, p *v1alpha1.MeshPolicy, rules []v1alpha1.PolicyRule) {
	t.Helper()
	var pol v1alpha1.MeshPolicy
	if err := c.Client.Get(ctx, client.ObjectKeyFromObject(p), &pol); err != nil {
		t.Fatal(err)
	}
	patch := client.MergeFrom(pol.DeepCopy())
	pol.Spec.Ingress = rules
	if err := c.Client.Patch(ctx, &pol, patch); err != nil {
		t.Fatal(err)
	}
}

// pingPongConn is one long-lived TCP connection between two pods: the server echoes every
// 8-byte message.
type pingPongConn struct {
	c   net.Conn
	seq uint64
}

// roundTrip sends one message and waits at most wait for its echo.
func (p *pingPongConn) roundTrip(wait time.Duration) error {
	p.seq++
	msg := []byte(fmt.Sprintf("%08d", p.seq%100_000_000))
	_ = p.c.SetDeadline(time.Now().Add(wait))
	if _, err := p.c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(p.c, buf); err != nil {
		return err
	}
	if !bytes.Equal(buf, msg) {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// pingPong connects from one pod to an echo server it starts in another.
func pingPong(t *testing.T, from, to *netenv.Pod, addr string) (*pingPongConn, func()) {
	t.Helper()
	ln, err := to.NS.ListenTCP(addr)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var conn net.Conn
	for conn == nil {
		dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
		conn, err = from.NS.DialTCP(dctx, addr)
		dcancel()
		if err != nil && ctx.Err() != nil {
			ln.Close()
			t.Fatalf("connect %s -> %s: %v", from.Name, addr, err)
		}
	}
	return &pingPongConn{c: conn}, func() { conn.Close(); ln.Close() }
}

// TestPolicyPathMTU: path MTU discovery works under policy. Pods have an MTU of 1500, more
// than the tunnel carries (1420), as with a CNI that does not lower it; a client under
// default-deny in both directions sends full-size TCP segments (DF set) to a server on
// another node: the node answers with ICMP fragmentation needed (IPv4) / packet too big
// (IPv6), which only the connection table can let through (the node is not a peer the client's
// ingress allows), the client lowers its path MTU, and the transfer completes.
func TestPolicyPathMTU(t *testing.T) {
	ctx := context.Background()
	tcp := []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolTCP, Port: ptr(int32(8080))}}
	cs := startClientServer(t, cluster.Options{Backend: string(wgBackend), PodMTU: 1500}, v1alpha1.ModeWireGuard, false, tcp)
	c, clientPod, server := cs.c, cs.client, cs.remote
	for _, dst := range server.Addrs() {
		payload := bytes.Repeat([]byte("MESHCRYPT-PMTU-"), 20_000) // 300 kB in full-size segments
		if err := cluster.Exchange(ctx, "tcp", clientPod, dst, server, 8080, payload, 30*time.Second); err != nil {
			t.Fatalf("full-size TCP transfer to %s under policy: %v", dst, err)
		}
		// The path MTU the client learned is the proof that the ICMP error reached it.
		h, err := clientPod.NS.Handle()
		if err != nil {
			t.Fatal(err)
		}
		routes, err := h.RouteGet(dst.AsSlice())
		h.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(routes) == 0 || routes[0].MTU == 0 || routes[0].MTU >= c.PodMTU() {
			t.Fatalf("route to %s: %+v: the client learned no smaller path MTU", dst, routes)
		}
		t.Logf("300 kB over TCP to %s: complete; the client's path MTU is %d (pods %d)", dst, routes[0].MTU, c.PodMTU())
	}
}
