package api

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

const goodKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="

func startAPI(t *testing.T) client.Client {
	t.Helper()
	cp := controlplane.StartT(t, controlplane.Options{})
	wd, _ := os.Getwd()
	if err := cp.ApplyCRDs(context.Background(), filepath.Join(wd, "..", "..", "manifests", "crds")); err != nil {
		t.Fatal(err)
	}
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	c, err := client.New(cp.RESTConfig(), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func validNode(name string) *v1alpha1.MeshNode {
	return &v1alpha1.MeshNode{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1alpha1.MeshNodeSpec{
			UnderlayIPs: []v1alpha1.IP{"10.77.0.11", "fd77::11"},
			PodCIDRs:    []v1alpha1.CIDR{"10.244.1.0/24", "fd44:0:0:1::/64"},
			WireGuard:   &v1alpha1.WireGuardSpec{PublicKey: goodKey, ListenPort: 51871},
		},
	}
}

func TestMeshNodeValidation(t *testing.T) {
	c := startAPI(t)
	ctx := context.Background()
	if err := c.Create(ctx, validNode("good")); err != nil {
		t.Fatalf("a valid MeshNode was rejected: %v", err)
	}
	tests := []struct {
		name    string
		mutate  func(*v1alpha1.MeshNode)
		wantMsg string
	}{
		{"key not base64", func(m *v1alpha1.MeshNode) { m.Spec.WireGuard.PublicKey = "not a key" }, "spec.wireguard.publicKey"},
		{"key 31 bytes", func(m *v1alpha1.MeshNode) {
			m.Spec.WireGuard.PublicKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBg=="
		}, "spec.wireguard.publicKey"},
		{"key 33 bytes", func(m *v1alpha1.MeshNode) { m.Spec.WireGuard.PublicKey = goodKey + "AA" }, "spec.wireguard.publicKey"},
		{"key non-canonical padding bits", func(m *v1alpha1.MeshNode) {
			m.Spec.WireGuard.PublicKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmn="
		}, "spec.wireguard.publicKey"},
		{"CIDR garbage", func(m *v1alpha1.MeshNode) { m.Spec.PodCIDRs = []v1alpha1.CIDR{"10.244.1.0"} }, "must be a CIDR"},
		{"CIDR prefix too long", func(m *v1alpha1.MeshNode) { m.Spec.PodCIDRs = []v1alpha1.CIDR{"10.244.1.0/33"} }, "must be a CIDR"},
		{"CIDR host bits", func(m *v1alpha1.MeshNode) { m.Spec.PodCIDRs = []v1alpha1.CIDR{"10.244.1.7/24"} }, "must not have host bits set"},
		{"IPv6 CIDR host bits", func(m *v1alpha1.MeshNode) { m.Spec.PodCIDRs = []v1alpha1.CIDR{"fd44::1/64"} }, "must not have host bits set"},
		{"IP garbage", func(m *v1alpha1.MeshNode) { m.Spec.UnderlayIPs = []v1alpha1.IP{"10.77.0.300"} }, "must be an IPv4 or IPv6 address"},
		{"IP is a CIDR", func(m *v1alpha1.MeshNode) { m.Spec.UnderlayIPs = []v1alpha1.IP{"10.77.0.1/24"} }, "must be an IPv4 or IPv6 address"},
		{"no underlay IP", func(m *v1alpha1.MeshNode) { m.Spec.UnderlayIPs = nil }, "spec.underlayIPs"},
		{"port 0", func(m *v1alpha1.MeshNode) { m.Spec.WireGuard.ListenPort = 0 }, "spec.wireguard.listenPort"},
		{"port 65536", func(m *v1alpha1.MeshNode) { m.Spec.WireGuard.ListenPort = 65536 }, "spec.wireguard.listenPort"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mn := validNode("bad-" + strings.ReplaceAll(strings.ToLower(tt.name), " ", "-"))
			tt.mutate(mn)
			err := c.Create(ctx, mn)
			if err == nil {
				t.Fatalf("the API server accepted %+v", mn.Spec)
			}
			if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Fatalf("error %q: want an Invalid error mentioning %q", err, tt.wantMsg)
			}
		})
	}
	// Updates are validated too: a valid object cannot be broken later.
	var mn v1alpha1.MeshNode
	if err := c.Get(ctx, client.ObjectKey{Name: "good"}, &mn); err != nil {
		t.Fatal(err)
	}
	mn.Spec.PodCIDRs = []v1alpha1.CIDR{"banana"}
	if err := c.Update(ctx, &mn); !apierrors.IsInvalid(err) {
		t.Fatalf("update to an invalid CIDR: err = %v, want Invalid", err)
	}
}

func TestMeshConfigValidation(t *testing.T) {
	c := startAPI(t)
	ctx := context.Background()
	mc := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if err := c.Create(ctx, mc); err != nil {
		t.Fatalf("a MeshConfig named default was rejected: %v", err)
	}
	if mc.Spec.Encryption.Mode != v1alpha1.ModeDisabled {
		t.Errorf("default mode = %q, want Disabled", mc.Spec.Encryption.Mode)
	}
	if o := mc.Spec.Encryption.NodeEncryptionOptOutLabels; o == nil || *o != v1alpha1.DefaultNodeEncryptionOptOut {
		t.Errorf("default nodeEncryptionOptOutLabels = %v, want %q", o, v1alpha1.DefaultNodeEncryptionOptOut)
	}
	mc.Spec.Encryption.Mode = v1alpha1.ModeIPsec
	mc.Spec.Encryption.NodeEncryption = true
	if err := c.Update(ctx, mc); err == nil || !strings.Contains(err.Error(), "nodeEncryption needs mode WireGuard") {
		t.Errorf("nodeEncryption with mode IPsec: err = %v, want the nodeEncryption rule", err)
	}
	mc.Spec.Encryption.Mode = v1alpha1.ModeWireGuard
	none := ""
	mc.Spec.Encryption.NodeEncryptionOptOutLabels = &none
	if err := c.Update(ctx, mc); err != nil {
		t.Fatalf("nodeEncryption with mode WireGuard and no opt-out: %v", err)
	}
	if o := mc.Spec.Encryption.NodeEncryptionOptOutLabels; o == nil || *o != "" {
		t.Errorf("an empty opt-out selector became %v, want it kept empty (no node opts out)", o)
	}
	mc.Spec.Encryption = v1alpha1.EncryptionSpec{Mode: v1alpha1.ModeDisabled}
	if err := c.Update(ctx, mc); err != nil {
		t.Fatal(err)
	}
	other := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: "other"}}
	if err := c.Create(ctx, other); err == nil || !strings.Contains(err.Error(), "named default") {
		t.Errorf("MeshConfig named other: err = %v, want the one-named-default rule", err)
	}
	mc.Spec.Encryption.Strict = true
	if err := c.Update(ctx, mc); err == nil || !strings.Contains(err.Error(), "strict needs an encryption mode") {
		t.Errorf("strict with mode Disabled: err = %v, want the strict rule", err)
	}
	mc.Spec.Encryption.Strict = false
	mc.Spec.Encryption.Mode = "Rot13"
	if err := c.Update(ctx, mc); !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "Unsupported value") {
		t.Errorf("mode Rot13: err = %v, want Invalid with the allowed values", err)
	}
}
