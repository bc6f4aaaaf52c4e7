package status

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

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

func withStrict(n v1alpha1.MeshNode, strict bool) v1alpha1.MeshNode {
	n.Status.Strict = strict
	return n
}

func ipsecNode(name string, spis []int32, strict bool, peers ...v1alpha1.PeerStatus) v1alpha1.MeshNode {
	n := node(name, keyA, v1alpha1.ModeIPsec, peers...)
	n.Spec.IPsec = &v1alpha1.IPsecSpec{NodeID: 1, SPIs: spis}
	n.Status.Strict = strict
	if len(peers) > 0 {
		n.Status.IPsec = &v1alpha1.IPsecStatus{OutboundSPI: peers[0].OutboundSPI, Algorithm: "rfc4106(gcm(aes))"}
	}
	return n
}

func ipsecPeer(name string, spi int32) v1alpha1.PeerStatus {
	return v1alpha1.PeerStatus{Node: name, OutboundSPI: spi}
}

func TestEvaluate(t *testing.T) {
	ipsecStrict := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeIPsec, Strict: true}}}
	wg := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}}
	wgStrict := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard, Strict: true}}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	t1 := t0.Add(time.Minute)
	full := []v1alpha1.MeshNode{
		node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, t0), peer("c", keyC, time.Time{})),
		node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, t1), peer("c", keyC, time.Time{})),
		node("c", keyC, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{}), peer("b", keyB, time.Time{})),
	}
	strictAll := []v1alpha1.MeshNode{withStrict(full[0], true), withStrict(full[1], true), withStrict(full[2], true)}
	tests := []struct {
		name      string
		in        Input
		compliant bool
		verdict   string
		pairs     []Pair
	}{
		{
			name: "all pairs configured both ways", in: Input{Config: wg, MeshNodes: full}, compliant: true,
			verdict: "compliant: all 3 node pairs encrypted (WireGuard)",
			pairs: []Pair{
				{A: "a", B: "b", Encrypted: true, LastHandshake: &t1},
				{A: "a", B: "c", Encrypted: true},
				{A: "b", B: "c", Encrypted: true},
			},
		},
		{
			name: "strict applied everywhere", in: Input{Config: wgStrict, MeshNodes: strictAll, Nodes: []string{"c", "b", "a"}}, compliant: true,
			verdict: "compliant: all 3 node pairs encrypted (WireGuard, strict)",
			pairs: []Pair{
				{A: "a", B: "b", Encrypted: true, LastHandshake: &t1},
				{A: "a", B: "c", Encrypted: true},
				{A: "b", B: "c", Encrypted: true},
			},
		},
		{
			name: "strict configured, one node has not applied it", in: Input{Config: wgStrict, MeshNodes: []v1alpha1.MeshNode{strictAll[0], strictAll[1], full[2]}},
			verdict: "NOT compliant: 2 of 3 node pairs not encrypted (WireGuard, strict)",
			pairs: []Pair{
				{A: "a", B: "b", Encrypted: true, LastHandshake: &t1},
				{A: "a", B: "c", Reason: "c has not applied strict mode"},
				{A: "b", B: "c", Reason: "c has not applied strict mode"},
			},
		},
		{
			name: "no MeshConfig means disabled", in: Input{MeshNodes: full[:2]},
			verdict: "NOT compliant: encryption is disabled (1 node pairs in clear)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "encryption disabled", LastHandshake: &t1}},
		},
		{
			name: "a MeshConfig without a mode means disabled", in: Input{Config: &v1alpha1.MeshConfig{}, MeshNodes: full[:2]},
			verdict: "NOT compliant: encryption is disabled (1 node pairs in clear)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "encryption disabled", LastHandshake: &t1}},
		},
		{
			name: "a mode this version cannot judge is never compliant",
			in: Input{Config: &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: "Quantum"}}},
				MeshNodes: full[:2]},
			verdict: `NOT compliant: cannot judge mode "Quantum" (this meshcrypt knows Disabled, WireGuard and IPsec)`,
			pairs:   []Pair{{A: "a", B: "b", Reason: "mode Quantum cannot be judged by this version", LastHandshake: &t1}},
		},
		{
			name: "IPsec: every node encrypts to every other with an SPI the other installed", compliant: true,
			in: Input{Config: ipsecStrict, MeshNodes: []v1alpha1.MeshNode{
				ipsecNode("a", []int32{1, 2}, true, ipsecPeer("b", 2), ipsecPeer("c", 2)),
				ipsecNode("b", []int32{2}, true, ipsecPeer("a", 2), ipsecPeer("c", 2)),
				ipsecNode("c", []int32{2, 3}, true, ipsecPeer("a", 2), ipsecPeer("b", 2)),
			}},
			verdict: "compliant: all 3 node pairs encrypted (IPsec, strict)",
			pairs:   []Pair{{A: "a", B: "b", Encrypted: true}, {A: "a", B: "c", Encrypted: true}, {A: "b", B: "c", Encrypted: true}},
		},
		{
			name: "IPsec: not yet encrypting, or with an SPI the peer lacks",
			in: Input{Config: ipsecStrict, MeshNodes: []v1alpha1.MeshNode{
				ipsecNode("a", []int32{1, 2}, true, ipsecPeer("b", 2), ipsecPeer("c", 2)),
				ipsecNode("b", []int32{1}, true, ipsecPeer("a", 1), ipsecPeer("c", 1)),
				ipsecNode("c", []int32{2}, true, ipsecPeer("b", 1)),
				ipsecNode("d", []int32{1}, false, ipsecPeer("a", 1)),
			}},
			verdict: "NOT compliant: 6 of 6 node pairs not encrypted (IPsec, strict)",
			pairs: []Pair{
				{A: "a", B: "b", Reason: "a encrypts to b with SPI 2, which b has not installed"},
				{A: "a", B: "c", Reason: "c does not encrypt to a yet"},
				{A: "a", B: "d", Reason: "d has not applied strict mode"},
				{A: "b", B: "c", Reason: "b encrypts to c with SPI 1, which c has not installed"},
				{A: "b", B: "d", Reason: "d has not applied strict mode"},
				{A: "c", B: "d", Reason: "d has not applied strict mode"},
			},
		},
		{
			name: "a stale key on one side is not encrypted", in: Input{Config: wg, MeshNodes: []v1alpha1.MeshNode{
				node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyC, time.Time{})),
				node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
			}},
			verdict: "NOT compliant: 1 of 1 node pairs not encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "a has not configured b's current key"}},
		},
		{
			name: "a peer missing on the second side", in: Input{Config: wg, MeshNodes: []v1alpha1.MeshNode{
				node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, time.Time{})),
				node("b", keyB, v1alpha1.ModeWireGuard),
			}},
			verdict: "NOT compliant: 1 of 1 node pairs not encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "b has not configured a's current key"}},
		},
		{
			name: "a node that has not applied the mode", in: Input{Config: wg, MeshNodes: []v1alpha1.MeshNode{
				node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, time.Time{})),
				node("b", keyB, v1alpha1.ModeDisabled),
			}},
			verdict: "NOT compliant: 1 of 1 node pairs not encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Reason: "b has not applied WireGuard"}},
		},
		{
			name: "a Kubernetes node without an agent makes its pairs unencrypted",
			in:   Input{Config: wg, MeshNodes: full[:2], Nodes: []string{"a", "b", "d"}},
			// a and b list c as a peer, which is not a node: harmless.
			verdict: "NOT compliant: 2 of 3 node pairs not encrypted (WireGuard)",
			pairs: []Pair{
				{A: "a", B: "b", Encrypted: true, LastHandshake: &t1},
				{A: "a", B: "d", Reason: "d has no MeshNode (no agent)"},
				{A: "b", B: "d", Reason: "d has no MeshNode (no agent)"},
			},
		},
		{
			name: "a MeshNode left over from a deleted node is not paired",
			in:   Input{Config: wg, MeshNodes: full, Nodes: []string{"a", "b"}}, compliant: true,
			verdict: "compliant: all 1 node pairs encrypted (WireGuard)",
			pairs:   []Pair{{A: "a", B: "b", Encrypted: true, LastHandshake: &t1}},
		},
		{
			name: "one node has no pairs", in: Input{Config: wg, MeshNodes: full[:1], Nodes: []string{"a"}}, compliant: true,
			verdict: "compliant: 1 node, no node pairs (WireGuard)",
		},
		{
			name: "no nodes at all", in: Input{Config: wg, Nodes: []string{}}, compliant: true,
			verdict: "compliant: 0 nodes, no node pairs (WireGuard)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Evaluate(tt.in)
			if r.Compliant != tt.compliant || r.Verdict != tt.verdict {
				t.Errorf("verdict = %v %q, want %v %q", r.Compliant, r.Verdict, tt.compliant, tt.verdict)
			}
			if strings.HasPrefix(r.Verdict, "compliant:") != r.Compliant {
				t.Errorf("verdict %q does not start with \"compliant:\" exactly when compliant (%v)", r.Verdict, r.Compliant)
			}
			if d := cmp.Diff(tt.pairs, r.Pairs); d != "" {
				t.Errorf("pairs (-want +got):\n%s", d)
			}
			if tt.in.Nodes == nil {
				if d := cmp.Diff(r, Compute(tt.in.Config, tt.in.MeshNodes)); d != "" {
					t.Errorf("Compute differs from Evaluate without Nodes (-Evaluate +Compute):\n%s", d)
				}
			}
		})
	}
}

func TestEvaluateNodes(t *testing.T) {
	wg := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}}
	notReady := node("b", keyB, v1alpha1.ModeWireGuard)
	notReady.Status.Conditions[0].Status = metav1.ConditionFalse
	notReady.Status.Conditions[0].Message = "add peer a: boom"
	notReady.Status.TunnelMTU = 1420
	r := Evaluate(Input{
		Config:    wg,
		MeshNodes: []v1alpha1.MeshNode{node("a", keyA, v1alpha1.ModeWireGuard), notReady, node("gone", keyC, v1alpha1.ModeWireGuard)},
		Nodes:     []string{"b", "a", "new"},
	})
	want := []Node{
		{Name: "a", Mode: v1alpha1.ModeWireGuard, Backend: v1alpha1.BackendUserspace, Fingerprint: r.Nodes[0].Fingerprint, Peers: 2, Ready: true},
		{Name: "b", Mode: v1alpha1.ModeWireGuard, Backend: v1alpha1.BackendUserspace, Fingerprint: r.Nodes[1].Fingerprint, Peers: 2, TunnelMTU: 1420, Message: "add peer a: boom"},
		{Name: "gone", Mode: v1alpha1.ModeWireGuard, Backend: v1alpha1.BackendUserspace, Fingerprint: r.Nodes[2].Fingerprint, Ready: true,
			Message: "stale MeshNode: no Kubernetes node of this name, not paired"},
		{Name: "new", Peers: 2, Message: "agent missing: no MeshNode for this node"},
	}
	if d := cmp.Diff(want, r.Nodes); d != "" {
		t.Errorf("nodes (-want +got):\n%s", d)
	}
	for _, n := range r.Nodes[:3] {
		if !strings.HasPrefix(n.Fingerprint, "sha256:") {
			t.Errorf("node %s: fingerprint %q", n.Name, n.Fingerprint)
		}
	}
}

func TestOnly(t *testing.T) {
	wg := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}}
	nodes := []v1alpha1.MeshNode{
		node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, time.Time{}), peer("c", keyC, time.Time{})),
		node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
		node("c", keyC, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
	}
	full := Evaluate(Input{Config: wg, MeshNodes: nodes, Nodes: []string{"a", "b", "c", "d"}})
	tests := []struct {
		node      string
		ok        bool
		compliant bool
		verdict   string
		pairs     []string
	}{
		{node: "a", ok: true, verdict: "NOT compliant: 1 of 3 node pairs of a not encrypted (WireGuard)", pairs: []string{"a-b", "a-c", "a-d"}},
		{node: "b", ok: true, verdict: "NOT compliant: 2 of 3 node pairs of b not encrypted (WireGuard)", pairs: []string{"a-b", "b-c", "b-d"}},
		{node: "nope"},
	}
	for _, tt := range tests {
		t.Run(tt.node, func(t *testing.T) {
			r, ok := full.Only(tt.node)
			if ok != tt.ok {
				t.Fatalf("ok = %v, want %v", ok, tt.ok)
			}
			if !ok {
				return
			}
			if r.Compliant != tt.compliant || r.Verdict != tt.verdict || r.Scope != tt.node {
				t.Errorf("verdict = %v %q scope %q, want %v %q", r.Compliant, r.Verdict, r.Scope, tt.compliant, tt.verdict)
			}
			var got []string
			for _, p := range r.Pairs {
				got = append(got, p.A+"-"+p.B)
			}
			if d := cmp.Diff(tt.pairs, got); d != "" {
				t.Errorf("pairs (-want +got):\n%s", d)
			}
			if len(r.Nodes) != 1 || r.Nodes[0].Name != tt.node {
				t.Errorf("nodes = %+v, want only %s", r.Nodes, tt.node)
			}
		})
	}
	two := Evaluate(Input{Config: wg, MeshNodes: nodes[:2], Nodes: []string{"a", "b"}})
	if r, _ := two.Only("a"); !r.Compliant || r.Verdict != "compliant: all 1 node pairs of a encrypted (WireGuard)" {
		t.Errorf("Only(a) of a compliant pair: %v %q", r.Compliant, r.Verdict)
	}
	one := Evaluate(Input{Config: wg, MeshNodes: nodes[:1], Nodes: []string{"a"}})
	if r, _ := one.Only("a"); !r.Compliant || r.Verdict != "compliant: a has no node pairs (WireGuard)" {
		t.Errorf("Only(a) of a single node: %v %q", r.Compliant, r.Verdict)
	}
}

func TestWriteJSONAndYAML(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	r := Evaluate(Input{
		Config: &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard}}},
		MeshNodes: []v1alpha1.MeshNode{
			node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, t0)),
			node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})),
		},
		Nodes: []string{"a", "b", "c"},
	})
	var js, ys bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteYAML(&ys); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ys.String(), "compliant: false\n") || !strings.Contains(ys.String(), "keyFingerprint: sha256:") {
		t.Errorf("YAML lacks the JSON field names:\n%s", ys.String())
	}
	var fromJSON, fromYAML Report
	if err := json.Unmarshal(js.Bytes(), &fromJSON); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(ys.Bytes(), &fromYAML); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(r, fromJSON); d != "" {
		t.Errorf("JSON round trip (-want +got):\n%s", d)
	}
	if d := cmp.Diff(r, fromYAML); d != "" {
		t.Errorf("YAML round trip (-want +got):\n%s", d)
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

	// Not compliant: the verdict first, a node without an agent, the reasons per pair.
	r = Evaluate(Input{
		Config: &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard, Strict: true}}},
		MeshNodes: []v1alpha1.MeshNode{
			withStrict(node("a", keyA, v1alpha1.ModeWireGuard, peer("b", keyB, t0)), true),
			withStrict(node("b", keyB, v1alpha1.ModeWireGuard, peer("a", keyA, time.Time{})), true),
		},
		Nodes: []string{"a", "b", "c"},
	})
	buf.Reset()
	if err := r.WriteTable(&buf, t0.Add(90*time.Second)); err != nil {
		t.Fatal(err)
	}
	r2 := Evaluate(Input{
		Config:    &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeIPsec}}},
		MeshNodes: []v1alpha1.MeshNode{ipsecNode("a", []int32{3}, false, ipsecPeer("b", 3)), ipsecNode("b", []int32{3}, false, ipsecPeer("a", 3))},
	})
	var buf2 bytes.Buffer
	if err := r2.WriteTable(&buf2, t0); err != nil {
		t.Fatal(err)
	}
	if want := "a     IPsec  userspace  spi 3 rfc4106(gcm(aes))  1/1          -    yes\n"; !strings.Contains(buf2.String(), want) {
		t.Errorf("IPsec table lacks %q:\n%s", want, buf2.String())
	}
	lines := strings.Split(buf.String(), "\n")
	if lines[0] != "NOT compliant: 2 of 3 node pairs not encrypted (WireGuard, strict)" {
		t.Errorf("first line %q, want the verdict", lines[0])
	}
	for _, want := range []string{
		"c     -          -          -                        0/2          -    no: agent missing: no MeshNode for this node\n",
		"a <-> c  NO         never           c has no MeshNode (no agent)\n",
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, buf.String())
		}
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

func TestProgressIPsec(t *testing.T) {
	nodes := []v1alpha1.MeshNode{
		ipsecNode("a", []int32{1}, false, ipsecPeer("b", 1), ipsecPeer("c", 1)),
		ipsecNode("b", []int32{1}, false, ipsecPeer("a", 1)),
		ipsecNode("c", []int32{2}, false, ipsecPeer("a", 2), ipsecPeer("b", 2)),
		node("d", keyA, v1alpha1.ModeWireGuard),
	}
	got := Progress(v1alpha1.ModeIPsec, nodes, []string{"a", "b", "c", "d"})
	want := []NodeProgress{
		{Node: "a", Waiting: "peers not configured: c"},
		{Node: "b", Waiting: "peers not configured: c"},
		{Node: "c", Waiting: "peers not configured: a, b"},
		{Node: "d", Waiting: `agent has applied "WireGuard"`},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	nodes[2] = ipsecNode("c", []int32{1, 2}, false, ipsecPeer("a", 1), ipsecPeer("b", 1))
	nodes[1].Status.Peers = append(nodes[1].Status.Peers, ipsecPeer("c", 1))
	for _, p := range Progress(v1alpha1.ModeIPsec, nodes[:3], nil) {
		if !p.Done {
			t.Errorf("%+v: want done", p)
		}
	}
}

func TestWriteTableIPsec(t *testing.T) {
	r := Report{Mode: v1alpha1.ModeIPsec, Nodes: []Node{
		{Name: "a", Mode: v1alpha1.ModeIPsec, IPsecSPI: 2, IPsecAlgorithm: "rfc4106(gcm(aes))", IPsecSPIs: []int{1, 2}, IPsecStates: 8,
			IPsecSequence: 429497, IPsecSequenceLimit: 4294967295, XFRMErrors: map[string]int64{"XfrmInNoStates": 3, "XfrmInTmplMismatch": 1}},
		{Name: "b", Mode: v1alpha1.ModeIPsec, IPsecSPI: 2, IPsecSPIs: []int{2}, IPsecStates: 4, IPsecSequenceLimit: 4294967295},
	}}
	var b strings.Builder
	if err := r.WriteTable(&b, time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"IPSEC NODE  OUT SPI  SPIS INSTALLED  STATES  SEQUENCE USED",
		"a           2        1,2             8       429497 of 4294967295 (0.0100%)  XfrmInNoStates=3 XfrmInTmplMismatch=1",
		"b           2        2               4       0 of 4294967295 (0.0000%)       -",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
}

func TestEvaluateNodeEncryption(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	announce := func(n v1alpha1.MeshNode) v1alpha1.MeshNode {
		n.Spec.NodeEncryption = true
		return n
	}
	n1 := node("n1", keyA, v1alpha1.ModeWireGuard, peer("n2", keyB, now), peer("n3", keyC, now))
	n2 := node("n2", keyB, v1alpha1.ModeWireGuard, peer("n1", keyA, now), peer("n3", keyC, now))
	n3 := node("n3", keyC, v1alpha1.ModeWireGuard, peer("n1", keyA, now), peer("n2", keyB, now))
	cfg := &v1alpha1.MeshConfig{Spec: v1alpha1.MeshConfigSpec{Encryption: v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeWireGuard, NodeEncryption: true}}}
	cp := map[string]map[string]string{"n3": {"node-role.kubernetes.io/control-plane": ""}}
	hosts := func(r Report) map[string]HostPair {
		out := map[string]HostPair{}
		for _, p := range r.Pairs {
			if p.Host != nil {
				out[p.A+"-"+p.B] = *p.Host
			}
		}
		return out
	}
	tests := []struct {
		name      string
		nodes     []v1alpha1.MeshNode
		labels    map[string]map[string]string
		want      map[string]HostPair
		compliant bool
		verdict   string
	}{
		{"all applied, n3 opts out", []v1alpha1.MeshNode{announce(n1), announce(n2), n3}, cp,
			map[string]HostPair{
				"n1-n2": {Encrypted: true},
				"n1-n3": {OptedOut: true, Reason: "n3 opts out (nodeEncryptionOptOutLabels)"},
				"n2-n3": {OptedOut: true, Reason: "n3 opts out (nodeEncryptionOptOutLabels)"},
			}, true, "compliant: all 3 node pairs encrypted (WireGuard, node encryption); host traffic encrypted on 1, in clear by opt-out on 2"},
		{"n2 not applied yet", []v1alpha1.MeshNode{announce(n1), n2, n3}, cp,
			map[string]HostPair{
				"n1-n2": {Reason: "n2 has not applied node encryption"},
				"n1-n3": {OptedOut: true, Reason: "n3 opts out (nodeEncryptionOptOutLabels)"},
				"n2-n3": {OptedOut: true, Reason: "n3 opts out (nodeEncryptionOptOutLabels)"},
			}, false, "NOT compliant: host traffic of 1 of 3 node pairs not encrypted (WireGuard, node encryption)"},
		{"no opt-out label: n3 must apply it too", []v1alpha1.MeshNode{announce(n1), announce(n2), n3}, nil,
			map[string]HostPair{
				"n1-n2": {Encrypted: true},
				"n1-n3": {Reason: "n3 has not applied node encryption"},
				"n2-n3": {Reason: "n3 has not applied node encryption"},
			}, false, "NOT compliant: host traffic of 2 of 3 node pairs not encrypted (WireGuard, node encryption)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Evaluate(Input{Config: cfg, MeshNodes: tt.nodes, NodeLabels: tt.labels})
			if d := cmp.Diff(tt.want, hosts(r)); d != "" {
				t.Errorf("host pairs (-want +got):\n%s", d)
			}
			if r.Compliant != tt.compliant || r.Verdict != tt.verdict {
				t.Errorf("verdict = %v %q, want %v %q", r.Compliant, r.Verdict, tt.compliant, tt.verdict)
			}
			var b bytes.Buffer
			if err := r.WriteTable(&b, now); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), "HOST TRAFFIC") || !strings.Contains(b.String(), "mode: WireGuard, node encryption") {
				t.Errorf("table lacks the host traffic column or mode:\n%s", b.String())
			}
		})
	}
	// Without node encryption configured the pairs carry no host state.
	plain := cfg.DeepCopy()
	plain.Spec.Encryption.NodeEncryption = false
	if got := hosts(Evaluate(Input{Config: plain, MeshNodes: []v1alpha1.MeshNode{n1, n2, n3}})); len(got) != 0 {
		t.Errorf("host pairs without node encryption: %v", got)
	}
}
