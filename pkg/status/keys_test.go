package status

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

func TestKeys(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	created := metav1.NewMicroTime(now.Add(-2 * time.Hour))
	node := func(name string) v1alpha1.MeshNode {
		m := v1alpha1.MeshNode{}
		m.Name = name
		m.Spec.WireGuard = &v1alpha1.WireGuardSpec{PublicKey: "YAnGKhdrvJoHvbe5Yy8k8p1nSNTm2FMXBd1f7LxpwWg=", ListenPort: 51871, KeyCreated: &created}
		return m
	}
	cfg := &v1alpha1.MeshConfig{}
	cfg.Spec.Encryption.Mode = v1alpha1.ModeWireGuard
	cfg.Spec.KeyRotation = &v1alpha1.KeyRotationSpec{
		Every:    &metav1.Duration{Duration: 24 * time.Hour},
		Requests: []v1alpha1.RotationRequest{{Node: "b", RequestedAt: metav1.NewMicroTime(now.Add(-time.Minute))}},
	}
	r := Keys(cfg, []v1alpha1.MeshNode{node("b"), node("a")}, now)
	if r.Nodes[0].Name != "a" || r.Nodes[0].RotationPending != "" || r.Nodes[0].KeyAge != "2h0m0s" || !strings.HasPrefix(r.Nodes[0].Fingerprint, "sha256:") {
		t.Errorf("node a: %+v", r.Nodes[0])
	}
	if !strings.HasPrefix(r.Nodes[1].RotationPending, "requested at 2026-11-21T11:59:00Z") {
		t.Errorf("node b: pending %q", r.Nodes[1].RotationPending)
	}
	cfg.Spec.KeyRotation.Every.Duration = time.Hour
	if p := PendingRotation(&[]v1alpha1.MeshNode{node("a")}[0], cfg.Spec.KeyRotation, now); p != "older than 1h0m0s" {
		t.Errorf("pending by age: %q", p)
	}
	var b strings.Builder
	if err := r.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"mode: WireGuard; automatic rotation: every 24h0m0s", "b     sha256:", "pending: requested at"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
	if strings.Contains(b.String(), "YAnGKhdr") {
		t.Error("the table shows a key")
	}
}

func TestIPsecRotation(t *testing.T) {
	node := func(name string, out int32, spis ...int32) v1alpha1.MeshNode {
		m := v1alpha1.MeshNode{}
		m.Name = name
		m.Spec.IPsec = &v1alpha1.IPsecSpec{NodeID: 1, SPIs: spis}
		m.Status.IPsec = &v1alpha1.IPsecStatus{OutboundSPI: out}
		return m
	}
	if r := IPsecRotation([]v1alpha1.MeshNode{node("a", 2, 2), node("b", 2, 2), {}}); r != "" {
		t.Errorf("settled: %q", r)
	}
	if r := IPsecRotation([]v1alpha1.MeshNode{node("a", 1, 1, 2), node("b", 2, 2)}); r != "a: SPIs [1 2], outbound 1" {
		t.Errorf("in progress: %q", r)
	}
}
