package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// TestTwoClusters runs two clusters, each with its own control plane, on one underlay, in
// mode Disabled: every cross-cluster pod pair talks in clear over the underlay (host-gateway
// routes span both clusters), each node reaches the other cluster's API server at the
// address APIServerURLFor names, the agents carry their cluster's identity, the merged
// kubeconfig has a context per cluster, and closing the cluster that created the topology
// first leaves the other one working, and both together leave nothing behind.
func TestTwoClusters(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two control planes and agents")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	cs := StartMeshT(t,
		Options{Name: "a", ClusterID: 1, Backend: "userspace"},
		Options{Name: "b", ClusterID: 2, Backend: "userspace"},
	)
	a, b := cs[0], cs[1]
	if a.Net != b.Net {
		t.Fatal("the clusters do not share a topology")
	}
	pods := map[*Cluster][]*netenv.Pod{}
	for _, c := range cs {
		for _, i := range []string{"1", "2"} {
			n, err := c.AddNode(ctx, c.Name()+i)
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.AddPod(ctx, n, c.Name()+i+"-p")
			if err != nil {
				t.Fatal(err)
			}
			pods[c] = append(pods[c], p)
		}
		if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.AddNode(ctx, "a1"); err == nil || !strings.Contains(err.Error(), `cluster "a"`) {
		t.Errorf("b.AddNode(a1) = %v, want an error naming cluster a, which has a node a1", err)
	}
	for _, c := range cs {
		if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, 2*time.Minute); err != nil {
			t.Fatalf("cluster %s: %v", c.Name(), err)
		}
	}

	t.Run("unique per node", func(t *testing.T) {
		seen := map[string]string{}
		for _, c := range cs {
			for _, n := range c.Nodes() {
				for _, v := range []string{n.NS.Name, n.Iface, n.StateDir, n.Kubeconfig, n.LogPath, c.BPFPinDir(n.Name),
					n.UnderlayV4.String(), n.UnderlayV6.String(), n.PodCIDRs[0].String(), n.PodCIDRs[1].String()} {
					if o, ok := seen[v]; ok {
						t.Errorf("%s of %s/%s is also %s's", v, c.Name(), n.Name, o)
					}
					seen[v] = c.Name() + "/" + n.Name
				}
			}
		}
	})

	t.Run("identity", func(t *testing.T) {
		for _, c := range cs {
			var mc v1alpha1.MeshConfig
			if err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
				t.Fatal(err)
			}
			want := v1alpha1.ClusterSpec{Name: c.Name(), ID: int32(c.ClusterID())}
			if mc.Spec.Cluster == nil || *mc.Spec.Cluster != want {
				t.Errorf("cluster %s: MeshConfig spec.cluster = %+v, want %+v", c.Name(), mc.Spec.Cluster, want)
			}
			for _, n := range c.Nodes() {
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", n.AgentPID()))
				if err != nil {
					t.Fatal(err)
				}
				args := strings.Split(string(b), "\x00")
				for _, f := range [][2]string{{"--cluster-name", c.Name()}, {"--cluster-id", fmt.Sprint(c.ClusterID())}} {
					if i := slices.Index(args, f[0]); i < 0 || i+1 >= len(args) || args[i+1] != f[1] {
						t.Errorf("agent of %s runs with %q, want %s %s", n.Name, args, f[0], f[1])
					}
				}
			}
		}
	})

	t.Run("cross-cluster pods in clear", func(t *testing.T) {
		marker := []byte("meshcrypt-two-clusters-clear")
		cp, err := a.Net.CaptureUnderlay(netenv.CaptureOptions{Markers: [][]byte{marker}})
		if err != nil {
			t.Fatal(err)
		}
		defer cp.Stop()
		port := 7100
		for _, pair := range [][2]*Cluster{{a, b}, {b, a}} {
			for _, from := range pods[pair[0]] {
				for _, to := range pods[pair[1]] {
					for _, dst := range to.Addrs() {
						port++
						if err := Exchange(ctx, "tcp", from, dst, to, port, marker, time.Minute); err != nil {
							t.Errorf("%s -> %s (%s): %v", from.Name, to.Name, dst, err)
						}
					}
				}
			}
		}
		if err := cp.Stop(); err != nil {
			t.Fatal(err)
		}
		if !cp.Contains(marker) {
			t.Errorf("the marker never crossed the underlay in clear (%d frames): the positive control failed", cp.Frames())
		}
	})

	t.Run("API servers from every node", func(t *testing.T) {
		for _, from := range cs {
			for _, to := range cs {
				for _, n := range from.Nodes() {
					u := to.APIServerURLFor(from)
					if err := getReadyz(ctx, n, u, to.CP.CACert(), to.CP.AdminToken()); err != nil {
						t.Errorf("from %s/%s to cluster %s at %s: %v", from.Name(), n.Name, to.Name(), u, err)
					}
				}
			}
		}
		if a.APIServerURLFor(b) == b.APIServerURLFor(a) || a.APIServerURLFor(b) == a.APIServerURLFor(a) {
			t.Errorf("URLs collide: a for b %s, b for a %s, a for a %s", a.APIServerURLFor(b), b.APIServerURLFor(a), a.APIServerURLFor(a))
		}
		// The kubeconfig of a remote cluster's Secret, used from inside a node of a.
		kc, err := b.KubeconfigFor(a, b.CP.AdminToken())
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := clientcmd.RESTConfigFromKubeConfig(kc)
		if err != nil {
			t.Fatal(err)
		}
		n := a.Nodes()[0]
		cfg.Dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return n.NS.DialTCP(ctx, addr) }
		remote, err := client.New(cfg, client.Options{Scheme: scheme(t)})
		if err != nil {
			t.Fatal(err)
		}
		if got := nodeNames(t, ctx, remote); !slices.Equal(got, []string{"b1", "b2"}) {
			t.Errorf("b's Nodes from inside %s through %s: %v, want b1 b2", n.Name, cfg.Host, got)
		}
	})

	t.Run("merged kubeconfig", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "kubeconfig")
		if err := MergedKubeconfig(path, a, b); err != nil {
			t.Fatal(err)
		}
		raw, err := clientcmd.LoadFromFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if raw.CurrentContext != "a" {
			t.Errorf("current context %q, want a", raw.CurrentContext)
		}
		for _, c := range cs {
			cfg, err := clientcmd.NewNonInteractiveClientConfig(*raw, c.Name(), nil, nil).ClientConfig()
			if err != nil {
				t.Fatal(err)
			}
			cl, err := client.New(cfg, client.Options{Scheme: scheme(t)})
			if err != nil {
				t.Fatal(err)
			}
			want := []string{c.Name() + "1", c.Name() + "2"}
			if got := nodeNames(t, ctx, cl); !slices.Equal(got, want) {
				t.Errorf("context %s: Nodes %v, want %v", c.Name(), got, want)
			}
		}
		if err := MergedKubeconfig(path, a, a); err == nil {
			t.Error("MergedKubeconfig with two clusters of one name succeeded")
		}
	})

	// Close a, which created the topology, first: b keeps its nodes, pods and agents.
	prefix := a.Net.Prefix()
	leftovers := processesMatching(t, prefix, a.CP.Dir(), b.CP.Dir())
	if len(leftovers) == 0 {
		t.Fatal("no processes found to watch for leftovers")
	}
	if err := a.Close(); err != nil {
		t.Fatalf("close a: %v", err)
	}
	for _, n := range []string{"a1", "a2"} {
		if _, err := os.Stat(filepath.Join("/run/netns", prefix+"-"+n)); err == nil {
			t.Errorf("namespace of %s still there after a.Close", n)
		}
	}
	if got := processesMatching(t, a.CP.Dir()); len(got) > 0 {
		t.Errorf("a's control plane still runs: %v", got)
	}
	for _, n := range b.Nodes() {
		if done, _ := n.AgentExited(); isClosed(done) {
			t.Errorf("agent of %s exited when a closed", n.Name)
		}
		if _, err := os.Stat(wireguard.UAPISocketPath(n.Iface)); err != nil {
			t.Errorf("device of %s: %v", n.Name, err)
		}
	}
	if err := Exchange(ctx, "udp", pods[b][0], pods[b][1].IPv4, pods[b][1], 7200, []byte("after a closed"), time.Minute); err != nil {
		t.Errorf("b's pods after a closed: %v", err)
	}
	if _, err := b.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Errorf("b after a closed: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("close b: %v", err)
	}
	checkNothingLeft(t, prefix, leftovers)
}

// TestTwoClustersCloseJoinerFirst closes the cluster that joined the topology before the one
// that created it (the order of StartMeshT's cleanups): the joiner removes only its own nodes,
// the creator then everything.
func TestTwoClustersCloseJoinerFirst(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two control planes and agents")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	cs := StartMeshT(t, Options{Name: "a", ClusterID: 1, IPv4Only: true}, Options{Name: "b", ClusterID: 2})
	a, b := cs[0], cs[1]
	if !b.opts.IPv4Only {
		t.Error("b did not take the shared topology's IPv4Only")
	}
	var pods []*netenv.Pod
	for _, c := range cs {
		n, err := c.AddNode(ctx, "n"+c.Name())
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.AddPod(ctx, n, "p"+c.Name())
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	if err := Exchange(ctx, "tcp", pods[0], pods[1].IPv4, pods[1], 7300, []byte("a to b"), time.Minute); err != nil {
		t.Error(err)
	}
	prefix := a.Net.Prefix()
	leftovers := processesMatching(t, prefix, a.CP.Dir(), b.CP.Dir())
	if err := b.Close(); err != nil {
		t.Fatalf("close b: %v", err)
	}
	if _, err := os.Stat(filepath.Join("/run/netns", prefix+"-nb")); err == nil {
		t.Error("b's node namespace is still there after b.Close")
	}
	// a's node no longer has b's API server forwarded, but its own, and its pod's network.
	if err := getReadyz(ctx, a.Node("na"), a.APIServerURLFor(a), a.CP.CACert(), a.CP.AdminToken()); err != nil {
		t.Errorf("a's API server from na after b closed: %v", err)
	}
	if err := getReadyz(ctx, a.Node("na"), b.APIServerURLFor(a), b.CP.CACert(), b.CP.AdminToken()); err == nil {
		t.Error("b's API server still answers from na after b closed")
	}
	if err := pods[0].NS.Ping(ctx, a.Node("na").UnderlayV4, 100); err != nil {
		t.Errorf("a's pod after b closed: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("close a: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	checkNothingLeft(t, prefix, leftovers)
}

// getReadyz GETs url/readyz from inside node n's namespace, verifying the server's
// certificate against ca as it is (no server name override).
func getReadyz(ctx context.Context, n *Node, url string, ca []byte, token string) error {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return fmt.Errorf("bad CA")
	}
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return n.NS.DialTCP(ctx, addr) },
	}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/readyz", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	if resp.StatusCode != http.StatusOK || body.String() != "ok" {
		return fmt.Errorf("status %s: %q", resp.Status, body.String())
	}
	return nil
}

func nodeNames(t *testing.T, ctx context.Context, cl client.Client) []string {
	t.Helper()
	var l corev1.NodeList
	if err := cl.List(ctx, &l); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range l.Items {
		names = append(names, n.Name)
	}
	slices.Sort(names)
	return names
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// processesMatching returns the pids whose command line contains any of subs: the agents
// and devices (their interface names start with the topology's prefix) and control planes
// (their directories).
func processesMatching(t *testing.T, subs ...string) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		for _, s := range subs {
			if strings.Contains(cmd, s) {
				out = append(out, e.Name()+": "+cmd)
				break
			}
		}
	}
	return out
}

// checkNothingLeft checks that no namespace of prefix, no bpffs of it, and none of the
// processes listed before (still with the same command line) remain.
func checkNothingLeft(t *testing.T, prefix string, before []string) {
	t.Helper()
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			t.Errorf("namespace %s left behind", e.Name())
		}
	}
	if _, err := os.Stat(filepath.Join(BPFRoot, prefix)); err == nil {
		t.Errorf("bpffs %s left behind", filepath.Join(BPFRoot, prefix))
	}
	for _, p := range before {
		pid, cmd, _ := strings.Cut(p, ": ")
		b, err := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
		if err == nil && strings.ReplaceAll(string(b), "\x00", " ") == cmd {
			t.Errorf("process left behind: %s", p)
		}
	}
}

// TestClusterOnCallersTopology runs a cluster on a topology the test built: the cluster's
// Close (and a Start that fails on contradicting options) removes only what it added, and
// the topology stays the caller's to close.
func TestClusterOnCallersTopology(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane and an agent")
	}
	if os.Getenv(KubeconfigEnv) != "" {
		t.Skip("uses a control plane of its own")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	topo := netenv.NewT(t, netenv.Options{IPv4Only: true, PodMTU: wireguard.TunnelMTU(1500)})
	if _, err := Start(ctx, Options{Net: topo, UnderlayMTU: 9000}); err == nil || !strings.Contains(err.Error(), "MTU") {
		t.Fatalf("Start with an MTU the topology does not have: %v, want an error naming the MTU", err)
	}
	c := StartT(t, Options{Net: topo, Name: "solo"})
	n, err := c.AddNode(ctx, "n1")
	if err != nil {
		t.Fatalf("add a node after a failed Start on the same topology: %v", err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	leftovers := processesMatching(t, topo.Prefix(), c.CP.Dir())
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.NS.Path); err == nil {
		t.Error("the cluster's node namespace is still there after Close")
	}
	if _, err := os.Stat(topo.Switch().Path); err != nil {
		t.Errorf("the caller's topology went with the cluster: %v", err)
	}
	if _, err := topo.AddNode(ctx, "n1"); err != nil {
		t.Errorf("the caller's topology after the cluster closed: %v", err)
	}
	if err := topo.Close(); err != nil {
		t.Fatal(err)
	}
	checkNothingLeft(t, topo.Prefix(), leftovers)
}
