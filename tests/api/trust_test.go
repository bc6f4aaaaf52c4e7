package api

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// TestAgentWritesOnlyItsOwnMeshNode: with the manifests' RBAC and admission policy, an agent
// holding its node-bound ServiceAccount token may write its own MeshNode (spec and status)
// and nothing else of the kind; and its role grants only what the code uses.
func TestAgentWritesOnlyItsOwnMeshNode(t *testing.T) {
	ctx := context.Background()
	cp := controlplane.StartT(t, controlplane.Options{})
	wd, _ := os.Getwd()
	root := filepath.Join(wd, "..", "..")
	if err := cp.ApplyCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"rbac", "admission"} {
		if err := cp.ApplyYAML(ctx, filepath.Join(root, "manifests", d)); err != nil {
			t.Fatal(err)
		}
	}
	admin := kubernetes.NewForConfigOrDie(cp.RESTConfig())
	scheme := runtime.NewScheme()
	_ = v1alpha1.AddToScheme(scheme)
	agents := map[string]client.Client{}
	for _, n := range []string{"n1", "n2"} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		tok, err := cluster.AgentToken(ctx, admin, n)
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.New(cp.RESTConfigFor(tok), client.Options{Scheme: scheme})
		if err != nil {
			t.Fatal(err)
		}
		agents[n] = c
	}

	// Each agent publishes its own MeshNode: allowed, spec and status.
	for n, c := range agents {
		mn := validNode(n)
		if n == "n2" {
			mn.Spec.WireGuard.PublicKey = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
		}
		if err := c.Create(ctx, mn); err != nil {
			t.Fatalf("agent of %s creating its own MeshNode: %v", n, err)
		}
		patch := client.MergeFrom(mn.DeepCopy())
		mn.Status.Mode = v1alpha1.ModeWireGuard
		if err := c.Status().Patch(ctx, mn, patch); err != nil {
			t.Fatalf("agent of %s patching its own status: %v", n, err)
		}
	}

	// n1's agent tries to overwrite n2's key, status, or to create a node that is not its own.
	var n2 v1alpha1.MeshNode
	if err := agents["n1"].Get(ctx, client.ObjectKey{Name: "n2"}, &n2); err != nil {
		t.Fatal(err)
	}
	stolen := n2.DeepCopy()
	stolen.Spec.WireGuard.PublicKey = goodKey
	// RBAC already refuses update (the agent only patches); patch reaches admission.
	if err := agents["n1"].Update(ctx, stolen); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 updating n2: err = %v, want Forbidden", err)
	}
	err := agents["n1"].Patch(ctx, stolen, client.MergeFrom(n2.DeepCopy()))
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "the meshcrypt agent of node n1 may write only its own MeshNode, not n2") {
		t.Fatalf("n1 overwriting n2's key: err = %v, want Forbidden by the admission policy", err)
	}
	st := n2.DeepCopy()
	patch := client.MergeFrom(n2.DeepCopy())
	st.Status.PeersReady = 99
	if err := agents["n1"].Status().Patch(ctx, st, patch); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 patching n2's status: err = %v, want Forbidden", err)
	}
	if err := agents["n1"].Create(ctx, validNode("n3")); !apierrors.IsForbidden(err) {
		t.Fatalf("n1 creating a MeshNode for n3: err = %v, want Forbidden", err)
	}
	var after v1alpha1.MeshNode
	if err := agents["n2"].Get(ctx, client.ObjectKey{Name: "n2"}, &after); err != nil {
		t.Fatal(err)
	}
	if after.Spec.WireGuard.PublicKey != n2.Spec.WireGuard.PublicKey || after.Status.PeersReady == 99 {
		t.Fatalf("n2's MeshNode changed: %+v", after)
	}

	// The role grants what the agent uses, and no more.
	for _, tt := range []struct {
		verb, group, resource, sub, ns string
		want                           bool
	}{
		{"watch", "meshcrypt.io", "meshnodes", "", "", true},
		{"patch", "meshcrypt.io", "meshnodes", "status", "", true},
		{"create", "", "events", "", "default", true},
		{"get", "", "nodes", "", "", true},
		{"delete", "meshcrypt.io", "meshnodes", "", "", false},
		{"update", "meshcrypt.io", "meshconfigs", "", "", false},
		{"update", "", "nodes", "", "", false},
		{"get", "", "secrets", "", "meshcrypt", false},
		{"list", "", "secrets", "", "", false},
		{"get", "", "secrets/meshcrypt-ipsec-keys", "", "meshcrypt", true},
		{"watch", "", "secrets/meshcrypt-ipsec-keys", "", "meshcrypt", true},
		{"get", "", "secrets/meshcrypt-ipsec-keys", "", "default", false},
		{"update", "", "secrets/meshcrypt-ipsec-keys", "", "meshcrypt", false},
		{"get", "", "secrets/other", "", "meshcrypt", false},
		{"patch", "meshcrypt.io", "meshconfigs", "status", "", true},
		{"create", "meshcrypt.io", "meshpolicies", "", "default", false},
	} {
		resource, name, _ := strings.Cut(tt.resource, "/") // "secrets/NAME": one object
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   "system:serviceaccount:meshcrypt:meshcrypt-agent",
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:meshcrypt", "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: tt.verb, Group: tt.group, Resource: resource, Name: name, Subresource: tt.sub, Namespace: tt.ns,
			},
		}}
		res, err := admin.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.Status.Allowed != tt.want {
			t.Errorf("can the agent %s %s.%s/%s? %v, want %v", tt.verb, tt.resource, tt.group, tt.sub, res.Status.Allowed, tt.want)
		}
	}
}
