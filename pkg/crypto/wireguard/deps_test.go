package wireguard

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDeps guards the package boundary stated in doc.go: no Kubernetes client libraries, no
// eBPF, no other meshcrypt packages but the shared netns helper.
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{".", "./wgtest"},
		Banned:   []string{"k8s.io/", "sigs.k8s.io/", "github.com/cilium/ebpf"},
		Own:      []string{"pkg/crypto/wireguard", "internal/netnsutil"},
	})
}
