package cluster

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// TestStartFailsCleanly: a Start that fails part-way (here: the binaries are missing) returns
// the error and cleans up, rather than crashing on its own cleanup.
func TestStartFailsCleanly(t *testing.T) {
	_, err := Start(context.Background(), Options{BinDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "meshcrypt-agent") {
		t.Fatalf("Start with an empty bin dir: err = %v, want the missing binary named", err)
	}
}

// TestExternalControlPlane runs two clusters one after the other against one control plane
// they do not own, as the e2e suites do in the VM: the first converges to WireGuard through
// the external API server and leaves its objects behind at Close, the control plane keeps
// running, and the second starts from a clean slate with the same node names.
func TestExternalControlPlane(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a control plane and agents")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces and WireGuard devices")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cp := controlplane.StartT(t, controlplane.Options{})
	if err := ApplyManifests(ctx, cp); err != nil {
		t.Fatal(err)
	}
	kc := filepath.Join(t.TempDir(), "admin.kubeconfig")
	if err := cp.WriteKubeconfig(kc, "", cp.AdminToken()); err != nil {
		t.Fatal(err)
	}
	admin, err := client.New(cp.RESTConfig(), client.Options{Scheme: scheme(t)})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Kubeconfig: kc, Backend: "userspace", IPv4Only: true}

	c1 := StartT(t, opts)
	if !c1.External() || c1.CP != nil {
		t.Fatalf("External() = %t, CP = %v: want an external control plane and none of its own", c1.External(), c1.CP)
	}
	if got, err := c1.Kubeconfig(); err != nil || got != kc {
		t.Errorf("Kubeconfig() = %q, %v; want the external one %q", got, err, kc)
	}
	for _, name := range []string{"n1", "n2"} {
		n, err := c1.AddNode(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c1.AddPod(ctx, n, name+"-p1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := c1.SetMode(ctx, v1alpha1.ModeWireGuard); err != nil {
		t.Fatal(err)
	}
	if _, err := c1.WaitConverged(ctx, v1alpha1.ModeWireGuard, time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, n := range c1.Nodes() {
		dev, err := n.WireGuardDevice()
		if err != nil || len(dev.Peers) != 1 {
			t.Errorf("%s: device %+v, %v; want one peer", n.Name, dev, err)
		}
	}
	pol := &v1alpha1.MeshPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "leftover"}}
	pol.Spec.EndpointSelector.MatchLabels = map[string]string{"app": "x"}
	keys := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: AgentNamespace, Name: "meshcrypt-ipsec-keys"}}
	for _, o := range []client.Object{pol, keys} {
		if err := c1.Client.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	var mns v1alpha1.MeshNodeList
	if err := admin.List(ctx, &mns); err != nil || len(mns.Items) != 2 {
		t.Fatalf("after Close the external control plane holds %d MeshNodes (%v); want it running, with the 2 left behind", len(mns.Items), err)
	}

	c2 := StartT(t, opts)
	for _, l := range []client.ObjectList{&v1alpha1.MeshNodeList{}, &v1alpha1.MeshConfigList{}, &v1alpha1.MeshIdentityList{},
		&v1alpha1.MeshPolicyList{}, &corev1.NodeList{}, &corev1.PodList{}, &corev1.SecretList{}} {
		if err := admin.List(ctx, l); err != nil {
			t.Fatal(err)
		}
		if n := len(mustItems(t, l)); n != 0 {
			t.Errorf("after the second Start: %d %T left, want a clean slate", n, l)
		}
	}
	n1, err := c2.AddNode(ctx, "n1")
	if err != nil {
		t.Fatalf("the second cluster cannot reuse a node name: %v", err)
	}
	if _, err := c2.AddPod(ctx, n1, "n1-p1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		t.Fatal(err)
	}
	// An admin kubeconfig for tools inside a node (RunInNode) reaches the external API server
	// through the node's forwarder, its certificate checked against the admin's server name.
	nkc, err := c2.nodeKubeconfig()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", nkc)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return n1.NS.DialTCP(ctx, addr) }
	inNode, err := client.New(cfg, client.Options{Scheme: scheme(t)})
	if err != nil {
		t.Fatal(err)
	}
	var nodes corev1.NodeList
	if err := inNode.List(ctx, &nodes); err != nil || len(nodes.Items) != 1 {
		t.Errorf("from inside n1 through %s: %d Nodes, %v; want 1", cfg.Host, len(nodes.Items), err)
	}
	t.Run("control-plane faults skip", func(t *testing.T) {
		c2.NeedOwnControlPlane(t, "stops kube-apiserver")
		t.Error("NeedOwnControlPlane did not skip with an external control plane")
	})
}

func scheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return s
}

func mustItems(t *testing.T, l client.ObjectList) []runtime.Object {
	t.Helper()
	items, err := meta.ExtractList(l)
	if err != nil {
		t.Fatal(err)
	}
	return items
}
