package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/agent"
	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/pkg/status"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

const wgPort = agent.DefaultListenPort

func newMarker(t *testing.T) []byte {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return []byte("MESHCRYPT-PLAINTEXT-MARKER-" + hex.EncodeToString(b))
}

// crossNodePairs lists every ordered pair of pods on different nodes.
func crossNodePairs(c *cluster.Cluster) [][2]*netenv.Pod {
	var pods []*netenv.Pod
	for _, n := range c.Nodes() {
		pods = append(pods, n.Pods()...)
	}
	var out [][2]*netenv.Pod
	for _, a := range pods {
		for _, b := range pods {
			if a.Node.Name != b.Node.Name {
				out = append(out, [2]*netenv.Pod{a, b})
			}
		}
	}
	return out
}

// exchangeAll makes every cross-node pod pair exchange marker over TCP and UDP, IPv4 and IPv6.
func exchangeAll(t *testing.T, c *cluster.Cluster, marker []byte) int {
	t.Helper()
	return exchangePairs(t, crossNodePairs(c), 7000, marker)
}

// exchangePairs makes each ordered pair send marker from the first to every address of the
// second, over TCP and UDP, on port; it returns the number of exchanges.
func exchangePairs(t *testing.T, pairs [][2]*netenv.Pod, port int, marker []byte) int {
	t.Helper()
	n := 0
	for _, pr := range pairs {
		for _, dst := range pr[1].Addrs() {
			for _, proto := range []string{"tcp", "udp"} {
				payload := append(slices.Clone(marker), fmt.Sprintf(" %s %s->%s", proto, pr[0].Name, dst)...)
				if err := cluster.Exchange(context.Background(), proto, pr[0], dst, pr[1], port, payload, 20*time.Second); err != nil {
					t.Fatalf("exchange: %v", err)
				}
				n++
			}
		}
	}
	return n
}

func capture(t *testing.T, c *cluster.Cluster, markers ...[]byte) *netenv.Capture {
	t.Helper()
	cp, err := c.Net.CaptureUnderlay(netenv.CaptureOptions{Markers: markers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cp.Stop() })
	return cp
}

// TestWireGuardEndToEnd runs one 3-node cluster through the whole story: clear
// traffic as the positive control, WireGuard on with every pair proven encrypted on the wire,
// status, full-size DF packets, a node joining and leaving, an agent restart under a stream,
// and back to clear.
func TestWireGuardEndToEnd(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		n, err := c.AddNode(ctx, fmt.Sprintf("n%d", i))
		if err != nil {
			t.Fatal(err)
		}
		for j := 1; j <= 2; j++ {
			if _, err := c.AddPod(ctx, n, fmt.Sprintf("n%d-p%d", i, j)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}

	t.Run("disabled sends the marker in clear (positive control)", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeAll(t, c, m)
		if got := cp.Count(m); got < n {
			t.Fatalf("marker seen in %d underlay frames after %d clear exchanges; the capture cannot see pod traffic", got, n)
		}
		t.Logf("%d exchanges, marker in %d underlay frames, %d WireGuard frames", n, cp.Count(m), cp.UDPFrames(wgPort))
	})

	t.Run("wireguard encrypts every pair", func(t *testing.T) {
		// The operator's switch: the CLI sets the mode and waits for every node.
		out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m")
		if err != nil {
			t.Fatalf("meshcrypt encryption enable: %v\n%s", err, out)
		}
		if !strings.Contains(out, "all 3 nodes applied WireGuard") {
			t.Fatalf("enable --wait did not report convergence:\n%s", out)
		}
		t.Logf("meshcrypt encryption enable --mode wireguard --wait:\n%s", out)
		// The harness's own check agrees.
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeAll(t, c, m)
		st := cp.Stats()
		if st.KernelDrops != 0 {
			t.Fatalf("capture lost %d frames in the kernel: cannot conclude", st.KernelDrops)
		}
		if got := cp.Count(m); got != 0 {
			t.Fatalf("marker seen in clear in %d underlay frames with WireGuard on", got)
		}
		if cp.UDPFrames(wgPort) < n {
			t.Fatalf("only %d WireGuard frames on the underlay for %d exchanges", cp.UDPFrames(wgPort), n)
		}
		t.Logf("%d exchanges (TCP+UDP, IPv4+IPv6): marker in 0 of %d underlay frames, %d WireGuard frames", n, st.Frames, cp.UDPFrames(wgPort))
		checkDevices(t, c)
	})

	t.Run("status shows every pair encrypted", func(t *testing.T) {
		var r status.Report
		err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			out, err := c.Run(ctx, "meshcrypt", "status", "-o", "json")
			if err != nil {
				return false, fmt.Errorf("meshcrypt status: %v\n%s", err, out)
			}
			r = status.Report{}
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				return false, fmt.Errorf("parse status: %v\n%s", err, out)
			}
			// The exchanges above made handshakes; wait until agents published them.
			for _, p := range r.Pairs {
				if p.LastHandshake == nil {
					return false, nil
				}
			}
			return r.Compliant, nil
		})
		if err != nil {
			t.Fatalf("%v: last report %+v", err, r)
		}
		if len(r.Pairs) != 3 || len(r.Nodes) != 3 {
			t.Fatalf("report has %d pairs and %d nodes, want 3 and 3", len(r.Pairs), len(r.Nodes))
		}
		for _, nd := range r.Nodes {
			if nd.Backend != wgBackend || nd.PeersReady != 2 || !strings.HasPrefix(nd.Fingerprint, "sha256:") {
				t.Errorf("node %+v: want %s backend, 2 peers ready, a fingerprint", nd, wgBackend)
			}
		}
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, mn := range mns {
			if mn.Status.Backend != wgBackend || mn.Status.AttachMode != autoAttach {
				t.Errorf("MeshNode %s reports backend %q, attach mode %q; want %s and %s on this kernel",
					mn.Name, mn.Status.Backend, mn.Status.AttachMode, wgBackend, autoAttach)
			}
		}
		out, err := c.Run(ctx, "meshcrypt", "status")
		if err != nil {
			t.Fatal(err, out)
		}
		if !strings.HasPrefix(out, "compliant: all 3 node pairs encrypted (WireGuard)") {
			t.Errorf("status table does not start with the verdict:\n%s", out)
		}
		t.Logf("meshcrypt status:\n%s", out)
	})

	t.Run("full-size packets with DF cross nodes", func(t *testing.T) {
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, mn := range mns {
			if int(mn.Status.TunnelMTU) != c.PodMTU() {
				t.Errorf("%s reports tunnel MTU %d, pods have %d", mn.Name, mn.Status.TunnelMTU, c.PodMTU())
			}
		}
		m := newMarker(t)
		cp := capture(t, c, m)
		from, to := c.Node("n1").Pods()[0], c.Node("n2").Pods()[0]
		for _, dst := range to.Addrs() {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := from.NS.Ping(pctx, dst, c.PodMTU())
			cancel()
			if err != nil {
				t.Errorf("ping -M do with a %d-byte packet %s -> %s: %v", c.PodMTU(), from.Name, dst, err)
			}
		}
		if cp.UDPFrames(wgPort) == 0 {
			t.Error("the full-size pings did not cross the underlay as WireGuard")
		}
	})

	t.Run("a node joins and leaves", func(t *testing.T) {
		start := time.Now()
		n4, err := c.AddNode(ctx, "n4")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.AddPod(ctx, n4, "n4-p1"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		t.Logf("joining node configured on every peer (both directions) %s after it was created", time.Since(start).Round(time.Millisecond))
		m := newMarker(t)
		cp := capture(t, c, m)
		p4 := n4.Pods()[0]
		for _, other := range []*netenv.Pod{c.Node("n1").Pods()[0], c.Node("n3").Pods()[1]} {
			for _, pair := range [][2]*netenv.Pod{{p4, other}, {other, p4}} {
				for _, dst := range pair[1].Addrs() {
					if err := cluster.Exchange(ctx, "udp", pair[0], dst, pair[1], 7001, m, 20*time.Second); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		if cp.Count(m) != 0 {
			t.Fatalf("marker to/from the new node seen in clear %d times", cp.Count(m))
		}
		checkDevices(t, c)

		gone := n4.PodCIDRs
		goneKey := publicKey(t, c, "n4")
		start = time.Now()
		if err := c.RemoveNode(ctx, "n4"); err != nil {
			t.Fatal(err)
		}
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
			for _, n := range c.Nodes() {
				peers, routes := deviceState(t, n)
				if len(peers) != 2 || slices.Contains(peers, goneKey) {
					return false, nil
				}
				for _, p := range gone {
					if slices.Contains(routes, p) {
						return false, nil
					}
				}
			}
			return true, nil
		})
		if err != nil {
			t.Fatalf("the removed node's peer and routes did not vanish everywhere: %v", err)
		}
		t.Logf("removed node's peer and routes gone everywhere %s after the node's removal began", time.Since(start).Round(time.Millisecond))
	})

	t.Run("agent restart keeps the key and loses no packet", func(t *testing.T) {
		n1 := c.Node("n1")
		keyBefore, err := os.ReadFile(filepath.Join(n1.StateDir, agent.KeyFileName))
		if err != nil {
			t.Fatal(err)
		}
		pubBefore := publicKey(t, c, "n1")
		from, to := n1.Pods()[0], c.Node("n2").Pods()[0]
		m := newMarker(t)
		cp := capture(t, c, m)
		s, err := cluster.StartStream(from, to, to.IPv4, 7002, m, 5*time.Millisecond, 4000)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if s.Received() == 0 {
			t.Fatal("stream not flowing before the restart")
		}
		for _, name := range []string{"n1", "n2"} {
			if err := c.Node(name).RestartAgent(); err != nil {
				t.Fatal(err)
			}
		}
		// Wait for both agents to be back and reconciled before ending the stream.
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		sent, received, lost := s.Stop(500 * time.Millisecond)
		t.Logf("UDP stream across two agent restarts: sent %d, received %d, lost %d", sent, received, len(lost))
		if len(lost) != 0 {
			t.Errorf("lost %d packets across the agent restart (first: %v)", len(lost), lost[:min(10, len(lost))])
		}
		if cp.Count(m) != 0 {
			t.Errorf("stream marker seen in clear %d times during the restart", cp.Count(m))
		}
		keyAfter, err := os.ReadFile(filepath.Join(n1.StateDir, agent.KeyFileName))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(keyBefore, keyAfter) {
			t.Error("the key file changed across the restart")
		}
		if got := publicKey(t, c, "n1"); got != pubBefore {
			t.Errorf("public key changed across the restart: %s -> %s", pubBefore, got)
		}
		fi, err := os.Stat(filepath.Join(n1.StateDir, agent.KeyFileName))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
		}
	})

	lostDevice := map[v1alpha1.WireGuardBackend]string{
		v1alpha1.BackendUserspace: "a killed userspace device is recreated and reconfigured",
		v1alpha1.BackendKernel:    "a deleted kernel device is recreated and reconfigured",
	}[wgBackend]
	t.Run(lostDevice, func(t *testing.T) {
		n3 := c.Node("n3")
		// A stream from n3's pod runs across the loss: while n3 has no device, its pod
		// traffic must be dropped (blackhole fallback), never routed to the underlay in clear.
		mk := newMarker(t)
		cpKill := capture(t, c, mk)
		from3, to1 := n3.Pods()[0], c.Node("n1").Pods()[0]
		stream, err := cluster.StartStream(from3, to1, to1.IPv4, 7005, mk, 5*time.Millisecond, 2000)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		replaced := breakDevice(t, n3)
		start := time.Now()
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
			return replaced(), nil
		})
		if err != nil {
			t.Fatalf("no new %s device %s: %v", wgBackend, n3.Iface, err)
		}
		// Status may still show the state from before the kill: wait for the kernel's own
		// view of n3 (peers on the new device, routes through it) to be whole again.
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
			peers, routes, err := tryDeviceState(n3)
			return err == nil && len(peers) == 2 && len(routes) == 4, nil
		})
		if err != nil {
			t.Fatal("n3's new device did not get its peers and routes back")
		}
		checkDevices(t, c)
		time.Sleep(time.Second)
		sent, received, lost := stream.Stop(300 * time.Millisecond)
		t.Logf("stream from n3 across its device's death: sent %d, received %d, dropped %d while the device was gone; marker in clear: %d",
			sent, received, len(lost), cpKill.Count(mk))
		if cpKill.Count(mk) != 0 {
			t.Fatalf("n3's pod traffic went out in clear %d times while its device was gone", cpKill.Count(mk))
		}
		if received == 0 {
			t.Fatal("the stream never flowed")
		}
		m := newMarker(t)
		cp := capture(t, c, m)
		from, to := c.Node("n1").Pods()[0], n3.Pods()[0]
		if err := cluster.Exchange(ctx, "udp", from, to.IPv4, to, 7004, m, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		if cp.Count(m) != 0 {
			t.Fatalf("marker in clear %d times after the device was recreated", cp.Count(m))
		}
		// The agent notices within a status period (1 s here); the rest is WireGuard itself:
		// n1 keeps its session with the old device until it sees no reply (about 10-15 s).
		t.Logf("device recreated, reconfigured and carrying a one-way flow from a peer %s after its loss", time.Since(start).Round(time.Millisecond))
	})

	t.Run("disabled again: peers and routes removed, clear again", func(t *testing.T) {
		if out, err := c.Run(ctx, "meshcrypt", "encryption", "disable", "--wait", "--timeout", "1m"); err != nil {
			t.Fatalf("meshcrypt encryption disable: %v\n%s", err, out)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
			t.Fatal(err)
		}
		for _, n := range c.Nodes() {
			peers, routes := deviceState(t, n)
			if len(peers) != 0 || len(routes) != 0 {
				t.Errorf("%s still has %d peers and routes %v", n.Name, len(peers), routes)
			}
		}
		m := newMarker(t)
		cp := capture(t, c, m)
		from, to := c.Node("n1").Pods()[0], c.Node("n3").Pods()[0]
		if err := cluster.Exchange(ctx, "udp", from, to.IPv4, to, 7003, m, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		if !cp.Contains(m) {
			t.Error("marker not seen in clear after disabling: traffic still tunnelled?")
		}
	})
}

func publicKey(t *testing.T, c *cluster.Cluster, node string) string {
	t.Helper()
	var mn v1alpha1.MeshNode
	if err := c.Client.Get(context.Background(), client.ObjectKey{Name: node}, &mn); err != nil {
		t.Fatal(err)
	}
	if mn.Spec.WireGuard == nil {
		t.Fatalf("%s has no WireGuard spec", node)
	}
	return mn.Spec.WireGuard.PublicKey
}

// deviceState reads a node's WireGuard peers (public keys) through wgctrl and its tunnel
// routes through netlink, both inside the node's namespace: the kernel's (or device's) own view, not the agent's report.
func deviceState(t *testing.T, n *cluster.Node) (peers []string, routes []netip.Prefix) {
	t.Helper()
	peers, routes, err := tryDeviceState(n)
	if err != nil {
		t.Fatal(err)
	}
	return peers, routes
}

// tryDeviceState is deviceState for polling: a device that is not there (yet) is an error.
func tryDeviceState(n *cluster.Node) (peers []string, routes []netip.Prefix, err error) {
	dev, err := n.WireGuardDevice()
	if err != nil {
		return nil, nil, err
	}
	for _, p := range dev.Peers {
		peers = append(peers, p.PublicKey.String())
	}
	h, err := n.NS.Handle()
	if err != nil {
		return nil, nil, err
	}
	defer h.Close()
	routes, err = datapath.NewRoutes(h).Prefixes(0)
	return peers, routes, err
}

// checkDevices verifies on every node that the device has exactly one peer per other node,
// with that node's current key and AllowedIPs exactly its pod CIDRs, and a tunnel route per
// remote pod CIDR.
func checkDevices(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	nodes := c.Nodes()
	for _, n := range nodes {
		dev, err := n.WireGuardDevice()
		if err != nil {
			t.Fatal(err)
		}
		byKey := map[string][]netip.Prefix{}
		for _, p := range dev.Peers {
			for _, a := range p.AllowedIPs {
				pr, _ := netip.AddrFromSlice(a.IP)
				ones, _ := a.Mask.Size()
				byKey[p.PublicKey.String()] = append(byKey[p.PublicKey.String()], netip.PrefixFrom(pr.Unmap(), ones))
			}
		}
		if len(dev.Peers) != len(nodes)-1 {
			t.Errorf("%s: %d peers, want %d", n.Name, len(dev.Peers), len(nodes)-1)
		}
		_, routes := deviceState(t, n)
		for _, o := range nodes {
			if o == n {
				continue
			}
			got := byKey[publicKey(t, c, o.Name)]
			want := slices.Clone(o.PodCIDRs)
			sortPrefixes(got)
			sortPrefixes(want)
			if !slices.Equal(got, want) {
				t.Errorf("%s: peer %s AllowedIPs %v, want exactly its pod CIDRs %v", n.Name, o.Name, got, want)
			}
			for _, p := range o.PodCIDRs {
				if !slices.Contains(routes, p) {
					t.Errorf("%s: no tunnel route for %s (%s)", n.Name, p, o.Name)
				}
			}
		}
	}
}

// findDevicePID finds the userspace device process serving iface.
func findDevicePID(iface string) (int, bool) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if slices.Contains(args, "wireguard-device") && slices.Contains(args, iface) {
			return pid, true
		}
	}
	return 0, false
}

func devicePID(t *testing.T, iface string) int {
	t.Helper()
	pid, ok := findDevicePID(iface)
	if !ok {
		t.Fatalf("no userspace device process for %s", iface)
	}
	return pid
}

func sortPrefixes(ps []netip.Prefix) {
	slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
}
