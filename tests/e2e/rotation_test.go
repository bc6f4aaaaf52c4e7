package e2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/status"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// TestWireGuardKeyRotation rotates WireGuard keys from the CLI on a running cluster under a
// continuous UDP stream between pods on two nodes, and measures the disruption: the sender's
// key, the receiver's key, every key at once. It also checks the audit trail (Events), `keys
// status`, that nothing leaves in clear meanwhile, and that a second rotation is refused while
// one is still running.
func TestWireGuardKeyRotation(t *testing.T) {
	ctx := context.Background()
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend)})
	addNodesWithPods(ctx, t, c, 3)
	if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		t.Fatal(err)
	}
	from, to := c.Node("n1").Pods()[0], c.Node("n2").Pods()[0]
	m := newMarker(t)
	cp := capture(t, c, m)
	eventually(t, "n1 -> n2 flows", func() bool { return reaches(from, to, 7500, m, 2*time.Second) })

	keyOf := func(node string) string {
		var mn v1alpha1.MeshNode
		if err := c.Client.Get(ctx, client.ObjectKey{Name: node}, &mn); err != nil {
			t.Fatal(err)
		}
		return mn.Spec.WireGuard.PublicKey
	}
	const interval = 2 * time.Millisecond
	for i, tt := range []struct {
		name string
		args []string
		keys []string // nodes whose key must change
	}{
		{"the sender's key", []string{"--node", "n1"}, []string{"n1"}},
		{"the receiver's key", []string{"--node", "n2"}, []string{"n2"}},
		{"every key", []string{"--all"}, []string{"n1", "n2", "n3"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := map[string]string{}
			for _, n := range tt.keys {
				before[n] = keyOf(n)
			}
			s, err := cluster.StartStream(from, to, to.IPv4, 7510+i, m, interval, 10000)
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "stream flowing", func() bool { return s.Received() > 50 })
			start := time.Now()
			out, err := c.Run(ctx, "meshcrypt", append(append([]string{"keys", "rotate"}, tt.args...), "--wait", "--timeout", "1m")...)
			if err != nil {
				t.Fatalf("keys rotate: %v\n%s", err, out)
			}
			took := time.Since(start)
			time.Sleep(time.Second) // the stream runs on after the rotation
			sent, received, lost := s.Stop(500 * time.Millisecond)
			gap := time.Duration(len(lost)) * interval
			t.Logf("keys rotate %s --wait: %s; UDP stream every %s: %d sent, %d received, %d lost (a gap of about %s)\n%s",
				strings.Join(tt.args, " "), took.Round(time.Millisecond), interval, sent, received, len(lost), gap, out)
			if !strings.Contains(out, "rotation complete on all") {
				t.Errorf("rotate --wait did not report completion:\n%s", out)
			}
			for _, n := range tt.keys {
				if keyOf(n) == before[n] {
					t.Errorf("node %s kept its key", n)
				}
			}
			eventually(t, "n1 -> n2 flows with the new keys", func() bool { return reaches(from, to, 7520+i, m, 2*time.Second) })
		})
	}
	// The marker rode every stream packet; the capture must not see it in clear.
	if got := cp.Count(m); got != 0 {
		t.Fatalf("marker in clear in %d underlay frames during the rotations", got)
	}

	t.Run("audit trail and keys status", func(t *testing.T) {
		var evs corev1.EventList
		if err := c.Client.List(ctx, &evs); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, e := range evs.Items {
			if e.Reason == "KeyRotated" && strings.Contains(e.Message, "requested by ") && !strings.Contains(e.Message, "requested by an operator") {
				n++
			}
		}
		if n < 5 { // n1 twice, n2 twice, n3 once
			t.Errorf("%d KeyRotated events naming the requester, want 5", n)
		}
		out, err := c.Run(ctx, "meshcrypt", "keys", "status", "-o", "json")
		if err != nil {
			t.Fatalf("keys status: %v\n%s", err, out)
		}
		var r status.KeysReport
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("keys status -o json: %v\n%s", err, out)
		}
		if len(r.Nodes) != 3 {
			t.Fatalf("keys status: %+v", r)
		}
		for _, n := range r.Nodes {
			if !strings.HasPrefix(n.Fingerprint, "sha256:") || n.KeyCreated == nil || n.RotationPending != "" {
				t.Errorf("keys status node %+v", n)
			}
			if strings.Contains(out, keyOf(n.Name)) {
				t.Error("keys status shows a public key, not a fingerprint")
			}
		}
	})

	t.Run("a second rotation is refused while one runs", func(t *testing.T) {
		if err := c.Node("n3").StopAgent(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := c.Node("n3").StartAgent(); err != nil {
				t.Fatal(err)
			}
		}()
		if out, err := c.Run(ctx, "meshcrypt", "keys", "rotate", "--node", "n3"); err != nil {
			t.Fatalf("first request: %v\n%s", err, out)
		}
		out, err := c.Run(ctx, "meshcrypt", "keys", "rotate", "--all")
		if err == nil || !strings.Contains(out, "a rotation is still running: n3") {
			t.Fatalf("second request while n3 has not rotated: %v\n%s", err, out)
		}
		out, err = c.Run(ctx, "meshcrypt", "keys", "rotate", "--node", "nosuchnode")
		if err == nil || !strings.Contains(out, "nosuchnode") {
			t.Fatalf("rotate of an unknown node: %v\n%s", err, out)
		}
	})
	// n3's agent is back: it rotates on start, since its request is pending.
	old := keyOf("n3")
	eventually(t, "n3 rotates once its agent is back", func() bool { return keyOf("n3") != old })

	t.Run("keyRotation.every rotates keys by age", func(t *testing.T) {
		before := map[string]string{"n1": keyOf("n1"), "n2": keyOf("n2"), "n3": keyOf("n3")}
		// The CLI refuses periods under a minute; the agents take what MeshConfig says.
		set := func(every *metav1.Duration) {
			err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
				var mc v1alpha1.MeshConfig
				if err := c.Client.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
					return err
				}
				mc.Spec.KeyRotation.Every = every
				return c.Client.Update(ctx, &mc)
			})
			if err != nil {
				t.Fatal(err)
			}
		}
		set(&metav1.Duration{Duration: 3 * time.Second})
		defer set(nil)
		eventually(t, "every node rotates its key once it is 3 s old", func() bool {
			for n, k := range before {
				if keyOf(n) == k {
					return false
				}
			}
			return true
		})
		set(nil)
		if out, err := c.Run(ctx, "meshcrypt", "keys", "rotate", "--every", "720h"); err != nil || !strings.Contains(out, "every 720h") {
			t.Fatalf("keys rotate --every 720h: %v\n%s", err, out)
		}
		if out, err := c.Run(ctx, "meshcrypt", "keys", "rotate", "--every", "10s"); err == nil {
			t.Fatalf("keys rotate --every 10s accepted:\n%s", out)
		}
	})
	eventually(t, "n1 -> n2 flows after the scheduled rotations", func() bool { return reaches(from, to, 7530, m, 2*time.Second) })
}
