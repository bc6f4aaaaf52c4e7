package e2e

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// meshCLI runs the CLI with the merged kubeconfig of both clusters (contexts a and b).
func meshCLI(ctx context.Context, c *cluster.Cluster, kubeconfig string, args ...string) (string, int, error) {
	cmd := exec.CommandContext(ctx, c.Bin("meshcrypt"), append([]string{"--kubeconfig", kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode(), nil
	}
	return string(out), 0, err
}

// remoteView returns, for every node of c, its MeshNode's view of remote cluster name
// (nil: none).
func remoteView(ctx context.Context, t *testing.T, c *cluster.Cluster, name string) map[string]*v1alpha1.RemoteClusterStatus {
	t.Helper()
	mns, err := c.MeshNodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*v1alpha1.RemoteClusterStatus{}
	for _, mn := range mns {
		out[mn.Name] = nil
		for i := range mn.Status.RemoteClusters {
			if r := &mn.Status.RemoteClusters[i]; r.Name == name {
				out[mn.Name] = r
			}
		}
	}
	return out
}

// waitRemote waits until every node of c sees remote cluster name as ok says.
func waitRemote(ctx context.Context, t *testing.T, c *cluster.Cluster, name, what string, timeout time.Duration, ok func(*v1alpha1.RemoteClusterStatus) bool) time.Duration {
	t.Helper()
	start := time.Now()
	waitFor(t, fmt.Sprintf("every node of %s: remote %s %s", c.Name(), name, what), timeout, func() string {
		for node, r := range remoteView(ctx, t, c, name) {
			if !ok(r) {
				return fmt.Sprintf("node %s sees %+v", node, r)
			}
		}
		return ""
	})
	return time.Since(start)
}

// devicePeers returns the public keys configured on a node's WireGuard device.
func devicePeers(t *testing.T, n *cluster.Node) []string {
	t.Helper()
	dev, err := n.WireGuardDevice()
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, p := range dev.Peers {
		keys = append(keys, p.PublicKey.String())
	}
	return keys
}

// TestClusterMesh joins two clusters (two API servers and etcds, two nodes each, on one
// underlay) with meshcrypt clustermesh connect, and walks the list: every
// cross-cluster pod pair talks, encrypted (the marker in clear with encryption off, never with
// it on); a policy in a denying a workload of b by its labels and cluster drops it before the
// tunnel; b's API server stopped for 30 s leaves traffic flowing; a key rotated in b is picked
// up by a; a remote node announcing an overlapping pod CIDR is refused alone; disconnect
// removes the remote.
func TestClusterMesh(t *testing.T) {
	ctx := context.Background()
	cs := cluster.StartMeshT(t,
		cluster.Options{Name: "a", ClusterID: 1, Backend: string(wgBackend)},
		cluster.Options{Name: "b", ClusterID: 2, Backend: string(wgBackend)})
	a, b := cs[0], cs[1]
	pods := map[string]*netenv.Pod{}
	for _, p := range []struct {
		c          *cluster.Cluster
		node, name string
		app        string
	}{{a, "a1", "a1-client", "client"}, {a, "a2", "a2-web", "web"}, {b, "b1", "b1-web", "web"}, {b, "b2", "b2-db", "db"}} {
		n := p.c.Node(p.node)
		if n == nil {
			var err error
			if n, err = p.c.AddNode(ctx, p.node); err != nil {
				t.Fatal(err)
			}
		}
		pod, err := p.c.AddPodLabels(ctx, n, p.name, map[string]string{"app": p.app})
		if err != nil {
			t.Fatal(err)
		}
		pods[p.name] = pod
	}
	for _, c := range cs {
		if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil { // writes spec.cluster
			t.Fatal(err)
		}
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	var cross [][2]*netenv.Pod
	for _, x := range []string{"a1-client", "a2-web"} {
		for _, y := range []string{"b1-web", "b2-db"} {
			cross = append(cross, [2]*netenv.Pod{pods[x], pods[y]}, [2]*netenv.Pod{pods[y], pods[x]})
		}
	}
	exchangeCross := func(t *testing.T, marker []byte) int {
		t.Helper()
		n := 0
		for _, pr := range cross {
			for _, dst := range pr[1].Addrs() {
				for _, proto := range []string{"tcp", "udp"} {
					payload := append(slices.Clone(marker), fmt.Sprintf(" %s %s->%s", proto, pr[0].Name, dst)...)
					if err := cluster.Exchange(ctx, proto, pr[0], dst, pr[1], 7000, payload, 20*time.Second); err != nil {
						t.Fatalf("exchange %s -> %s: %v", pr[0].Name, dst, err)
					}
					n++
				}
			}
		}
		return n
	}

	t.Run("disabled: cross-cluster traffic in clear (positive control)", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, a, m)
		n := exchangeCross(t, m)
		if got := cp.Count(m); got < n {
			t.Fatalf("marker in %d underlay frames after %d clear exchanges between the clusters", got, n)
		}
	})

	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cluster.MergedKubeconfig(kc, a, b); err != nil {
		t.Fatal(err)
	}
	out, code, err := meshCLI(ctx, a, kc, "--context", "a", "clustermesh", "connect", "--to-context", "b",
		"--remote-api-server", b.APIServerURLFor(a), "--local-api-server", a.APIServerURLFor(b))
	if err != nil || code != 0 {
		t.Fatalf("clustermesh connect: exit %d, %v:\n%s", code, err, out)
	}
	t.Logf("meshcrypt clustermesh connect:\n%s", out)
	start := time.Now()
	for _, c := range cs {
		if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
			t.Fatal(err)
		}
	}
	connected := func(r *v1alpha1.RemoteClusterStatus) bool {
		return r != nil && r.State == v1alpha1.RemoteConnected && r.Nodes == 2 && r.PeersReady == 2 && r.Identities >= 2
	}
	waitRemote(ctx, t, a, "b", "connected, 2 nodes configured", 2*time.Minute, connected)
	waitRemote(ctx, t, b, "a", "connected, 2 nodes configured", 2*time.Minute, connected)
	t.Logf("both clusters connected, every remote node configured on every node %s after enabling WireGuard", time.Since(start).Round(time.Millisecond))

	t.Run("wireguard: every cross-cluster pair encrypted", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, a, m)
		n := exchangeCross(t, m)
		st := cp.Stats()
		if st.KernelDrops != 0 || cp.Count(m) != 0 {
			t.Fatalf("marker in %d underlay frames (kernel drops %d) with WireGuard between the clusters", cp.Count(m), st.KernelDrops)
		}
		if w := cp.UDPFrames(wgPort); w < n {
			t.Fatalf("only %d WireGuard frames for %d exchanges", w, n)
		}
		t.Logf("%d cross-cluster exchanges: marker in 0 of %d underlay frames, %d WireGuard frames", n, st.Frames, cp.UDPFrames(wgPort))
		out, code, err := meshCLI(ctx, a, kc, "--context", "a", "clustermesh", "status")
		if err != nil || code != 0 {
			t.Errorf("clustermesh status: exit %d, %v:\n%s", code, err, out)
		}
		t.Logf("meshcrypt clustermesh status:\n%s", out)
	})

	t.Run("policy in a denies a workload of b before the tunnel", func(t *testing.T) {
		m := newMarker(t)
		client, web, db := pods["a1-client"], pods["b1-web"], pods["b2-db"]
		if !reaches(client, db, 7100, m, 5*time.Second) {
			t.Fatal("client cannot reach b's db before any policy")
		}
		pol := &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "client-to-b-web"},
			Spec: v1alpha1.MeshPolicySpec{
				EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
				Egress: []v1alpha1.PolicyRule{{Peers: []v1alpha1.PolicyPeer{{PodSelector: &metav1.LabelSelector{
					MatchLabels: map[string]string{"app": "web", "meshcrypt.io/cluster": "b"}}}}}},
			},
		}
		if err := a.Client.Create(ctx, pol); err != nil {
			t.Fatal(err)
		}
		eventually(t, "a's client denied to b's db", func() bool { return !reaches(client, db, 7100, m, time.Second) })
		if !reaches(client, web, 7100, m, 5*time.Second) {
			t.Fatal("a's client cannot reach b's web, which the policy allows by label and cluster")
		}
		b2, err := b.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var dbKey string
		for _, mn := range b2 {
			if mn.Name == "b2" {
				dbKey = mn.Spec.WireGuard.PublicKey
			}
		}
		dropsBefore, txBefore := droppedByPolicy(t, a, "a1"), wgTxTo(t, a.Node("a1"), dbKey)
		for range 5 {
			if reaches(client, db, 7100, m, 300*time.Millisecond) {
				t.Fatal("a's client reached b's db through the policy")
			}
		}
		if d := droppedByPolicy(t, a, "a1") - dropsBefore; d < 5 {
			t.Errorf("a1 counted %d policy drops for 5 denied datagrams", d)
		}
		if tx := wgTxTo(t, a.Node("a1"), dbKey) - txBefore; tx > 512 {
			t.Errorf("%d bytes went into the tunnel to b2 while the policy dropped the datagrams", tx)
		}
		if err := a.Client.Delete(ctx, pol); err != nil {
			t.Fatal(err)
		}
		eventually(t, "policy gone: a's client reaches b's db", func() bool { return reaches(client, db, 7100, m, time.Second) })
	})

	t.Run("b's API server away for 30s: traffic keeps flowing", func(t *testing.T) {
		before := map[string][]string{}
		for _, n := range a.Nodes() {
			before[n.Name] = devicePeers(t, n)
		}
		if err := b.CP.StopAPIServer(); err != nil {
			t.Fatal(err)
		}
		restarted := false
		defer func() {
			if !restarted {
				_ = b.CP.StartAPIServer(ctx)
			}
		}()
		waitRemote(ctx, t, a, "b", "unreachable", time.Minute, func(r *v1alpha1.RemoteClusterStatus) bool {
			return r != nil && r.State == v1alpha1.RemoteUnreachable && r.Nodes == 2 && r.PeersReady == 2
		})
		m := newMarker(t)
		deadline := time.Now().Add(30 * time.Second)
		rounds := 0
		for time.Now().Before(deadline) {
			for _, pr := range [][2]string{{"a1-client", "b1-web"}, {"b2-db", "a2-web"}} {
				if err := cluster.Exchange(ctx, "udp", pods[pr[0]], pods[pr[1]].IPv4, pods[pr[1]], 7000, m, 5*time.Second); err != nil {
					t.Fatalf("round %d with b's API server down: %s -> %s: %v", rounds, pr[0], pr[1], err)
				}
			}
			rounds++
			time.Sleep(time.Second)
		}
		for _, n := range a.Nodes() {
			if got := devicePeers(t, n); !slices.Equal(slices.Sorted(slices.Values(got)), slices.Sorted(slices.Values(before[n.Name]))) {
				t.Errorf("node %s's peers changed while b was unreachable: %v -> %v", n.Name, before[n.Name], got)
			}
		}
		t.Logf("%d rounds of cross-cluster exchanges in 30 s with b's API server stopped, peers unchanged", rounds)
		if err := b.CP.StartAPIServer(ctx); err != nil {
			t.Fatal(err)
		}
		restarted = true
		d := waitRemote(ctx, t, a, "b", "connected again", 2*time.Minute, connected)
		t.Logf("b's API server back: connected again on every node of a after %s", d.Round(time.Millisecond))
	})

	t.Run("a key rotated in b is picked up by a", func(t *testing.T) {
		mnKey := func() string {
			var mn v1alpha1.MeshNode
			if err := b.Client.Get(ctx, client.ObjectKey{Name: "b1"}, &mn); err != nil {
				t.Fatal(err)
			}
			return mn.Spec.WireGuard.PublicKey
		}
		old := mnKey()
		out, code, err := meshCLI(ctx, b, kc, "--context", "b", "keys", "rotate", "--node", "b1", "--wait", "--timeout", "1m")
		if err != nil || code != 0 {
			t.Fatalf("keys rotate in b: exit %d, %v:\n%s", code, err, out)
		}
		nk := mnKey()
		if nk == old {
			t.Fatal("b1's key did not change")
		}
		start := time.Now()
		waitFor(t, "every node of a configured with b1's new key", time.Minute, func() string {
			for _, n := range a.Nodes() {
				if ps := devicePeers(t, n); !slices.Contains(ps, nk) || slices.Contains(ps, old) {
					return fmt.Sprintf("node %s has %v", n.Name, ps)
				}
			}
			return ""
		})
		t.Logf("b1's new key configured on every node of a %s after rotate --wait returned", time.Since(start).Round(time.Millisecond))
		if err := cluster.Exchange(ctx, "tcp", pods["a2-web"], pods["b1-web"].IPv4, pods["b1-web"], 7000, newMarker(t), 20*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a remote node overlapping a's pod CIDR is refused alone", func(t *testing.T) {
		a2, err := a.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var a2CIDR v1alpha1.CIDR
		for _, mn := range a2 {
			if mn.Name == "a2" {
				a2CIDR = mn.Spec.PodCIDRs[0]
			}
		}
		k, _ := wgtypes.GeneratePrivateKey()
		rogue := &v1alpha1.MeshNode{
			ObjectMeta: metav1.ObjectMeta{Name: "b9"},
			Spec: v1alpha1.MeshNodeSpec{UnderlayIPs: []v1alpha1.IP{"10.77.0.250"}, PodCIDRs: []v1alpha1.CIDR{a2CIDR},
				WireGuard: &v1alpha1.WireGuardSpec{PublicKey: k.PublicKey().String(), ListenPort: 51871}},
		}
		if err := b.Client.Create(ctx, rogue); err != nil {
			t.Fatal(err)
		}
		waitRemote(ctx, t, a, "b", "refused for b9", time.Minute, func(r *v1alpha1.RemoteClusterStatus) bool {
			return r != nil && r.State == v1alpha1.RemoteRefused && r.NodesRefused == 1 && strings.Contains(r.Message, "b/b9: pod CIDR conflict: "+string(a2CIDR)+" overlaps")
		})
		for _, n := range a.Nodes() {
			if slices.Contains(devicePeers(t, n), k.PublicKey().String()) {
				t.Errorf("node %s configured the rogue node b9", n.Name)
			}
		}
		for _, pr := range [][2]string{{"a1-client", "a2-web"}, {"a1-client", "b1-web"}} {
			if err := cluster.Exchange(ctx, "udp", pods[pr[0]], pods[pr[1]].IPv4, pods[pr[1]], 7000, newMarker(t), 10*time.Second); err != nil {
				t.Errorf("%s -> %s with the rogue node announced: %v", pr[0], pr[1], err)
			}
		}
		if err := b.Client.Delete(ctx, rogue); err != nil {
			t.Fatal(err)
		}
		waitRemote(ctx, t, a, "b", "connected again", time.Minute, connected)
	})

	t.Run("a new node in b is reachable from every node of a", func(t *testing.T) {
		start := time.Now()
		n, err := b.AddNode(ctx, "b3")
		if err != nil {
			t.Fatal(err)
		}
		pod, err := b.AddPodLabels(ctx, n, "b3-web", map[string]string{"app": "web"})
		if err != nil {
			t.Fatal(err)
		}
		var key string
		waitFor(t, "b3's MeshNode", time.Minute, func() string {
			var mn v1alpha1.MeshNode
			if err := b.Client.Get(ctx, client.ObjectKey{Name: "b3"}, &mn); err != nil || mn.Spec.WireGuard == nil {
				return fmt.Sprint(err)
			}
			key = mn.Spec.WireGuard.PublicKey
			return ""
		})
		waitFor(t, "every node of a configured with b3", time.Minute, func() string {
			for _, n := range a.Nodes() {
				if !slices.Contains(devicePeers(t, n), key) {
					return "node " + n.Name + " has not configured b3"
				}
			}
			return ""
		})
		configured := time.Since(start)
		for _, from := range []string{"a1-client", "a2-web"} {
			if err := cluster.Exchange(ctx, "udp", pods[from], pod.IPv4, pod, 7000, newMarker(t), 20*time.Second); err != nil {
				t.Fatalf("%s -> b3-web: %v", from, err)
			}
		}
		t.Logf("new node b3: configured on every node of a %s after AddNode began (namespace, Node object, agent start), pods talking %s after",
			configured.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	})

	t.Run("disconnect removes the remote", func(t *testing.T) {
		out, code, err := meshCLI(ctx, a, kc, "--context", "a", "clustermesh", "disconnect", "--to-context", "b")
		if err != nil || code != 0 {
			t.Fatalf("clustermesh disconnect: exit %d, %v:\n%s", code, err, out)
		}
		waitRemote(ctx, t, a, "b", "gone", time.Minute, func(r *v1alpha1.RemoteClusterStatus) bool { return r == nil })
		waitFor(t, "a's devices without b's nodes", time.Minute, func() string {
			for _, n := range a.Nodes() {
				if ps := devicePeers(t, n); len(ps) != 1 {
					return fmt.Sprintf("node %s has %d peers", n.Name, len(ps))
				}
			}
			return ""
		})
	})
}
