package api

import (
	"context"
	"fmt"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// TestPolicyPeerValidation: the real API server accepts entities and ipBlocks (IPv4 and
// IPv6, both directions) and refuses each bad peer with a message that names the field.
func TestPolicyPeerValidation(t *testing.T) {
	c := startAPI(t)
	ctx := context.Background()
	withPeers := func(name string, peers ...v1alpha1.PolicyPeer) *v1alpha1.MeshPolicy {
		return &v1alpha1.MeshPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
			Spec: v1alpha1.MeshPolicySpec{
				Ingress: []v1alpha1.PolicyRule{{Peers: peers}},
				Egress:  []v1alpha1.PolicyRule{{Peers: peers}},
			},
		}
	}
	block := func(cidr string, except ...string) v1alpha1.PolicyPeer {
		return v1alpha1.PolicyPeer{IPBlock: &v1alpha1.IPBlock{CIDR: cidr, Except: except}}
	}
	good := withPeers("good",
		v1alpha1.PolicyPeer{Entities: []v1alpha1.Entity{v1alpha1.EntityHost, v1alpha1.EntityRemoteNode, v1alpha1.EntityWorld, v1alpha1.EntityCluster, v1alpha1.EntityAll}},
		block("10.0.0.0/8", "10.1.0.0/16", "10.2.3.4/32"),
		block("2001:db8::/32", "2001:db8:1::/48"),
		block("192.0.2.7/32"),
		block("0.0.0.0/0", "10.0.0.0/8"),
		v1alpha1.PolicyPeer{PodSelector: &metav1.LabelSelector{}},
	)
	if err := c.Create(ctx, good); err != nil {
		t.Fatalf("valid entity and ipBlock peers were refused: %v", err)
	}
	var got v1alpha1.MeshPolicy
	if err := c.Get(ctx, client.ObjectKeyFromObject(good), &got); err != nil {
		t.Fatal(err)
	}
	if p := got.Spec.Egress[0].Peers[1].IPBlock; p == nil || p.CIDR != "10.0.0.0/8" || len(p.Except) != 2 {
		t.Errorf("the ipBlock did not round-trip: %+v", p)
	}
	tests := []struct {
		name string
		peer v1alpha1.PolicyPeer
		want []string // all in the error
	}{
		{"cidr not a CIDR", block("10.0.0.1"), []string{"ipBlock.cidr", "must be a CIDR"}},
		{"cidr garbage", block("banana/8"), []string{"ipBlock.cidr", "must be a CIDR"}},
		{"cidr prefix too long", block("10.0.0.0/33"), []string{"ipBlock.cidr", "must be a CIDR"}},
		{"cidr host bits", block("10.0.0.1/8"), []string{"ipBlock.cidr", "host bits"}},
		{"except not a CIDR", block("10.0.0.0/8", "10.1.0.0"), []string{"ipBlock.except", "must be CIDRs"}},
		{"except outside the block", block("10.0.0.0/8", "11.0.0.0/16"), []string{"ipBlock.except", "strictly inside ipBlock.cidr"}},
		{"except the block itself", block("10.0.0.0/8", "10.0.0.0/8"), []string{"ipBlock.except", "strictly inside ipBlock.cidr"}},
		{"except larger than the block", block("10.1.0.0/16", "10.0.0.0/8"), []string{"ipBlock.except", "strictly inside ipBlock.cidr"}},
		{"except of the other family", block("2001:db8::/32", "10.0.0.0/8"), []string{"ipBlock.except", "strictly inside ipBlock.cidr"}},
		{"IPv6 except outside", block("2001:db8::/32", "2001:db9::/48"), []string{"ipBlock.except", "strictly inside ipBlock.cidr"}},
		{"unknown entity", v1alpha1.PolicyPeer{Entities: []v1alpha1.Entity{"moon"}}, []string{"entities[0]", "Unsupported value", `"moon"`}},
		{"entity and selector", v1alpha1.PolicyPeer{Entities: []v1alpha1.Entity{v1alpha1.EntityHost}, PodSelector: &metav1.LabelSelector{}}, []string{"peers[0]", "a peer is exactly one of"}},
		{"ipBlock and entity", v1alpha1.PolicyPeer{Entities: []v1alpha1.Entity{v1alpha1.EntityWorld}, IPBlock: &v1alpha1.IPBlock{CIDR: "10.0.0.0/8"}}, []string{"peers[0]", "a peer is exactly one of"}},
		{"ipBlock and namespaceSelector", v1alpha1.PolicyPeer{NamespaceSelector: &metav1.LabelSelector{}, IPBlock: &v1alpha1.IPBlock{CIDR: "10.0.0.0/8"}}, []string{"peers[0]", "a peer is exactly one of"}},
		{"empty peer", v1alpha1.PolicyPeer{}, []string{"peers[0]", "a peer is exactly one of"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := withPeers(fmt.Sprintf("bad-%d", i), tt.peer)
			err := c.Create(ctx, p)
			if err == nil {
				t.Fatalf("the API server accepted %+v", tt.peer)
			}
			if !apierrors.IsInvalid(err) {
				t.Fatalf("error %v: want Invalid", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

// TestMeshConfigHostToLocalPodsDefault: allowHostToLocalPods defaults to true, from a typed
// client (which sends policy: {}) and from YAML that leaves spec.policy out, and can be
// turned off.
func TestMeshConfigHostToLocalPodsDefault(t *testing.T) {
	c := startAPI(t)
	ctx := context.Background()
	mc := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if err := c.Create(ctx, mc); err != nil {
		t.Fatal(err)
	}
	if v := mc.Spec.Policy.AllowHostToLocalPods; v == nil || !*v {
		t.Errorf("allowHostToLocalPods = %v, want the default true", v)
	}
	off := false
	mc.Spec.Policy.AllowHostToLocalPods = &off
	if err := c.Update(ctx, mc); err != nil {
		t.Fatal(err)
	}
	if v := mc.Spec.Policy.AllowHostToLocalPods; v == nil || *v || mc.Spec.Policy.HostToLocalPodsAllowed() {
		t.Errorf("allowHostToLocalPods = %v after turning it off", v)
	}
	// A spec without the policy field at all, as kubectl apply of a YAML sends it.
	if err := c.Delete(ctx, mc); err != nil {
		t.Fatal(err)
	}
	raw := []byte(`{"apiVersion":"meshcrypt.io/v1alpha1","kind":"MeshConfig","metadata":{"name":"default"},"spec":{"encryption":{"mode":"WireGuard"}}}`)
	if err := c.Create(ctx, rawObject(t, raw)); err != nil {
		t.Fatal(err)
	}
	var got v1alpha1.MeshConfig
	if err := c.Get(ctx, client.ObjectKey{Name: "default"}, &got); err != nil {
		t.Fatal(err)
	}
	if v := got.Spec.Policy.AllowHostToLocalPods; v == nil || !*v {
		t.Errorf("allowHostToLocalPods = %v with spec.policy left out, want the default true", v)
	}
}

// rawObject decodes a JSON object as it would come from a YAML file, with nothing the Go
// types would add.
func rawObject(t *testing.T, raw []byte) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(raw); err != nil {
		t.Fatal(err)
	}
	return u
}
