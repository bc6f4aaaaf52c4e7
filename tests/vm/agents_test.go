package vm_test

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// TestAgentsInVM is the e2e path through the VM: a real kube-apiserver and
// etcd on the host (tests/controlplane, loopback only), and inside the VM two
// netenv nodes whose meshcrypt agents use kernel WireGuard and reach the API
// server at 10.0.2.2 through qemu's user network (the guest side is
// tests/vm/internal/guestagent). The host then reads what the agents in the
// VM published.
func TestAgentsInVM(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM and a control plane")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()

	// The image builds while the control plane starts.
	var (
		img    *vm.Image
		imgErr error
		wg     sync.WaitGroup
	)
	wg.Go(func() {
		img, imgErr = vm.Build(ctx, vm.Options{
			Tests:        []vm.Test{{Package: "tests/vm/internal/guestagent", MustRun: []string{"TestAgentsKernelWireGuard"}}},
			Programs:     []string{"cmd/meshcrypt-agent"},
			HostPrograms: []string{"ip"}, // netenv runs agents with ip netns exec
		})
	})
	cp := controlplane.StartT(t, controlplane.Options{})
	wg.Wait()
	if imgErr != nil {
		t.Fatal(imgErr)
	}
	defer img.Close()

	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.ApplyCRDs(ctx, filepath.Join(root, "manifests", "crds")); err != nil {
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
	mc := &v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.MeshConfigName}}
	mc.Spec.Encryption.Mode = v1alpha1.ModeWireGuard
	if err := c.Create(ctx, mc); err != nil {
		t.Fatal(err)
	}

	// The guest reaches the host's 127.0.0.1:PORT at 10.0.2.2:PORT; the
	// kubeconfig then names localhost for TLS, which the certificate holds.
	u, err := url.Parse(cp.URL())
	if err != nil {
		t.Fatal(err)
	}
	kcPath := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cp.WriteKubeconfig(kcPath, fmt.Sprintf("https://%s:%s", vm.HostAddr, u.Port()), cp.AdminToken()); err != nil {
		t.Fatal(err)
	}
	kc, err := os.ReadFile(kcPath)
	if err != nil {
		t.Fatal(err)
	}
	res, err := vm.Boot(ctx, img, vm.BootOptions{
		Network: true,
		Files:   []vm.File{{Path: "/etc/meshcrypt/kubeconfig", Data: kc, Mode: 0o600}},
		Env: map[string]string{
			"MESHCRYPT_KUBECONFIG": "/etc/meshcrypt/kubeconfig",
			"MESHCRYPT_AGENT":      vm.ProgramDir + "/meshcrypt-agent",
		},
		Progress: t.Output(),
	})
	if err != nil {
		t.Fatal(err)
	}
	res.Report(t)

	// What the agents in the VM published is in the host's etcd.
	var list v1alpha1.MeshNodeList
	if err := c.List(ctx, &list); err != nil {
		t.Fatal(err)
	}
	got := map[string]v1alpha1.WireGuardBackend{}
	for _, mn := range list.Items {
		got[mn.Name] = mn.Status.Backend
	}
	for _, name := range []string{"vm-a", "vm-b"} {
		if got[name] != v1alpha1.BackendKernel {
			t.Errorf("MeshNode %s on the host: backend %q, want kernel (all: %v)", name, got[name], got)
		}
	}
}
