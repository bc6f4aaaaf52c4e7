package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// protoESP is the IP protocol number of ESP.
const protoESP = 50

// espSupported reports whether this kernel can install tunnel-mode ESP states with AES-GCM,
// probing for real in the test's own namespace.
func espSupported(t testing.TB) bool {
	t.Helper()
	h, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	err = ipsec.Supported(h)
	if err != nil && !errors.Is(err, ipsec.ErrNotSupported) {
		t.Fatalf("probe ESP: %v", err)
	}
	return err == nil
}

// keyLine returns a keyring line with a fresh random AES-128-GCM key.
func keyLine(t testing.TB, spi int) string {
	t.Helper()
	b := make([]byte, 20)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%d rfc4106(gcm(aes)) %s 128", spi, hex.EncodeToString(b))
}

// setKeyring writes the keyring Secret the agents read.
func setKeyring(ctx context.Context, t testing.TB, c *cluster.Cluster, lines ...string) {
	t.Helper()
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: ipsec.SecretName, Namespace: cluster.AgentNamespace}}
	data := []byte(strings.Join(lines, "\n") + "\n")
	err := c.Client.Get(ctx, client.ObjectKeyFromObject(sec), sec)
	switch {
	case apierrors.IsNotFound(err):
		sec.Data = map[string][]byte{ipsec.SecretKey: data}
		err = c.Client.Create(ctx, sec)
		t.Cleanup(func() { _ = c.Client.Delete(context.Background(), sec) })
	case err == nil:
		sec.Data = map[string][]byte{ipsec.SecretKey: data}
		err = c.Client.Update(ctx, sec)
	}
	if err != nil {
		t.Fatalf("write keyring Secret: %v", err)
	}
}

// setIPsec switches the cluster to mode IPsec (strict or not) with a rotation grace period.
func setIPsec(ctx context.Context, t testing.TB, c *cluster.Cluster, strict bool, grace time.Duration) {
	t.Helper()
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
		var mc v1alpha1.MeshConfig
		err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc)
		create := apierrors.IsNotFound(err)
		if err != nil && !create {
			return false, err
		}
		mc.Name = v1alpha1.MeshConfigName
		mc.Spec.Encryption.Mode = v1alpha1.ModeIPsec
		mc.Spec.Encryption.Strict = strict
		mc.Spec.Encryption.IPsec = &v1alpha1.IPsecConfig{RotationGracePeriod: &metav1.Duration{Duration: grace}}
		if create {
			err = c.Client.Create(ctx, &mc)
		} else {
			err = c.Client.Update(ctx, &mc)
		}
		return err == nil, nil // a conflict retries
	})
	if err != nil {
		t.Fatalf("set mode IPsec: %v", err)
	}
}

// waitMeshNodes is cluster.WaitMeshNodes that fails t, with the agents' logs, when ok does
// not hold in time.
func waitMeshNodes(ctx context.Context, t *testing.T, c *cluster.Cluster, what string, timeout time.Duration, ok func([]v1alpha1.MeshNode) string) time.Duration {
	t.Helper()
	took, err := c.WaitMeshNodes(ctx, timeout, ok)
	if err != nil {
		c.DumpLogs(t.Output(), 30)
		t.Fatalf("%s: %v", what, err)
	}
	return took
}

// ipsecConverged says what keeps the cluster's nodes from all encrypting to each other
// with keyring SPI spi and holding exactly the keys of spis ("" when nothing does).
func ipsecConverged(nodes int, spi int32, spis ...int32) func([]v1alpha1.MeshNode) string {
	return func(mns []v1alpha1.MeshNode) string {
		if len(mns) != nodes {
			return fmt.Sprintf("%d MeshNodes, want %d", len(mns), nodes)
		}
		for _, mn := range mns {
			enc := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionEncrypted)
			switch {
			case mn.Status.Mode != v1alpha1.ModeIPsec:
				return fmt.Sprintf("%s in mode %q", mn.Name, mn.Status.Mode)
			case enc == nil || enc.Status != metav1.ConditionTrue:
				return fmt.Sprintf("%s not encrypted: %+v", mn.Name, enc)
			case mn.Status.IPsec == nil || mn.Status.IPsec.OutboundSPI != spi:
				return fmt.Sprintf("%s: IPsec status %+v, want outbound SPI %d", mn.Name, mn.Status.IPsec, spi)
			case int(mn.Status.PeersReady) != nodes-1:
				return fmt.Sprintf("%s: %d peers ready, want %d", mn.Name, mn.Status.PeersReady, nodes-1)
			case mn.Spec.IPsec == nil || fmt.Sprint(mn.Spec.IPsec.SPIs) != fmt.Sprint(spis):
				return fmt.Sprintf("%s reports SPIs %v, want %v", mn.Name, mn.Spec.IPsec, spis)
			}
		}
		return ""
	}
}

// addNodesWithPods adds nodes n1..nN with one pod each (nI-p1) and returns the pods.
func addNodesWithPods(ctx context.Context, t testing.TB, c *cluster.Cluster, n int) []*netenv.Pod {
	t.Helper()
	var pods []*netenv.Pod
	for i := 1; i <= n; i++ {
		node, err := c.AddNode(ctx, fmt.Sprintf("n%d", i))
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.AddPod(ctx, node, fmt.Sprintf("n%d-p1", i))
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	return pods
}

// TestIPsecRefusedWithoutESP selects IPsec on a kernel without ESP (the build hosts'): every
// node refuses the mode with a clear condition, MeshConfig says so, and pod traffic between
// nodes stops rather than leaving in clear.
func TestIPsecRefusedWithoutESP(t *testing.T) {
	if espSupported(t) {
		t.Skip("the kernel has ESP (CONFIG_INET_ESP): nothing to refuse; the refusal runs on kernels without it, as the build hosts'")
	}
	ctx := context.Background()
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	pods := addNodesWithPods(ctx, t, c, 2)
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	m := newMarker(t)
	cp := capture(t, c, m)
	if !reaches(pods[0], pods[1], 7400, m, 20*time.Second) || cp.Count(m) == 0 {
		t.Fatalf("positive control: mode Disabled, marker in %d underlay frames", cp.Count(m))
	}

	setKeyring(ctx, t, c, keyLine(t, 1))
	setIPsec(ctx, t, c, false, time.Minute)
	took := waitMeshNodes(ctx, t, c, "every node refuses IPsec", time.Minute, func(mns []v1alpha1.MeshNode) string {
		for _, mn := range mns {
			r := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionReady)
			e := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionEncrypted)
			if r == nil || r.Status != metav1.ConditionFalse || r.Reason != "IPsecNotSupported" || e == nil || e.Reason != "IPsecNotSupported" {
				return fmt.Sprintf("%s: Ready %+v Encrypted %+v", mn.Name, r, e)
			}
			if !strings.Contains(r.Message, "CONFIG_INET_ESP") || !strings.Contains(r.Message, "never sent in clear") {
				return fmt.Sprintf("%s: message %q does not say what is missing and what happens", mn.Name, r.Message)
			}
		}
		return ""
	})
	t.Logf("every node refused IPsec after %s", took.Round(time.Millisecond))
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		var mc v1alpha1.MeshConfig
		if err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
			return false, err
		}
		a := meta.FindStatusCondition(mc.Status.Conditions, v1alpha1.ConfigApplied)
		return a != nil && a.Status == metav1.ConditionFalse && strings.Contains(a.Message, "applied on 0 of 2 nodes") &&
			strings.Contains(a.Message, "cannot do IPsec"), nil
	})
	if err != nil {
		var mc v1alpha1.MeshConfig
		_ = c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc)
		t.Fatalf("MeshConfig status does not report the refusal: %+v", mc.Status)
	}

	m2 := newMarker(t)
	cp2 := capture(t, c, m2)
	for i, pr := range [][2]*netenv.Pod{{pods[0], pods[1]}, {pods[1], pods[0]}} {
		for _, dst := range pr[1].Addrs() {
			if err := cluster.Exchange(ctx, "udp", pr[0], dst, pr[1], 7410+i, m2, 2*time.Second); err == nil {
				t.Errorf("%s -> %s went through with IPsec refused", pr[0].Name, dst)
			}
			if err := cluster.Exchange(ctx, "tcp", pr[0], dst, pr[1], 7420+i, m2, 2*time.Second); err == nil {
				t.Errorf("%s -> %s (TCP) went through with IPsec refused", pr[0].Name, dst)
			}
		}
	}
	if st := cp2.Stats(); st.KernelDrops != 0 {
		t.Fatalf("capture lost %d frames: cannot conclude", st.KernelDrops)
	}
	if got := cp2.Count(m2); got != 0 {
		t.Fatalf("marker in clear in %d underlay frames while IPsec is refused", got)
	}

	// Back to Disabled: the hold is lifted.
	if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	eventually(t, "traffic flows again in mode Disabled", func() bool { return reaches(pods[0], pods[1], 7430, m, 2*time.Second) })
}

// TestIPsecEndToEnd is IPsec's story on a kernel with ESP (the VM): clear traffic as the
// positive control, IPsec on with every pair proven encrypted on the wire, the status
// fields, a key rotation under a continuous UDP stream without loss, a node reboot (new boot
// ID, keys re-derived), and back to clear.
func TestIPsecEndToEnd(t *testing.T) {
	if !espSupported(t) {
		t.Skip("needs ESP with AES-GCM in the kernel (CONFIG_INET_ESP): runs in the kernel VM suite (tests/vm)")
	}
	ctx := context.Background()
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	const nodes = 3
	addNodesWithPods(ctx, t, c, nodes)
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	setKeyring(ctx, t, c, keyLine(t, 1))

	t.Run("disabled sends the marker in clear (positive control)", func(t *testing.T) {
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeAll(t, c, m)
		if got := cp.Count(m); got < n {
			t.Fatalf("marker in %d underlay frames after %d clear exchanges", got, n)
		}
	})

	t.Run("ipsec encrypts every pair", func(t *testing.T) {
		setIPsec(ctx, t, c, false, 3*time.Second)
		took := waitMeshNodes(ctx, t, c, "IPsec converged", 2*time.Minute, ipsecConverged(nodes, 1, 1))
		t.Logf("IPsec on every node after %s", took.Round(time.Millisecond))
		m := newMarker(t)
		cp := capture(t, c, m)
		n := exchangeAll(t, c, m)
		if st := cp.Stats(); st.KernelDrops != 0 {
			t.Fatalf("capture lost %d frames: cannot conclude", st.KernelDrops)
		}
		if got := cp.Count(m); got != 0 {
			t.Fatalf("marker in clear in %d underlay frames with IPsec on", got)
		}
		if esp := cp.IPProtoFrames(protoESP); esp < n {
			t.Fatalf("%d ESP frames for %d exchanges: the traffic did not go through ESP", esp, n)
		}
		t.Logf("%d exchanges (every pair, TCP and UDP, IPv4 and IPv6): marker in 0 frames, %d ESP frames", n, cp.IPProtoFrames(protoESP))
		// The agents publish status every second (--status-period): the sequence numbers the
		// exchanges used show up at the next publish.
		waitMeshNodes(ctx, t, c, "IPsec status with the exchanges' sequence numbers", 30*time.Second, func(mns []v1alpha1.MeshNode) string {
			for _, mn := range mns {
				st := mn.Status.IPsec
				// 2 peers x (IPv4 + IPv6 pods) x (in + out) x 1 key.
				if st == nil || st.Algorithm != string(ipsec.AESGCM) || st.States != 8 || st.SequenceLimit != int64(ipsec.SeqLimit) || st.HighestSequence == 0 {
					return fmt.Sprintf("%s: IPsec status %+v", mn.Name, st)
				}
				if mn.Status.TunnelMTU != 1446 {
					return fmt.Sprintf("%s: tunnel MTU %d, want 1446 (AES-GCM over a 1500-byte IPv4 underlay)", mn.Name, mn.Status.TunnelMTU)
				}
			}
			return ""
		})
	})

	t.Run("rotation loses no packet", func(t *testing.T) {
		from, to := c.Node("n1").Pods()[0], c.Node("n2").Pods()[0]
		s, err := cluster.StartStream(from, to, to.IPv4, 7450, []byte("rotate"), 5*time.Millisecond, 20000)
		if err != nil {
			t.Fatal(err)
		}
		// Traffic flows on key 1 before the rotation starts.
		eventually(t, "stream flowing", func() bool { return s.Received() > 20 })
		start := time.Now()
		// The operator's command: a key with SPI 2 into the Secret, then it follows every
		// node: inbound first everywhere, then outbound on SPI 2, then key 1 gone after the
		// grace period.
		out, err := c.Run(ctx, "meshcrypt", "keys", "rotate", "--wait", "--timeout", "2m")
		if err != nil {
			t.Fatalf("keys rotate: %v\n%s", err, out)
		}
		t.Logf("meshcrypt keys rotate --wait:\n%s", out)
		waitMeshNodes(ctx, t, c, "every node on SPI 2, SPI 1 retired", 2*time.Minute, ipsecConverged(nodes, 2, 2))
		took := time.Since(start)
		var sec corev1.Secret
		if err := c.Client.Get(ctx, client.ObjectKey{Namespace: cluster.AgentNamespace, Name: ipsec.SecretName}, &sec); err != nil {
			t.Fatal(err)
		}
		if kr, err := ipsec.ParseKeyring(sec.Data[ipsec.SecretKey]); err != nil || fmt.Sprint(kr.SPIs()) != "[1 2]" {
			t.Errorf("keyring after the rotation: SPIs %v, %v; want [1 2]", kr.SPIs(), err)
		}
		time.Sleep(200 * time.Millisecond) // packets in flight on the retired key
		sent, received, lost := s.Stop(500 * time.Millisecond)
		t.Logf("rotation 1 -> 2 done %s after the command (grace 3s included); UDP stream across it: %d sent, %d received, %d lost",
			took.Round(time.Millisecond), sent, received, len(lost))
		if len(lost) != 0 {
			c.DumpLogs(t.Output(), 30)
			t.Fatalf("%d of %d packets lost across the rotation (first lost: %v)", len(lost), sent, lost[:min(len(lost), 10)])
		}
		if sent < 100 {
			t.Fatalf("only %d packets sent in %s: the stream did not cover the rotation", sent, time.Since(start))
		}
		mns, err := c.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, mn := range mns {
			if st := mn.Status.IPsec; st.States != 8 {
				t.Errorf("%s: %d states after the rotation, want 8 (the old key's removed)", mn.Name, st.States)
			}
		}
	})

	t.Run("a rebooted node re-derives its keys and traffic recovers", func(t *testing.T) {
		before, err := c.MeshNodes(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var oldBoot string
		for _, mn := range before {
			if mn.Name == "n3" {
				oldBoot = mn.Spec.BootID
			}
		}
		start := time.Now()
		n3, err := c.RebootNode(ctx, "n3")
		if err != nil {
			t.Fatal(err)
		}
		p3, err := c.AddPod(ctx, n3, "n3-p2")
		if err != nil {
			t.Fatal(err)
		}
		waitMeshNodes(ctx, t, c, "n3 back with a new boot ID", time.Minute, func(mns []v1alpha1.MeshNode) string {
			for _, mn := range mns {
				if mn.Name == "n3" && (mn.Spec.BootID == oldBoot || mn.Spec.BootID == "") {
					return "n3 still has boot ID " + mn.Spec.BootID
				}
			}
			return ""
		})
		waitMeshNodes(ctx, t, c, "IPsec converged after the reboot", 2*time.Minute, ipsecConverged(nodes, 2, 2))
		m := newMarker(t)
		cp := capture(t, c, m)
		p1, p2 := c.Node("n1").Pods()[0], c.Node("n2").Pods()[0]
		if !reaches(p1, p3, 7460, m, 20*time.Second) || !reaches(p3, p2, 7461, m, 20*time.Second) {
			c.DumpLogs(t.Output(), 30)
			t.Fatal("traffic to and from the rebooted node does not flow")
		}
		t.Logf("rebooted node reachable again, encrypted, %s after the reboot began", time.Since(start).Round(time.Millisecond))
		if got := cp.Count(m); got != 0 {
			t.Fatalf("marker in clear in %d underlay frames after the reboot", got)
		}
	})

	t.Run("disabled removes every state", func(t *testing.T) {
		if err := c.SetMode(ctx, v1alpha1.ModeDisabled); err != nil {
			t.Fatal(err)
		}
		waitMeshNodes(ctx, t, c, "IPsec off everywhere", time.Minute, func(mns []v1alpha1.MeshNode) string {
			for _, mn := range mns {
				if mn.Status.Mode != v1alpha1.ModeDisabled || mn.Status.IPsec != nil || mn.Spec.IPsec != nil {
					return fmt.Sprintf("%s: mode %q, IPsec %+v / %+v", mn.Name, mn.Status.Mode, mn.Spec.IPsec, mn.Status.IPsec)
				}
			}
			return ""
		})
		m := newMarker(t)
		cp := capture(t, c, m)
		p1, p2 := c.Node("n1").Pods()[0], c.Node("n2").Pods()[0]
		eventually(t, "clear traffic flows", func() bool { return reaches(p1, p2, 7470, m, 2*time.Second) })
		if cp.Count(m) == 0 {
			t.Fatal("mode Disabled: marker not in clear, the capture sees nothing")
		}
	})
}
