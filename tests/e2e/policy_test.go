package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// reaches reports whether a UDP datagram from one pod to another's port arrives within d.
func reaches(from, to *netenv.Pod, port int, payload []byte, d time.Duration) bool {
	return cluster.Exchange(context.Background(), "udp", from, to.IPv4, to, port, payload, d) == nil
}

// eventually polls cond until it holds, logging how long the change took to take effect.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, 45*time.Second, true,
		func(context.Context) (bool, error) { return cond(), nil })
	if err != nil {
		t.Fatalf("%s: not within 45s", what)
	}
	t.Logf("%s: took effect after %s", what, time.Since(start).Round(time.Millisecond))
}

// wgTxTo returns how many bytes node's WireGuard device has sent to peerKey.
func wgTxTo(t *testing.T, n *cluster.Node, peerKey string) int64 {
	t.Helper()
	dev, err := n.WireGuardDevice()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range dev.Peers {
		if p.PublicKey.String() == peerKey {
			return p.TransmitBytes
		}
	}
	t.Fatalf("%s has no peer %s", n.Name, peerKey)
	return 0
}

// reasonCount reads one reason's packet count from node's pinned metrics map, summed over CPUs.
func reasonCount(t *testing.T, c *cluster.Cluster, node string, reason uint32) uint64 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(c.BPFPinDir(node), "metrics"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var perCPU []struct{ Packets, Bytes uint64 }
	if err := m.Lookup(reason, &perCPU); err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, v := range perCPU {
		sum += v.Packets
	}
	return sum
}

// droppedByPolicy is the number of packets node's classifier denied by egress or ingress
// policy (reasons DENIED_EGRESS and DENIED_INGRESS of docs/datapath.md).
func droppedByPolicy(t *testing.T, c *cluster.Cluster, node string) uint64 {
	t.Helper()
	return reasonCount(t, c, node, 1) + reasonCount(t, c, node, 2)
}

func TestPolicy(t *testing.T) {
	for _, mode := range []string{"auto", "tc"} {
		t.Run("attach="+mode, func(t *testing.T) { testPolicy(t, mode) })
	}
}

// testPolicy: identities from labels, a MeshPolicy allowing only web -> db on one port,
// enforced before the tunnel on the sending node (nothing of a denied flow reaches the
// WireGuard device or the wire), allowed traffic still encrypted, and changes (policy
// removed, pod relabelled) taking effect.
func testPolicy(t *testing.T, attach string) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend), AgentArgs: []string{"--attach-mode", attach}})
	ctx := context.Background()
	n1, err := c.AddNode(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	n2, err := c.AddNode(ctx, "n2")
	if err != nil {
		t.Fatal(err)
	}
	web, err := c.AddPodLabels(ctx, n1, "web", map[string]string{"app": "web", "pod-template-hash": "abc123"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := c.AddPodLabels(ctx, n1, "other", map[string]string{"app": "other"})
	if err != nil {
		t.Fatal(err)
	}
	db, err := c.AddPodLabels(ctx, n2, "db", map[string]string{"app": "db"})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m"); err != nil {
		t.Fatal(err, out)
	}
	wantAttach := map[string]string{"auto": autoAttach, "tc": "tc"}[attach]
	eventually(t, "classifier attached and reported as "+wantAttach, func() bool {
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			return false
		}
		for _, mn := range mns {
			if mn.Status.AttachMode != wantAttach {
				return false
			}
		}
		return true
	})
	// Identities: one per distinct label set (pod-template-hash is churn and ignored).
	var ids v1alpha1.MeshIdentityList
	eventually(t, "identities allocated for web, other, db", func() bool {
		return c.Client.List(ctx, &ids) == nil && len(ids.Items) == 3
	})
	for _, id := range ids.Items {
		if _, ok := id.Spec.Labels["pod-template-hash"]; ok {
			t.Errorf("identity %s keeps the churn label pod-template-hash", id.Name)
		}
	}

	m := newMarker(t)
	if !reaches(other, db, 7100, m, 20*time.Second) || !reaches(web, db, 7100, m, 20*time.Second) {
		t.Fatal("no policy yet, but traffic does not flow")
	}

	policy := &v1alpha1.MeshPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "db"},
		Spec: v1alpha1.MeshPolicySpec{
			EndpointSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
			Ingress: []v1alpha1.PolicyRule{{
				Peers: []v1alpha1.PolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}},
				Ports: []v1alpha1.PolicyPort{{Protocol: v1alpha1.ProtocolUDP, Port: ptr(int32(7100))}},
			}},
		},
	}
	if err := c.Client.Create(ctx, policy); err != nil {
		t.Fatal(err)
	}
	eventually(t, "policy added: other -> db denied", func() bool { return !reaches(other, db, 7100, m, time.Second) })

	t.Run("the CLI explains the verdicts", func(t *testing.T) {
		out, err := c.Run(ctx, "meshcrypt", "policy", "check", "--from", "default/web", "--to", "default/db", "--port", "7100/UDP")
		if err != nil || !strings.HasPrefix(out, "ALLOWED") || !strings.Contains(out, "ingress of default/db: allowed by default/db ingress[0]") {
			t.Errorf("policy check web -> db: err %v\n%s", err, out)
		}
		out, err = c.Run(ctx, "meshcrypt", "policy", "check", "--from", "default/other", "--to", "default/db", "--port", "7100/UDP")
		if err == nil || !strings.HasPrefix(out, "DENIED") || !strings.Contains(out, "default-deny (selected by default/db)") {
			t.Errorf("policy check other -> db: want exit 1 and DENIED by default-deny; err %v\n%s", err, out)
		}
		t.Logf("meshcrypt policy check --from default/other --to default/db --port 7100/UDP:\n%s", out)
		out, err = c.Run(ctx, "meshcrypt", "identities")
		if err != nil || !strings.Contains(out, "app=web") || !strings.Contains(out, "meshcrypt.io/namespace=default") {
			t.Errorf("identities: err %v\n%s", err, out)
		}
	})

	t.Run("allowed flow passes and stays encrypted", func(t *testing.T) {
		cp := capture(t, c, m)
		if !reaches(web, db, 7100, m, 10*time.Second) {
			t.Fatal("web -> db:7100/UDP denied")
		}
		if cp.Count(m) != 0 {
			t.Fatalf("allowed flow seen in clear %d times", cp.Count(m))
		}
		if cp.UDPFrames(wgPort) == 0 {
			t.Fatal("allowed flow did not cross as WireGuard")
		}
	})

	t.Run("denied flows never leave the node", func(t *testing.T) {
		n2Key := publicKey(t, c, "n2")
		time.Sleep(500 * time.Millisecond)
		txBefore := wgTxTo(t, n1, n2Key)
		dropsBefore := droppedByPolicy(t, c, "n1")
		cp := capture(t, c, m)
		// other is not web; web on another port is not allowed either.
		if reaches(other, db, 7100, m, 2*time.Second) {
			t.Error("other -> db:7100 arrived")
		}
		if reaches(web, db, 7101, m, 2*time.Second) {
			t.Error("web -> db:7101 arrived (the rule names port 7100)")
		}
		if txAfter := wgTxTo(t, n1, n2Key); txAfter != txBefore {
			t.Errorf("n1's WireGuard device sent %d bytes to n2 during denied flows: they entered the tunnel", txAfter-txBefore)
		}
		if got := cp.UDPFrames(wgPort); got != 0 {
			t.Errorf("%d WireGuard frames on the underlay during denied flows", got)
		}
		if cp.Count(m) != 0 {
			t.Errorf("denied marker on the underlay %d times", cp.Count(m))
		}
		if drops := droppedByPolicy(t, c, "n1") - dropsBefore; drops < 10 {
			t.Errorf("n1's classifier counted %d policy drops, want the denied packets (>= 10)", drops)
		}
	})

	t.Run("the agent's metrics move with traffic", func(t *testing.T) {
		checkMetrics(t, n1, func() { reaches(other, db, 7100, m, time.Second) })
	})

	t.Run("encryption Required drops instead of sending in clear", func(t *testing.T) {
		var pol v1alpha1.MeshPolicy
		if err := c.Client.Get(ctx, client.ObjectKeyFromObject(policy), &pol); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(pol.DeepCopy())
		pol.Spec.Encryption = v1alpha1.EncryptionRequired
		if err := c.Client.Patch(ctx, &pol, patch); err != nil {
			t.Fatal(err)
		}
		// The capture runs across the switch: not one packet of the flow may be in clear.
		m2 := newMarker(t)
		cp := capture(t, c, m2)
		if !reaches(web, db, 7100, m2, 10*time.Second) {
			t.Fatal("web -> db denied while encryption is on")
		}
		before := reasonCount(t, c, "n1", 3) // DROP_NOT_ENCRYPTED
		stream, err := cluster.StartStream(web, db, db.IPv4, 7100, m2, 5*time.Millisecond, 2000)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := c.Run(ctx, "meshcrypt", "encryption", "disable", "--wait", "--timeout", "1m"); err != nil {
			t.Fatal(err, out)
		}
		time.Sleep(time.Second)
		sent, received, _ := stream.Stop(300 * time.Millisecond)
		if reaches(web, db, 7100, m2, 2*time.Second) {
			t.Error("web -> db arrived with encryption off, under a Required policy")
		}
		if got := cp.Count(m2); got != 0 {
			t.Fatalf("Required traffic seen in clear %d times across the switch to Disabled", got)
		}
		drops := reasonCount(t, c, "n1", 3) - before
		if drops == 0 {
			t.Error("no DROP_NOT_ENCRYPTED counted on n1")
		}
		t.Logf("stream across the switch: sent %d, received %d; n1 dropped %d packets as not encryptable; 0 in clear", sent, received, drops)
		if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m"); err != nil {
			t.Fatal(err, out)
		}
		eventually(t, "encryption back on: Required flow passes again", func() bool { return reaches(web, db, 7100, m2, time.Second) })
		if got := cp.Count(m2); got != 0 {
			t.Fatalf("Required traffic seen in clear %d times", got)
		}
	})

	t.Run("a relabelled pod gets its new identity and policy", func(t *testing.T) {
		var pod corev1.Pod
		if err := c.Client.Get(ctx, client.ObjectKey{Namespace: "default", Name: "other"}, &pod); err != nil {
			t.Fatal(err)
		}
		patch := client.MergeFrom(pod.DeepCopy())
		pod.Labels["app"] = "web"
		if err := c.Client.Patch(ctx, &pod, patch); err != nil {
			t.Fatal(err)
		}
		eventually(t, "other relabelled app=web: allowed", func() bool { return reaches(other, db, 7100, m, time.Second) })
		if err := c.Client.Patch(ctx, &pod, client.RawPatch("application/merge-patch+json", []byte(`{"metadata":{"labels":{"app":"other"}}}`))); err != nil {
			t.Fatal(err)
		}
		eventually(t, "other relabelled back: denied", func() bool { return !reaches(other, db, 7100, m, time.Second) })
	})

	t.Run("removing the policy reopens", func(t *testing.T) {
		if err := c.Client.Delete(ctx, policy); err != nil {
			t.Fatal(err)
		}
		eventually(t, "policy removed: other -> db allowed", func() bool { return reaches(other, db, 7100, m, time.Second) })
	})
}

func ptr[T any](v T) *T { return &v }
