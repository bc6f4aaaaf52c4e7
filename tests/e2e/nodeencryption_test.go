package e2e

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/datapath"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// hostOf is a node's own namespace seen as a pod: its underlay addresses, where host-network
// processes (kubelet, hostNetwork pods) listen and send from.
func hostOf(n *cluster.Node) *netenv.Pod {
	return &netenv.Pod{Name: n.Name + "-host", Node: n.Node, NS: n.NS, IPv4: n.UnderlayV4, IPv6: n.UnderlayV6}
}

// exchangeHosts makes the two nodes' host namespaces exchange marker both ways over TCP and
// UDP, on every underlay address family; it returns the number of exchanges.
func exchangeHosts(t *testing.T, a, b *cluster.Node, marker []byte) int {
	t.Helper()
	return exchangePairs(t, [][2]*netenv.Pod{{hostOf(a), hostOf(b)}, {hostOf(b), hostOf(a)}}, 7400, marker)
}

// TestNodeEncryption: with node encryption on, traffic between the nodes' own addresses is
// encrypted too (the marker never crosses the underlay in clear; positive control: it does
// with node encryption off), except to a node that opts out by label (control-plane by
// default), whose host traffic stays in clear by configuration. Switching it on and off
// keeps a host-to-host TCP connection and loses no packet of a UDP stream, and status
// reports every pair's host traffic.
func TestNodeEncryption(t *testing.T) {
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	ctx := context.Background()
	var nodes []*cluster.Node
	for i := 1; i <= 3; i++ {
		n, err := c.AddNode(ctx, fmt.Sprintf("n%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.AddPod(ctx, n, fmt.Sprintf("n%d-p1", i)); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	// n3 is a control-plane node: the default opt-out selector keeps its host traffic in clear.
	var k8sNode corev1.Node
	if err := c.Client.Get(ctx, client.ObjectKey{Name: "n3"}, &k8sNode); err != nil {
		t.Fatal(err)
	}
	patch := client.MergeFrom(k8sNode.DeepCopy())
	if k8sNode.Labels == nil {
		k8sNode.Labels = map[string]string{}
	}
	k8sNode.Labels["node-role.kubernetes.io/control-plane"] = ""
	if err := c.Client.Patch(ctx, &k8sNode, patch); err != nil {
		t.Fatal(err)
	}
	cli := func(args ...string) string {
		t.Helper()
		out, err := c.Run(ctx, "meshcrypt", args...)
		if err != nil {
			t.Fatalf("meshcrypt %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	cli("encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m")

	t.Run("without node encryption host traffic is in clear (positive control)", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeHosts(t, n1, n2, m)
		if got := cp.Count(m); got < n {
			t.Fatalf("marker in %d underlay frames after %d clear host exchanges: the capture cannot see host traffic", got, n)
		}
		t.Logf("%d host exchanges n1<->n2, marker in %d underlay frames", n, cp.Count(m))
	})

	// Long-lived host-to-host traffic across both switches.
	tcp := startTCPSession(t, hostOf(n1), hostOf(n2), 7410)
	udp, err := cluster.StartStream(hostOf(n2), hostOf(n1), n1.UnderlayV4, 7411, []byte("host-switch"), 10*time.Millisecond, 100000)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("node encryption encrypts host traffic, the opted-out node stays in clear", func(t *testing.T) {
		time.Sleep(time.Second)
		out := cli("encryption", "enable", "--mode", "wireguard", "--node-encryption", "--wait", "--timeout", "1m")
		if !strings.Contains(out, "(node encryption)") || !strings.Contains(out, "all 3 nodes applied WireGuard") {
			t.Fatalf("enable --node-encryption --wait:\n%s", out)
		}
		t.Logf("meshcrypt encryption enable --mode wireguard --node-encryption --wait:\n%s", out)
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		announced := map[string]bool{}
		for _, mn := range mns {
			announced[mn.Name] = mn.Spec.NodeEncryption
		}
		if want := map[string]bool{"n1": true, "n2": true, "n3": false}; !maps.Equal(announced, want) {
			t.Fatalf("MeshNode spec.nodeEncryption = %v, want %v", announced, want)
		}
		for _, n := range nodes {
			dev, err := n.WireGuardDevice()
			if err != nil {
				t.Fatal(err)
			}
			if dev.FirewallMark != datapath.DefaultFirewallMark {
				t.Errorf("%s: WireGuard device fwmark %#x, want %#x (its own packets must skip the tunnel table)", n.Name, dev.FirewallMark, datapath.DefaultFirewallMark)
			}
		}
		m12, m13, mPod := newMarker(t), newMarker(t), newMarker(t)
		cp := capture(t, c, m12, m13, mPod)
		n := exchangeHosts(t, n1, n2, m12)
		nOpt := exchangeHosts(t, n1, n3, m13)
		nPods := exchangeAll(t, c, mPod)
		st := cp.Stats()
		if st.KernelDrops != 0 {
			t.Fatalf("capture lost %d frames in the kernel: cannot conclude", st.KernelDrops)
		}
		if got := cp.Count(m12); got != 0 {
			t.Fatalf("host marker n1<->n2 seen in clear in %d underlay frames with node encryption on", got)
		}
		if got := cp.Count(mPod); got != 0 {
			t.Fatalf("pod marker seen in clear in %d underlay frames", got)
		}
		if got := cp.Count(m13); got < nOpt {
			t.Fatalf("host marker n1<->n3 in %d frames after %d exchanges: the opted-out node's host traffic should stay in clear", got, nOpt)
		}
		if wg := cp.UDPFrames(wgPort); wg < n+nPods {
			t.Fatalf("%d WireGuard frames for %d encrypted exchanges", wg, n+nPods)
		}
		t.Logf("host n1<->n2: %d exchanges, marker in 0 of %d underlay frames (%d WireGuard); host n1<->n3 (opted out): marker in %d frames; pods: %d exchanges, marker in 0",
			n, st.Frames, cp.UDPFrames(wgPort), cp.Count(m13), nPods)

		out, err = c.Run(ctx, "meshcrypt", "status")
		if err != nil {
			t.Fatalf("meshcrypt status: %v\n%s", err, out)
		}
		for _, want := range []string{
			"compliant: all 3 node pairs encrypted (WireGuard, node encryption); host traffic encrypted on 1, in clear by opt-out on 2",
			"HOST TRAFFIC", "clear (opt-out)",
		} {
			if !strings.Contains(out, want) {
				t.Fatalf("meshcrypt status lacks %q:\n%s", want, out)
			}
		}
		t.Logf("meshcrypt status:\n%s", out)

		// The agents' own proof: verify --host probes between the underlay addresses.
		out, code, mv := runVerify(ctx, t, c, "--from", "n1", "--to", "n2", "--host")
		if code != 0 || !strings.Contains(out, "verified: all 1 node pair(s)' host traffic encrypted (WireGuard, ChaCha20-Poly1305)") {
			t.Fatalf("verify --host n1 -> n2: exit %d\n%s", code, out)
		}
		checkVerification(t, mv, v1alpha1.VerdictEncrypted, v1alpha1.ModeWireGuard, "ChaCha20-Poly1305")
		out, code, mv = runVerify(ctx, t, c, "--from", "n1", "--to", "n3", "--host")
		if code != 1 || !strings.Contains(out, "PLAINTEXT SEEN: 0 of 1 node pair(s)' host traffic encrypted") {
			t.Fatalf("verify --host n1 -> n3 (opted out): exit %d, want 1 with the marker seen\n%s", code, out)
		}
		checkVerification(t, mv, v1alpha1.VerdictPlaintextSeen, v1alpha1.ModeWireGuard, "ChaCha20-Poly1305")
		t.Logf("meshcrypt verify --host: n1->n2 encrypted, n1->n3 (opted out) plaintext seen, as configured")
	})

	t.Run("node encryption off: host traffic in clear again", func(t *testing.T) {
		time.Sleep(time.Second)
		cli("encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m")
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeHosts(t, n1, n2, m)
		if got := cp.Count(m); got < n {
			t.Fatalf("marker in %d underlay frames after %d host exchanges with node encryption off", got, n)
		}
	})

	time.Sleep(time.Second)
	rounds, err := tcp.Stop()
	if err != nil {
		t.Fatalf("host TCP connection broke after %d round trips across node encryption on and off: %v", rounds, err)
	}
	sent, received, lost := udp.Stop(time.Second)
	t.Logf("across node encryption on and off: host TCP %d round trips without error, host UDP %d sent %d received %d lost", rounds, sent, received, len(lost))
	// Routes and AllowedIPs change without a gap (no reset above; 0 lost in most runs). When
	// both nodes start routing into the tunnel at once and no session exists yet, their
	// simultaneous first handshakes can leave one direction waiting for WireGuard's handshake
	// retry (REKEY_TIMEOUT, 5 s): at most that long a stall, never a packet in clear.
	const retry = 600 // 6 s of the 10 ms stream
	if len(lost) > retry {
		t.Fatalf("host UDP stream lost %d of %d packets across node encryption on and off (first %v): more than one handshake retry", len(lost), sent, lost[:min(len(lost), 10)])
	}
	if len(lost) > 0 && lost[len(lost)-1]-lost[0] > retry {
		t.Fatalf("host UDP losses spread over %d packets (%v ... %v): more than one stall", lost[len(lost)-1]-lost[0], lost[0], lost[len(lost)-1])
	}
}
