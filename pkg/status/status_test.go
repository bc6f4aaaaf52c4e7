package status

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

const (
	keyA = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	keyB = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA="
	keyC = "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCA="
)

func node(name, key string, mode v1alpha1.EncryptionMode, peers ...v1alpha1.PeerStatus) v1alpha1.MeshNode {
	return v1alpha1.MeshNode{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1alpha1.MeshNodeSpec{WireGuard: &v1alpha1.WireGuardSpec{PublicKey: key, ListenPort: 51871}},
		Status: v1alpha1.MeshNodeStatus{
			Mode: mode, Backend: v1alpha1.BackendUserspace, Peers: peers, PeersReady: int32(len(peers)),
			Conditions: []metav1.Condition{{Type: v1alpha1.ConditionReady, Status: metav1.ConditionTrue}},
		},
	}
}

func peer(name, key string, hs time.Time) v1alpha1.PeerStatus {
	ps := v1alpha1.PeerStatus{Node: name, PublicKey: key}
	if !hs.IsZero() {
		t := metav1.NewTime(hs)
		ps.LastHandshakeTime = &t
	}
	return ps
}

func TestCompute(t *testing.T) {
	wg := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	t1 := t0.Add(time.Minute)
	full := []v1alpha1.MeshNode{
		node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, t0), peer("c", keyC, time.Time{})),
		node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, t1), peer("c", keyC, time.Time{})),
		node("c", keyC, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{}), peer("b", keyB, time.Time{})),
	}
	tests := []struct {
		name      string
		cfg       *v1alpha1.MeshConfig
		nodes     []v1alpha1.MeshNode
		compliant bool
		verdict   string
		pairs     []Pair
	}{
		{
			name: "all pairs configured both ways", cfg: wg, nodes: full, compliant: true,
			verdict: "compliant: all 3 node pairs encrypted (WireGuard)",
			pairs: []Pair{
				{A: "a", B: "b", Encrypted: true, LastHandshake: &t1},
				{A: "a", B: "c", Encrypted: true},
				{A: "b", B: "c", Encrypted: true},
			},
		},
		{
			name: "no MeshConfig means disabled", cfg: nil, nodes: full[:2],
			verdict: "not compliant: encryption is disabled (1 node pairs in clear)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "encryption disabled", LastHandshake: &t1}},
		},
		{
			name: "a stale key on one side is not encrypted", cfg: wg,
			nodes: []v1alpha1.MeshNode{
				node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyC, time.Time{})),
				node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
			},
			verdict: "not compliant: 0 of 1 node pairs encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "a has not configured b's current key"}},
		},
		{
			name: "a node that has not applied the mode", cfg: wg,
			nodes: []v1alpha1.MeshNode{
				node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, time.Time{})),
				node("b", keyB, v1alpha1.ModeDisabled),
			},
			verdict: "not compliant: 0 of 1 node pairs encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "b has not applied WireGuard"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Compute(tt.cfg, tt.nodes)
			if r.Compliant != tt.compliant || r.Verdict != tt.verdict {
				t.Errorf("verdict = %v %q, want %v %q", r.Compliant, r.Verdict, tt.compliant, tt.verdict)
			}
			if d := cmp.Diff(tt.pairs, r.Pairs); d != "" {
				t.Errorf("pairs (-want +got):\n%s", d)
			}
		})
	}
}

func TestWriteTable(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	r := Compute(&v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}},
		[]v1alpha1.MeshNode{
			node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, t0)),
			node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
		})
	var buf bytes.Buffer
	if err := r.WriteTable(&buf, t0.Add(90*time.Second)); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{
		"compliant: all 1 node pairs encrypted (WireGuard)\n",
		"a <-> b  yes        1m30s ago",
		"userspace",
		"sha256:",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, keyA) {
		t.Errorf("output shows a raw key, want only fingerprints:\n%s", out)
	}
}

func TestProgress(t *testing.T) {
	full := []v1alpha1.MeshNode{
		node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, time.Time{})),
		node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyC, time.Time{})),
		node("c", keyC, v1alpha1.ModeDisabled),
	}
	got := Progress(v1alpha1.ModeWireGuard, full, []string{"a", "b", "c", "d"})
	want := []NodeProgress{
		{Node: "a", Waiting: "peers not configured: c"},
		{Node: "b", Waiting: "peers not configured: a, c"},
		{Node: "c", Waiting: `agent has applied "Disabled"`},
		{Node: "d", Waiting: "agent has not published its MeshNode"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	got = Progress(v1alpha1.ModeDisabled, full, nil)
	if !got[2].Done || got[0].Done {
		t.Errorf("Disabled progress %+v: want only c done", got)
	}
}
