package agent

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec"
)

var t0 = time.Date(2026, 11, 21, 8, 0, 0, 0, time.UTC)

// ipsecMN is a MeshNode taking part in IPsec with a node ID and reported SPIs.
func ipsecMN(name string, created time.Time, id int32, spis ...int32) v1alpha1.MeshNode {
	mn := v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: metav1.NewTime(created)}}
	mn.Spec.BootID = "boot-" + name
	mn.Spec.UnderlayIPs = []v1alpha1.IP{"fd77::" + v1alpha1.IP(strings.TrimPrefix(name, "n")), "10.77.0." + v1alpha1.IP(strings.TrimPrefix(name, "n"))}
	if id != 0 {
		mn.Spec.IPsec = &v1alpha1.IPsecSpec{NodeID: id, SPIs: spis}
	}
	return mn
}

func testKeyring(t *testing.T, spis ...uint8) ipsec.Keyring {
	t.Helper()
	var kr ipsec.Keyring
	for _, s := range spis {
		k, err := ipsec.NewKey(s, ipsec.AESGCM, bytes.Repeat([]byte{s}, 20), 128)
		if err != nil {
			t.Fatal(err)
		}
		if kr, err = kr.Add(k); err != nil {
			t.Fatal(err)
		}
	}
	return kr
}

func TestIPsecNodeID(t *testing.T) {
	// The hash start of "n1"; the tests below are written around it.
	h := ipsecNodeID("n1", time.Time{}, 0, nil)
	if h == 0 {
		t.Fatal("node ID 0")
	}
	for _, tt := range []struct {
		name    string
		created time.Time
		current int32
		nodes   []v1alpha1.MeshNode
		want    uint16
	}{
		{"first pick is the hash", time.Time{}, 0, nil, h},
		{"stable once picked", t0, 77, []v1alpha1.MeshNode{ipsecMN("n2", t0, 78)}, 77},
		{"a new node moves off a taken hash", time.Time{}, 0, []v1alpha1.MeshNode{ipsecMN("n2", t0, int32(h))}, h%65535 + 1},
		{"the newer of two holders moves", t0.Add(time.Second), 5, []v1alpha1.MeshNode{ipsecMN("n2", t0, 5)}, h},
		{"the older holder stays", t0, 5, []v1alpha1.MeshNode{ipsecMN("n2", t0.Add(time.Second), 5)}, 5},
		{"same age: the smaller name stays", t0, 5, []v1alpha1.MeshNode{ipsecMN("n2", t0, 5)}, 5},
		{"same age: the larger name moves", t0, 5, []v1alpha1.MeshNode{ipsecMN("n0", t0, 5)}, h},
		{"out-of-range current is re-picked", t0, 70000, nil, h},
		{"its own MeshNode is not a holder", t0, 9, []v1alpha1.MeshNode{ipsecMN("n1", t0, 9)}, 9},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := ipsecNodeID("n1", tt.created, tt.current, tt.nodes); got != tt.want {
				t.Errorf("ipsecNodeID = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestChooseOutbound(t *testing.T) {
	for _, tt := range []struct {
		name      string
		keyring   []uint8
		installed []uint8
		current   uint8
		nodes     []v1alpha1.MeshNode
		want      uint8
	}{
		{"first start: the current key", []uint8{1}, nil, 0, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2)}, 1},
		{"all report 1", []uint8{1}, []uint8{1}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 1), ipsecMN("n3", t0, 3, 1)}, 1},
		{"new key not reported by all: stay", []uint8{1, 2}, []uint8{1, 2}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 1, 2), ipsecMN("n3", t0, 3, 1)}, 1},
		{"new key not installed here: stay", []uint8{1, 2}, []uint8{1}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 1, 2), ipsecMN("n3", t0, 3, 1, 2)}, 1},
		{"everyone has the new key: switch", []uint8{1, 2}, []uint8{1, 2}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 1, 2), ipsecMN("n3", t0, 3, 2)}, 2},
		{"nodes outside IPsec do not count", []uint8{1, 2}, []uint8{1, 2}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 2), ipsecMN("n4", t0, 0)}, 2},
		{"current pruned from the keyring: the keyring's current", []uint8{3}, []uint8{1}, 1, []v1alpha1.MeshNode{ipsecMN("n2", t0, 2, 1)}, 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := chooseOutbound(testKeyring(t, tt.keyring...), tt.installed, tt.current, "n1", tt.nodes)
			if got != tt.want {
				t.Errorf("chooseOutbound = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestRetireKeys(t *testing.T) {
	kr := testKeyring(t, 1, 2, 3)
	grace := time.Minute
	for _, tt := range []struct {
		name     string
		outbound uint8
		now      time.Time
		want     []uint8
		wantAt   time.Time
	}{
		{"in the grace period", 2, t0.Add(30 * time.Second), []uint8{1, 2, 3}, t0.Add(grace)},
		{"after it: older keys go, newer stay", 2, t0.Add(grace), []uint8{2, 3}, time.Time{}},
		{"nothing older", 1, t0, []uint8{1, 2, 3}, time.Time{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, at := retireKeys(kr, tt.outbound, t0, grace, tt.now)
			if diff := cmp.Diff(tt.want, got.SPIs()); diff != "" {
				t.Errorf("kept SPIs (-want +got):\n%s", diff)
			}
			if !at.Equal(tt.wantAt) {
				t.Errorf("retire at %v, want %v", at, tt.wantAt)
			}
		})
	}
}

func TestIPsecRemotes(t *testing.T) {
	p := netip.MustParsePrefix
	assigned := map[string][]netip.Prefix{
		"n1": {p("10.244.1.0/24")}, "n2": {p("10.244.2.0/24")}, "n3": {p("10.244.3.0/24"), p("fd44:0:0:3::/64")},
	}
	n2 := ipsecMN("n2", t0, 2, 1, 2)
	n2.Spec.PodCIDRs = []v1alpha1.CIDR{"10.244.1.0/24"} // a claim on n1's pods: ignored, the Node's CIDRs count
	nodes := []v1alpha1.MeshNode{
		ipsecMN("n1", t0, 1, 1), n2, ipsecMN("n3", t0, 3, 1),
		ipsecMN("n4", t0, 4, 2), // no Kubernetes Node
		ipsecMN("n5", t0, 0),    // not in IPsec
	}
	got := ipsecRemotes("n1", netip.MustParseAddr("10.77.0.1"), nodes, assigned, 2, false)
	want := []ipsec.Node{
		{Name: "n2", ID: 2, BootID: "boot-n2", Underlay: netip.MustParseAddr("10.77.0.2"), PodCIDRs: assigned["n2"]},
		{Name: "n3", ID: 3, BootID: "boot-n3", Underlay: netip.MustParseAddr("10.77.0.3"), PodCIDRs: assigned["n3"], InboundOnly: true},
	}
	if diff := cmp.Diff(want, got, cmpNetip); diff != "" {
		t.Errorf("ipsecRemotes (-want +got):\n%s", diff)
	}
	got = ipsecRemotes("n1", netip.MustParseAddr("fd77::1"), nodes, assigned, 2, true)
	if len(got) != 2 || !got[0].InboundOnly || !got[1].InboundOnly || got[0].Underlay != netip.MustParseAddr("fd77::2") {
		t.Errorf("ipsecRemotes inbound only, IPv6 underlay: %+v", got)
	}
}

func TestBlockedExcept(t *testing.T) {
	p := netip.MustParsePrefix
	assigned := map[string][]netip.Prefix{"n1": {p("10.244.1.0/24")}, "n2": {p("10.244.2.0/24")}, "n3": {p("10.244.3.0/24")}}
	got := blockedExcept("n1", assigned, map[string]bool{"n2": true})
	if diff := cmp.Diff([]netip.Prefix{p("10.244.3.0/24")}, got, cmpNetip); diff != "" {
		t.Errorf("blockedExcept (-want +got):\n%s", diff)
	}
}

func TestSetConditionsRefused(t *testing.T) {
	var st v1alpha1.MeshNodeStatus
	r := &refusal{Reason: "IPsecNotSupported", Message: "the kernel cannot do IPsec"}
	setConditions(&st, conditionInput{mode: v1alpha1.ModeIPsec, refused: r})
	for _, ct := range []string{v1alpha1.ConditionReady, v1alpha1.ConditionEncrypted} {
		c := meta.FindStatusCondition(st.Conditions, ct)
		if c == nil || c.Status != metav1.ConditionFalse || c.Reason != "IPsecNotSupported" || !strings.Contains(c.Message, "cannot do IPsec") {
			t.Errorf("condition %s = %+v, want False IPsecNotSupported", ct, c)
		}
	}
	var asErr *refusal
	if !errors.As(error(r), &asErr) {
		t.Error("a refusal is not found by errors.As")
	}
	setConditions(&st, conditionInput{mode: v1alpha1.ModeIPsec, peers: 2, ready: 2, badKeys: "keyring line 1: bad"})
	if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionDegraded); c == nil || c.Reason != "KeyringRefused" {
		t.Errorf("Degraded = %+v, want KeyringRefused", c)
	}
	if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionEncrypted); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("Encrypted = %+v, want True", c)
	}
}

func TestConfigStatus(t *testing.T) {
	node := func(name string, mode v1alpha1.EncryptionMode, ready bool, reason, msg string, encrypted bool) v1alpha1.MeshNode {
		mn := v1alpha1.MeshNode{ObjectMeta: metav1.ObjectMeta{Name: name}}
		mn.Status.Mode = mode
		rs, es := metav1.ConditionFalse, metav1.ConditionFalse
		if ready {
			rs = metav1.ConditionTrue
		}
		if encrypted {
			es = metav1.ConditionTrue
		}
		mn.Status.Conditions = []metav1.Condition{
			{Type: v1alpha1.ConditionReady, Status: rs, Reason: reason, Message: msg},
			{Type: v1alpha1.ConditionEncrypted, Status: es, Reason: reason, Message: msg},
		}
		return mn
	}
	mc := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "default", Generation: 3}}
	mc.Spec.Encryption.Mode = v1alpha1.ModeIPsec
	st := configStatus(mc, []v1alpha1.MeshNode{
		node("a", v1alpha1.ModeIPsec, true, "Reconciled", "", true),
		node("b", v1alpha1.ModeIPsec, false, "IPsecNotSupported", "mode IPsec refused: no ESP", false),
	})
	app := meta.FindStatusCondition(st.Conditions, v1alpha1.ConfigApplied)
	if app == nil || app.Status != metav1.ConditionFalse || !strings.Contains(app.Message, "1 of 2 nodes") || !strings.Contains(app.Message, "b: mode IPsec refused: no ESP") {
		t.Errorf("Applied = %+v", app)
	}
	if st.Nodes != 2 || st.NodesApplied != 1 || st.ObservedGeneration != 3 {
		t.Errorf("counts %d/%d generation %d", st.NodesApplied, st.Nodes, st.ObservedGeneration)
	}
	mc.Status = st
	st = configStatus(mc, []v1alpha1.MeshNode{node("a", v1alpha1.ModeIPsec, true, "Reconciled", "", true)})
	for _, ct := range []string{v1alpha1.ConfigApplied, v1alpha1.ConfigEncrypted} {
		if c := meta.FindStatusCondition(st.Conditions, ct); c == nil || c.Status != metav1.ConditionTrue {
			t.Errorf("%s = %+v, want True", ct, c)
		}
	}
}

func TestRotationDue(t *testing.T) {
	created := t0
	req := func(node string, at time.Time) v1alpha1.RotationRequest {
		return v1alpha1.RotationRequest{Node: node, RequestedAt: metav1.NewMicroTime(at), RequestedBy: "alice"}
	}
	every := &metav1.Duration{Duration: time.Hour}
	for _, tt := range []struct {
		name string
		kr   *v1alpha1.KeyRotationSpec
		now  time.Time
		want bool
		why  string
	}{
		{"no rotation configured", nil, t0.Add(24 * time.Hour), false, ""},
		{"request for this node after the key", &v1alpha1.KeyRotationSpec{Requests: []v1alpha1.RotationRequest{req("n1", t0.Add(time.Millisecond))}}, t0.Add(time.Second), true, "requested by alice"},
		{"request for every node", &v1alpha1.KeyRotationSpec{Requests: []v1alpha1.RotationRequest{req("*", t0.Add(time.Minute))}}, t0.Add(2 * time.Minute), true, "requested by alice"},
		{"request older than the key", &v1alpha1.KeyRotationSpec{Requests: []v1alpha1.RotationRequest{req("n1", t0.Add(-time.Second))}}, t0.Add(time.Minute), false, ""},
		{"request for another node", &v1alpha1.KeyRotationSpec{Requests: []v1alpha1.RotationRequest{req("n2", t0.Add(time.Second))}}, t0.Add(time.Minute), false, ""},
		{"key younger than every", &v1alpha1.KeyRotationSpec{Every: every}, t0.Add(59 * time.Minute), false, ""},
		{"key as old as every", &v1alpha1.KeyRotationSpec{Every: every}, t0.Add(time.Hour), true, "older than 1h0m0s"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, why := rotationDue("n1", created, tt.kr, tt.now)
			if got != tt.want || !strings.Contains(why, tt.why) {
				t.Errorf("rotationDue = %v %q, want %v %q", got, why, tt.want, tt.why)
			}
		})
	}
}
