package e2e

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// runVerify runs meshcrypt verify with args and returns its output, exit code and the
// MeshVerification it created (the newest).
func runVerify(ctx context.Context, t *testing.T, c *cluster.Cluster, args ...string) (string, int, *v1alpha1.MeshVerification) {
	t.Helper()
	names := func() map[string]bool {
		var list v1alpha1.MeshVerificationList
		if err := c.Client.List(ctx, &list); err != nil {
			t.Fatal(err)
		}
		m := map[string]bool{}
		for _, mv := range list.Items {
			m[mv.Name] = true
		}
		return m
	}
	before := names()
	out, err := c.Run(ctx, "meshcrypt", append([]string{"verify"}, args...)...)
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("meshcrypt verify: %v\n%s", err, out)
		}
		code = ee.ExitCode()
	}
	for name := range names() {
		if !before[name] {
			var mv v1alpha1.MeshVerification
			if err := c.Client.Get(ctx, client.ObjectKey{Name: name}, &mv); err != nil {
				t.Fatal(err)
			}
			return out, code, &mv
		}
	}
	return out, code, nil
}

// checkVerification asserts every pair of mv has verdict want and plausible counts, and that
// the test's own capture of the switch agrees on the marker.
func checkVerification(t *testing.T, mv *v1alpha1.MeshVerification, want v1alpha1.VerificationVerdict, mode v1alpha1.EncryptionMode, cipher string) {
	t.Helper()
	if mv == nil {
		t.Fatal("no MeshVerification was created")
	}
	if len(mv.Status.Results) != len(mv.Spec.Pairs) {
		t.Fatalf("%d results for %d pairs: %+v", len(mv.Status.Results), len(mv.Spec.Pairs), mv.Status.Results)
	}
	for _, r := range mv.Status.Results {
		if r.Phase != v1alpha1.PhaseComplete || r.Verdict != want || r.Mode != mode || r.Cipher != cipher {
			t.Errorf("pair %s->%s: phase %s, verdict %s (%s), mode %s, cipher %s; want Complete, %s, %s, %s",
				r.From, r.To, r.Phase, r.Verdict, r.Message, r.Mode, r.Cipher, want, mode, cipher)
		}
		if r.StartedAt == nil || r.CompletedAt == nil || r.Source == nil || r.Destination == nil || !r.Destination.Done {
			t.Errorf("pair %s->%s: incomplete audit record %+v", r.From, r.To, r)
			continue
		}
		if r.ProbesSent != mv.Spec.Probes || r.Destination.ProbesReceived == 0 || r.EchoesReceived == 0 {
			t.Errorf("pair %s->%s: %d probes sent (want %d), %d received, %d echoes", r.From, r.To, r.ProbesSent, mv.Spec.Probes, r.Destination.ProbesReceived, r.EchoesReceived)
		}
		switch want {
		case v1alpha1.VerdictEncrypted:
			if r.Source.PlaintextFrames+r.Destination.PlaintextFrames != 0 || r.Source.EncryptedFrames == 0 || r.Destination.EncryptedFrames == 0 {
				t.Errorf("pair %s->%s: captures %+v / %+v: want encrypted frames both ways and none in clear", r.From, r.To, r.Source, r.Destination)
			}
		case v1alpha1.VerdictPlaintextSeen:
			if r.Source.PlaintextFrames == 0 || r.Destination.PlaintextFrames == 0 {
				t.Errorf("pair %s->%s: captures %+v / %+v: want the marker in clear both ways", r.From, r.To, r.Source, r.Destination)
			}
		}
	}
}

// TestVerify: meshcrypt verify proves encryption actively, and proves its absence: with mode
// Disabled it reports the marker in clear and exits 1; with WireGuard (and IPsec where the
// kernel has ESP) every pair is Encrypted and it exits 0. The harness's own capture of the
// switch confirms each verdict. Mode changes leave an audit trail (Event, annotations, the
// agents' ModeApplied Events naming who).
func TestVerify(t *testing.T) {
	ctx := context.Background()
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	addNodesWithPods(ctx, t, c, 3)
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}

	t.Run("disabled: plaintext seen, exit 1", func(t *testing.T) {
		cp := capture(t, c)
		out, code, mv := runVerify(ctx, t, c, "--all-pairs")
		if code != 1 || !strings.Contains(out, "\nPLAINTEXT SEEN: 0 of 3 node pair(s) encrypted; 3 with the marker in clear on the underlay") {
			t.Fatalf("verify with mode Disabled: exit %d, want 1 and PLAINTEXT SEEN:\n%s", code, out)
		}
		checkVerification(t, mv, v1alpha1.VerdictPlaintextSeen, v1alpha1.ModeDisabled, "none")
		if n := cp.Count([]byte(mv.Spec.Marker)); n == 0 {
			t.Errorf("the switch capture never saw marker %s, yet the agents did", mv.Spec.Marker)
		}
		t.Logf("meshcrypt verify --all-pairs (Disabled):\n%s", out)
	})

	t.Run("wireguard: every pair encrypted, exit 0, audit trail", func(t *testing.T) {
		out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m")
		if err != nil {
			t.Fatalf("encryption enable: %v\n%s", err, out)
		}
		if !strings.Contains(out, "recorded Event default/EncryptionModeChanged: encryption mode Disabled -> WireGuard by ") {
			t.Errorf("enable did not record the change:\n%s", out)
		}
		checkAudit(ctx, t, c)
		cp := capture(t, c)
		out, code, mv := runVerify(ctx, t, c, "--all-pairs")
		if code != 0 || !strings.Contains(out, "verified: all 3 node pair(s) encrypted (WireGuard, ChaCha20-Poly1305)") {
			t.Fatalf("verify with WireGuard: exit %d, want 0 and verified:\n%s", code, out)
		}
		checkVerification(t, mv, v1alpha1.VerdictEncrypted, v1alpha1.ModeWireGuard, "ChaCha20-Poly1305")
		if st := cp.Stats(); st.KernelDrops != 0 || st.Dropped != 0 || cp.Count([]byte(mv.Spec.Marker)) != 0 {
			t.Errorf("the switch capture saw marker %s %d times (%d frames lost, %d not retained) while the agents said Encrypted",
				mv.Spec.Marker, cp.Count([]byte(mv.Spec.Marker)), st.KernelDrops, st.Dropped)
		}
		if mv.Spec.RequestedBy == "" {
			t.Errorf("the MeshVerification does not record who asked")
		}
		t.Logf("meshcrypt verify --all-pairs (WireGuard):\n%s", out)
	})

	t.Run("one pair, both directions named", func(t *testing.T) {
		out, code, mv := runVerify(ctx, t, c, "--from", "n3", "--to", "n1", "--probes", "5", "-o", "json")
		if code != 0 || !strings.Contains(out, `"verdict": "Encrypted"`) {
			t.Fatalf("verify --from n3 --to n1 -o json: exit %d:\n%s", code, out)
		}
		if len(mv.Spec.Pairs) != 1 || mv.Spec.Pairs[0] != (v1alpha1.VerificationPair{From: "n3", To: "n1"}) || mv.Status.Encrypted != 1 || mv.Status.Pairs != 1 {
			t.Errorf("MeshVerification %+v / status %+v", mv.Spec, mv.Status)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		for _, tt := range []struct {
			args []string
			want string
		}{
			{[]string{"--from", "n1", "--to", "nosuchnode"}, `node "nosuchnode" not found: the cluster's nodes are n1, n2, n3`},
			{[]string{"--from", "n1"}, "--from and --to name two different nodes"},
			{[]string{}, "say which nodes to verify"},
			{[]string{"--all-pairs", "--from", "n1", "--to", "n2"}, "say which nodes to verify"},
			{[]string{"--all-pairs", "--probes", "0"}, "--probes 0: want 1-100"},
		} {
			out, code, _ := runVerify(ctx, t, c, tt.args...)
			if code != 2 || !strings.Contains(out, tt.want) {
				t.Errorf("verify %v: exit %d, want 2 and %q:\n%s", tt.args, code, tt.want, out)
			}
		}
	})

	t.Run("ipsec: every pair encrypted", func(t *testing.T) {
		if !espSupported(t) {
			t.Skip("needs ESP with AES-GCM in the kernel (CONFIG_INET_ESP): runs in the kernel VM suite (tests/vm)")
		}
		setKeyring(ctx, t, c, keyLine(t, 1))
		if out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "ipsec", "--wait", "--timeout", "2m"); err != nil {
			t.Fatalf("encryption enable --mode ipsec: %v\n%s", err, out)
		}
		waitMeshNodes(ctx, t, c, "IPsec outbound on every node", 2*time.Minute, ipsecConverged(3, 1, 1))
		cp := capture(t, c)
		out, code, mv := runVerify(ctx, t, c, "--all-pairs")
		if code != 0 {
			t.Fatalf("verify with IPsec: exit %d:\n%s", code, out)
		}
		checkVerification(t, mv, v1alpha1.VerdictEncrypted, v1alpha1.ModeIPsec, "rfc4106(gcm(aes))")
		if n := cp.Count([]byte(mv.Spec.Marker)); n != 0 || cp.Stats().Dropped != 0 {
			t.Errorf("the switch capture saw marker %s %d times with IPsec", mv.Spec.Marker, n)
		}
		t.Logf("meshcrypt verify --all-pairs (IPsec):\n%s", out)
	})
}

// checkAudit asserts the mode change is on record: the MeshConfig's annotations, the CLI's
// Event naming who, and every agent's ModeApplied Event repeating it.
func checkAudit(ctx context.Context, t *testing.T, c *cluster.Cluster) {
	t.Helper()
	var mc v1alpha1.MeshConfig
	if err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
		t.Fatal(err)
	}
	by := mc.Annotations[v1alpha1.AnnotationChangedBy]
	if by == "" || mc.Annotations[v1alpha1.AnnotationChange] != "encryption mode Disabled -> WireGuard" || mc.Annotations[v1alpha1.AnnotationChangedAt] == "" {
		t.Fatalf("MeshConfig annotations %v: want who, when and what", mc.Annotations)
	}
	waitFor(t, "the CLI's Event and every agent's ModeApplied Event naming "+by, 30*time.Second, func() string {
		var evs corev1.EventList
		if err := c.Client.List(ctx, &evs); err != nil {
			return err.Error()
		}
		cli, applied := 0, map[string]bool{}
		for _, e := range evs.Items {
			switch {
			case e.Reason == "EncryptionModeChanged" && e.InvolvedObject.Kind == "MeshConfig" && strings.HasSuffix(e.Message, " by "+by):
				cli++
			case e.Reason == "ModeApplied" && strings.Contains(e.Message, "applied encryption mode WireGuard (was Disabled, changed by "+by+" at "):
				applied[e.InvolvedObject.Name] = true
			}
		}
		if cli != 1 || len(applied) != 3 {
			return fmt.Sprintf("%d CLI Events, ModeApplied from %v", cli, applied)
		}
		return ""
	})
}

// waitFor polls check (an empty string means done) until timeout.
func waitFor(t *testing.T, what string, timeout time.Duration, check func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		msg := check()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %s", what, timeout, msg)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
