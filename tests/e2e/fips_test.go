package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// TestFIPSRefusesWireGuard runs agents on nodes in FIPS mode (the kernel flag simulated
// through --fips-path): WireGuard is refused with a condition naming IPsec AES-GCM as the
// approved mode, and pod traffic between nodes stops instead of leaving in clear. A node
// whose flag reads 0 applies WireGuard as usual.
func TestFIPSRefusesWireGuard(t *testing.T) {
	ctx := context.Background()
	flag := filepath.Join(t.TempDir(), "fips_enabled")
	if err := os.WriteFile(flag, []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c := cluster.StartT(t, cluster.Options{Backend: string(wgBackend), AgentArgs: []string{"--fips-path=" + flag}})
	pods := addNodesWithPods(ctx, t, c, 2)
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := c.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		t.Fatal(err)
	}
	took := waitMeshNodes(ctx, t, c, "every FIPS node refuses WireGuard", time.Minute, func(mns []v1alpha1.MeshNode) string {
		for _, mn := range mns {
			r := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionReady)
			if r == nil || r.Status != metav1.ConditionFalse || r.Reason != "FIPSRefusesWireGuard" {
				return fmt.Sprintf("%s: Ready %+v", mn.Name, r)
			}
			if !strings.Contains(r.Message, "IPsec") || !strings.Contains(r.Message, "AES-GCM") {
				return fmt.Sprintf("%s: message %q does not name the approved mode", mn.Name, r.Message)
			}
			if len(mn.Status.Peers) != 0 {
				return fmt.Sprintf("%s has %d WireGuard peers", mn.Name, len(mn.Status.Peers))
			}
		}
		return ""
	})
	t.Logf("WireGuard refused on every FIPS node after %s", took.Round(time.Millisecond))

	m := newMarker(t)
	cp := capture(t, c, m)
	for _, dst := range pods[1].Addrs() {
		if err := cluster.Exchange(ctx, "udp", pods[0], dst, pods[1], 7480, m, 2*time.Second); err == nil {
			t.Errorf("%s -> %s went through with WireGuard refused", pods[0].Name, dst)
		}
	}
	if err := cluster.Exchange(ctx, "tcp", pods[1], pods[0].IPv4, pods[0], 7481, m, 2*time.Second); err == nil {
		t.Error("TCP went through with WireGuard refused")
	}
	if got := cp.Count(m); got != 0 {
		t.Fatalf("marker in clear in %d underlay frames while WireGuard is refused", got)
	}
	if n := cp.UDPFrames(wgPort); n != 0 {
		t.Errorf("%d WireGuard frames on the underlay: a FIPS node used WireGuard", n)
	}

	// The flag cleared and the agents restarted: WireGuard applies.
	if err := os.WriteFile(flag, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		if err := n.RestartAgent(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		t.Fatal(err)
	}
	eventually(t, "traffic flows through WireGuard once FIPS is off", func() bool { return reaches(pods[0], pods[1], 7482, m, 2*time.Second) })
}
