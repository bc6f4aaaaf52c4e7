package netenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// echoPort is where every pod of TestCluster runs its TCP and UDP echo servers.
const echoPort = 7000

// requireRoot skips privileged tests when not root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces")
	}
}

func randomMarker(t *testing.T, what string) []byte {
	t.Helper()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return []byte("meshcrypt-" + what + "-" + hex.EncodeToString(b[:]))
}

// startEcho runs TCP and UDP echo servers on every address of p. Each answers
// "<remote address> <message>", so clients can check they were not NATed.
func startEcho(t *testing.T, p *Pod) {
	t.Helper()
	for _, a := range p.Addrs() {
		addr := netip.AddrPortFrom(a, echoPort).String()
		ln, err := p.NS.ListenTCP(addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					msg, err := io.ReadAll(c)
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s %s", c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(), msg)
				}()
			}
		}()
		uc, err := p.NS.ListenUDP(addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { uc.Close() })
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, from, err := uc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				reply := fmt.Appendf(nil, "%s %s", from.Addr(), buf[:n])
				uc.WriteToUDPAddrPort(reply, from)
			}
		}()
	}
}

// exchangeTCP sends msg from src to dst's echo server over TCP and checks the
// answer names src's address.
func exchangeTCP(ctx context.Context, src *Pod, srcIP, dstIP netip.Addr, msg []byte) error {
	c, err := src.NS.DialTCP(ctx, netip.AddrPortFrom(dstIP, echoPort).String())
	if err != nil {
		return err
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if want := fmt.Sprintf("%s %s", srcIP, msg); string(got) != want {
		return fmt.Errorf("tcp %s -> %s: got %q, want %q", srcIP, dstIP, got, want)
	}
	return nil
}

// exchangeUDP sends msg from src to dst's echo server over UDP and checks the
// answer. UDP may lose a datagram: it retries until ctx is done.
func exchangeUDP(ctx context.Context, src *Pod, srcIP, dstIP netip.Addr, msg []byte) error {
	c, err := src.NS.DialUDP(netip.AddrPortFrom(dstIP, echoPort).String())
	if err != nil {
		return err
	}
	defer c.Close()
	want := fmt.Sprintf("%s %s", srcIP, msg)
	buf := make([]byte, 64<<10)
	for {
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if err == nil {
			if string(buf[:n]) != want {
				return fmt.Errorf("udp %s -> %s: got %q, want %q", srcIP, dstIP, buf[:n], want)
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("udp %s -> %s: no answer: %w", srcIP, dstIP, err)
		}
	}
}

// hostGWRoutes lists n's static routes in the main table as "dst via gw".
func hostGWRoutes(t *testing.T, n *Node) []string {
	t.Helper()
	h, err := n.NS.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var routes []netlink.Route
	for range 5 {
		routes, err = h.RouteListFiltered(netlink.FAMILY_ALL,
			&netlink.Route{Table: unix.RT_TABLE_MAIN, Protocol: unix.RTPROT_STATIC},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		t.Fatalf("list routes on %s: %v", n.Name, err)
	}
	var got []string
	for _, r := range routes {
		got = append(got, fmt.Sprintf("%s via %s", r.Dst, r.Gw))
	}
	slices.Sort(got)
	return got
}

// wantHostGWRoutes is what n must route: every other node's pod CIDRs via its
// underlay address.
func wantHostGWRoutes(n *Node, all []*Node) []string {
	var want []string
	for _, o := range all {
		if o == n {
			continue
		}
		for _, c := range o.PodCIDRs {
			gw := o.UnderlayV4
			if c.Addr().Is6() {
				gw = o.UnderlayV6
			}
			want = append(want, fmt.Sprintf("%s via %s", c, gw))
		}
	}
	slices.Sort(want)
	return want
}

func namespacesOf(t *testing.T, prefix string) []string {
	t.Helper()
	names, err := listNamedNS(prefix)
	if err != nil {
		t.Fatal(err)
	}
	return names
}

func TestCluster(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	const podMTU = 1420
	topo := NewT(t, Options{PodMTU: podMTU})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	for _, nn := range []string{"node-a", "node-b", "node-c"} {
		n, err := topo.AddNode(ctx, nn)
		if err != nil {
			t.Fatal(err)
		}
		for _, pn := range []string{"web", "database-primary-0"} {
			p, err := topo.AddPod(ctx, n, pn)
			if err != nil {
				t.Fatal(err)
			}
			startEcho(t, p)
		}
	}
	nodes := topo.Nodes()
	var pods []*Pod
	for _, n := range nodes {
		pods = append(pods, n.Pods()...)
	}

	t.Run("addressing", func(t *testing.T) {
		a := topo.Node("node-a")
		got := []string{a.UnderlayV4.String(), a.UnderlayV6.String(), fmt.Sprint(a.PodCIDRs), a.Port}
		want := []string{"10.77.0.11", "fd77::11", "[10.244.1.0/24 fd44:0:0:1::/64]", "p1-node-a"}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("node-a (-want +got):\n%s", diff)
		}
		var gotPods []string
		for _, p := range pods {
			gotPods = append(gotPods, fmt.Sprintf("%s %s %s %s %s", p.NS.Name, p.IPv4, p.IPv6, p.HostVeth, p.Node.Name))
		}
		pre := topo.Prefix()
		wantPods := []string{
			pre + "-node-a-web 10.244.1.10 fd44:0:0:1::10 lxcweb node-a",
			pre + "-node-a-database-primary-0 10.244.1.11 fd44:0:0:1::11 " + pods[1].HostVeth + " node-a",
			pre + "-node-b-web 10.244.2.10 fd44:0:0:2::10 lxcweb node-b",
			pre + "-node-b-database-primary-0 10.244.2.11 fd44:0:0:2::11 " + pods[3].HostVeth + " node-b",
			pre + "-node-c-web 10.244.3.10 fd44:0:0:3::10 lxcweb node-c",
			pre + "-node-c-database-primary-0 10.244.3.11 fd44:0:0:3::11 " + pods[5].HostVeth + " node-c",
		}
		if diff := cmp.Diff(wantPods, gotPods); diff != "" {
			t.Errorf("pods (-want +got):\n%s", diff)
		}
		if h := pods[1].HostVeth; len(h) != ifNameMax || !strings.HasPrefix(h, "lxcdatabas") {
			t.Errorf("host veth %q: want lxcdatabas and 5 hex digits", h)
		}
		wantNS := []string{pre + "-sw"}
		for _, n := range nodes {
			wantNS = append(wantNS, n.NS.Name)
			for _, p := range n.Pods() {
				wantNS = append(wantNS, p.NS.Name)
			}
		}
		slices.Sort(wantNS)
		if diff := cmp.Diff(wantNS, namespacesOf(t, pre)); diff != "" {
			t.Errorf("namespaces (-want +got):\n%s", diff)
		}
	})

	t.Run("nothing-in-root-netns", func(t *testing.T) {
		for _, n := range nodes {
			names := []string{n.Port}
			for _, p := range n.Pods() {
				names = append(names, p.HostVeth)
			}
			for _, name := range names {
				if _, err := netlink.LinkByName(name); err == nil {
					t.Errorf("link %s exists in the root namespace", name)
				}
			}
		}
	})

	t.Run("ip-netns-exec", func(t *testing.T) {
		p := pods[3]
		out, err := p.NS.Command(ctx, "ip", "-o", "addr", "show", "dev", UnderlayIface).CombinedOutput()
		if err != nil {
			t.Fatalf("ip netns exec: %v: %s", err, out)
		}
		for _, a := range p.Addrs() {
			if !strings.Contains(string(out), a.String()+"/") {
				t.Errorf("ip addr in %s: %q lacks %s", p.NS.Name, out, a)
			}
		}
		out, err = p.NS.Command(ctx, "ip", "route", "show", "default").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "default via 169.254.1.1 dev eth0") {
			t.Errorf("ip route in %s: %q, %v", p.NS.Name, out, err)
		}
	})

	t.Run("host-gw-routes", func(t *testing.T) {
		for _, n := range nodes {
			if diff := cmp.Diff(wantHostGWRoutes(n, nodes), hostGWRoutes(t, n)); diff != "" {
				t.Errorf("routes on %s (-want +got):\n%s", n.Name, diff)
			}
		}
	})

	t.Run("pod-to-pod", func(t *testing.T) {
		var wg sync.WaitGroup
		errc := make(chan error, 1000)
		for _, src := range pods {
			for _, dst := range pods {
				if src.Node == dst.Node {
					continue
				}
				wg.Go(func() {
					for i, dstIP := range dst.Addrs() {
						srcIP := src.Addrs()[i]
						msg := fmt.Appendf(nil, "hello from %s/%s", src.Node.Name, src.Name)
						if err := exchangeTCP(ctx, src, srcIP, dstIP, msg); err != nil {
							errc <- err
						}
						if err := exchangeUDP(ctx, src, srcIP, dstIP, msg); err != nil {
							errc <- err
						}
					}
				})
			}
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			t.Error(err)
		}
	})

	t.Run("capture", func(t *testing.T) {
		sent := randomMarker(t, "sent-in-clear")
		sentTCP := randomMarker(t, "sent-over-tcp6")
		never := randomMarker(t, "never-sent")
		local := randomMarker(t, "same-node")
		c, err := topo.CaptureUnderlay(CaptureOptions{Markers: [][]byte{sent, sentTCP, never, local}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Stop()
		a, b, a2 := pods[0], pods[2], pods[1]
		// On a node, with default options, a forwarded frame is seen twice:
		// entering by one interface and leaving by another.
		onNode, err := StartCapture(a.Node.NS, CaptureOptions{Markers: [][]byte{sent}})
		if err != nil {
			t.Fatal(err)
		}
		defer onNode.Stop()
		if err := exchangeUDP(ctx, a, a.IPv4, b.IPv4, sent); err != nil {
			t.Fatal(err)
		}
		if err := exchangeTCP(ctx, b, b.IPv6, a.IPv6, sentTCP); err != nil {
			t.Fatal(err)
		}
		// Same node: routed by the node, never on the underlay.
		if err := exchangeUDP(ctx, a, a.IPv4, a2.IPv4, local); err != nil {
			t.Fatal(err)
		}
		if err := c.Stop(); err != nil {
			t.Fatal(err)
		}
		st := c.Stats()
		if st.KernelDrops != 0 || st.Dropped != 0 || st.Truncated != 0 {
			t.Fatalf("capture lost frames: %+v", st)
		}
		// UDP: the request and the echo each cross the switch once.
		if got := c.Count(sent); got != 2 {
			t.Errorf("Count(sent) = %d, want 2 (request and echo)", got)
		}
		if got := onNode.Count(sent); got != 4 {
			t.Errorf("capture on the node: Count(sent) = %d, want 4 (request and echo, each on lxc and eth0)", got)
		}
		if got := c.UDPFrames(echoPort); got != 1 {
			t.Errorf("UDPFrames(%d) = %d, want 1", echoPort, got)
		}
		if !c.Contains(sentTCP) {
			t.Errorf("marker sent over TCP/IPv6 between nodes not seen on the switch")
		}
		// An unregistered marker is searched in the retained frames.
		if !c.Contains(sent[:len(sent)-1]) {
			t.Errorf("unregistered prefix of a sent marker not found")
		}
		if c.Contains(never) || c.Contains([]byte("meshcrypt-never-registered-never-sent")) {
			t.Errorf("capture reports a marker that was never sent")
		}
		if got := c.Count(local); got != 0 {
			t.Errorf("same-node marker seen %d times on the switch", got)
		}
		if c.IPProtoFrames(unix.IPPROTO_TCP) == 0 || c.Frames() < 4 {
			t.Errorf("stats %+v: want TCP frames and at least 4 frames", c.Stats())
		}
	})

	t.Run("full-size-ping", func(t *testing.T) {
		src, dst := pods[0], pods[5]
		for _, ip := range dst.Addrs() {
			if err := src.NS.Ping(ctx, ip, podMTU); err != nil {
				t.Errorf("full-size ping: %v", err)
			}
			if err := src.NS.Ping(ctx, ip, podMTU+1); !errors.Is(err, ErrFragNeeded) {
				t.Errorf("ping of pod MTU + 1 with DF: got %v, want ErrFragNeeded", err)
			}
		}
	})

	t.Run("forward-tcp", func(t *testing.T) {
		// The "API server": a TCP echo server on the root namespace's loopback.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		fctx, fcancel := context.WithCancel(ctx)
		defer fcancel()
		a := topo.Node("node-a").NS
		addr, err := a.ForwardTCP(fctx, "127.0.0.1:6443", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if addr.String() != "127.0.0.1:6443" {
			t.Errorf("listen address %s", addr)
		}
		for range 3 {
			c, err := a.DialTCP(ctx, "127.0.0.1:6443")
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte("ping through the forwarder"))
			c.CloseWrite()
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(got) != "ping through the forwarder" {
				t.Fatalf("echo through forwarder: %q, %v", got, err)
			}
		}
		// Another node has its own loopback.
		if c, err := topo.Node("node-b").NS.DialTCP(ctx, "127.0.0.1:6443"); err == nil {
			c.Close()
			t.Errorf("node-b reached node-a's forwarder")
		}
		fcancel()
		for {
			c, err := a.DialTCP(ctx, "127.0.0.1:6443")
			if err != nil {
				break // stopped
			}
			c.Close()
			if ctx.Err() != nil {
				t.Fatal("forwarder still listening after its context ended")
			}
			time.Sleep(10 * time.Millisecond)
		}
	})

	t.Run("remove-node", func(t *testing.T) {
		c := topo.Node("node-c")
		if err := topo.RemoveNode(ctx, "node-c"); err != nil {
			t.Fatal(err)
		}
		left := topo.Nodes()
		if len(left) != 2 || topo.Node("node-c") != nil {
			t.Fatalf("nodes after removal: %v", left)
		}
		for _, n := range left {
			if diff := cmp.Diff(wantHostGWRoutes(n, left), hostGWRoutes(t, n)); diff != "" {
				t.Errorf("routes on %s after removing node-c (-want +got):\n%s", n.Name, diff)
			}
		}
		for _, name := range namespacesOf(t, topo.Prefix()) {
			if strings.HasPrefix(name, topo.Prefix()+"-node-c") {
				t.Errorf("namespace %s left behind", name)
			}
		}
		// Re-adding the name gives the same addresses, and routes come back.
		c2, err := topo.AddNode(ctx, "node-c")
		if err != nil {
			t.Fatal(err)
		}
		if c2.Index != c.Index || c2.UnderlayV4 != c.UnderlayV4 || !slices.Equal(c2.PodCIDRs, c.PodCIDRs) {
			t.Errorf("re-added node-c: index %d %s %v, was %d %s %v", c2.Index, c2.UnderlayV4, c2.PodCIDRs, c.Index, c.UnderlayV4, c.PodCIDRs)
		}
		all := topo.Nodes()
		for _, n := range all {
			if diff := cmp.Diff(wantHostGWRoutes(n, all), hostGWRoutes(t, n)); diff != "" {
				t.Errorf("routes on %s after re-adding node-c (-want +got):\n%s", n.Name, diff)
			}
		}
		p, err := topo.AddPod(ctx, c2, "web")
		if err != nil {
			t.Fatal(err)
		}
		startEcho(t, p)
		if err := exchangeUDP(ctx, pods[0], pods[0].IPv6, p.IPv6, []byte("welcome back")); err != nil {
			t.Error(err)
		}
		// Removing a pod removes the node's route to it.
		if err := topo.RemovePod(ctx, p); err != nil {
			t.Fatal(err)
		}
		h, err := c2.NS.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		if _, err := h.LinkByName(p.HostVeth); err == nil {
			t.Errorf("host veth %s of a removed pod still exists", p.HostVeth)
		}
		for _, ip := range p.Addrs() {
			if r, err := h.RouteGet(ip.AsSlice()); err == nil {
				t.Errorf("node still routes to removed pod %s: %v", ip, r)
			}
		}
		if _, err := os.Stat(p.NS.Path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pod namespace %s: %v, want gone", p.NS.Path, err)
		}
	})
}

func TestIPv4Only(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	topo := NewT(t, Options{IPv4Only: true})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var pods []*Pod
	for _, nn := range []string{"n1", "n2"} {
		n, err := topo.AddNode(ctx, nn)
		if err != nil {
			t.Fatal(err)
		}
		if n.UnderlayV6.IsValid() || len(n.PodCIDRs) != 1 {
			t.Errorf("IPv4-only node %s has %s %v", n.Name, n.UnderlayV6, n.PodCIDRs)
		}
		p, err := topo.AddPod(ctx, n, "p")
		if err != nil {
			t.Fatal(err)
		}
		if p.IPv6.IsValid() || len(p.Addrs()) != 1 {
			t.Errorf("IPv4-only pod has %v", p.Addrs())
		}
		startEcho(t, p)
		pods = append(pods, p)
	}
	nodes := topo.Nodes()
	for _, n := range nodes {
		if diff := cmp.Diff(wantHostGWRoutes(n, nodes), hostGWRoutes(t, n)); diff != "" {
			t.Errorf("routes on %s (-want +got):\n%s", n.Name, diff)
		}
	}
	if err := exchangeTCP(ctx, pods[0], pods[0].IPv4, pods[1].IPv4, []byte("v4 only")); err != nil {
		t.Error(err)
	}
}

// TestMTUMismatch is the negative control of the MTU tests: pods whose MTU
// exceeds what the underlay carries get "fragmentation needed" from their node.
func TestMTUMismatch(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	topo := NewT(t, Options{UnderlayMTU: 1400, PodMTU: 1500})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var pods []*Pod
	for _, nn := range []string{"n1", "n2"} {
		n, err := topo.AddNode(ctx, nn)
		if err != nil {
			t.Fatal(err)
		}
		p, err := topo.AddPod(ctx, n, "p")
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	for _, ip := range pods[1].Addrs() {
		if err := pods[0].NS.Ping(ctx, ip, 1400); err != nil {
			t.Errorf("ping of underlay size: %v", err)
		}
		err := pods[0].NS.Ping(ctx, ip, 1500)
		if !errors.Is(err, ErrFragNeeded) {
			t.Errorf("ping of pod MTU over a smaller underlay: got %v, want ErrFragNeeded", err)
		}
	}
}

func TestClose(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	topo, err := New(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	n, err := topo.AddNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	p, err := topo.AddPod(ctx, n, "p1")
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	for _, ns := range []*NS{n.NS, p.NS} {
		cmd := ns.Command(context.Background(), "sleep", "1000")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		waitInNS(t, ctx, ns, cmd.Process.Pid)
	}
	if _, err := n.NS.ForwardTCP(context.Background(), "127.0.0.1:6443", "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pidFile(topo.Prefix())); err != nil {
		t.Fatalf("pid file: %v", err)
	}
	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range cmds {
		err := cmd.Wait()
		ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("sleep in a namespace: %v, want killed by SIGKILL", err)
		}
	}
	if names := namespacesOf(t, topo.Prefix()); len(names) != 0 {
		t.Errorf("namespaces left after Close: %v", names)
	}
	if _, err := os.Stat(pidFile(topo.Prefix())); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file after Close: %v", err)
	}
	if err := topo.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := topo.AddNode(ctx, "n2"); !errors.Is(err, ErrClosed) {
		t.Errorf("AddNode after Close: %v, want ErrClosed", err)
	}
}

// waitInNS waits until pid has entered ns (`ip netns exec` switches namespace
// right after it starts).
func waitInNS(t *testing.T, ctx context.Context, ns *NS, pid int) {
	t.Helper()
	want, err := statNS(ns.Path)
	if err != nil {
		t.Fatal(err)
	}
	for {
		if got, err := statNS(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil && got == want {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("pid %d never entered %s", pid, ns.Name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCleanupStale(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var rnd [3]byte
	rand.Read(rnd[:])
	prefix := "mcstale" + hex.EncodeToString(rnd[:])
	topo, err := New(ctx, Options{Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	n, err := topo.AddNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := topo.AddPod(ctx, n, "p1"); err != nil {
		t.Fatal(err)
	}
	sleep := n.NS.Command(context.Background(), "sleep", "1000")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	waitInNS(t, ctx, n.NS, sleep.Process.Pid)

	// A live owner is left alone.
	if deleted, err := CleanupStale(ctx, nil); err != nil || slices.ContainsFunc(deleted, func(s string) bool { return strings.HasPrefix(s, prefix) }) {
		t.Fatalf("CleanupStale with a live owner: deleted %v, %v", deleted, err)
	}
	// Fake a dead owner: the pid of a process that has exited.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pidFile(prefix), []byte(owner{pid: dead.Process.Pid, start: 1}.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	deleted, err := CleanupStale(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ours []string
	for _, d := range deleted {
		if strings.HasPrefix(d, prefix+"-") {
			ours = append(ours, d)
		}
	}
	slices.Sort(ours)
	want := []string{prefix + "-n1", prefix + "-n1-p1", prefix + "-sw"}
	if diff := cmp.Diff(want, ours); diff != "" {
		t.Errorf("deleted (-want +got):\n%s", diff)
	}
	if names := namespacesOf(t, prefix); len(names) != 0 {
		t.Errorf("namespaces left: %v", names)
	}
	if _, err := os.Stat(pidFile(prefix)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file: %v, want removed", err)
	}
	if err := sleep.Wait(); err == nil {
		t.Errorf("sleep in a stale namespace was not killed")
	}
	if err := topo.Close(); err != nil {
		t.Errorf("Close after CleanupStale: %v", err)
	}
}

func TestDoRestoresThread(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	topo := NewT(t, Options{})
	sw, err := statNS(topo.Switch().Path)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		var inside nsID
		if err := topo.Switch().Do(func() error {
			var err error
			inside, err = statNS(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if inside != sw {
			t.Fatalf("Do ran in %v, want the switch %v", inside, sw)
		}
	}
	// Every thread of the process is back in the root namespace.
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		id, err := statNS(filepath.Join("/proc/self/task", task.Name(), "ns", "net"))
		if err == nil && id == sw {
			t.Errorf("thread %s left in the switch namespace", task.Name())
		}
	}
	if _, err := topo.Switch().ListenTCP("localhost:80"); err == nil {
		t.Errorf("ListenTCP accepted a host name")
	}
}
